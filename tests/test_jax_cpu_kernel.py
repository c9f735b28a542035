"""The fused CPU inference kernel in JAX (`cbam_multi.jax.cpu_kernel`, an XLA FFI custom call): it runs where it
should, computes what the composed ops and the float64 oracle compute, differentiates as the composed ops do,
and everything it cannot do stays on the composed path (the torch op's twin: tests/test_cpu_kernel.py).

The kernel must build here (a C++ compiler and jaxlib's FFI headers are part of the set-up); these tests fail
rather than skip when it does not, unless ``CBAM_MULTI_CPU_KERNEL=0`` turns it off on purpose.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_default_matmul_precision", "highest")

import jax.numpy as jnp
import numpy as np
import pytest

from cbam_multi import CBAMSpec, InputError
from cbam_multi.jax import cpu_kernel
from cbam_multi.jax import functional as F
from cbam_multi.parity import CASES, TOLERANCES
from cbam_multi.reference import cbam_forward

if not cpu_kernel._switch.env_enabled():
    pytest.skip(f"{cpu_kernel.ENV_VAR}=0 turns the fused kernel off", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"float32": jnp.float32, "float64": jnp.float64}


def _kernel_computes(spec) -> bool:
    return spec.variant == "standard" and not spec.no_spatial and spec.mlp_act == "relu"


KERNEL_CASES = [c for c in CASES if set(c.spec.channel_pools) <= {"avg", "max"} and _kernel_computes(c.spec)]
ROUTED_CASES = [c for c in CASES if not (set(c.spec.channel_pools) <= {"avg", "max"} and _kernel_computes(c.spec))]


def _weights(spec, seed=1) -> dict[str, np.ndarray]:
    """Canonical float64 weights with non-trivial BatchNorm running statistics (the folded BN is exercised)."""
    w = {n: a.astype(np.float64) for n, a in F.init_params(spec, seed=seed, dtype=jnp.float64).items()}
    if spec.has_norm:
        w.update({"spatial.bn.scale": np.array([0.8]), "spatial.bn.bias": np.array([-0.3]),
                  "spatial.bn.mean": np.array([0.15]), "spatial.bn.var": np.array([1.7])})
    return w


def _inputs(case, seed=0):
    rng = np.random.default_rng(seed)
    shape = (case.batch, case.height, case.width, case.spec.channels)
    return rng.normal(size=shape), rng.uniform(0.5, 1.5, case.spec.channels), rng.normal(size=case.spec.channels), rng.normal(size=shape)


def _hlo(fn, *args) -> str:
    return jax.jit(fn).trace(*args).lower().as_text()


def _max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_kernel_builds():
    assert cpu_kernel.available(), f"the fused kernel did not build: {cpu_kernel._state['error']!r}"


# the plain block against the oracle is a parity row for every case (``jax-infer~oracle`` in parity_tests); here
# the ResNet tail (eval BN in front, shortcut add and ReLU behind) for every case, against the composed ops and
# the oracle, and the plain block against the composed ops for one case per preset (the parity rows cover the rest)
TAIL_CASES = [("bn+cbam+residual", c) for c in KERNEL_CASES] + [
    ("cbam", c) for c in {c.preset: c for c in reversed(KERNEL_CASES)}.values()]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("tail, case", TAIL_CASES, ids=lambda v: v if isinstance(v, str) else v.id)
def test_kernel_matches_composed_ops_and_oracle(tail, case, dtype):
    spec, dt = case.spec, DTYPES[dtype]
    w = _weights(spec)
    h64, scale64, shift64, res64 = _inputs(case)
    params = {n: jnp.asarray(a, F.stat_dtype(dt) if n in F.BN_STATS else dt) for n, a in w.items()}
    h, res = jnp.asarray(h64, dt), jnp.asarray(res64, dt)
    scale, shift = jnp.asarray(scale64, dt), jnp.asarray(shift64, dt)

    def run(p, h):  # a new function per call: jit caches traces by function, and the switch acts when tracing
        if tail == "cbam":
            return F.cbam(p, h, spec)[0]
        return F.cbam_after_affine(p, h, scale, shift, spec, residual=res)[0]

    # the oracle sees x as the composed path rounds it (the affine map in the input dtype)
    x_ref = h64 if tail == "cbam" else np.asarray((h * scale + shift).astype(dt), np.float64)
    assert cpu_kernel.applies(spec, h, False)  # the program holds the custom call: test_where_the_kernel_...
    fused = jax.jit(lambda *a: run(*a))(params, h)
    with cpu_kernel.disabled():
        composed = jax.jit(lambda *a: run(*a))(params, h)
    y_ref = cbam_forward(np.moveaxis(x_ref, 3, 1), w, spec, train=False)[0]
    y_ref = np.moveaxis(y_ref, 1, 3)
    if tail != "cbam":
        y_ref = np.maximum(y_ref + np.asarray(res, np.float64), 0)
    tol = TOLERANCES[dtype]["y"]
    assert fused.dtype == dt and fused.shape == h.shape
    err_ref, err_ops = _max_err(fused, y_ref), _max_err(fused, composed)
    assert err_ref <= tol, f"kernel vs float64 oracle: max abs err {err_ref:.3e} > {tol:.0e}"
    assert err_ops <= tol, f"kernel vs composed ops: max abs err {err_ops:.3e} > {tol:.0e}"


@pytest.mark.parametrize("case", ROUTED_CASES, ids=lambda c: c.id)
def test_options_the_kernel_lacks_run_the_composed_ops(case):
    spec = case.spec
    h = jnp.asarray(_inputs(case)[0])
    params = {n: jnp.asarray(a) for n, a in _weights(spec).items()}
    assert not cpu_kernel.applies(spec, h, False)
    assert cpu_kernel.TARGET not in _hlo(lambda p, x: F.cbam(p, x, spec)[0], params, h)


def test_where_the_kernel_does_not_apply():
    spec = CBAMSpec.official(16)
    x = jnp.ones((2, 5, 5, 16), jnp.float32)
    assert cpu_kernel.applies(spec, x, False)
    assert not cpu_kernel.applies(spec, x, True)  # train mode: BatchNorm batch statistics, composed ops
    assert not cpu_kernel.applies(spec, x.astype(jnp.bfloat16), False)  # half precision keeps its float32 gate
    assert not cpu_kernel.applies(spec, x[0], False)
    params = F.init_params(spec)
    scale, shift = jnp.ones(16), jnp.zeros(16)
    for block in (lambda p, x: F.cbam(p, x, spec)[0],
                  lambda p, x: F.cbam_after_affine(p, x, scale, shift, spec, residual=x)[0]):
        assert cpu_kernel.TARGET in _hlo(lambda *a: block(*a), params, x)
        with cpu_kernel.disabled():  # traced inside the block: the composed ops
            assert cpu_kernel.TARGET not in _hlo(lambda *a: block(*a), params, x)
    hlo = _hlo(lambda p, x: F.cbam(p, x, spec, train=True)[0], params, x)
    assert cpu_kernel.TARGET not in hlo
    # another platform lowered from the same program gets the composed ops (no custom call there)
    cuda = jax.jit(lambda p, x: F.cbam(p, x, spec)[0]).trace(params, x).lower(lowering_platforms=("cuda",)).as_text()
    assert cpu_kernel.TARGET not in cuda and "stablehlo.reduce" in cuda


def test_derivatives_are_the_composed_ops():
    """grad, jvp and vmap through an eval forward: the kernel has no derivative of its own; the custom_jvp
    hands differentiation to the composed ops (bit for bit), vmap runs the kernel per element."""
    spec = CBAMSpec.official(16)
    params = {n: jnp.asarray(a) for n, a in _weights(spec).items()}
    rng = np.random.default_rng(3)
    h, res = jnp.asarray(rng.normal(size=(2, 5, 6, 16))), jnp.asarray(rng.normal(size=(2, 5, 6, 16)))
    scale, shift = jnp.asarray(rng.uniform(0.5, 1.5, 16)), jnp.asarray(rng.normal(size=16))

    def loss(p, h):
        return (F.cbam_after_affine(p, h, scale, shift, spec, residual=res)[0] ** 2).sum()

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, h)
    tangent = jnp.asarray(rng.normal(size=h.shape))
    _, jvp = jax.jvp(lambda h: loss(params, h), (h,), (tangent,))
    batched = jax.jit(jax.vmap(lambda h: F.cbam(params, h, spec)[0]))(h[:, None])
    with cpu_kernel.disabled():
        grads_ref = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, h)
        _, jvp_ref = jax.jvp(lambda h: loss(params, h), (h,), (tangent,))
        batched_ref = jax.jit(jax.vmap(lambda h: F.cbam(params, h, spec)[0]))(h[:, None])
    assert cpu_kernel.TARGET in _hlo(jax.vmap(lambda h: F.cbam(params, h, spec)[0]), h[:, None])  # per element
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), grads, grads_ref))
    assert float(jvp) == float(jvp_ref)
    assert _max_err(batched, batched_ref) <= TOLERANCES["float64"]["y"]


def test_nan_and_inf_propagate_like_the_composed_ops():
    spec = CBAMSpec.official(16)
    params = F.init_params(spec, seed=2)
    x = np.random.default_rng(0).normal(size=(3, 6, 5, 16)).astype(np.float32)
    x[0, 2, 1, 3] = np.nan  # sample 0: NaN reaches the pools, so the whole sample is NaN
    x[1, 0, 0, 5] = np.inf
    x[2, 4, 4, 7] = -np.inf
    fused = np.asarray(jax.jit(lambda p, x: F.cbam(p, x, spec)[0])(params, jnp.asarray(x)))
    with cpu_kernel.disabled():
        composed = np.asarray(jax.jit(lambda p, x: F.cbam(p, x, spec)[0])(params, jnp.asarray(x)))
    assert np.array_equal(np.isnan(fused), np.isnan(composed)) and np.isnan(fused[0]).all()
    finite = np.isfinite(composed)
    assert np.array_equal(np.isfinite(fused), finite)
    assert _max_err(fused[finite], composed[finite]) <= TOLERANCES["float32"]["y"]


def test_broadcast_affine_other_residual_dtypes_shard_map_and_export():
    """What the composed ops accept, the kernel path accepts too: a scalar BN scale/shift, a residual of another
    dtype (promoted, composed path), a call inside shard_map; jax.export of a program traced with the kernel
    off (an exported program must not need this package's custom call)."""
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    spec = CBAMSpec.official(16)
    params = F.init_params(spec, seed=1)
    rng = np.random.default_rng(4)
    h = jnp.asarray(rng.normal(size=(2, 5, 4, 16)), jnp.float32)
    res64 = jnp.asarray(rng.normal(size=h.shape))

    def run(h, res=None):
        return F.cbam_after_affine(params, h, 1.5, jnp.asarray([0.25]), spec, residual=res)[0]

    mesh = Mesh(np.array(jax.devices()[:1]), ("d",))
    shard = jax.shard_map(lambda h: run(h), mesh=mesh, in_specs=P("d"), out_specs=P("d"))
    assert cpu_kernel.TARGET in _hlo(lambda h: run(h), h) and cpu_kernel.TARGET in _hlo(shard, h)
    got = [jax.jit(lambda h: run(h))(h), jax.jit(shard)(h), jax.jit(lambda h, r: run(h, r))(h, res64)]
    with cpu_kernel.disabled():
        want = [jax.jit(lambda h: run(h))(h)] * 2 + [jax.jit(lambda h, r: run(h, r))(h, res64)]
        exported = jax.export.export(jax.jit(lambda h: run(h)))(h)
    assert got[2].dtype == jnp.float64  # promoted like the composed add
    for a, b in zip(got, want):
        assert _max_err(a, b) <= TOLERANCES["float32"]["y"]
    assert _max_err(exported.call(h), want[0]) <= TOLERANCES["float32"]["y"]


def test_residual_of_another_shape_is_refused():
    spec = CBAMSpec.official(16)
    params, h = F.init_params(spec), jnp.ones((2, 4, 4, 16))
    with pytest.raises(InputError, match="residual must have h's shape"):
        F.cbam_after_affine(params, h, jnp.ones(16), jnp.zeros(16), spec, residual=jnp.ones((2, 4, 4, 8)))


def test_resnet_eval_tail_is_one_kernel_call_per_block():
    from cbam_multi.jax.models import resnet
    from cbam_multi.models import ResNetSpec

    spec = ResNetSpec(depth=18, stem="cifar", num_classes=3, width=16)
    params = resnet.init_params(spec, seed=0, dtype=jnp.float64)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)))
    compiled = jax.jit(lambda p, x: resnet.forward(p, x, spec)[0]).trace(params, x).lower().compile().as_text()
    assert compiled.count(f'custom_call_target="{cpu_kernel.TARGET}"') == len(spec.blocks())
    fused = jax.jit(lambda p, x: resnet.forward(p, x, spec)[0])(params, x)
    with cpu_kernel.disabled():
        composed = jax.jit(lambda p, x: resnet.forward(p, x, spec)[0])(params, x)
    assert _max_err(fused, composed) <= TOLERANCES["float64"]["y"]


