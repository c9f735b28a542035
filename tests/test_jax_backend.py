"""JAX/Flax backend (NNX modules, linen modules, pure functions) against the float64 NumPy reference."""

from __future__ import annotations

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_default_matmul_precision", "highest")

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cbam_multi import CBAMSpec, InputError, WeightsError, init_weights
from cbam_multi import reference as ref
from cbam_multi.jax import (
    CBAM,
    ChannelAttention,
    SpatialAttention,
    export_grads,
    export_weights,
    import_weights,
)
from cbam_multi.jax import functional as F
from cbam_multi.jax import linen as L

TOL = 1e-10

CASES = {
    "seed": (CBAMSpec.seed(8), (2, 6, 5, 8)),
    "paper": (CBAMSpec.paper(32), (2, 9, 8, 32)),
    "official": (CBAMSpec.official(32), (2, 7, 5, 32)),
    "timm": (CBAMSpec.timm(16), (3, 6, 6, 16)),
    "lp_lse": (CBAMSpec.seed(8, channel_pools=("avg", "max", "lp", "lse")), (2, 5, 6, 8)),
    "lse_only_bn": (CBAMSpec.official(8, reduction=2, channel_pools=("lse",)), (2, 4, 4, 8)),
    "hard_sigmoid": (CBAMSpec.timm(16, gate="hard_sigmoid"), (2, 5, 5, 16)),
    "1x1_no_bn": (CBAMSpec.paper(32), (3, 1, 1, 32)),
    "7x5": (CBAMSpec.seed(8, spatial_kernel=5), (2, 7, 5, 8)),
    "c1_round": (CBAMSpec(1, hidden_rule="round"), (2, 4, 3, 1)),
    "no_bias_maxmean": (CBAMSpec.seed(6, mlp_bias=False, spatial_bias=False, concat_order=("max", "mean")), (2, 3, 4, 6)),
}
BN_CASES = [k for k, (s, _) in CASES.items() if s.has_norm]


