"""A core-only install: importing a backend or plotting without its framework raises an ImportError that
names the extra to install. Each case runs in a fresh interpreter where the module is made unimportable
(``sys.modules[name] = None``, which is what an absent package looks like to ``import``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cbam_multi import _optional
from cbam_multi._optional import MissingDependencyError, require

ROOT = Path(__file__).resolve().parents[1]


def run_without(blocked: tuple[str, ...], code: str) -> subprocess.CompletedProcess:
    prelude = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in blocked)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


@pytest.mark.parametrize(
    ("blocked", "code", "extra"),
    [
        (("torch",), "import cbam_multi.torch", "torch"),
        (("jax",), "import cbam_multi.jax", "jax"),
        (("flax",), "import cbam_multi.jax", "jax"),
        (("optax",), "from cbam_multi.training.backends import backend_module; backend_module('jax')", "jax"),
        (("torch",), "from cbam_multi.training.backends import backend_module; backend_module('torch')", "torch"),
        (("matplotlib",), "from cbam_multi.training import plots; plots._pyplot()", "plot"),
        (("torch",), "from cbam_multi import parity; parity.run_torch_inference(None, None, None, 'float32')", "torch"),
    ],
    ids=["torch", "jax", "flax", "optax-jax-trainer", "torch-trainer", "matplotlib", "parity-runner"],
)
def test_missing_framework_names_the_extra(blocked, code, extra):
    proc = run_without(blocked, code)
    assert proc.returncode != 0, "the import should have failed"
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("cbam_multi._optional.MissingDependencyError:"), proc.stderr[-2000:]
    assert f"pip install 'cbam-multi[{extra}]'" in last, last


def test_core_imports_without_any_framework():
    code = "import cbam_multi, cbam_multi.parity, cbam_multi.training.plots; print(cbam_multi.CBAMSpec.paper(64).hidden)"
    proc = run_without(("torch", "jax", "flax", "optax", "matplotlib", "mlxtend"), code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "4"


def test_error_is_an_import_error_naming_module_and_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cbam_probe_missing", None)  # absent, as far as `import` can tell
    monkeypatch.setitem(_optional.EXTRAS, "cbam_probe_missing", ("the probe", "plot"))
    with pytest.raises(ImportError, match=r"the probe is not installed: pip install 'cbam-multi\[plot\]'") as info:
        require("cbam_probe_missing", "a test")  # callers' `except ImportError` still works
    assert isinstance(info.value, MissingDependencyError) and info.value.name == "cbam_probe_missing"
    assert str(info.value).startswith("a test needs the probe")
    with pytest.raises(MissingDependencyError, match="pip install cbam_no_such_module_xyz"):
        require("cbam_no_such_module_xyz")  # unregistered: named, without an extra


def test_a_broken_dependency_inside_a_package_is_not_masked():
    # The package exists but one of *its* imports is missing: the original error, not an install hint.
    with pytest.raises(ModuleNotFoundError) as info:
        require("json.no_such_submodule")
    assert not isinstance(info.value, MissingDependencyError)
