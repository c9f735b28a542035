"""Property-based tests (hypothesis): random valid specs, shapes, dtypes, BatchNorm modes and inputs
(with ties and NaN) give the same CBAM in torch, JAX and the float64 oracle; random invalid specs and
spec JSON always raise SpecError, never another exception.

CI runs a fixed seed (``derandomize``) and 60 examples per property (the "ci" profile). A longer,
randomised run: ``HYPOTHESIS_PROFILE=long python -m pytest tests/test_properties.py`` (2,000 examples
per property, new seeds each run; a failure prints the example and the ``@reproduce_failure`` line).
The profiles are registered in ``conftest.py``.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

from cbam_multi import CBAMSpec, SpecError
from cbam_multi.parity import TOLERANCES
from cbam_multi.reference import cbam_forward
from cbam_multi.spec import POOLS, SPATIAL_MAPS
from cbam_multi.weights import init_weights

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp

import cbam_multi.torch as ct
from cbam_multi.jax import functional as F

FIELDS = {f.name for f in dataclasses.fields(CBAMSpec)}

# One strategy per CBAMSpec field: a field added to the spec must be added here (test_every_field_is_drawn),
# so the properties cover it. Fields another branch adds are listed ahead; absent fields are skipped.
# Floats stay where the float32 comparison is well conditioned (eps >= 1e-5, as every preset).
FIELD_STRATEGIES = {
    "channels": st.sampled_from([1, 3, 4]),
    "reduction": st.integers(1, 8),
    "hidden_rule": st.sampled_from(["floor", "round"]),
    "mlp_bias": st.booleans(),
    "mlp_kind": st.sampled_from(["linear", "conv1x1"]),
    "channel_pools": st.lists(st.sampled_from(POOLS), min_size=1, max_size=len(POOLS), unique=True).map(tuple),
    "spatial_kernel": st.sampled_from([1, 3, 5]),
    "concat_order": st.permutations(SPATIAL_MAPS).map(tuple),
    "spatial_bias": st.booleans(),
    "spatial_norm": st.sampled_from(["none", "batchnorm"]),
    "norm_momentum": st.floats(0.0, 1.0),
    "norm_eps": st.floats(1e-5, 1e-1),
    "norm_gamma_init": st.floats(-2.0, 2.0),
    "gate": st.sampled_from(["sigmoid", "hard_sigmoid"]),
    # fields of the anchors branch (issue: anchor presets)
    "tie_rule": st.sampled_from(["split", "first"]),
    "no_spatial": st.booleans(),
    "variant": st.sampled_from(["standard", "light"]),
    "mlp_act": st.sampled_from(["relu", "relu6", "leaky_relu", "silu"]),
    "hidden_channels": st.none() | st.integers(1, 6),
    "hidden_divisor": st.integers(1, 4),
}


@st.composite
def valid_specs(draw) -> CBAMSpec:
    kwargs = {name: draw(FIELD_STRATEGIES[name]) for name in sorted(FIELDS)}
    if kwargs["hidden_rule"] == "floor":  # keep the floor rule's hidden width >= 1 without filtering
        kwargs["reduction"] = min(kwargs["reduction"], kwargs["channels"])
    try:
        return CBAMSpec(**kwargs)
    except SpecError as e:  # a combination the spec forbids (e.g. a divisor without the round rule)
        note(f"rejected: {e}")
        assume(False)


def test_every_field_is_drawn():
    assert not FIELDS - set(FIELD_STRATEGIES), f"add a strategy for {sorted(FIELDS - set(FIELD_STRATEGIES))}"


# ------------------------------------------------------------------ inputs
# (batch, H, W): batch 1, H = 1, W = 1, odd and non-square sizes. A small alphabet of shapes (and of
# channel counts above), because JAX compiles every primitive once per shape: with few shapes the
# compiled kernels are reused across examples and the examples stay fast; the specs vary freely.
BHW = [(1, 1, 1), (2, 1, 3), (1, 5, 3), (3, 3, 2)]

@st.composite
def cases(draw):
    spec = draw(valid_specs())
    batch, height, width = draw(st.sampled_from(BHW))
    train = draw(st.booleans())
    if train and spec.has_norm:
        assume(batch * height * width >= 2)  # BatchNorm statistics need two values
    dtype = draw(st.sampled_from(["float64", "float32"]))
    kind = draw(st.sampled_from(["normal", "ties", "nan"]))
    seed = draw(st.integers(0, 2**32 - 1))
    grads = draw(st.integers(0, 7)) == 0  # JAX's backward pass compiles as much again: every 8th example
    return spec, (batch, spec.channels, height, width), train, dtype, kind, seed, grads


def make_input(shape, kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "ties":  # few distinct values: tied maxima in every pool, equal spatial maps
        return rng.integers(-2, 3, size=shape).astype(np.float64)
    x = rng.normal(size=shape)
    if kind == "nan":
        x.flat[rng.integers(x.size)] = np.nan
    return x


def weights_for(spec, seed: int) -> dict[str, np.ndarray]:
    w = init_weights(spec, seed=seed % 1000, dtype=np.float64)
    if spec.has_norm:  # a non-trivial running state, so eval mode is exercised
        rng = np.random.default_rng(seed)
        w["spatial.bn.mean"] = rng.normal(scale=0.1, size=(1,))
        w["spatial.bn.var"] = rng.uniform(0.5, 2.0, size=(1,))
    return w


def run_torch(spec, w, x, dtype, train):
    tdtype = getattr(torch, dtype)
    model = ct.CBAM(spec, dtype=tdtype)
    ct.import_weights(model, w)
    model.train(train)
    xt = torch.tensor(x, dtype=tdtype, requires_grad=True)
    y = model(xt)
    y.sum().backward()
    stats = {n: a for n, a in ct.export_weights(model).items() if n.endswith((".mean", ".var"))}
    out = {"y": y.detach().numpy(), "grad": xt.grad.numpy(), "stats": stats}
    if not train:  # inference path: on CPU the fused kernel where it applies
        with torch.inference_mode():
            out["y_inference"] = model(torch.tensor(x, dtype=tdtype)).numpy()
    return out


def run_jax(spec, w, x, dtype, train, grads):
    jdtype = getattr(jnp, dtype)
    params = {n: jnp.asarray(a, dtype=F.stat_dtype(jdtype) if n in F.BN_STATS else jdtype) for n, a in w.items()}
    xj = jnp.asarray(np.transpose(x, (0, 2, 3, 1)), dtype=jdtype)

    def loss(xin):
        y, stats = F.cbam(params, xin, spec, train=train)
        return y.sum(), (y, stats)

    # jitted, as JAX code runs in practice (and much cheaper here than eager per-op dispatch over ~100 shapes);
    # eager JAX is checked against the oracle by the parity suite's NNX rows
    if grads:
        (_, (y, stats)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(xj)
    else:
        _, (y, stats) = jax.jit(loss)(xj)
    nchw = lambda a: np.transpose(np.asarray(a), (0, 3, 1, 2))
    full_stats = {n: w[n] for n in F.BN_STATS if n in w}
    full_stats.update({n: np.asarray(a) for n, a in stats.items()})
    return {"y": nchw(y), "grad": nchw(g) if grads else None, "stats": full_stats}


def assert_close(got, want, tol, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} vs {want.shape}"
    assert np.array_equal(np.isnan(got), np.isnan(want)), f"{what}: NaN positions differ"
    finite = ~np.isnan(want)
    err = float(np.max(np.abs(got[finite] - want[finite]), initial=0.0))
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:g}"


@pytest.mark.slow
@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(cases())
def test_torch_jax_and_the_oracle_agree(case):
    spec, shape, train, dtype, kind, seed, grads = case
    x = make_input(shape, kind, seed)
    w = weights_for(spec, seed)
    tol = TOLERANCES[dtype]
    want_y, want_stats = cbam_forward(x, w, spec, train=train)
    t, j = run_torch(spec, w, x, dtype, train), run_jax(spec, w, x, dtype, train, grads)
    for name, got in (("torch", t), ("jax", j)):
        assert_close(got["y"], want_y, tol["y"], f"{name} y")
        for stat, value in want_stats.items():
            assert_close(got["stats"][stat], value, tol["stats"], f"{name} {stat}")
    if "y_inference" in t:
        assert_close(t["y_inference"], want_y, tol["y"], "torch inference y")
    if grads and (kind != "ties" or getattr(spec, "tie_rule", None) is not None):
        # The input gradient of sum(y): equal unless a maximum is tied and the backends route it
        # differently (the spec's tie_rule, where it exists, fixes the routing for both).
        scale = max(1.0, float(np.nanmax(np.abs(t["grad"]), initial=0.0)))
        assert_close(j["grad"], t["grad"], tol["grad"] * scale, "input grad jax vs torch")


def test_lp_pool_gradient_at_an_all_zero_channel_is_zero_in_both_backends():
    # Found by the property above (a tied input with a zero channel, H = W = 1): JAX's sqrt(sum x^2)
    # gave a NaN gradient where torch's vector_norm gives 0.
    spec = CBAMSpec(3, reduction=1, channel_pools=("avg", "max", "lp"), spatial_kernel=1)
    x = np.array([1.0, 2.0, 0.0]).reshape(1, 3, 1, 1)
    w = weights_for(spec, 0)
    t, j = run_torch(spec, w, x, "float64", False), run_jax(spec, w, x, "float64", False, True)
    assert np.isfinite(t["grad"]).all() and np.isfinite(j["grad"]).all(), (t["grad"], j["grad"])
    assert_close(j["grad"], t["grad"], TOLERANCES["float64"]["grad"], "input grad jax vs torch")



def test_lp_pool_propagates_nan_in_both_backends():
    # Found by the property above after the zero-channel fix: a NaN in an lp-pooled channel made JAX's
    # pool 0 (the `s > 0` test is False for NaN) where torch and the oracle give NaN for the whole sample.
    spec = CBAMSpec(1, reduction=1, channel_pools=("lp",), spatial_kernel=1)
    x = np.array([np.nan, 1.0, 2.0]).reshape(1, 1, 1, 3)
    w = weights_for(spec, 0)
    t, j = run_torch(spec, w, x, "float64", False), run_jax(spec, w, x, "float64", False, False)
    assert np.isnan(t["y"]).all(), t["y"]
    assert_close(j["y"], t["y"], TOLERANCES["float64"]["y"], "lp pool NaN jax vs torch")

# ------------------------------------------------------------------ invalid specs
# Values of every JSON type and then some: most are invalid for any given field.
ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 40), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6), st.sampled_from(["avg", "max", "mean", "lp", "floor", "round", "batchnorm", "sigmoid"]),
    st.lists(st.one_of(st.sampled_from(list(POOLS) + list(SPATIAL_MAPS)), st.integers(), st.none()), max_size=5),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@st.composite
def spec_kwargs(draw):
    """A valid spec's fields with one to three fields replaced by arbitrary values (and sometimes an
    unknown field name): valid or not, CBAMSpec must either build or raise SpecError."""
    kwargs = dataclasses.asdict(draw(valid_specs()))
    for _ in range(draw(st.integers(1, 3))):
        kwargs[draw(st.sampled_from(sorted(FIELDS)))] = draw(ANY_VALUE)
    if draw(st.booleans()):
        kwargs[draw(st.sampled_from(["chanels", "format", "version", "kernel"]))] = draw(ANY_VALUE)
    return kwargs


@given(spec_kwargs())
def test_arbitrary_fields_build_a_spec_or_raise_spec_error(kwargs):
    kwargs.pop("format", None), kwargs.pop("version", None)
    try:
        spec = CBAMSpec(**{k: v for k, v in kwargs.items() if k in FIELDS})
    except SpecError:
        return
    assert spec.hidden >= 1 and CBAMSpec.from_json(spec.to_json()) == spec
    for name in ("norm_momentum", "norm_eps", "norm_gamma_init"):
        assert math.isfinite(getattr(spec, name))


@given(st.one_of(
    spec_kwargs().map(lambda d: json.dumps(d, default=str)),
    spec_kwargs().map(lambda d: json.dumps(d, default=str)[: len(json.dumps(d, default=str)) // 2]),
    st.text(max_size=40),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=4),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3)).map(json.dumps),
))
def test_spec_json_builds_a_spec_or_raises_spec_error(text):
    try:
        spec = CBAMSpec.from_json(text)
    except SpecError:
        return
    assert CBAMSpec.from_json(spec.to_json()) == spec
