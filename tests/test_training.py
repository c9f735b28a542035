"""Training in both backends: config, schedule, optimizer formulas, cross-framework evaluation, trajectory
parity (float64 and float32), bit-identical resume (also across frameworks) and init-from.

Real-MNIST tests use the library's own search (``find_mnist_dir``: ``$CBAM_MNIST_DIR``, the cache, ...) with a
2,000 / 1,000 subset, and skip with a reason when it is absent. Tolerances: ONE table,
`cbam_multi.training.TRAJECTORY_TOLERANCES` (measurements in its comment). Budget: the whole file runs in well under 3 minutes on 2 cores.
"""

import itertools
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

from cbam_multi import CheckpointError, training
from cbam_multi.models import MNISTNetSpec
from cbam_multi.training import lr_at, trajectory_tolerance
from cbam_multi.training.config import ConfigError, TrainConfig
from cbam_multi.training.data import load_mnist, subset

N_TRAIN, N_TEST = 2000, 1000
STEPS, BATCH = 30, 64  # CI trajectory length; `cbam-multi parity --train --steps 200` runs the full one
# float64 agrees to ~1e-13 at any length (its tolerance row holds to 200 steps), so 15 steps show the same
# agreement at half the cost; float32's rows depend on the horizon, so it keeps STEPS
F64_STEPS = 15


@pytest.fixture(scope="module")
def mnist():
    folder = training.default_mnist_dir()
    if folder is None or not folder.is_dir():
        pytest.skip("full MNIST not found (find_mnist_dir): set CBAM_MNIST_DIR or put the IDX files in ~/.cache/cbam_multi/mnist")
    return subset(load_mnist(folder, dataset="mnist"), N_TRAIN, N_TEST)


def _tiny(mnist, n_train=256, n_test=200):
    return subset(mnist, n_train, n_test)


# ------------------------------------------------------------------ config and schedule (framework-free)
def test_config_json_round_trip_and_validation():
    cfg = TrainConfig(
        backend="jax", model=MNISTNetSpec(conv_channels=(16, 32), cbam=False), optimizer="sgd", nesterov=True,
        betas=[0.8, 0.99], n_train=100, data_dir="/x", init_from="ckpt.safetensors", schedule="linear",
    )
    back = TrainConfig.from_json(cfg.to_json())
    assert back == cfg and isinstance(back.betas, tuple) and back.model == cfg.model
    assert TrainConfig.from_dict({"model": {"conv_channels": [8, 16]}}).model == MNISTNetSpec(conv_channels=(8, 16))
    with pytest.raises(ConfigError) as e:
        TrainConfig(optimizer="rmsprop", lr=-1, dtype="float16", n_train=0)
    for word in ("optimizer", "lr", "dtype", "n_train"):
        assert word in str(e.value)
    with pytest.raises(ConfigError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ConfigError, match="exclusive"):
        TrainConfig(resume=True, init_from="x")
    assert TrainConfig(out="runs/{backend}-x", backend="jax").out_dir.name == "jax-x"


def test_lr_schedule():
    cfg = TrainConfig(lr=1e-2, epochs=2, warmup_frac=0.1, final_lr_frac=0.01)
    spe = 50  # 100 steps, 10 warmup
    lrs = [lr_at(cfg, s, spe) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[9] == pytest.approx(1e-2) and max(lrs) == lrs[10] == 1e-2
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:])) and lrs[-1] > 1e-4 and lrs[-1] < 1.1e-4
    assert lr_at(cfg.replace(schedule="linear"), 55, spe) == pytest.approx(1e-2 + (1e-4 - 1e-2) * 0.5)
    assert {lr_at(cfg.replace(schedule="constant"), s, spe) for s in range(100)} == {1e-2}


# ------------------------------------------------------------------ optimizer semantics
OPTIMIZERS = {
    "adam+l2": dict(optimizer="adam", weight_decay=0.05, eps=1e-3),
    "adamw": dict(optimizer="adamw", weight_decay=0.05, eps=1e-3, betas=(0.8, 0.95)),
    "sgd": dict(optimizer="sgd", weight_decay=0.05, momentum=0.9),
    "sgd-nesterov": dict(optimizer="sgd", weight_decay=0.0, momentum=0.7, nesterov=True),
    "sgd-plain": dict(optimizer="sgd", weight_decay=0.01, momentum=0.0),
}


