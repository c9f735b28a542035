"""Numerics settings shared by tests/ and parity_tests/: float64 available in JAX, no reduced-precision
matmuls anywhere (TF32 off in torch, 'highest' matmul precision in JAX)."""

import os

import pytest

os.environ.setdefault("XLA_FLAGS", "")  # leave room for callers' flags (e.g. forced host device counts)

# One JAX compilation cache per test run, shared by the xdist workers and the subprocesses tests start (they
# inherit the environment): many tests compile the same MNIST/CBAM programs in fresh processes (the README
# commands, CLI runs, resumes). Made here, in the first process, before JAX is imported; empty at the start of
# every run, so no result depends on an earlier run; removed at exit. A caller's own cache dir is respected.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _jax_cache = tempfile.mkdtemp(prefix="cbam_multi_jax_cache_")
    atexit.register(shutil.rmtree, _jax_cache, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_jax_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

try:
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", "highest")
except ImportError:  # the torch-only install still runs the framework-free and torch tests
    pass

# Under pytest-xdist every worker is a process of its own: one torch (OpenMP) thread each, and one in the
# subprocesses tests start (OMP_NUM_THREADS, which they inherit), or N workers x N threads oversubscribe the
# cores and the threads spin in OpenMP barriers, burning CPU the other worker needs. A caller's own
# OMP_NUM_THREADS is respected. CLI_TORCH_THREADS: the count a plain process uses (the `cli_torch_threads`
# fixture), read before the limit.
_ONE_THREAD = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1 and "OMP_NUM_THREADS" not in os.environ
CLI_TORCH_THREADS = None
try:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    CLI_TORCH_THREADS = torch.get_num_threads()
    if _ONE_THREAD:
        torch.set_num_threads(1)
except ImportError:
    pass
if _ONE_THREAD:
    os.environ["OMP_NUM_THREADS"] = "1"

try:  # property tests (tests/test_properties.py): fixed examples in CI, a longer random run on request
    from hypothesis import settings

    # 60 fixed examples: the suite's 6-minute budget on 2 cores (100 took 17 s of a worker's time)
    settings.register_profile("ci", max_examples=60, derandomize=True, deadline=None, database=None)
    settings.register_profile("long", max_examples=2000, deadline=None, print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:
    pass


def pytest_report_header(config):
    """Where the parity suites' numbers come from (torch device via CBAM_MULTI_TORCH_DEVICE; JAX's backend)."""
    try:
        from cbam_multi.parity import devices

        return f"parity devices: {devices()}"
    except Exception as exc:  # a header must never stop the run: a torch-only install, a bad device name
        return f"parity devices: unknown ({exc})"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` first (a stable sort): pytest-xdist hands tests out in this order, so the long
    runs start early and the short tests fill in around them, instead of a long test running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def cli_torch_threads() -> int | None:
    """torch's thread count in a plain process (None without torch): what `cbam-multi parity` runs with."""
    return CLI_TORCH_THREADS


@pytest.fixture(scope="session")
def on_four_devices():
    """Runs a Python script in a fresh process with four forced host devices (XLA reads the flag at start-up) and
    returns the JSON object its last stdout line prints; a failing script fails the test with its stderr's tail."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent)
    env = {**os.environ, "PYTHONPATH": root, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}

    def run(script: str, timeout: float = 300) -> dict:
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    return run
