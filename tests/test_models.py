"""MNISTNet in both backends: the NumPy oracle, canonical round trips, cross-framework transfer, smoke runs.

float64 comparisons rely on the root conftest.py (JAX x64 on, highest matmul precision, TF32 off).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
nnx = pytest.importorskip("flax.nnx")

import cbam_multi.jax.models as jm
import cbam_multi.torch.models as tm
from cbam_multi import InputError, WeightsError
from cbam_multi.models.mnist import MNISTNetSpec, forward
from cbam_multi.torch.models.mnist import fc1_to_canonical, fc1_to_torch
from cbam_multi.training.config import TrainConfig
from cbam_multi.weights import init_weights

SPECS = {
    "default": MNISTNetSpec(),
    "no-cbam": MNISTNetSpec(cbam=False),
    # two convs per block, BatchNorm inside CBAM (running statistics), a 5x5 kernel
    "official-bn": MNISTNetSpec(conv_channels=(8, 16), convs_per_block=2, kernel=5, dense=24, cbam_preset="official", cbam_reduction=4),
}


def _x(batch=3, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, 1, 28, 28))


def _weights(spec, seed=1):
    """Seeded canonical weights with non-trivial BatchNorm state (so eval mode is exercised)."""
    w = init_weights(spec, seed, np.float64)
    rng = np.random.default_rng(seed + 100)
    for name in w:
        if name.endswith((".bn.scale", ".bn.var")):
            w[name] = rng.uniform(0.5, 1.5, size=w[name].shape)
        elif name.endswith((".bn.bias", ".bn.mean")):
            w[name] = rng.normal(scale=0.2, size=w[name].shape)
    return w


def _nhwc(x):
    return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))


def _torch_model(spec, weights, dtype=torch.float64, train=False):
    m = tm.import_model_weights(tm.MNISTNet(spec, dtype=dtype), weights)
    return m.train(train)


def _jax_model(spec, weights, dtype=jnp.float64, train=False):
    m = jm.import_model_weights(jm.MNISTNet(spec, dtype=dtype), weights)
    m.train() if train else m.eval()
    return m


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(SPECS))
def test_forward_matches_numpy_oracle_float64(name, train):
    spec = SPECS[name]
    w, x = _weights(spec), _x()
    ref, ref_stats = forward(x, w, spec, train=train)
    tmod = _torch_model(spec, w, train=train)
    y_t = tmod(torch.tensor(x)).detach().numpy()
    jmod = _jax_model(spec, w, train=train)
    y_j = np.asarray(jmod(jnp.asarray(_nhwc(x))))
    err_t, err_j = np.abs(y_t - ref).max(), np.abs(y_j - ref).max()
    assert err_t <= 1e-10, f"torch MNISTNet vs oracle: max abs err {err_t:.3e}"
    assert err_j <= 1e-10, f"jax MNISTNet vs oracle: max abs err {err_j:.3e}"
    # BatchNorm running statistics after one train-mode call (only the BN spec has any)
    assert bool(ref_stats) == (train and name == "official-bn")
    for mod, export in ((tmod, tm.export_model_weights), (jmod, jm.export_model_weights)):
        got = export(mod)
        for n, s in ref_stats.items():
            assert np.abs(got[n] - s).max() <= 1e-12, f"{n}: {got[n]} vs oracle {s}"


@pytest.mark.parametrize("name", list(SPECS))
def test_seeded_init_is_canonical_and_identical_in_both_backends(name):
    spec = SPECS[name]
    w = init_weights(spec, 7, np.float64)
    got_t = tm.export_model_weights(tm.MNISTNet(spec, dtype=torch.float64, seed=7))
    got_j = jm.export_model_weights(jm.MNISTNet(spec, dtype=jnp.float64, seed=7))
    assert list(got_t) == list(got_j) == list(spec.param_shapes())
    for n in w:
        assert np.array_equal(got_t[n], w[n]) and np.array_equal(got_j[n], w[n]), n
    got32 = tm.export_model_weights(tm.MNISTNet(spec, seed=7))
    assert all(np.array_equal(got32[n], w[n].astype(np.float32)) for n in w)


@pytest.mark.parametrize("name", list(SPECS))
def test_canonical_round_trips_are_exact(name):
    spec = SPECS[name]
    w = _weights(spec, seed=3)
    for dtype_t, dtype_j, npdt in ((torch.float64, jnp.float64, np.float64), (torch.float32, jnp.float32, np.float32)):
        wd = {n: a.astype(npdt) for n, a in w.items()}
        back_t = tm.export_model_weights(tm.import_model_weights(tm.MNISTNet(spec, dtype=dtype_t), wd))
        back_j = jm.export_model_weights(jm.import_model_weights(jm.MNISTNet(spec, dtype=dtype_j), wd))
        for n in w:
            assert back_t[n].dtype == npdt and np.array_equal(back_t[n], wd[n]), f"torch {n}"
            assert back_j[n].dtype == npdt and np.array_equal(back_j[n], wd[n]), f"jax {n}"


def test_fc1_permutation_matches_torch_flatten():
    spec = MNISTNetSpec(conv_channels=(4, 8), dense=4, cbam=False)
    s, c = spec.final_size, spec.conv_channels[-1]
    k = np.random.default_rng(0).normal(size=(spec.flat_features, spec.dense))
    w = fc1_to_torch(k, spec)
    assert np.array_equal(fc1_to_canonical(w, spec), k)
    # the same features, flattened NHWC (canonical) and NCHW (torch), give the same dense output
    feat = np.random.default_rng(1).normal(size=(2, c, s, s))
    nhwc = feat.transpose(0, 2, 3, 1).reshape(2, -1) @ k
    nchw = feat.reshape(2, -1) @ w.T
    assert np.abs(nhwc - nchw).max() <= 1e-12


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", ["default", "official-bn"])
def test_weight_transfer_between_frameworks_gives_equal_outputs(name, dtype):
    spec = SPECS[name]
    tol = {"float64": 1e-10, "float32": 1e-4}[dtype]
    x = _x(batch=4, seed=5).astype(dtype)
    # torch -> canonical -> jax
    t1 = tm.MNISTNet(spec, dtype=getattr(torch, dtype), seed=11).eval()
    j1 = _jax_model(spec, tm.export_model_weights(t1), dtype=getattr(jnp, dtype))
    err1 = np.abs(t1(torch.tensor(x)).detach().numpy() - np.asarray(j1(jnp.asarray(_nhwc(x))))).max()
    # jax -> canonical -> torch
    j2 = jm.MNISTNet(spec, dtype=getattr(jnp, dtype), seed=12)
    j2.eval()
    t2 = _torch_model(spec, jm.export_model_weights(j2), dtype=getattr(torch, dtype))
    err2 = np.abs(t2(torch.tensor(x)).detach().numpy() - np.asarray(j2(jnp.asarray(_nhwc(x))))).max()
    assert err1 <= tol, f"torch->jax {dtype}: max abs logit err {err1:.3e} > {tol}"
    assert err2 <= tol, f"jax->torch {dtype}: max abs logit err {err2:.3e} > {tol}"


@pytest.mark.parametrize("name", ["default", "official-bn"])
def test_gradients_agree_float64(name):
    spec = SPECS[name]
    w, x = _weights(spec, seed=4), _x(batch=4, seed=6)
    y = np.array([3, 1, 4, 1])
    tmod = _torch_model(spec, w, train=True)
    loss_t = torch.nn.functional.cross_entropy(tmod(torch.tensor(x)), torch.tensor(y))
    loss_t.backward()
    g_t = tm.export_model_grads(tmod)

    jmod = _jax_model(spec, w, train=True)
    import optax

    def loss_fn(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(jnp.asarray(_nhwc(x))), jnp.asarray(y)).mean()

    loss_j, grads = nnx.jit(nnx.value_and_grad(loss_fn))(jmod)  # jitted: one compile, not one per eager op
    g_j = jm.export_model_grads(grads)
    assert abs(loss_t.item() - float(loss_j)) <= 1e-12
    trainable = [n for n, k in spec.param_kinds().items() if k == "param"]
    assert sorted(g_t) == sorted(trainable) and set(trainable) <= set(g_j)
    errs = {n: np.abs(g_t[n] - g_j[n]).max() / max(np.abs(g_t[n]).max(), 1e-30) for n in trainable}
    worst = max(errs, key=errs.get)
    assert errs[worst] <= 1e-10, f"max relative gradient error {errs[worst]:.3e} at {worst}"


def test_errors_name_the_problem():
    spec = MNISTNetSpec()
    with pytest.raises(InputError, match="NCHW"):
        tm.MNISTNet(spec)(torch.zeros(2, 28, 28, 1))
    with pytest.raises(InputError, match="NHWC"):
        jm.MNISTNet(spec)(jnp.zeros((2, 1, 28, 28)))
    with pytest.raises(InputError, match="float64"):
        tm.MNISTNet(spec)(torch.zeros(2, 1, 28, 28, dtype=torch.float64))
    w = init_weights(spec)
    del w["head.fc2.bias"]
    for mod, imp in ((tm.MNISTNet(spec), tm.import_model_weights), (jm.MNISTNet(spec), jm.import_model_weights)):
        with pytest.raises(WeightsError, match="head.fc2.bias"):
            imp(mod, w)
    with pytest.raises(TypeError, match="MNISTNet"):
        tm.export_model_weights(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------ 1-epoch smoke runs
def _tiny_dataset(n_train=192, n_test=70, seed=0):
    """Synthetic digits-like data: each class is a fixed random blob pattern plus noise (learnable fast)."""
    from cbam_multi.training.data import Dataset

    rng = np.random.default_rng(seed)
    protos = rng.uniform(0, 255, size=(10, 28, 28))

    def split(n):
        labels = rng.integers(0, 10, size=n).astype(np.int64)
        imgs = np.clip(protos[labels] * 0.7 + rng.uniform(0, 255 * 0.3, size=(n, 28, 28)), 0, 255).astype(np.uint8)
        return imgs, labels

    (a, b), (c, d) = split(n_train), split(n_test)
    return Dataset("synthetic", "tests", a, b, c, d)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_one_epoch_smoke(backend, tmp_path):
    import json

    from cbam_multi import training

    cfg = TrainConfig(
        backend=backend,
        model=MNISTNetSpec(conv_channels=(8, 16), dense=32),
        epochs=1,
        batch_size=32,
        eval_batch_size=64,  # 70 test images: one full batch and a ragged tail of 6
        out=str(tmp_path / "{backend}"),
        progress=False,
    )
    metrics = training.train_and_evaluate(cfg, data=_tiny_dataset())
    out = cfg.out_dir
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["final"] == metrics["final"]
    ep = on_disk["epochs"][0]
    assert len(ep["train_losses"]) == metrics["steps_per_epoch"] == 6
    assert np.isfinite(ep["train_loss"]) and ep["images_per_s"] > 0 and ep["epoch_seconds"] > 0
    assert ep["test_correct"] == round(ep["test_accuracy"] * 70)  # all 70, the tail included
    for key in ("torch", "jax", "flax", "optax", "numpy"):
        assert key in on_disk["versions"]
    assert on_disk["dataset"]["name"] == "synthetic" and on_disk["device"]
    assert (out / "checkpoint.safetensors").is_file() and (out / "train_state.safetensors").is_file()
    ev = training.evaluate(out, backend=backend, data=_tiny_dataset(), batch_size=64)
    assert ev["n"] == 70 and len(ev["predictions"]) == 70
    assert ev["accuracy"] == ep["test_accuracy"]
    assert abs(ev["loss"] - ep["test_loss"]) <= 1e-6