def _reference_steps(cfg, p, grads, lrs):
    """The update formulas of `cbam_multi.training.config`, in NumPy float64."""
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    b1, b2 = cfg.betas
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        if cfg.optimizer == "adamw":
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            direction = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + cfg.eps)
            p = p - lr * (direction + cfg.weight_decay * p)
        elif cfg.optimizer == "adam":
            g = g + cfg.weight_decay * p
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + cfg.eps)
        else:
            g = g + cfg.weight_decay * p
            m = cfg.momentum * m + g
            d = g + cfg.momentum * m if cfg.nesterov else m
            p = p - lr * d
    return p


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_formulas_match_torch_optax_and_numpy(name):
    from cbam_multi.jax.train import make_optimizer as jax_opt
    from cbam_multi.torch.train import make_optimizer as torch_opt

    cfg = TrainConfig(dtype="float64", **OPTIMIZERS[name])
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(5, 3))
    grads = [rng.normal(size=(5, 3)) * 10.0 ** rng.uniform(-3, 1) for _ in range(6)]
    lrs = [0.1, 0.05, 0.2, 0.01, 0.3, 0.07]  # a schedule: the lr changes every step
    ref = _reference_steps(cfg, p0, grads, lrs)

    pt = torch.nn.Parameter(torch.tensor(p0))
    opt = torch_opt(cfg, [pt])
    for g, lr in zip(grads, lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        pt.grad = torch.tensor(g)
        opt.step()

    tx = jax_opt(cfg)
    pj = {"w": jax.numpy.asarray(p0)}
    state = tx.init(pj)
    for g, lr in zip(grads, lrs):
        state.hyperparams["learning_rate"] = jax.numpy.asarray(lr)
        updates, state = tx.update({"w": jax.numpy.asarray(g)}, state, pj)
        pj = optax.apply_updates(pj, updates)

    err_t = np.abs(pt.detach().numpy() - ref).max()
    err_j = np.abs(np.asarray(pj["w"]) - ref).max()
    assert err_t <= 1e-12, f"{name}: torch.optim vs formula, max abs err {err_t:.3e}"
    assert err_j <= 1e-12, f"{name}: optax vs formula, max abs err {err_j:.3e}"


# ------------------------------------------------------------------ trajectory parity and cross evaluation
@pytest.fixture(scope="module")
def float32_parity(mnist, tmp_path_factory):
    """torch and JAX trained STEPS float32 steps from the same init on the same batches (models saved)."""
    return training.trajectory_parity(STEPS, "float32", batch_size=BATCH, n_test=N_TEST, data=mnist,
                                      out_root=tmp_path_factory.mktemp("f32"))


@pytest.mark.slow
def test_trajectory_parity_float64(mnist, tmp_path):
    r = training.trajectory_parity(F64_STEPS, "float64", batch_size=BATCH, n_test=200, data=_tiny(mnist, F64_STEPS * BATCH),
                                   out_root=tmp_path)
    tol = trajectory_tolerance("float64", F64_STEPS)
    assert r["losses_torch"][-1] < r["losses_torch"][0]  # it did train
    assert r["max_loss_rel"] <= tol["loss_rel"], f"float64 loss curves: max rel diff {r['max_loss_rel']:.3e} > {tol['loss_rel']}"
    assert r["weights_rel"] <= tol["weights_rel"], f"float64 final weights: rel diff {r['weights_rel']:.3e} at {r['worst_weight']}"
    assert r["agreement"] == 1.0 and r["ok"]


def test_trajectory_parity_float32(float32_parity):
    r, tol = float32_parity, trajectory_tolerance("float32", STEPS)
    assert r["max_loss_rel"] <= tol["loss_rel"], f"float32 loss curves: max rel diff {r['max_loss_rel']:.3e} > {tol['loss_rel']}"
    assert r["window_loss_rel"] <= tol["window_loss_rel"], f"float32 smoothed loss: rel diff {r['window_loss_rel']:.3e}"
    assert r["weights_rel"] <= tol["weights_rel"], f"float32 final weights: rel diff {r['weights_rel']:.3e} at {r['worst_weight']}"
    assert r["agreement"] >= tol["agreement"], f"float32: {100 * r['agreement']:.2f}% equal test predictions"
    assert r["ok"]


@pytest.mark.parametrize("writer,reader", [("torch", "jax"), ("jax", "torch")])
def test_checkpoint_evaluates_the_same_in_the_other_framework(float32_parity, mnist, writer, reader):
    from pathlib import Path

    run_dir = Path(float32_parity["out"]) / writer
    own = training.evaluate(run_dir, backend=writer, data=mnist, batch_size=300)  # 1000 = 3 x 300 + a tail of 100
    other = training.evaluate(run_dir, backend=reader, data=mnist, batch_size=300)
    assert own["n"] == other["n"] == N_TEST
    agreement = float((own["predictions"] == other["predictions"]).mean())
    assert agreement >= 0.999, f"{writer} model: {reader} agrees on {100 * agreement:.2f}% of {N_TEST} predictions"
    assert abs(own["accuracy"] - other["accuracy"]) <= 0.001, (own["accuracy"], other["accuracy"])
    logit_err = np.abs(own["logits"] - other["logits"]).max()
    assert logit_err <= 1e-3, f"max abs logit difference {logit_err:.3e}"
    assert own["accuracy"] > 0.8  # a few dozen steps already learn most digits
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["final"]["test_accuracy"] == own["accuracy"]


# ------------------------------------------------------------------ resume and init-from
def _cfg(backend, out, **kw):
    base = dict(backend=backend, epochs=2, batch_size=32, n_test=200, eval_batch_size=200, out=str(out), progress=False)
    return TrainConfig(**{**base, **kw})


def _state(out):
    return training.ResumeState.load(out / training.TRAIN_STATE_FILE)


@pytest.mark.parametrize("backend,optimizer", [("torch", "adamw"), ("jax", "adamw"), ("torch", "sgd"), ("jax", "sgd")])
def test_resume_is_bit_identical(mnist, tmp_path, backend, optimizer):
    data = _tiny(mnist)
    extra = {"optimizer": optimizer, "lr": 0.02, "nesterov": True} if optimizer == "sgd" else {}
    full = training.train_and_evaluate(_cfg(backend, tmp_path / "full", **extra), data=data)
    part = training.train_and_evaluate(_cfg(backend, tmp_path / "part", **extra), data=data, stop_after_epoch=1)
    assert [e["epoch"] for e in part["epochs"]] == [1]
    resumed = training.train_and_evaluate(_cfg(backend, tmp_path / "part", resume=True, **extra), data=data)
    assert [e["epoch"] for e in resumed["epochs"]] == [1, 2] and resumed["started"]["how"] == "resume"
    a, b = _state(tmp_path / "full"), _state(tmp_path / "part")
    assert a.step == b.step == 16 and a.epoch == b.epoch == 2
    for n in a.weights:
        assert np.array_equal(a.weights[n], b.weights[n]), f"{backend}: weight {n} differs after resume"
    for slot in a.opt:
        for n in a.opt[slot]:
            assert np.array_equal(a.opt[slot][n], b.opt[slot][n]), f"{backend}: optimizer {slot}.{n} differs"
    assert full["epochs"][1]["train_losses"] == resumed["epochs"][1]["train_losses"]
    assert full["epochs"][1]["test_accuracy"] == resumed["epochs"][1]["test_accuracy"]


def test_resume_across_frameworks_and_init_from(mnist, tmp_path):
    """A torch run interrupted after epoch 1 continues in JAX (and vice versa) on the torch trajectory; and
    ``init_from`` takes a model checkpoint of either framework."""
    data = _tiny(mnist, 128)
    kw = dict(dtype="float64", batch_size=32)
    ref = training.train_and_evaluate(_cfg("torch", tmp_path / "ref", **kw), data=data)
    training.train_and_evaluate(_cfg("torch", tmp_path / "t", **kw), data=data, stop_after_epoch=1)
    shutil.copytree(tmp_path / "t", tmp_path / "t2j")
    cross = training.train_and_evaluate(_cfg("jax", tmp_path / "t2j", resume=True, **kw), data=data)
    assert cross["started"] == {"how": "resume", "from_epoch": 1, "written_by": "torch"}
    lt, lj = np.array(ref["epochs"][1]["train_losses"]), np.array(cross["epochs"][1]["train_losses"])
    rel = np.abs(lt - lj).max() / np.abs(lt).min()
    assert rel <= trajectory_tolerance("float64", 8)["loss_rel"], f"torch->jax resume: loss rel diff {rel:.3e}"

    # init_from: both frameworks start from the JAX-written checkpoint of the run above
    ckpt = tmp_path / "t2j" / training.CHECKPOINT_FILE
    runs = {}
    for backend in ("torch", "jax"):
        runs[backend] = training.train_and_evaluate(
            _cfg(backend, tmp_path / f"init-{backend}", epochs=1, init_from=str(ckpt), **kw), data=data
        )
        assert runs[backend]["started"] == {"how": "init_from", "checkpoint": str(ckpt)}
    lt, lj = (np.array(runs[b]["epochs"][0]["train_losses"]) for b in ("torch", "jax"))
    rel = np.abs(lt - lj).max() / np.abs(lt).min()
    assert rel <= trajectory_tolerance("float64", 4)["loss_rel"], f"init_from: loss rel diff {rel:.3e}"
    # the first loss is that of the checkpoint's weights, not of a fresh init
    fresh = training.train_and_evaluate(_cfg("torch", tmp_path / "fresh", epochs=1, **kw), data=data)
    assert fresh["epochs"][0]["train_losses"][0] != runs["torch"]["epochs"][0]["train_losses"][0]
    assert runs["torch"]["epochs"][0]["train_losses"][0] < fresh["epochs"][0]["train_losses"][0]


def test_resume_and_init_from_errors(mnist, tmp_path):
    data = _tiny(mnist, 64)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        training.train_and_evaluate(_cfg("torch", tmp_path / "none", resume=True), data=data)
    training.train_and_evaluate(_cfg("torch", tmp_path / "a", epochs=1), data=data)
    with pytest.raises(ConfigError, match="lr: checkpoint 0.003, requested 0.1"):
        training.train_and_evaluate(_cfg("torch", tmp_path / "a", epochs=2, resume=True, lr=0.1), data=data)
    other = MNISTNetSpec(conv_channels=(8, 16))
    with pytest.raises(ConfigError, match="differs from the configured"):
        training.train_and_evaluate(_cfg("jax", tmp_path / "b", model=other, init_from=str(tmp_path / "a")), data=data)
    with pytest.raises(ConfigError, match="backend must be one of"):
        training.evaluate(tmp_path / "a", backend="mxnet", data=data)


# ------------------------------------------------------------------ speed settings keep the semantics
@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("cbam", [True, False])
def test_a_nan_in_the_batch_shows_as_a_nan_loss(backend, cbam):
    """The JAX step is compiled with XLA's fast (non-NaN-propagating) max reductions on CPU; a NaN input
    still reaches the loss (ReLU, convolutions and CBAM's mean pools carry it), as in torch, and the
    next finite batch is NaN too (the weights are poisoned, as in torch)."""
    if backend == "torch":
        from cbam_multi.torch.train import TorchTrainer as Trainer
    else:
        from cbam_multi.jax.train import JaxTrainer as Trainer
    tr = Trainer(TrainConfig(backend=backend, model=MNISTNetSpec(cbam=cbam), batch_size=4, progress=False))
    x = np.full((4, 28, 28, 1), 0.5, np.float32)
    x[1, 10, 12, 0] = np.nan  # one pixel, which the 2x2 max-pools alone would drop under fast max
    y = np.arange(4)
    losses = tr.losses([tr.train_step(x, y, 1e-3), tr.train_step(np.full_like(x, 0.5), y, 1e-3)])
    assert np.isnan(losses).all(), losses


def test_jax_train_step_uses_the_cpu_compiler_options():
    import jax

    from cbam_multi.jax import sharding
    from cbam_multi.jax.train import CPU_COMPILER_OPTIONS, compiler_options

    expected = CPU_COMPILER_OPTIONS if jax.devices()[0].platform == "cpu" else {}
    assert compiler_options(sharding.data_mesh(None)) == expected


def test_jax_compiler_options_this_xla_does_not_know_are_dropped(monkeypatch):
    """pyproject allows other jaxlib versions, whose XLA may lack an option: the step compiles without it."""
    import jax

    from cbam_multi.jax import sharding
    from cbam_multi.jax import train as jtrain

    if jax.devices()[0].platform != "cpu":
        pytest.skip("CPU options only")
    monkeypatch.setattr(jtrain, "CPU_COMPILER_OPTIONS", {**jtrain.CPU_COMPILER_OPTIONS, "xla_cpu_no_such_option": True})
    assert jtrain.compiler_options(sharding.data_mesh(None)) == {
        k: v for k, v in jtrain.CPU_COMPILER_OPTIONS.items() if k != "xla_cpu_no_such_option"
    }
