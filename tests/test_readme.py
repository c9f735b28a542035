"""README stays true: its Python examples run in one namespace, and every shell command in its ```bash
blocks (plus the `cbam-multi ...` commands its prose quotes with a `runs/...` path) is listed in COMMANDS below with
how this test treats it. A command README gains or loses without an entry here fails the test.

RUN commands run in README order in one scratch folder (so `runs/...` paths written by one are read by the
next), as written plus the listed small-size flags: argparse lets a later flag override an earlier one,
so e.g. `--epochs 2` appended to a command is what a user would type to shorten it. The first runs
through the installed `cbam-multi` entry point; the rest in one interpreter, through `cbam_multi.training.cli.main`,
the function that entry point calls. PARSE commands are checked by the real argument parser only (the
reason says where they run for real); SKIP ones are not `cbam-multi` commands (installs, the suite itself).
Every `runs/...` path any README command names must exist after the RUN commands.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("flax")

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

RUN, PARSE, SKIP = "run", "parse", "skip"
SMALL = ["--n-train", "192", "--n-test", "100", "--no-progress"]  # 3 steps of 64 images, 100 test images
FULL_MNIST = "needs full MNIST"

# README command -> (mode, extra argv for RUN | reason for PARSE/SKIP[, FULL_MNIST])
COMMANDS: dict[str, tuple] = {
    # Quickstart and Install
    'pip install -c constraints.txt -e ".[all]"': (SKIP, "installs; tests/test_install.py checks the constraints files"),
    'pip install -c constraints.txt -e ".[dev]"': (SKIP, "installs; tests/test_install.py checks the constraints files"),
    'pip install -c constraints.txt -e ".[jax]"': (SKIP, "installs; tests/test_optional_deps.py checks a one-framework install"),
    'pip install -c constraints-gpu.txt -e ".[all]" "jax[cuda12]"': (
        SKIP, "needs a CUDA machine; constraints checked by tests/test_install.py"),
    'pip install -c constraints.txt -e ".[all]" "jax[tpu]"': (SKIP, "needs a TPU VM; constraints checked by tests/test_install.py"),
    "ruff check .": (SKIP, "lint; CI runs it"),
    "python -m pytest -q -n auto": (SKIP, "the suite this test is part of"),
    "cbam-multi train --backend jax --epochs 1": (RUN, SMALL),
    # Numerical parity
    "cbam-multi parity": (RUN, ["--preset", "paper", "--dtype", "float32"]),
    "cbam-multi parity --preset official --dtype float64 --compile": (
        PARSE, "torch.compile of every official case takes minutes on 2 cores; parity_tests/ compile the compile cases"),
    # MNIST
    "cbam-multi train --backend torch": (RUN, ["--epochs", "1", *SMALL]),
    "cbam-multi train --backend jax --no-cbam": (RUN, ["--epochs", "1", *SMALL]),
    "cbam-multi train --backend jax --resume": (RUN, ["--epochs", "2", *SMALL]),  # the Quickstart's run, one epoch more
    "cbam-multi train --backend jax --init-from runs/mnist-torch --out runs/mnist-jax-from-torch": (RUN, ["--epochs", "1", *SMALL]),
    "cbam-multi evaluate --backend jax --checkpoint runs/mnist-torch": (RUN, ["--n-test", "100"]),
    "cbam-multi evaluate --backend torch --checkpoint runs/mnist-jax": (RUN, ["--n-test", "100"]),
    "cbam-multi plot runs/mnist-torch runs/mnist-jax": (RUN, ["--n-images", "2", "--out", "runs/plots"]),
    "cbam-multi parity --train --steps 200": (RUN, ["--steps", "3", "--dtype", "float64", "--n-test", "100"], FULL_MNIST),
    "cbam-multi train --backend jax --tensorboard --out runs/mnist-jax-tb": (RUN, ["--epochs", "1", *SMALL]),
    "tensorboard --logdir runs": (SKIP, "serves a web UI; tests/test_tensorboard.py reads the events back"),
    # ResNet-CBAM
    "cbam-multi train --backend torch --model resnet18 --width 16": (
        RUN, ["--epochs", "1", "--n-train", "32", "--n-test", "32", "--batch-size", "16", "--no-progress"]),
    "cbam-multi evaluate --checkpoint runs/resnet18-torch": (RUN, ["--n-test", "32"]),
    # Scale-out
    "XLA_FLAGS=--xla_force_host_platform_device_count=4 cbam-multi train --backend jax": (
        PARSE, "tests/test_scale_out.py runs the CLI on 4 forced host devices"),
    "torchrun --standalone --nproc_per_node 2 -m cbam_multi.training.cli train --backend torch --distributed": (
        PARSE, "tests/test_scale_out.py runs the CLI under torchrun with 2 processes"),
}

PLACEHOLDER = re.compile(r"[{}<>\[\]]|\bs\b")  # prose templates like `--backend {torch,jax} [--no-cbam]`


def readme_commands() -> list[str]:
    """Shell commands in README order: ```bash lines (comments dropped, `&&` chains split), then the
    `cbam-multi ...` commands quoted inline in the prose that name a run folder (other inline mentions,
    like `cbam-multi train`, name a command rather than spell one out)."""
    text = README.read_text()
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = re.sub(r"(^|\s+)#.*$", "", line).strip()
            commands += [part.strip() for part in line.split("&&") if part.strip()]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`(cbam-multi[^`]*)`", prose):
        span = " ".join(span.split())
        if "runs/" in span and not PLACEHOLDER.search(span):
            commands.append(span)
    return list(dict.fromkeys(commands))  # first appearance wins the order


def cli_argv(command: str) -> list[str]:
    """The `cbam-multi` arguments of a command, past env assignments and launchers."""
    words = shlex.split(command)
    while words and re.match(r"^[A-Z_]+=", words[0]):
        words = words[1:]
    if words[0] == "cbam-multi":
        return words[1:]
    if words[0] == "torchrun":
        return words[words.index("cbam_multi.training.cli") + 1 :]
    raise AssertionError(f"not a cbam-multi command: {command}")


def test_every_readme_command_is_listed_and_vice_versa():
    found = readme_commands()
    missing = [c for c in found if c not in COMMANDS]
    stale = [c for c in COMMANDS if c not in found]
    assert not missing, f"README commands with no entry in COMMANDS (say how to test them): {missing}"
    assert not stale, f"COMMANDS entries README no longer has: {stale}"


def test_readme_parse_only_commands_parse():
    from cbam_multi.training.cli import build_parser

    for command, (mode, *_) in COMMANDS.items():
        if mode != PARSE:
            continue
        build_parser().parse_args(cli_argv(command))  # argparse exits (a test error) on an unknown flag or choice


DRIVER = """
import json, sys
from cbam_multi.training.cli import main
for argv in json.loads(sys.argv[1]):
    print("$ cbam-multi " + " ".join(argv), flush=True)
    rc = main(argv)
    if rc:
        sys.exit(f"exit status {rc}: cbam-multi {' '.join(argv)}")
"""


def _full_mnist_available() -> bool:
    from cbam_multi.training import default_mnist_dir

    return default_mnist_dir() is not None


def _seed_kernel_cache(cache: Path) -> None:
    """The JAX kernel library this machine has built (tests/test_jax_cpu_kernel.py tests the build) copied into
    the fresh cache the commands run with: they would spend ~8 s compiling it again."""
    from cbam_multi.fastpath import kernel_arch
    from cbam_multi.jax import cpu_kernel

    if cpu_kernel.available():
        lib = cpu_kernel._library_path(kernel_arch())
        (cache / "kernels").mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib, cache / "kernels" / lib.name)


@pytest.mark.slow
def test_readme_shell_commands_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "CBAM_MULTI_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    _seed_kernel_cache(tmp_path / "cache")
    full = _full_mnist_available()
    runs = [(c, spec) for c in readme_commands() for spec in [COMMANDS[c]] if spec[0] == RUN]
    runs = [(c, spec) for c, spec in runs if full or FULL_MNIST not in spec]
    argvs = [cli_argv(c) + list(spec[1]) for c, spec in runs]
    # The first through the console script, as a user runs it; the rest in one interpreter.
    exe = shutil.which("cbam-multi")
    first = [exe] if exe else [sys.executable, "-m", "cbam_multi.training.cli"]
    proc = subprocess.run([*first, *argvs[0]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{runs[0][0]}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argvs[1:])], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert proc.stdout.count("$ cbam-multi ") == len(argvs) - 1
    # Every runs/... path any README command names exists now.
    for command in COMMANDS:
        for word in shlex.split(command):
            if word.startswith("runs/"):
                assert (tmp_path / word).exists(), f"README names {word} (in `{command}`), which no README command writes"
    assert (tmp_path / "runs/plots/curves.png").is_file() and (tmp_path / "runs/plots/attention.png").is_file()
    assert any((tmp_path / "runs/mnist-jax-tb/tensorboard").glob("events.out.tfevents.*"))
    jax_run = json.loads((tmp_path / "runs/mnist-jax/metrics.json").read_text())
    assert [e["epoch"] for e in jax_run["epochs"]] == [1, 2], "--resume continued the Quickstart run by one epoch"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 4, "README lost its usage examples"
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)
    assert tuple(namespace["y"].shape) == (8, 64, 32, 32)
    assert tuple(namespace["y_nnx"].shape) == tuple(namespace["y_linen"].shape) == (8, 32, 32, 64)