def max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def rand_weights(spec: CBAMSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """Canonical init, with non-trivial BN values (the official preset zero-inits the BN scale)."""
    w = init_weights(spec, seed, np.float64)
    rng = np.random.default_rng(1000 + seed)
    if spec.has_norm:
        w["spatial.bn.scale"] = rng.uniform(0.5, 1.5, (1,))
        w["spatial.bn.bias"] = rng.uniform(-0.5, 0.5, (1,))
        w["spatial.bn.mean"] = rng.uniform(-0.3, 0.3, (1,))
        w["spatial.bn.var"] = rng.uniform(0.5, 2.0, (1,))
    return w


def rand_x(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape) * 2.0


def reference(x_nhwc, w, spec, train=False):
    y, stats = ref.cbam_forward(np.transpose(x_nhwc, (0, 3, 1, 2)), w, spec, train=train)
    return np.transpose(y, (0, 2, 3, 1)), stats


def as_jax(w):
    return {n: jnp.asarray(a) for n, a in w.items()}


def nnx_model(spec, w):
    return import_weights(CBAM(spec, param_dtype=jnp.float64), w)


def assert_stats(got, want):
    assert set(got) == set(want), (sorted(got), sorted(want))
    for n in want:
        err = max_err(got[n], want[n])
        assert err <= TOL, f"{n}: max abs error {err:.3e}"


# ------------------------------------------------------------------ functional vs reference
# train mode only differs with BatchNorm; two no-BN cases check that train=True is then a no-op
FUNCTIONAL_CASES = [(c, False) for c in CASES] + [(c, True) for c in BN_CASES + ["seed", "1x1_no_bn"]]


@pytest.mark.parametrize("case, train", FUNCTIONAL_CASES)
def test_functional_matches_reference(case, train):
    spec, shape = CASES[case]
    w, x = rand_weights(spec), rand_x(shape)
    want, want_stats = reference(x, w, spec, train)
    y, stats = F.cbam(as_jax(w), jnp.asarray(x), spec, train=train)
    err = max_err(y, want)
    assert y.dtype == jnp.float64 and y.shape == shape
    assert err <= TOL, f"{case} train={train}: max abs error {err:.3e}"
    assert_stats(stats, want_stats)
    # the same under jit, spec static
    yj, stats_j = jax.jit(F.cbam, static_argnames=("spec", "train"))(as_jax(w), jnp.asarray(x), spec=spec, train=train)
    err = max_err(yj, want)
    assert err <= TOL, f"{case} train={train} jit: max abs error {err:.3e}"
    assert_stats(stats_j, want_stats)


@pytest.mark.parametrize("case", ["seed", "official", "lp_lse", "hard_sigmoid"])
def test_functional_gates_match_reference(case):
    spec, shape = CASES[case]
    w, x = rand_weights(spec), rand_x(shape, 1)
    w64 = {n: np.asarray(a, np.float64) for n, a in w.items()}
    xc = np.transpose(x, (0, 3, 1, 2))
    want_c = np.transpose(ref.channel_attention(xc, w64, spec), (0, 2, 3, 1))
    got_c = F.channel_attention(as_jax(spec_part(w, "channel")), jnp.asarray(x), spec)
    assert max_err(got_c, want_c) <= TOL, f"channel: max abs error {max_err(got_c, want_c):.3e}"
    for train in (False, True):
        want_s, want_stats = ref.spatial_attention(xc, w64, spec, train)
        got_s, stats = F.spatial_attention(as_jax(spec_part(w, "spatial")), jnp.asarray(x), spec, train=train)
        err = max_err(got_s, np.transpose(want_s, (0, 2, 3, 1)))
        assert err <= TOL, f"spatial train={train}: max abs error {err:.3e}"
        assert_stats(stats, want_stats)


def spec_part(w, part):
    return {n: a for n, a in w.items() if n.startswith(part + ".")}


# ------------------------------------------------------------------ NNX modules
@pytest.mark.parametrize("case", list(CASES))
def test_nnx_module_matches_reference(case):
    spec, shape = CASES[case]
    w, x = rand_weights(spec), rand_x(shape, 2)
    model = nnx_model(spec, w)
    model.eval()
    want, _ = reference(x, w, spec, train=False)
    err = max_err(model(jnp.asarray(x)), want)
    assert err <= TOL, f"{case} eval: max abs error {err:.3e}"
    assert max_err(export_weights(model)["spatial.conv.kernel"], w["spatial.conv.kernel"]) == 0.0


@pytest.mark.parametrize("case", BN_CASES)
def test_nnx_batchnorm_train_then_eval(case):
    spec, shape = CASES[case]
    w, x = rand_weights(spec), rand_x(shape, 3)
    model = nnx_model(spec, w)
    assert model.spatial.use_running_average is False  # fresh modules train, like torch / nnx.BatchNorm
    model.train()
    want, want_stats = reference(x, w, spec, train=True)
    err = max_err(model(jnp.asarray(x)), want)
    assert err <= TOL, f"{case} train: max abs error {err:.3e}"
    got = export_weights(model)
    assert_stats({n: got[n] for n in want_stats}, want_stats)
    assert isinstance(model.spatial.bn.mean, nnx.BatchStat) and isinstance(model.spatial.bn.scale, nnx.Param)

    model.eval()
    assert model.spatial.use_running_average is True
    w2 = {**w, **want_stats}
    want_eval, _ = reference(x, w2, spec, train=False)
    err = max_err(model(jnp.asarray(x)), want_eval)
    assert err <= TOL, f"{case} eval after train: max abs error {err:.3e}"
    assert_stats({n: export_weights(model)[n] for n in want_stats}, want_stats)  # eval leaves stats alone

    # nnx.view gives a train-mode view sharing the same arrays
    view = nnx.view(model, use_running_average=False)
    view(jnp.asarray(x))
    _, want_stats2 = reference(x, w2, spec, train=True)
    assert_stats({n: export_weights(model)[n] for n in want_stats}, want_stats2)


def test_nnx_standalone_gates():
    spec, shape = CASES["official"]
    w, x = rand_weights(spec), rand_x(shape, 4)
    ch = import_weights(ChannelAttention(spec, param_dtype=jnp.float64), spec_part(w, "channel"))
    sp = import_weights(SpatialAttention(spec, param_dtype=jnp.float64), spec_part(w, "spatial"))
    assert set(export_weights(ch)) == set(spec.param_shapes("channel"))
    assert set(export_weights(sp)) == set(spec.param_shapes("spatial"))
    sp.train()
    y = sp(ch(jnp.asarray(x)))
    want, want_stats = reference(x, w, spec, train=True)
    assert max_err(y, want) <= TOL, f"max abs error {max_err(y, want):.3e}"
    assert_stats({n: export_weights(sp)[n] for n in want_stats}, want_stats)
    # same seed -> CBAM's submodules equal the standalone ones
    full = CBAM(spec, seed=3)
    for part, mod in (("channel", ChannelAttention(spec, seed=3)), ("spatial", SpatialAttention(spec, seed=3))):
        a, b = export_weights(getattr(full, part)), export_weights(mod)
        assert all(np.array_equal(a[n], b[n]) for n in a)


def test_nnx_init_is_canonical():
    spec = CBAMSpec.timm(16)
    got = export_weights(CBAM(spec, seed=7))
    want = init_weights(spec, 7, np.float32)
    assert list(got) == list(spec.param_shapes())
    for n in want:
        assert got[n].dtype == np.float32 and np.array_equal(got[n], want[n]), n


def test_nnx_jit_matches_eager():
    spec, shape = CASES["official"]
    w, x = rand_weights(spec), jnp.asarray(rand_x(shape, 5))
    eager, jitted = nnx_model(spec, w), nnx_model(spec, w)
    step = nnx.jit(lambda m, x: m(x))
    for _ in range(2):  # two train steps: stats updated in place under jit too
        ye, yj = eager(x), step(jitted, x)
        assert max_err(ye, yj) <= 1e-14, f"train: max abs error {max_err(ye, yj):.3e}"
    we, wj = export_weights(eager), export_weights(jitted)
    assert all(max_err(we[n], wj[n]) <= 1e-14 for n in we), {n: max_err(we[n], wj[n]) for n in we}
    eager.eval(), jitted.eval()
    ye, yj = eager(x), step(jitted, x)
    assert max_err(ye, yj) <= 1e-14, f"eval: max abs error {max_err(ye, yj):.3e}"
    assert np.array_equal(export_weights(jitted)["spatial.bn.mean"], wj["spatial.bn.mean"])  # eval: no update


# ------------------------------------------------------------------ linen
@pytest.mark.parametrize("case", ["seed", "official", "timm", "c1_round"])
def test_linen_matches_nnx_and_reference(case):
    spec, shape = CASES[case]
    w, x = rand_weights(spec), jnp.asarray(rand_x(shape, 6))
    model = L.CBAM(spec, seed=0, param_dtype=jnp.float64)
    variables = model.init(jax.random.key(123), x)
    init = L.init_variables(spec, 0, jnp.float64)
    assert jax.tree.structure(variables) == jax.tree.structure(init)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), variables, init)))

    variables = L.import_variables(w, spec)
    assert jax.tree.structure(variables) == jax.tree.structure(init)
    nm = nnx_model(spec, w)
    nm.eval()
    y_eval = model.apply(variables, x)
    assert max_err(y_eval, nm(x)) == 0.0, f"linen vs nnx eval: max abs error {max_err(y_eval, nm(x)):.3e}"
    want, _ = reference(np.asarray(x), w, spec, train=False)
    assert max_err(y_eval, want) <= TOL, f"linen eval: max abs error {max_err(y_eval, want):.3e}"

    nm.train()
    y_train, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    y_nnx = nm(x)
    assert max_err(y_train, y_nnx) == 0.0, f"linen vs nnx train: max abs error {max_err(y_train, y_nnx):.3e}"
    got = L.export_variables({**variables, **updates})
    exp = export_weights(nm)
    assert list(sorted(got)) == sorted(spec.param_shapes())
    assert all(np.array_equal(got[n], exp[n]) for n in exp)
    if spec.has_norm:
        _, want_stats = reference(np.asarray(x), w, spec, train=True)
        assert_stats({n: got[n] for n in want_stats}, want_stats)
        assert set(updates["batch_stats"]["spatial"]["bn"]) == {"mean", "var"}


