"""Scale-out and mixed precision (docs/SCALE_OUT.md): JAX data parallelism with ``jax.sharding`` (4 forced
host devices, and 2 processes x 2 devices through ``jax.distributed``), torch DDP under ``torchrun`` (2 gloo
processes), bfloat16 mixed precision in both backends, and the TPU-readiness properties of the JAX step
(compiles once, no host callbacks, donated buffers, evaluation without recompiles).

Multi-device runs need flags set before JAX starts (``XLA_FLAGS=--xla_force_host_platform_device_count=4``)
or several processes, so they run in subprocesses and compare their per-step losses and final weights with
a single-device / single-process run of the same config. Bounds: the ONE table
`cbam_multi.training.TRAJECTORY_TOLERANCES` (kinds ``sharded:*``, ``ddp:*``, ``bfloat16``,
``bfloat16-vs-float32``; measurements in its comment). Real MNIST (found as the library finds it, e.g. ``$CBAM_MNIST_DIR``)
is required and the tests skip with a reason without it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

from cbam_multi import training
from cbam_multi.training import trajectory_tolerance
from cbam_multi.training.config import ConfigError, TrainConfig
from cbam_multi.training.data import load_mnist, subset
from cbam_multi.weights import load_weights

N_TRAIN, N_TEST = 2000, 1000
SUBPROCESS_TIMEOUT = 300


@pytest.fixture(scope="module")
def mnist_dir() -> Path:
    folder = training.default_mnist_dir()
    if folder is None or not folder.is_dir():
        pytest.skip("full MNIST not found (find_mnist_dir): set CBAM_MNIST_DIR or put the IDX files in ~/.cache/cbam_multi/mnist")
    return folder


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    return subset(load_mnist(mnist_dir, dataset="mnist"), N_TRAIN, N_TEST)


def _env(mnist_dir, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS_ID"))}
    env.update(CBAM_MNIST_DIR=str(mnist_dir), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _losses(out) -> np.ndarray:
    return np.asarray(json.loads((Path(out) / training.METRICS_FILE).read_text())["epochs"][0]["train_losses"])


def _weights_rel(a: dict, b: dict) -> float:
    return max(float(np.abs(a[n].astype(np.float64) - b[n]).max() / max(np.abs(a[n]).max(), 1e-30)) for n in a)


def _check_pair(kind: str, ref_out, other_out) -> dict:
    """Per-step losses and final weights of two runs against the `kind` row of the tolerance table."""
    la, lb = _losses(ref_out), _losses(other_out)
    assert la.shape == lb.shape and la[-1] < la[0], (la, lb)  # same number of steps, and it trained
    tol = trajectory_tolerance(kind, len(la))
    loss_rel = float(np.max(np.abs(la - lb) / np.abs(la)))
    window = max(1, len(la) // 4)
    window_rel = float(abs(la[-window:].mean() / lb[-window:].mean() - 1))
    w_rel = _weights_rel(
        load_weights(Path(ref_out) / training.CHECKPOINT_FILE)[0], load_weights(Path(other_out) / training.CHECKPOINT_FILE)[0]
    )
    assert loss_rel <= tol["loss_rel"], f"{kind}: per-step loss rel diff {loss_rel:.3e} > {tol['loss_rel']:.0e}\n{la}\n{lb}"
    assert window_rel <= tol["window_loss_rel"], f"{kind}: smoothed loss rel diff {window_rel:.3e}"
    assert w_rel <= tol["weights_rel"], f"{kind}: final weights rel diff {w_rel:.3e} > {tol['weights_rel']:.0e}"
    result = {"loss_rel": loss_rel, "window_loss_rel": window_rel, "weights_rel": w_rel}
    print(f"{kind}, {len(la)} steps: " + ", ".join(f"{k} {v:.3g}" for k, v in result.items()))  # pytest -s shows it
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, env, cwd, timeout=SUBPROCESS_TIMEOUT) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


# ------------------------------------------------------------------ config, CLI, helpers (no extra devices)
def test_bfloat16_config_and_cli_flags():
    cfg = TrainConfig(dtype="bfloat16")
    assert cfg.param_dtype == "float32" and cfg.mixed_precision
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    assert TrainConfig(dtype="float64").param_dtype == "float64" and not TrainConfig().mixed_precision
    from cbam_multi.training.cli import build_parser, train_config_from_args

    args = build_parser().parse_args(["train", "--backend", "jax", "--dtype", "bfloat16", "--distributed", "--batch-size", "128"])
    assert args.distributed and train_config_from_args(args).dtype == "bfloat16"
    assert not build_parser().parse_args(["train"]).distributed


def test_data_parallel_slicing_and_divisibility_errors():
    from cbam_multi.jax import sharding
    from cbam_multi.torch import distributed

    assert distributed.rank_rows(64, 0, 2) == slice(0, 32) and distributed.rank_rows(64, 1, 2) == slice(32, 64)
    with pytest.raises(ConfigError, match="not divisible by the 2 data-parallel processes"):
        distributed.rank_rows(33, 0, 2)
    mesh = sharding.data_mesh(jax.devices()[:1])
    assert sharding.process_rows(64, mesh) == slice(0, 64)  # one process feeds the whole batch
    x = np.arange(6 * 2, dtype=np.float32).reshape(6, 2)
    assert np.array_equal(np.asarray(sharding.shard_batch(x, mesh)), x)
    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.rank() == 0


def test_only_the_main_process_writes(mnist, tmp_path):
    """`fit` on a non-main rank trains and evaluates but writes nothing (rank 0 writes, atomically)."""
    from cbam_multi.torch.train import TorchTrainer

    class Rank1(TorchTrainer):
        def __init__(self, config):
            super().__init__(config)
            self.is_main = False

    cfg = TrainConfig(epochs=1, batch_size=32, n_test=100, eval_batch_size=100, out=str(tmp_path / "run"), progress=False)
    metrics = training.fit(cfg, Rank1, data=subset(mnist, 64, 100))
    assert metrics["final"]["step"] == 2 and not (tmp_path / "run").exists()


# ------------------------------------------------------------------ TPU readiness of the JAX step (1 device)
def _primitives(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _primitives(inner)


def _batch(mnist, n, start=0):
    from cbam_multi.training.data import normalize

    return normalize(mnist.train_images[start : start + n], np.float32), mnist.train_labels[start : start + n]


def test_jax_step_compiles_once_has_no_host_callbacks_and_donates(mnist):
    from cbam_multi.jax.train import JaxTrainer

    cfg = TrainConfig(backend="jax", batch_size=24, eval_batch_size=300, progress=False)  # a batch size no other test uses
    tr = JaxTrainer(cfg)
    compiles: list[str] = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(kwargs.get("fun_name", "?"))

    x, y = _batch(mnist, 24 * 6)
    tr.warmup(x[:24], y[:24])  # compiles the step and the eval function
    step_cache = tr._step._cache_size()
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        old_leaf = jax.tree.leaves(tr.params)[0]
        handles = [tr.train_step(x[i * 24 : (i + 1) * 24], y[i * 24 : (i + 1) * 24], 1e-3) for i in range(6)]
        assert old_leaf.is_deleted(), "the parameter buffers were not donated to the step"
        losses = tr.losses(handles)
        # evaluation: 1000 examples in batches of 300, a ragged tail of 100 padded to the compiled 300
        ev = training.evaluate_arrays(tr.predict, *(_batch(mnist, 1000)), 300)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert np.all(np.isfinite(losses)) and ev["n"] == 1000
    assert compiles == [], f"compiled again after warmup: {compiles}"
    assert tr._step._cache_size() == step_cache

    args = (tr.params, tr.rest, tr.opt_state, *tr._inputs(x[:24], y[:24]), tr._lr(1e-3))
    eqns = list(_primitives(tr._step.trace(*args).jaxpr.jaxpr))  # (make_jaxpr would nest a jit with compiler options)
    names = {e.primitive.name for e in eqns}
    assert "conv_general_dilated" in names  # the walk reached the step's body
    assert not {n for n in names if "callback" in n}, f"host callbacks in the train step: {names}"
    hlo = tr._step.lower(*args).as_text().lower()
    assert "callback" not in hlo and "host_compute" not in hlo


# ------------------------------------------------------------------ bfloat16 mixed precision mechanics
def test_bfloat16_jax_computes_in_bf16_with_float32_master_state(mnist):
    import jax.numpy as jnp

    from cbam_multi.jax.train import JaxTrainer

    tr = JaxTrainer(TrainConfig(backend="jax", dtype="bfloat16", batch_size=16, progress=False))
    state = (tr.params, tr.rest, tr.opt_state)
    assert {leaf.dtype for leaf in jax.tree.leaves(state) if jnp.issubdtype(leaf.dtype, jnp.floating)} == {jnp.dtype("float32")}
    x, y = _batch(mnist, 16)
    args = (*state, *tr._inputs(x, y), tr._lr(1e-3))
    closed = tr._step.trace(*args).jaxpr
    convs = [e for e in _primitives(closed.jaxpr) if e.primitive.name == "conv_general_dilated"]
    assert convs and all(v.aval.dtype == jnp.bfloat16 for e in convs for v in e.invars), "convolutions not in bf16"
    assert all(a.dtype == jnp.float32 for a in closed.out_avals if jnp.issubdtype(a.dtype, jnp.floating)), (
        "params, optimizer state and loss leave the step in float32"
    )


def test_bfloat16_torch_autocast_with_float32_master_state(mnist):
    from cbam_multi.torch.train import TorchTrainer

    tr = TorchTrainer(TrainConfig(dtype="bfloat16", batch_size=16, progress=False))
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen[name] = output.dtype  # (returns None: the output is left alone)

        return hook

    hooks = [
        tr.net.block0.conv0.register_forward_hook(record("conv")),
        tr.net.block0.cbam.register_forward_hook(record("cbam")),
        tr.net.head.fc2.register_forward_hook(record("logits")),
    ]
    x, y = _batch(mnist, 16)
    loss = tr.losses([tr.train_step(x, y, 1e-3)])
    for h in hooks:
        h.remove()
    assert seen == {"conv": torch.bfloat16, "cbam": torch.bfloat16, "logits": torch.bfloat16}
    assert np.isfinite(loss).all()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in tr.net.parameters())
    assert {v.dtype for s in tr.optimizer.state.values() for v in s.values() if v.is_floating_point() and v.dim()} == {torch.float32}
    assert tr.predict(x).dtype == np.float32


BF16_STEPS = 30
# Three reports from four 30-step runs (torch bf16 on CPU is the slowest thing in the suite): the bf16 run of
# each backend serves both its float32 comparison and the torch-vs-JAX one (`trajectory_parity`'s cache), so
# each run trains once; torch-vs-jax goes first so that its output folder holds both bf16 checkpoints.
BF16_RUNS = {
    "torch-vs-jax": {},
    "torch": {"runs": [("torch", "float32"), ("torch", "bfloat16")], "tolerance": "bfloat16-vs-float32"},
    "jax": {"runs": [("jax", "float32"), ("jax", "bfloat16")], "tolerance": "bfloat16-vs-float32"},
}


@pytest.mark.slow
def test_bfloat16_trajectories(mnist, tmp_path_factory):
    # one test, not one per report: under pytest-xdist a fixture shared by parametrized tests is rebuilt on
    # every worker that runs one of them, which would retrain the runs the cache exists to share
    cache: dict = {}
    for which, kw in BF16_RUNS.items():
        r = training.trajectory_parity(
            BF16_STEPS, "bfloat16", batch_size=64, n_test=N_TEST, data=mnist, out_root=tmp_path_factory.mktemp(f"bf16-{which}"),
            cache=cache, **kw,
        )
        kind = r["tolerance_row"]
        first = trajectory_tolerance(kind, 1)["loss_rel"]
        assert r["loss_rel"][0] <= first, f"{which}: first-step (forward only) loss rel diff {r['loss_rel'][0]:.3e} > {first:.0e}"
        text = training.format_trajectory(r)
        assert r["ok"], f"{which}:\n{text}"
        assert all(r["accuracy"][k] > 0.7 for k in r["accuracy"]), f"{which}:\n{text}"
        if which == "torch-vs-jax":
            _bfloat16_checkpoints_are_float32(r)
    assert len(cache) == 4, sorted(cache)  # torch/jax x float32/bfloat16, each trained once


def _bfloat16_checkpoints_are_float32(report):
    out = Path(report["out"])
    for backend in ("torch", "jax"):
        weights, _ = load_weights(out / backend / training.CHECKPOINT_FILE)
        state = training.ResumeState.load(out / backend / training.TRAIN_STATE_FILE)
        assert {w.dtype for w in weights.values()} == {np.dtype("float32")}, backend
        assert {a.dtype for slot in state.opt.values() for a in slot.values()} == {np.dtype("float32")}, backend
        assert state.config.dtype == "bfloat16"


# ------------------------------------------------------------------ JAX: 4 devices (jax.sharding) vs 1
# Each (preset, dtype) pair compiles the step twice (1 and 4 devices): the fewest pairs that cover both
# dtypes and both CBAM presets (the float64 path is the same code for either preset). 10 steps of 32
# (n_train 320, as in the multi-process test) give 10 per-step comparisons against the <= 20-step bounds.
# one pair: the official preset (a BatchNorm inside CBAM, its statistics over the sharded batch) in float64,
# where the 1- and 4-device numbers must agree to rounding; the sharding code does not depend on the dtype
SHARDED_RUNS = (("official", "float64"),)
SHARDED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    SHARDED_RUNS = %r
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", "highest")
    import numpy as np
    from cbam_multi.training.config import ConfigError, TrainConfig
    from cbam_multi.training.data import load_mnist, normalize, subset
    from cbam_multi.models import MNISTNetSpec
    from cbam_multi.jax.train import JaxTrainer
    from cbam_multi.training import fit

    root = sys.argv[1]
    assert jax.device_count() == 4, jax.devices()
    data = subset(load_mnist(None, dataset="mnist"), 320, 200)
    report = {"runs": {}}
    try:
        JaxTrainer(TrainConfig(backend="jax", batch_size=30))
        report["divisibility_error"] = None
    except ConfigError as e:
        report["divisibility_error"] = str(e)
    trainers = []
    for preset, dtype in SHARDED_RUNS:
        for n in (1, 4):
            out = f"{root}/{preset}-{dtype}-{n}"
            cfg = TrainConfig(backend="jax", model=MNISTNetSpec(cbam_preset=preset), epochs=1, batch_size=32, n_train=320,
                              n_test=200, eval_batch_size=100, dtype=dtype, out=out, progress=False)
            m = fit(cfg, lambda c: trainers.append(JaxTrainer(c, devices=jax.devices()[:n])) or trainers[-1], data=data)
            report["runs"][f"{preset}-{dtype}-{n}"] = {"out": out, "parallel": m["parallel"], "test_loss": m["final"]["test_loss"]}
    # the sharded step compiles once: after the last 4-device run's epoch (its step compiled), six steps with
    # fresh batches add no compilation
    tr = trainers[-1]
    x, y = normalize(data.train_images[:192], np.float32), data.train_labels[:192]
    tr.warmup(x[:32], y[:32])
    sizes = [tr._step._cache_size()]
    handles = []
    for i in range(6):
        handles.append(tr.train_step(x[32 * i : 32 * (i + 1)], y[32 * i : 32 * (i + 1)], 1e-3))
        sizes.append(tr._step._cache_size())
    tr.losses(handles)
    report["cache_sizes"] = sizes
    report["param_sharding"] = str(jax.tree.leaves(tr.params)[0].sharding)
    print("REPORT " + json.dumps(report))
    """
) % (SHARDED_RUNS,)


