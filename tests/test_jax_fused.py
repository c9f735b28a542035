"""The JAX block through the CPU kernels (`cbam_multi.jax.fused`) computes what the composed ops compute.

Outputs, BatchNorm statistics and the gradients w.r.t. the input and every parameter, for every preset, both
tie rules (on inputs built with many tied maxima), train and eval mode: float64 within 1e-10 of the composed
ops, float32 within `cbam_multi.parity.TOLERANCES` of the float64 composed ops. Forward mode, a
Hessian-vector product (forward over reverse) and ``vmap`` of the gradient agree with the composed ops too,
and the kernels are what runs (the compiled program holds their custom calls and no convolution). The torch
twin is tests/test_torch_fused.py; the float64 oracle and the cross-framework rows are in parity_tests.
"""

from __future__ import annotations

import contextlib
import itertools

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_default_matmul_precision", "highest")

import jax.numpy as jnp
import numpy as np
import pytest

from cbam_multi import CBAMSpec
from cbam_multi.jax import cpu_kernel, fused
from cbam_multi.jax import functional as F
from cbam_multi.parity import TOLERANCES

if not cpu_kernel._switch.env_enabled():
    pytest.skip(f"{cpu_kernel.ENV_VAR}=0 turns the kernels off", allow_module_level=True)

# both tie rules on inputs full of ties (which hold untied values too) with and without BatchNorm (seed: 3x3
# conv; official: 7x7 conv and BN), train mode; eval mode (BN's running statistics) and untied input once each.
# parity_tests cross the JAX rows (these kernels) with torch's and the oracle over every preset.
CASES = [pytest.param(p, r, ties, train, id=f"{p}-{r}-{'ties' if ties else 'noties'}-{'train' if train else 'eval'}")
         for p, r, ties, train in [*((p, r, True, True) for p, r in itertools.product(["seed", "official"], ["split", "first"])),
                                   ("official", "first", True, False), ("seed", "split", False, True)]]
# spec options of the small maps between the kernels (several per case: each compile costs ~0.7 s)
OPTIONS = [pytest.param(p, r, o, id="-".join([p, r, *(f"{k}={v}" for k, v in o.items())])) for p, r, o in [
    ("official", "first", {"mlp_bias": False, "spatial_bias": False, "concat_order": ("mean", "max")}),
    ("timm", "first", {"gate": "hard_sigmoid", "channel_pools": ("avg",)}),
    ("official", "split", {"mlp_act": "silu", "channel_pools": ("max", "avg")}),
    ("paper", "split", {"channel_pools": ("max",)})]]


def _inputs(spec, ties, seed=0, shape=(4, 7, 6)):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(*shape, spec.channels))
    if ties:  # zeros and repeated integers: tied maxima over H, W and over channels
        x = np.round(np.maximum(x * 2, 0))
    params = {n: jnp.asarray(a) for n, a in F.init_params(spec, seed + 1, jnp.float64).items()}
    if spec.has_norm:  # running statistics that matter in eval mode
        params.update({"spatial.bn.mean": jnp.asarray([0.15]), "spatial.bn.var": jnp.asarray([1.7])})
    return params, jnp.asarray(x), jnp.asarray(rng.normal(size=x.shape))


def _run(spec, params, x, ct, dtype, train, composed):
    """[y, dL/dx, dL/dparams..., BN statistics...] for L = sum(y * ct), through the kernels or the composed ops."""
    params = {n: a.astype(dtype) if n not in F.BN_STATS else a for n, a in params.items()}
    x, ct = x.astype(dtype), ct.astype(dtype)

    def loss(p, v):
        y, stats = F.cbam(p, v, spec, train=train)
        return (y * ct).sum(), (y, stats)

    with cpu_kernel.disabled() if composed else contextlib.nullcontext():
        assert fused.applies(spec, x) == (not composed)
        (g_p, g_x), (y, stats) = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return [y, g_x, *(g_p[n] for n in sorted(g_p)), *(stats[n] for n in sorted(stats))]


def _err(a, b) -> float:
    return max(float(jnp.abs(jnp.asarray(p, jnp.float64) - jnp.asarray(q, jnp.float64)).max()) for p, q in zip(a, b, strict=True))