def test_linen_standalone_gates_and_roundtrip():
    spec, shape = CASES["official"]
    w, x = rand_weights(spec), jnp.asarray(rand_x(shape, 7))
    ch, sp = L.ChannelAttention(spec, param_dtype=jnp.float64), L.SpatialAttention(spec, param_dtype=jnp.float64)
    vc = ch.init(jax.random.key(0), x)
    vs = sp.init(jax.random.key(0), x)
    assert set(vc["params"]) == {"fc1", "fc2"} and set(vs["params"]) == {"conv", "bn"}
    assert set(L.export_variables(vc)) == set(spec.param_shapes("channel"))
    assert set(L.export_variables(vs)) == set(spec.param_shapes("spatial"))
    back = L.export_variables(L.import_variables(w, spec))
    assert all(np.array_equal(back[n], w[n]) for n in w) and set(back) == set(w)
    with pytest.raises(WeightsError, match="missing"):
        L.import_variables(spec_part(w, "channel"), spec)


# ------------------------------------------------------------------ weights adapters
@pytest.mark.parametrize("case", ["official", "seed"])
def test_roundtrip_export_import_export(case):
    spec, _ = CASES[case]
    for dtype in (jnp.float32, jnp.float64):
        src = CBAM(spec, param_dtype=dtype, seed=1)
        first = export_weights(src)
        dst = import_weights(CBAM(spec, param_dtype=dtype, seed=2), first)
        second = export_weights(dst)
        assert list(first) == list(second)
        for n in first:
            assert second[n].dtype == first[n].dtype and np.array_equal(first[n], second[n]), n


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda w: w.pop("channel.fc1.kernel"), ["missing", "channel.fc1.kernel"]),
        (lambda w: w.__setitem__("spatial.conv.kernel", np.zeros((7, 7, 2, 1))), ["spatial.conv.kernel", "shape"]),
        (lambda w: w.__setitem__("channel.fc2.bias", np.zeros((8,), np.int64)), ["channel.fc2.bias", "not floating"]),
        (lambda w: w.__setitem__("channel.extra", np.zeros((1,))), ["unexpected", "channel.extra"]),
    ],
)
def test_bad_weights_raise_and_leave_module_unchanged(mutate, words):
    spec = CBAMSpec.seed(8)
    model = CBAM(spec, seed=0)
    before = export_weights(model)
    bad = init_weights(spec, 5)
    mutate(bad)
    with pytest.raises(WeightsError) as e:
        import_weights(model, bad)
    for word in words:
        assert word in str(e.value), str(e.value)
    after = export_weights(model)
    assert all(np.array_equal(before[n], after[n]) for n in before)


