"""Pure, jit-compatible CBAM maths in JAX, NHWC. The only place in this backend with the maths.

``params`` is a flat dict of canonical names (``spec.param_shapes()``, canonical layouts: dense
kernels (in, out), conv kernel HWIO) -> arrays; ``spec`` is a frozen, hashable `CBAMSpec` and must be
a static argument under ``jax.jit`` (``static_argnames=("spec", "train")``).

Every check here looks only at shapes and dtypes, which are static under tracing, so the same
functions run eagerly, under ``jit`` and under ``grad``. Numerics follow `cbam_multi.reference`:

* compute happens in the input dtype (parameters are cast to it);
* reductions (avg/lp/lse pools, the channel mean map, BatchNorm statistics) run in at least float32
  and are cast back, so bfloat16/float16 inputs do not accumulate in half precision;
* BatchNorm uses PyTorch's convention (``spec.norm_momentum`` is the weight of the *new* batch
  statistic; the running variance gets the *unbiased* batch variance, normalisation the biased one).
  Flax's ``BatchNorm`` cannot do the unbiased update, hence the hand-written BN below.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from cbam_multi.errors import InputError, SpecError, WeightsError
from cbam_multi.spec import LEAKY_SLOPE, CBAMSpec, require_spec
from cbam_multi.weights import init_weights

from . import cpu_kernel, fused  # fused uses this module's pieces at call time (a cycle only at import)

Params = Mapping[str, jax.Array]

BN_STATS = ("spatial.bn.mean", "spatial.bn.var")

__all__ = [
    "channel_attention", "spatial_attention", "spatial_gate", "cbam", "init_params", "check_input", "max_reduce", "batch_norm",
    "promote_input", "BN_STATS",
]


# ------------------------------------------------------------------ static checks (trace time)
def check_input(x, spec: CBAMSpec, *, train: bool = False) -> None:
    """Raise InputError for a bad input; shape/dtype only, so it is safe inside ``jit``."""
    require_spec(spec).check_input(x.shape, str(x.dtype), "NHWC")
    if train and spec.has_norm:
        n = x.shape[0] * x.shape[1] * x.shape[2]
        if n < 2:
            raise InputError(
                "BatchNorm in train mode needs more than 1 value per channel (B*H*W >= 2), "
                f"got input shape {tuple(x.shape)}"
            )


def _check_params(params: Params, spec: CBAMSpec, part: str | None) -> None:
    """Names and shapes of the params ``part`` needs (extra names are ignored); WeightsError lists all."""
    problems = []
    expected = spec.param_shapes(part)
    missing = [n for n in expected if n not in params]
    if missing:
        problems.append(f"missing {missing}")
    for name, shape in expected.items():
        if name in params and tuple(jnp.shape(params[name])) != tuple(shape):
            problems.append(f"{name}: shape {tuple(jnp.shape(params[name]))}, spec says {tuple(shape)}")
    if problems:
        raise WeightsError("params do not match CBAMSpec: " + "; ".join(problems))


def _need_spatial(spec: CBAMSpec) -> None:
    if spec.no_spatial:
        raise SpecError("this CBAMSpec has no_spatial=True: it has no spatial gate")


def _checked_input(x, spec: CBAMSpec, train: bool = False) -> jax.Array:
    """Check shape/dtype as given (before any conversion), then return a JAX array."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        x = jnp.asarray(x)
    check_input(x, spec, train=train)
    return x if isinstance(x, jax.Array) else jnp.asarray(x)


def _acc_dtype(dtype) -> jnp.dtype:
    """Accumulation dtype: at least float32 (float64 stays float64)."""
    return jnp.promote_types(dtype, jnp.float32)


