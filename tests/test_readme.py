"""The README's Python examples run, in order, in one namespace: the documentation stays true."""

import re
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("flax")

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 4, "README lost its usage examples"
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)
    assert tuple(namespace["y"].shape) == (8, 64, 32, 32)
    assert tuple(namespace["y_nnx"].shape) == tuple(namespace["y_linen"].shape) == (8, 32, 32, 64)