def test_bad_weights_lists_every_problem():
    spec = CBAMSpec.official(16)
    model = CBAM(spec)
    before = export_weights(model)
    bad = init_weights(spec, 1)
    bad.pop("spatial.bn.var")
    bad["channel.fc1.kernel"] = bad["channel.fc1.kernel"].T
    bad["spatial.bn.scale"] = np.ones((1,), np.int32)
    with pytest.raises(WeightsError) as e:
        import_weights(model, bad)
    msg = str(e.value)
    for word in ("spatial.bn.var", "channel.fc1.kernel", "spatial.bn.scale"):
        assert word in msg, msg
    assert all(np.array_equal(before[n], export_weights(model)[n]) for n in before)
    with pytest.raises(WeightsError):  # the spatial part alone is not a CBAM
        import_weights(model, spec_part(init_weights(spec, 1), "spatial"))


# ------------------------------------------------------------------ inputs
@pytest.mark.parametrize(
    "x, words",
    [
        (np.zeros((4, 4, 8)), ["rank-4", "rank 3"]),
        (np.zeros((2, 8, 4, 4)), ["NHWC", "NCHW", "transpose(0, 2, 3, 1)"]),
        (np.zeros((2, 4, 4, 8), np.int32), ["floating-point", "int32"]),
        (np.zeros((2, 4, 4, 5)), ["8 channels", "axis 3"]),
    ],
)
def test_bad_inputs_raise_input_error(x, words):
    spec = CBAMSpec.seed(8)
    model = CBAM(spec)
    calls = [
        lambda: model(jnp.asarray(x)),
        lambda: nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x)),
        lambda: F.cbam(F.init_params(spec), x, spec),
        lambda: jax.jit(F.channel_attention, static_argnames="spec")(F.init_params(spec), jnp.asarray(x), spec=spec),
        lambda: L.CBAM(spec).init(jax.random.key(0), jnp.asarray(x)),
    ]
    for call in calls:
        with pytest.raises(InputError) as e:
            call()
        for word in words:
            assert word in str(e.value), str(e.value)


