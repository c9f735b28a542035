"""The README's ResNet-CBAM recipes (its ```py blocks) run, in order, in one namespace, in a folder holding the
files they read: an official-format training checkpoint (written here with the official ResNet structure from
benchmarks/anchors_resnet.py) and a plain torchvision-layout ResNet state_dict."""

import re
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("flax")

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.mark.slow
def test_readme_resnet_recipes_run(tmp_path, monkeypatch):
    from benchmarks.anchors_resnet import official_resnet

    blocks = re.findall(r"```py\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2, "README lost its ResNet-CBAM recipes"
    # Stand-ins for the downloaded files, in their real formats (an ImageNet-type ResNet-18 keeps the test quick).
    official = official_resnet("ImageNet", 18, 1000, "CBAM").eval()
    checkpoint = {"epoch": 90, "arch": "resnet", "state_dict": torch.nn.DataParallel(official).state_dict(),
                  "best_prec1": 77.622, "optimizer": {"state": {}, "param_groups": []}}
    torch.save(checkpoint, tmp_path / "RESNET50_CBAM_new_name_wrap.pth")
    torch.save(official_resnet("ImageNet", 18, 1000, None).state_dict(), tmp_path / "resnet50.pth")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md py block {i}", "exec"), namespace)
    x = torch.from_numpy(np.asarray(namespace["x"]).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        expected = official(x).numpy()
    assert np.abs(np.asarray(namespace["logits"]) - expected).max() < 1e-4  # JAX logits = the official network's
    assert namespace["initialised"] and all(".cbam." in n for n in namespace["initialised"])