def _assert_float32(got, ref, what):
    """The output within float32's "y" tolerance, the rest (gradients, statistics) within its "grad" tolerance
    relative to the largest reference value."""
    err_y = _err(got[:1], ref[:1])
    scale = max(float(jnp.abs(r).max()) for r in ref[1:]) or 1.0
    err_g = _err(got[1:], ref[1:]) / scale
    tol = TOLERANCES["float32"]
    assert err_y <= tol["y"] and err_g <= tol["grad"], f"{what}: y err {err_y:.3e}, grad rel err {err_g:.3e}"


@pytest.mark.parametrize("preset,tie_rule,ties,train", CASES)
def test_kernels_match_composed_float64(preset, tie_rule, ties, train):
    spec = CBAMSpec.preset(preset, 16, tie_rule=tie_rule)
    params, x, ct = _inputs(spec, ties)
    ref = _run(spec, params, x, ct, jnp.float64, train, composed=True)
    got = _run(spec, params, x, ct, jnp.float64, train, composed=False)
    err = _err(got, ref)
    assert err <= TOLERANCES["float64"]["grad"], f"kernels vs composed (float64): max abs err {err:.3e}"


@pytest.mark.parametrize("preset,tie_rule,overrides", OPTIONS)
def test_kernels_float32_within_tolerance(preset, tie_rule, overrides):
    spec = CBAMSpec.preset(preset, 16, tie_rule=tie_rule, **overrides)
    params, x, ct = _inputs(spec, ties=False, seed=3)
    ref = _run(spec, params, x, ct, jnp.float64, True, composed=True)
    got = _run(spec, params, x, ct, jnp.float32, True, composed=False)
    _assert_float32(got, ref, "float32")


@pytest.mark.parametrize("tie_rule", ["first", "split"])
def test_float32_kernels_with_ties_past_one_vector(tie_rule):
    """C = 40 (the AVX-512 rows' masked tails) and 12x11 positions, integer inputs full of tied maxima: the
    kernels against the composed ops in float32, which see the same ties."""
    spec = CBAMSpec.preset("seed", 40, tie_rule=tie_rule)
    params, x, ct = _inputs(spec, ties=True, seed=5, shape=(3, 12, 11))
    ref = _run(spec, params, x, ct, jnp.float32, True, composed=True)
    got = _run(spec, params, x, ct, jnp.float32, True, composed=False)
    _assert_float32(got, ref, "float32 with ties")


def test_forward_mode_second_order_and_vmap_agree_with_composed():
    """jax.jvp (the tangent map evaluated as the composed JVP), a Hessian-vector product (forward over the
    kernels' reverse mode), vmap of the gradient and of the JVP, the gradient under jax.checkpoint, train mode with
    BatchNorm, float64."""
    spec = CBAMSpec.official(16)
    params, x, ct = _inputs(spec, ties=False, seed=7)
    t = jnp.asarray(np.random.default_rng(8).normal(size=x.shape))

    def compiled():  # a new function each time: jax.jit keeps what a function traced the first time
        def run(x, t):
            def loss(v):
                return (F.cbam(params, v, spec, train=True)[0] * ct).sum()

            grad = jax.grad(loss)
            return [jax.jvp(loss, (x,), (t,))[1], jax.jvp(grad, (x,), (t,))[1], jax.vmap(grad)(jnp.stack([x, 0.5 * x])),
                    jax.vmap(lambda t: jax.jvp(loss, (x,), (t,))[1])(jnp.stack([t, x])),  # the tangent map batched
                    jax.grad(jax.checkpoint(loss))(t)]  # rematerialised: the kernels' forward runs again in the backward

        return jax.jit(run)

    got = compiled()(x, t)
    with cpu_kernel.disabled():
        ref = compiled()(x, t)
    err = _err(got, ref)
    assert err <= TOLERANCES["float64"]["grad"], f"jvp / hvp / vmap(grad) vs composed: max abs err {err:.3e}"


@pytest.mark.parametrize("preset", ["seed", "official"])
def test_the_kernels_run(preset):
    """The differentiated program holds the forward, backward and conv kernels' custom calls and no XLA
    convolution; inside ``disabled()`` none of them."""
    spec = CBAMSpec.preset(preset, 16)
    params, x, ct = _inputs(spec, ties=False)

    def hlo():  # a new function each time: jax.jit keeps what a function traced the first time
        step = jax.value_and_grad(lambda p, v: (F.cbam(p, v, spec, train=True)[0] * ct).sum(), argnums=(0, 1))
        return jax.jit(step).trace(params, x).lower().as_text()

    def kernels_in(text):
        return [name for name in cpu_kernel.TRAIN_HANDLERS if cpu_kernel.train_target(name) in text]

    text = hlo()
    assert kernels_in(text) == list(cpu_kernel.TRAIN_HANDLERS)
    assert "convolution" not in text
    with cpu_kernel.disabled():
        assert kernels_in(hlo()) == []