def test_batchnorm_train_needs_two_values():
    spec = CBAMSpec.official(16)
    model = CBAM(spec)
    x = jnp.ones((1, 1, 1, 16))
    with pytest.raises(InputError, match=r"B\*H\*W >= 2"):
        model(x)
    model.eval()
    assert model(x).shape == (1, 1, 1, 16)  # eval is fine


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("case", ["official", "timm", "lp_lse"])
@pytest.mark.parametrize("train", [True, False])
def test_export_grads_match_functional_grad(case, train):
    spec, shape = CASES[case]
    w, x = rand_weights(spec), jnp.asarray(rand_x(shape, 8))
    r = jnp.asarray(np.random.default_rng(9).normal(size=shape))
    model = nnx_model(spec, w)
    model.train() if train else model.eval()
    grads = nnx.grad(lambda m, x: jnp.sum(m(x) * r))(model, x)
    got = export_grads(grads)
    trainable = [n for n, k in spec.param_kinds().items() if k == "param"]
    assert sorted(got) == sorted(trainable)

    stats = {n: jnp.asarray(w[n]) for n in F.BN_STATS if n in w}
    params = {n: jnp.asarray(w[n]) for n in trainable}
    want = jax.grad(lambda p: jnp.sum(F.cbam({**p, **stats}, x, spec, train=train)[0] * r))(params)
    for n in trainable:
        err = max_err(got[n], want[n])
        assert err <= 1e-12, f"{n}: max abs error {err:.3e}"
    # the grad step updated the stats in train mode only
    moved = max_err(export_weights(model).get("spatial.bn.mean", 0.0), w.get("spatial.bn.mean", 0.0))
    assert (moved > 0) == (train and spec.has_norm)


def test_export_grads_of_standalone_gate_has_canonical_names():
    spec = CBAMSpec.seed(8)
    ch = ChannelAttention(spec, param_dtype=jnp.float64)
    x = jnp.asarray(rand_x((2, 3, 3, 8)))
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(ch)
    assert sorted(export_grads(grads)) == sorted(spec.param_shapes("channel"))


# ------------------------------------------------------------------ dtypes
def test_low_precision_inputs():
    spec, shape = CASES["official"]
    w, x = rand_weights(spec), rand_x(shape, 10)
    want, want_stats = reference(x, w, spec, train=True)
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 6e-2), (jnp.float16, 1e-2)):
        model = import_weights(CBAM(spec, param_dtype=dtype), w)
        y = model(jnp.asarray(x, dtype))
        assert y.dtype == dtype
        assert max_err(y, want) <= tol, f"{dtype.__name__}: max abs error {max_err(y, want):.3e}"
        assert model.spatial.bn.mean[...].dtype == jnp.float32  # running stats kept in >= float32
        stat_err = max_err(export_weights(model)["spatial.bn.var"], want_stats["spatial.bn.var"])
        assert stat_err <= tol, f"{dtype.__name__} running var: max abs error {stat_err:.3e}"