# ------------------------------------------------------------------ pieces
def _first_onehot(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """Boolean mask, shaped like ``x``, of the maximum of lowest flat (row-major) index over the
    contiguous ``axes``: what torch's ``max(dim)`` / ``max_pool2d`` record as the argmax (a NaN, the
    first one, where there is one: ``max`` propagates it).

    The lowest index among the maxima is a min-reduction of integers, not ``jnp.argmax``: XLA:CPU runs
    argmax's paired (value, index) reduction unvectorised, several times slower than max + min
    (benchmarks/RESULTS.md, "JAX tie rule")."""
    a0, a1 = axes[0], axes[-1] + 1
    n = int(np.prod(x.shape[a0:a1]))
    flat = x.reshape(x.shape[:a0] + (n,) + x.shape[a1:])
    iota = jax.lax.broadcasted_iota(jnp.int32, flat.shape, a0)
    hit = (flat == jnp.max(flat, axis=a0, keepdims=True)) | jnp.isnan(flat)
    first = jnp.min(jnp.where(hit, iota, n), axis=a0, keepdims=True)
    return (iota == first).reshape(x.shape)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _max_first(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """``jnp.max(x, axes)`` whose derivative sends a tied maximum's whole (co)tangent to the first one."""
    return jnp.max(x, axis=axes)


@_max_first.defjvp
def _max_first_jvp(axes, primals, tangents):
    # A custom JVP (linear in the tangent) rather than a custom VJP: JAX transposes it for reverse mode,
    # and forward mode (jax.jvp, jax.hessian) keeps working.
    (x,), (t,) = primals, tangents
    onehot = _first_onehot(x, axes)
    return jnp.max(x, axis=axes), jnp.sum(jnp.where(onehot, t, jnp.zeros((), t.dtype)), axis=axes)


def max_reduce(x: jax.Array, axes: tuple[int, ...], tie_rule: str = "split") -> jax.Array:
    """Max over the contiguous ``axes`` with the gradient rule ``tie_rule`` of `cbam_multi.spec`:
    "split" (``jnp.max``: tied maxima share the cotangent) or "first" (all to the lowest flat index)."""
    if tie_rule == "split":
        return jnp.max(x, axis=axes)
    if tie_rule != "first":
        raise ValueError(f"unknown tie_rule {tie_rule!r}")
    axes = tuple(a % x.ndim for a in axes)
    if list(axes) != list(range(axes[0], axes[-1] + 1)):
        raise ValueError(f"max_reduce with tie_rule='first' needs contiguous axes, got {axes}")
    return _max_first(x, axes)


def _activation(h: jax.Array, kind: str) -> jax.Array:
    """The shared MLP's activation (`cbam_multi.spec.ACTIVATIONS`)."""
    if kind == "relu":
        return jax.nn.relu(h)
    if kind == "relu6":
        return jax.nn.relu6(h)
    if kind == "leaky_relu":
        return jax.nn.leaky_relu(h, LEAKY_SLOPE)
    return jax.nn.silu(h)


def _gate(z: jax.Array, kind: str) -> jax.Array:
    if z.dtype in (jnp.bfloat16, jnp.float16):  # the gate is computed in float32, then rounded once
        return _gate(z.astype(jnp.float32), kind).astype(z.dtype)
    if kind == "sigmoid":
        return jax.nn.sigmoid(z)
    return jnp.clip(z / 6.0 + 0.5, 0.0, 1.0)  # hard_sigmoid = relu6(z + 3) / 6, as the reference


def _pool_hw(x: jax.Array, kind: str, tie_rule: str = "split") -> jax.Array:
    """Global pool over H, W of an NHWC array -> (B, C), in the input dtype."""
    if kind == "max":
        return max_reduce(x, (1, 2), tie_rule)
    xa = x.astype(_acc_dtype(x.dtype))
    if kind == "avg":
        p = jnp.mean(xa, axis=(1, 2))
    elif kind == "lp":  # official code: F.lp_pool2d(x, 2, (H, W)) = sqrt(sum x^2)
        # The gradient at an all-zero channel is 0, as torch.linalg.vector_norm's (torch backend); a bare
        # sqrt would give 0 * inf = NaN there. Double where: the untaken branch must not see sqrt'(0) either.
        # `s == 0` (not `s > 0`) as the test, so a NaN sum stays NaN, as in torch and the oracle.
        s = jnp.sum(xa * xa, axis=(1, 2))
        zero = s == 0
        p = jnp.where(zero, 0, jnp.sqrt(jnp.where(zero, 1, s)))
    else:  # "lse": log of the *sum* (not the mean) of exponentials, max-shifted
        p = jax.nn.logsumexp(xa, axis=(1, 2))
    return p.astype(x.dtype)


def _channel(params: Params, x: jax.Array, spec: CBAMSpec) -> jax.Array:
    return x * _channel_gate(params, x, spec)[:, None, None, :]


def _channel_gate(params: Params, x: jax.Array, spec: CBAMSpec) -> jax.Array:
    """The channel gate values (B, C) of NHWC ``x``."""
    return _mlp_gate(params, [_pool_hw(x, kind, spec.tie_rule) for kind in spec.channel_pools], spec)


def _mlp_gate(params: Params, pools: list, spec: CBAMSpec) -> jax.Array:
    """The channel gate (B, C) from the pooled vectors (B, C), one per ``spec.channel_pools``."""
    dt = pools[0].dtype
    b, c = pools[0].shape
    npools = len(pools)
    if spec.variant == "light":  # timm LightChannelAttn: one MLP call on the mean of the pools
        pooled, npools = sum(p * (1.0 / npools) for p in pools), 1
    else:  # one MLP call on all pools stacked along the batch: (npools * B, C)
        pooled = jnp.concatenate(pools, axis=0)
    h = pooled @ params["channel.fc1.kernel"].astype(dt)
    if spec.mlp_bias:
        h = h + params["channel.fc1.bias"].astype(dt)
    h = _activation(h, spec.mlp_act)
    o = h @ params["channel.fc2.kernel"].astype(dt)
    if spec.mlp_bias:
        o = o + params["channel.fc2.bias"].astype(dt)
    logits = o.reshape(npools, b, c).sum(axis=0) if npools > 1 else o
    return _gate(logits, spec.gate)


def batch_norm(z: jax.Array, scale, bias, mean, var, *, momentum: float, eps: float, train: bool):
    """BatchNorm over every axis but the last (NHWC channels) in >= float32, PyTorch's convention.

    Returns ``(out, (new_mean, new_var))`` in train mode, ``(out, None)`` in eval mode. ``momentum``
    weighs the new batch statistic (Flax's momentum would be 1 - momentum, the weight of the old
    value); the running variance gets the unbiased batch variance, normalisation the biased one.
    Flax's ``BatchNorm`` cannot do the unbiased update, hence this function. Used by the CBAM
    block's spatial BN and by every BN of the networks (`cbam_multi.jax.models`).
    """
    acc = _acc_dtype(z.dtype)
    za = z.astype(acc)
    axes = tuple(range(z.ndim - 1))
    if train:
        n = z.size // z.shape[-1]  # static
        m_b = jnp.mean(za, axis=axes)
        v_b = jnp.mean(jnp.square(za - m_b), axis=axes)  # biased: used to normalise
        sacc = _acc_dtype(mean.dtype)
        new_mean = (1.0 - momentum) * mean.astype(sacc) + momentum * m_b.astype(sacc)
        new_var = (1.0 - momentum) * var.astype(sacc) + momentum * v_b.astype(sacc) * (n / (n - 1))
        stats = (jax.lax.stop_gradient(new_mean).astype(mean.dtype), jax.lax.stop_gradient(new_var).astype(var.dtype))
    else:
        m_b, v_b, stats = mean.astype(acc), var.astype(acc), None
    out = (za - m_b) / jnp.sqrt(v_b + eps) * scale.astype(acc) + bias.astype(acc)
    return out.astype(z.dtype), stats


def _batch_norm(z: jax.Array, params: Params, spec: CBAMSpec, train: bool):
    """BatchNorm of the single spatial-logit channel z (B, H, W, 1). Returns (out, stats)."""
    out, new = batch_norm(
        z, params["spatial.bn.scale"], params["spatial.bn.bias"], params["spatial.bn.mean"], params["spatial.bn.var"],
        momentum=spec.norm_momentum, eps=spec.norm_eps, train=train,
    )
    return out, ({} if new is None else dict(zip(BN_STATS, new)))


def _channel_mean(x: jax.Array, gated_from=None) -> jax.Array:
    """Mean over channels of NHWC ``x`` -> (B, H, W), accumulated in >= float32.

    ``gated_from=(x0, g)`` says ``x == x0 * g[:, None, None, :]`` (the channel-gated tensor inside `cbam`).
    For float32/float64 the mean is then taken as the contraction ``sum_c x0 * g / C``: XLA:CPU runs it
    as one matrix-vector pass over ``x0``, fused-free, instead of a separate reduction over the
    materialised product (-20 % forward time for a 64x64x28x28 block on CPU). Same maths; only the
    summation order differs. Half precision keeps the reduction of the rounded product, as before.
    """
    dt = x.dtype
    if gated_from is not None and dt in (jnp.float32, jnp.float64):
        x0, g = gated_from
        s = jnp.einsum("bhwc,bc->bhw", x0, g, precision=jax.lax.Precision.HIGHEST)
        return s / x.shape[3]
    return jnp.mean(x.astype(_acc_dtype(dt)), axis=3).astype(dt)


def _lax_conv(m: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
    # precision follows jax_default_matmul_precision
    return jax.lax.conv_general_dilated(
        m, kernel, window_strides=(1, 1), padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _spatial_conv(m: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
    """The k x k "same" convolution of the (B, H, W, 1 or 2) pooled maps with an HWIO kernel (k, k, 1 or 2, 1).

    Up to 3 x 3, its value is k * k * (1 or 2) shifted multiply-adds, accumulated in at least float32: one
    fused loop, where XLA:CPU's convolution with 1-2 input channels and one output channel is several times
    slower (benchmarks/RESULTS.md, "JAX spatial conv"). Larger kernels keep the convolution: their unrolled
    sums (98 terms at 7 x 7) more than double the compile time of every program holding a CBAM block. The
    derivative is the convolution's own (`_lax_conv` is linear in each argument), so reverse and forward
    mode run XLA's convolution gradients either way."""
    k_h, k_w, c_in, _ = kernel.shape
    if k_h * k_w > 9:
        return _lax_conv(m, kernel, padding)
    dt = m.dtype
    acc = _acc_dtype(dt)
    h, w = m.shape[1], m.shape[2]
    mp = jnp.pad(m.astype(acc), ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    kernel = kernel.astype(acc)
    out = None
    for i in range(k_h):
        for j in range(k_w):
            for c in range(c_in):
                term = mp[:, i : i + h, j : j + w, c : c + 1] * kernel[i, j, c, 0]
                out = term if out is None else out + term
    return out.astype(dt)


@_spatial_conv.defjvp
def _spatial_conv_jvp(padding, primals, tangents):
    (m, kernel), (m_dot, kernel_dot) = primals, tangents
    return _spatial_conv(m, kernel, padding), _lax_conv(m_dot, kernel, padding) + _lax_conv(m, kernel_dot, padding)


def _spatial(params: Params, x: jax.Array, spec: CBAMSpec, train: bool, gated_from=None):
    s, stats = _spatial_gate(params, x, spec, train, gated_from)
    return x * s, stats


def _spatial_gate(params: Params, x: jax.Array, spec: CBAMSpec, train: bool, gated_from=None):
    """The spatial attention map (B, H, W, 1) and the BN stats update."""
    maps = {
        "mean": _channel_mean(x, gated_from),
        "max": max_reduce(x, (3,), spec.tie_rule),
    }
    return _gate_from_maps(params, maps, spec, train)


def _gate_from_maps(params: Params, maps: dict, spec: CBAMSpec, train: bool, conv=None):
    """The spatial attention map (B, H, W, 1) from the channel "mean" and "max" maps (B, H, W), and the BN
    stats update. ``conv(m, kernel, padding)``: the spatial conv (default `_spatial_conv`)."""
    dt = maps["mean"].dtype
    if spec.variant == "light":  # timm LightSpatialAttn: the one map 0.5 * mean + 0.5 * max, (B, H, W, 1)
        m = (0.5 * maps["mean"] + 0.5 * maps["max"])[..., None]
    else:
        m = jnp.stack([maps[k] for k in spec.concat_order], axis=-1)  # (B, H, W, 2)
    z = (conv or _spatial_conv)(m, params["spatial.conv.kernel"].astype(dt), spec.padding)  # (B, H, W, 1)
    if spec.spatial_bias:
        z = z + params["spatial.conv.bias"].astype(dt)
    stats = {}
    if spec.has_norm:
        z, stats = _batch_norm(z, params, spec, train)
    return _gate(z, spec.gate), stats


# ------------------------------------------------------------------ public API
def channel_attention(params: Params, x, spec: CBAMSpec) -> jax.Array:
    """Channel gate on NHWC ``x``: ``x * gate(MLP(pool_1) + ... + MLP(pool_n))``."""
    x = _checked_input(x, spec)
    _check_params(params, spec, "channel")
    return _channel(params, x, spec)


def spatial_attention(params: Params, x, spec: CBAMSpec, *, train: bool = False):
    """Spatial gate on NHWC ``x``. Returns ``(y, new_stats)``; ``new_stats`` holds the updated
    ``spatial.bn.mean``/``spatial.bn.var`` in train mode with BatchNorm, else ``{}``."""
    _need_spatial(spec)
    x = _checked_input(x, spec, train)
    _check_params(params, spec, "spatial")
    return _spatial(params, x, spec, train)


def spatial_gate(params: Params, x, spec: CBAMSpec, *, train: bool = False):
    """The spatial attention map (B, H, W, 1) that `spatial_attention` multiplies into NHWC ``x``.
    Returns ``(map, new_stats)``, like `spatial_attention`."""
    _need_spatial(spec)
    x = _checked_input(x, spec, train)
    _check_params(params, spec, "spatial")
    return _spatial_gate(params, x, spec, train)


def cbam(params: Params, x, spec: CBAMSpec, *, train: bool = False):
    """CBAM on NHWC ``x``: channel gate, then spatial gate. Returns ``(y, new_stats)``."""
    x = _checked_input(x, spec, train)
    _check_params(params, spec, None)
    params = {n: params[n] for n in spec.param_shapes()}
    if fused.applies(spec, x):  # CPU: the kernels (cbam_multi/csrc), forward and derivative
        return fused.cbam(params, x, spec, train)
    return _cbam(params, x, spec, train)


# Jitted so that an eager call (an NNX or linen module outside jit, a debugging session) runs one compiled
# program instead of ~150 op-by-op dispatches, each compiled on its first use (benchmarks/RESULTS.md, "Eager
# JAX"); under an outer jit or grad it is traced inline like any function.
@functools.partial(jax.jit, static_argnames=("spec", "train"))
def _cbam(params: Params, x, spec: CBAMSpec, train: bool):
    g = _channel_gate(params, x, spec)
    if spec.no_spatial:
        return x * g[:, None, None, :], {}
    return _spatial(params, x * g[:, None, None, :], spec, train, gated_from=(x, g))


def cbam_after_affine(params: Params, h, scale, shift, spec: CBAMSpec, *, train: bool = False, residual=None):
    """``cbam(params, h * scale + shift, spec)`` with per-channel ``scale``, ``shift`` (C,): an eval-mode
    BatchNorm in front of the block. Returns ``(y, new_stats)`` like `cbam`; with ``residual`` (h's shape),
    ``y = relu(cbam(...) + residual)``: a ResNet block's tail, one kernel call on CPU in eval mode.

    The block reads ``h`` and never materialises ``x = h * scale + shift``: XLA fuses the affine map into
    each of the block's passes (the pools as ``mean(h) * scale + shift`` and ``max(h * scale) + shift``, the
    channel mean as one contraction of ``h``), where the composed pair writes ``x`` and its consumers each
    re-fuse the map (ResNet-50 inference on CPU: benchmarks/RESULTS.md). Same maths, rounded in another
    order. Other variants, pools and half precision take the composed pair."""
    h = _checked_input(h, spec, train)
    _check_params(params, spec, None)
    dt = h.dtype
    acc = _acc_dtype(dt)  # half precision: the map in float32, rounded once (as `batch_norm` does)
    c = h.shape[-1]  # scalars and (1,) broadcast, as in h * scale + shift
    scale, shift = (jnp.broadcast_to(jnp.asarray(a).astype(acc), (c,)) for a in (scale, shift))
    params = {n: params[n] for n in spec.param_shapes()}
    if residual is not None and tuple(residual.shape) != tuple(h.shape):
        raise InputError(f"residual must have h's shape {h.shape}, got {residual.shape}")
    same_dtype = residual is None or residual.dtype == dt
    if same_dtype and cpu_kernel.applies(spec, h, train):  # eval on CPU: the kernel forms x sample by sample in cache
        return _fused(params, h, (scale, shift), residual, spec), {}
    if (spec.no_spatial or spec.variant != "standard" or not set(spec.channel_pools) <= {"avg", "max"}
            or dt not in (jnp.float32, jnp.float64)):
        y, stats = _cbam(params, (h.astype(acc) * scale + shift).astype(dt), spec, train)
    else:
        y, stats = _cbam_after_affine(params, h, scale, shift, spec, train)
    return (y if residual is None else jax.nn.relu(y + residual)), stats


@functools.partial(jax.jit, static_argnames=("spec", "train"))
def _cbam_after_affine(params: Params, h, scale, shift, spec: CBAMSpec, train: bool):
    acc = _acc_dtype(h.dtype)
    pools = []
    for kind in spec.channel_pools:
        if kind == "avg":  # linear: the mean of h, mapped
            pools.append((jnp.mean(h.astype(acc), axis=(1, 2)) * scale + shift).astype(h.dtype))
        else:  # x's maximum is h * scale's maximum, shifted; the tie rule acts on h * scale (values that
            # differ there but round to one x after the shift count as ties in cbam(x) only)
            pools.append(max_reduce(h * scale, (1, 2), spec.tie_rule) + shift)
    g = _mlp_gate(params, pools, spec)
    w = scale * g  # x * g = h * (scale * g) + shift * g
    mean = jnp.einsum("bhwc,bc->bhw", h, w, precision=jax.lax.Precision.HIGHEST) + (shift * g).sum(-1)[:, None, None]
    y1 = (h * scale + shift) * g[:, None, None, :]
    maps = {"mean": mean / h.shape[3], "max": max_reduce(y1, (3,), spec.tie_rule)}
    s, stats = _gate_from_maps(params, maps, spec, train)
    return y1 * s, stats


def _composed(params: Params, x, in_affine, residual, spec: CBAMSpec):
    """What `cpu_kernel.cbam_infer` computes, from the composed ops: eval-mode cbam(x) (of x * scale + shift
    with ``in_affine``), then relu(. + residual) with a residual. Its derivatives are the kernel path's."""
    if in_affine is None:
        y, _ = _cbam(params, x, spec, False)
    else:
        y, _ = _cbam_after_affine(params, x, *in_affine, spec, False)
    return y if residual is None else jax.nn.relu(y + residual)


@functools.partial(jax.jit, static_argnames=("spec",))  # one program for eager calls, as `_cbam`
def _fused(params: Params, x, in_affine, residual, spec: CBAMSpec):
    composed = functools.partial(_composed, spec=spec)
    return cpu_kernel.cbam_infer(params, x, spec, composed, in_affine, residual)


def promote_input(x, params: Params, dtype=None):
    """Flax's dtype convention for the modules: ``x`` cast to ``dtype``, or with ``dtype=None`` to the
    promoted dtype of ``x`` and the trainable parameters (``jnp.result_type``, as ``flax.nnx.Linear``
    promotes), so a float64 input meets float64 maths and nothing is silently computed in a narrower
    dtype than both. Non-float inputs pass through unchanged for `check_input` to name the problem."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return x
    if dtype is None:
        dtype = jnp.result_type(x.dtype, *(jnp.asarray(v).dtype for n, v in params.items() if n not in BN_STATS))
    return x if x.dtype == jnp.dtype(dtype) else jnp.asarray(x).astype(dtype)


def init_params(spec: CBAMSpec, seed: int = 0, dtype=jnp.float32, part: str | None = None) -> dict[str, jax.Array]:
    """Canonical seeded parameters (`cbam_multi.weights.init_weights`) as a flat dict of JAX arrays.

    BatchNorm running statistics are kept in at least float32 (as Flax does), whatever ``dtype``.
    """
    w = init_weights(spec, seed, np.float64)
    names = spec.param_shapes(part)
    return {n: jnp.asarray(w[n], dtype=stat_dtype(dtype) if n in BN_STATS else dtype) for n in names}


def stat_dtype(dtype) -> jnp.dtype:
    """Storage dtype of BatchNorm running statistics for parameters of ``dtype`` (>= float32)."""
    return _acc_dtype(dtype)