@pytest.mark.slow
def test_jax_sharded_four_devices_match_one(mnist_dir, tmp_path):
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED_SCRIPT)
    env = _env(mnist_dir, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = _run([sys.executable, str(script), str(tmp_path)], env, cwd=tmp_path)
    report = json.loads(proc.stdout.split("REPORT ", 1)[1])
    assert report["divisibility_error"] and "not divisible by the 4 devices" in report["divisibility_error"]
    assert report["cache_sizes"] == [report["cache_sizes"][0]] * 7 and report["cache_sizes"][0] >= 1
    assert "PartitionSpec()" in report["param_sharding"] or "P()" in report["param_sharding"]
    for preset, dtype in SHARDED_RUNS:
        one, four = (report["runs"][f"{preset}-{dtype}-{n}"] for n in (1, 4))
        assert one["parallel"]["devices"] == 1 and four["parallel"]["devices"] == 4
        _check_pair(f"sharded:{dtype}", one["out"], four["out"])


# ------------------------------------------------------------------ JAX: 2 processes x 2 devices (jax.distributed)
def _train_flags(dtype, n_train=320, batch=32):
    return ["--dataset", "mnist", "--epochs", "1", "--batch-size", str(batch), "--n-train", str(n_train), "--n-test", "100",
            "--eval-batch-size", "100", "--dtype", dtype, "--no-progress"]


@pytest.mark.slow
def test_jax_multi_process_matches_single_device(mnist_dir, mnist, tmp_path):
    """Two JAX processes (2 CPU devices each) joined by ``jax.distributed`` through the CLI's environment
    variables; each feeds its half of every global batch. Same losses as one device, float64."""
    port = _free_port()
    out = tmp_path / "multi"
    procs = []
    for pid in range(2):
        env = _env(mnist_dir, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        cmd = [sys.executable, "-m", "cbam_multi.training.cli", "train", "--backend", "jax", *_train_flags("float64"), "--out", str(out)]
        procs.append(subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=SUBPROCESS_TIMEOUT) for p in procs]
    for p, (so, se) in zip(procs, outputs):
        assert p.returncode == 0, f"{so[-2000:]}\n{se[-4000:]}"
    assert "data mesh of 4 over 2 process(es)" in outputs[0][0] and "metrics:" not in outputs[1][0]  # process 1 prints no table
    metrics = json.loads((out / training.METRICS_FILE).read_text())
    assert metrics["parallel"]["processes"] == 2 and metrics["parallel"]["devices"] == 4
    ref = TrainConfig(backend="jax", epochs=1, batch_size=32, n_train=320, n_test=100, eval_batch_size=100, dtype="float64",
                      out=str(tmp_path / "single"), progress=False)
    training.train_and_evaluate(ref, data=load_mnist(mnist_dir, dataset="mnist"))
    _check_pair("sharded:float64", tmp_path / "single", out)


# ------------------------------------------------------------------ torch: torchrun, 2 DDP processes vs 1
def _torchrun() -> list[str]:
    exe = shutil.which("torchrun")
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float64"])  # float64: agreement to rounding; DDP's code is the same for float32
def test_torch_ddp_matches_single_process(mnist_dir, tmp_path, dtype):
    out = tmp_path / "ddp"
    cmd = [*_torchrun(), "--standalone", "--nproc_per_node", "2", "-m", "cbam_multi.training.cli", "train", "--backend", "torch",
           "--distributed", *_train_flags(dtype), "--out", str(out)]
    proc = _run(cmd, _env(mnist_dir), cwd=tmp_path)
    assert proc.stdout.count("metrics:") == 1  # rank 0 prints, rank 1 does not
    metrics = json.loads((out / training.METRICS_FILE).read_text())
    assert metrics["parallel"] == {"engine": "torch.distributed DDP", "processes": 2, "devices": 2, "backend": "gloo"}
    assert sorted(p.name for p in out.iterdir()) == sorted([training.CHECKPOINT_FILE, training.TRAIN_STATE_FILE, training.METRICS_FILE])
    # the single-process reference, in a subprocess too (one thread, like each rank)
    single = tmp_path / "single"
    cmd = [sys.executable, "-m", "cbam_multi.training.cli", "train", "--backend", "torch", *_train_flags(dtype), "--out", str(single)]
    _run(cmd, _env(mnist_dir), cwd=tmp_path)
    _check_pair(f"ddp:{dtype}", single, out)