def test_public_api():
    import cbam_multi.jax as cj

    for name in ("ChannelAttention", "SpatialAttention", "CBAM", "export_weights", "import_weights", "export_grads"):
        assert name in cj.__all__ and hasattr(cj, name)
    assert cj.functional is F and cj.linen is L
    assert "NHWC" in cj.__doc__ and "jax_enable_x64" in cj.__doc__


@pytest.mark.parametrize("k", [1, 3, 7])
def test_spatial_conv_value_and_derivatives_are_the_convolutions(k):
    # _spatial_conv computes its value by shifted multiply-adds and its derivative by XLA's convolution
    rng = np.random.default_rng(k)
    m = jnp.asarray(rng.normal(size=(2, 6, 5, 2)))
    kernel = jnp.asarray(rng.normal(size=(k, k, 2, 1)))
    t_m, t_k = jnp.asarray(rng.normal(size=m.shape)), jnp.asarray(rng.normal(size=kernel.shape))
    want = F._lax_conv(m, kernel, k // 2)
    assert float(jnp.abs(F._spatial_conv(m, kernel, k // 2) - want).max()) <= 1e-13
    _, tangent = jax.jvp(lambda a, b: F._spatial_conv(a, b, k // 2), (m, kernel), (t_m, t_k))
    _, want_tangent = jax.jvp(lambda a, b: F._lax_conv(a, b, k // 2), (m, kernel), (t_m, t_k))
    assert float(jnp.abs(tangent - want_tangent).max()) <= 1e-13


def test_forward_mode_through_cbam_agrees_with_reverse_mode():
    spec = CBAMSpec.official(32)  # BatchNorm, 7x7 spatial conv, tie rule "first"
    params = F.init_params(spec, 0, jnp.float64)
    rng = np.random.default_rng(0)
    x, t, g = (jnp.asarray(rng.normal(size=(2, 5, 4, 32))) for _ in range(3))
    _, tangent = jax.jvp(lambda v: F.cbam(params, v, spec, train=True)[0], (x,), (t,))
    grad = jax.grad(lambda v: (F.cbam(params, v, spec, train=True)[0] * g).sum())(x)
    assert abs(float((tangent * g).sum() - (grad * t).sum())) <= 1e-10 * float(jnp.abs(grad * t).sum())


@pytest.mark.parametrize("name,train", [("official", False), ("timm", True), ("lp_lse", False)])  # lp_lse: the fallback
def test_cbam_after_affine_is_cbam_of_the_affine_input(name, train):
    """`F.cbam_after_affine` (an eval BatchNorm's affine map folded into the block) computes
    cbam(h * scale + shift): output, spatial BN statistics and the gradients w.r.t. h, scale, shift and
    every parameter, with negative and zero scales among the channels (the max pool's sign rule)."""
    spec, shape = CASES[name]
    rng = np.random.default_rng(5)
    params = {n: jnp.asarray(a) for n, a in init_weights(spec, 3).items()}
    h = jnp.asarray(rng.normal(size=shape))
    scale = rng.uniform(0.5, 1.5, shape[-1]) * rng.choice([-1.0, 1.0], shape[-1])
    scale[0] = 0.0
    shift = rng.normal(size=shape[-1])
    ct = jnp.asarray(rng.normal(size=shape))

    def loss(fn, p, h, a, e):
        y, stats = fn(p, h, a, e)
        return (y * ct).sum(), (y, stats)

    fused = lambda p, h, a, e: F.cbam_after_affine(p, h, a, e, spec, train=train)
    composed = lambda p, h, a, e: F.cbam(p, h * a + e, spec, train=train)
    args = (params, h, jnp.asarray(scale), jnp.asarray(shift))
    (_, (y1, s1)), g1 = jax.value_and_grad(lambda *a: loss(fused, *a), argnums=(0, 1, 2, 3), has_aux=True)(*args)
    (_, (y2, s2)), g2 = jax.value_and_grad(lambda *a: loss(composed, *a), argnums=(0, 1, 2, 3), has_aux=True)(*args)
    err = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves((y1, s1, g1)), jax.tree.leaves((y2, s2, g2)), strict=True))
    assert err <= TOL, f"cbam_after_affine vs cbam(h * scale + shift): max abs err {err:.3e}"