BUILD_FAILS = """
import json, warnings
import jax.numpy as jnp
from cbam_multi import CBAMSpec
from cbam_multi.jax import cpu_kernel, functional as F
spec = CBAMSpec.official(16)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y = F.cbam(F.init_params(spec), jnp.ones((2, 4, 4, 16)), spec)[0]
    F.cbam(F.init_params(spec), jnp.ones((2, 4, 4, 16)), spec)
print(json.dumps({"shape": list(y.shape), "warnings": [str(w.message) for w in caught], "loaded": cpu_kernel._state["loaded"]}))
"""


def test_a_failed_build_warns_once_and_runs_the_composed_ops(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CXX": "false", "CBAM_MULTI_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", BUILD_FAILS], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["shape"] == [2, 4, 4, 16] and report["loaded"] is False
    built = [m for m in report["warnings"] if "could not be built" in m]
    assert len(built) == 1 and cpu_kernel.ENV_VAR in built[0], report["warnings"]
    assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.rglob("*.tmp"))  # nothing half-written left


SHARDED = """
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from cbam_multi import CBAMSpec
from cbam_multi.jax import cpu_kernel, functional as F
spec = CBAMSpec.official(16)
params = F.init_params(spec, seed=1)
mesh = Mesh(np.array(jax.devices()), ("data",))
rng = np.random.default_rng(0)
h, res = (jnp.asarray(rng.normal(size=(8, 6, 5, 16)), jnp.float32) for _ in range(2))
scale, shift = jnp.asarray(rng.uniform(0.5, 1.5, 16), jnp.float32), jnp.asarray(rng.normal(size=16), jnp.float32)
def tail(p, h, r):
    return F.cbam_after_affine(p, h, scale, shift, spec, residual=r)[0]
split = NamedSharding(mesh, P("data"))
run = jax.jit(tail)
hs, rs = jax.device_put(h, split), jax.device_put(res, split)
hlo = run.lower(params, hs, rs).compile().as_text()
y = run(params, hs, rs)
with cpu_kernel.disabled():
    ref = jax.jit(lambda p, h, r: tail(p, h, r))(params, h, res)
print(json.dumps({"devices": jax.device_count(), "custom_call": cpu_kernel.TARGET in hlo, "all_gather": "all-gather" in hlo,
                  "out_spec": str(y.sharding.spec), "err": float(jnp.max(jnp.abs(y - ref)))}))
"""


def test_a_batch_split_over_devices_stays_split(on_four_devices):
    """Sharded jit: each device runs the kernel on its own samples (custom partitioning), no gather of the batch."""
    report = on_four_devices(SHARDED)
    assert report["devices"] == 4 and report["custom_call"] and not report["all_gather"], report
    assert report["out_spec"] == "P('data',)", report
    assert report["err"] <= TOLERANCES["float32"]["y"], report
