"""JAX modules follow Flax's dtype convention (issue 13, item 3): parameters stored in ``param_dtype``
(default float32), computation in ``dtype`` or, with ``dtype=None`` (default), in the promoted dtype of
the input and the parameters. A float64 input is never silently computed in float32. The MNIST model
raises on an input dtype that is not its compute dtype, as torch does. Plus the no_spatial modules."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp

import cbam_multi.jax as cj
from cbam_multi import CBAMSpec, InputError, MNISTNetSpec
from cbam_multi.jax import linen as L
from cbam_multi.reference import cbam_forward

SPEC = CBAMSpec.official(16)
F32, F64, BF16 = jnp.float32, jnp.float64, jnp.bfloat16

# (id, input dtype, param_dtype, dtype, expected output dtype, tolerance against the float64 oracle run on
# the module's own parameter values and the input's values)
CASES = [
    ("x64-params32-promoted", F64, F32, None, F64, 1e-12),
    ("x32-params64-promoted", F32, F64, None, F64, 1e-12),
    ("x64-params64", F64, F64, None, F64, 1e-12),
    ("x32-params32", F32, F32, None, F32, 1e-5),
    ("x64-dtype32-explicit", F64, F32, F32, F32, 1e-5),
    ("x32-bf16-mixed", F32, F32, BF16, BF16, 6e-2),
]


def _x(dtype):
    return jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 6, 16)) * 2.0, dtype)


def _oracle(weights, x):
    y, _ = cbam_forward(np.transpose(np.asarray(x, np.float64), (0, 3, 1, 2)), weights, SPEC)
    return np.transpose(y, (0, 2, 3, 1))


@pytest.mark.parametrize("api", ["nnx", "linen"])
@pytest.mark.parametrize("x_dtype, param_dtype, dtype, out_dtype, tol", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_dtype_convention(api, x_dtype, param_dtype, dtype, out_dtype, tol):
    x = _x(x_dtype)
    if api == "nnx":
        model = cj.CBAM(SPEC, dtype=dtype, param_dtype=param_dtype, seed=3)
        model.eval()
        y = model(x)
        weights = cj.export_weights(model)
    else:
        model = L.CBAM(SPEC, seed=3, dtype=dtype, param_dtype=param_dtype)
        variables = model.init(jax.random.key(0), x)
        y = model.apply(variables, x)
        weights = L.export_variables(variables)
    assert all(w.dtype == np.dtype(param_dtype) for n, w in weights.items() if not n.endswith((".mean", ".var")))
    assert y.dtype == out_dtype
    err = float(np.max(np.abs(np.asarray(y, np.float64) - _oracle(weights, x))))
    assert err <= tol, f"max abs error {err:.2e} > {tol:.0e}"


def test_float64_input_is_not_rounded_to_float32():
    """The issue's case: CBAM(spec) (float32 parameters) given float64 input used to compute in float32
    (2.6e-8 error); now it computes in float64 with the float32 parameter values exactly."""
    model = cj.CBAM(SPEC, seed=1)
    model.eval()
    x = _x(F64)
    y = model(x)
    y32 = model(x.astype(F32))
    want = _oracle(cj.export_weights(model), x)
    assert y.dtype == F64 and float(np.max(np.abs(np.asarray(y) - want))) <= 1e-12
    assert float(np.max(np.abs(np.asarray(y32, np.float64) - want))) > 1e-9  # float32 compute is measurably worse


def test_mnist_model_raises_on_another_input_dtype_like_torch():
    from cbam_multi.jax.models import MNISTNet

    model = MNISTNet(MNISTNetSpec(conv_channels=(4, 8), dense=8), dtype=F32)
    with pytest.raises(InputError, match="float64.*computes in float32"):
        model(jnp.zeros((1, 28, 28, 1), F64))


@pytest.mark.parametrize("api", ["nnx", "linen"])
def test_no_spatial_modules(api):
    spec = CBAMSpec.official(16, no_spatial=True)
    x = _x(F64)
    if api == "nnx":
        model = cj.CBAM(spec, param_dtype=F64)
        assert model.spatial is None
        model.train()
        y = model(x)
        weights = cj.export_weights(model)
        with pytest.raises(ValueError, match="no_spatial"):
            cj.SpatialAttention(spec)
    else:
        model = L.CBAM(spec, param_dtype=F64)
        variables = model.init(jax.random.key(0), x)
        assert set(variables) == {"params"} and set(variables["params"]) == {"channel"}
        y = model.apply(variables, x, train=True, mutable=["batch_stats"])[0]
        weights = L.export_variables(variables)
    assert sorted(weights) == sorted(spec.param_shapes())
    y_ref, stats = cbam_forward(np.transpose(np.asarray(x), (0, 3, 1, 2)), weights, spec, train=True)
    assert stats == {}
    assert float(np.max(np.abs(np.transpose(np.asarray(y), (0, 3, 1, 2)) - y_ref))) <= 1e-12