def test_nan_and_inf_propagate_like_the_composed_ops():
    """Non-finite inputs: the same NaN / infinite pattern as the composed ops in the output and the gradients
    (no BatchNorm, so samples stay apart), and the finite values agree."""
    spec = CBAMSpec.seed(16)
    params, x, ct = _inputs(spec, ties=False)
    x = np.array(x)
    x[0, 2, 1, 3] = np.nan
    x[1, 0, 0, 5] = np.inf
    x[2, 4, 4, 7] = -np.inf
    x = jnp.asarray(x)
    ref = _run(spec, params, x, ct, jnp.float64, True, composed=True)
    got = _run(spec, params, x, ct, jnp.float64, True, composed=False)
    for a, b in zip(got, ref, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert np.array_equal(np.isnan(a), np.isnan(b)) and np.array_equal(np.isfinite(a), np.isfinite(b))
        finite = np.isfinite(b)
        assert not finite.any() or _err([a[finite]], [b[finite]]) <= TOLERANCES["float64"]["grad"]


SHARDED = r"""
import json, re
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from cbam_multi import CBAMSpec
from cbam_multi.jax import cpu_kernel, functional as F
spec = CBAMSpec.official(16)
params = F.init_params(spec, seed=1)
rng = np.random.default_rng(0)
x, ct = (jnp.asarray(rng.normal(size=(8, 6, 5, 16)), jnp.float32) for _ in range(2))

def step():  # a new function per call: jax.jit keeps what a function traced first
    def loss(p, v):
        y, stats = F.cbam(p, v, spec, train=True)
        return (y * ct).sum(), stats
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

split = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
xs = jax.device_put(x, split)
run = step()
hlo = run.lower(params, xs).compile().as_text()
got = run(params, xs)
with cpu_kernel.disabled():
    ref = step()(params, x)
err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)))

def per_device():  # shard_map: BatchNorm statistics per device; the replicated weights' gradients summed
    grad = jax.grad(lambda p, v, c: (F.cbam(p, v, spec, train=True)[0] * c).sum(), argnums=(0, 1))
    return jax.jit(jax.shard_map(lambda v, c: grad(params, v, c), mesh=split.mesh, in_specs=(P("data"), P("data")),
                                 out_specs=(P(), P("data"))))

got_sm = per_device()(xs, ct)
with cpu_kernel.disabled():
    ref_sm = per_device()(x, ct)
err_sm = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(got_sm), jax.tree.leaves(ref_sm)))
# XLA may gather a (B, C) vector of the MLP's backward; what it must not gather is a per-pixel array
gathered = [int(np.prod([int(d) for d in m.group(1).split(",")])) for m in re.finditer(r"= f32\[([0-9,]+)\][^ ]* all-gather", hlo)]
print(json.dumps({"devices": jax.device_count(), "kernels": all(cpu_kernel.train_target(n) in hlo for n in cpu_kernel.TRAIN_HANDLERS),
                  "largest_gather": max(gathered, default=0), "pixels": 8 * 6 * 5, "grad_spec": str(got[1][1].sharding.spec), "err": err,
                  "err_shard_map": err_sm}))
"""


def test_a_batch_split_over_devices_stays_split(on_four_devices):
    """Sharded jit of a train step: each device runs the kernels on its own samples (no per-pixel array gathered); BN
    statistics and parameter gradients are reduced over the devices by XLA, as for the composed ops. The same
    gradient inside shard_map (per-device statistics) agrees with the composed ops' there."""
    report = on_four_devices(SHARDED)
    assert report["devices"] == 4 and report["kernels"] and report["largest_gather"] < report["pixels"], report
    assert report["grad_spec"] == "P('data',)", report
    assert report["err"] <= TOLERANCES["float32"]["grad"] and report["err_shard_map"] <= TOLERANCES["float32"]["grad"], report
