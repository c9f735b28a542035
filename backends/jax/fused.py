"""The CBAM block's derivative through CPU kernels: the full-size passes of training as XLA FFI calls.

XLA differentiates the composed ops (`functional._cbam`) into some ten passes over full-size tensors per
backward, each a separate loop fusion; the block's forward+backward took 9.1 ms at 64x64x28x28 on this
machine's CPU against 3.8 ms for the torch backend's kernels (benchmarks/RESULTS.md). Here the same kernels
(`cbam_multi/csrc/train_core_nhwc.h`, `csrc/cbam_train_ffi.cpp`) do the full-size work: three passes over
``x`` forward (H,W pools; channel maps of ``x * ca``; the gated product), three over the output cotangent
and ``x`` backward (dL/ds; dL/dca; dL/dx). Only small maps are saved: the gates ``ca`` (B, C) and ``s``
(B, H, W), the pooled values with their first-max indices and tie counts. The small maths between the
passes (the shared MLP, the spatial conv, BatchNorm in train or eval mode, the gates) stays in
`functional`, differentiated by JAX, so every option of the spec those pieces honour is honoured here.

How JAX gets a kernel backward without losing forward mode: `cbam` is a ``jax.custom_jvp`` whose tangent
is a linear primitive, ``cbam_multi_cbam_lin``, of the input and parameter tangents. Forward mode
evaluates that primitive as the composed ops' JVP; reverse mode transposes it, and its transpose rule is
the backward kernels. So ``jax.grad``, ``jax.jvp``, ``jax.linearize`` and their compositions (a
Hessian-vector product) all work, with the composed ops' derivatives wherever a second order is taken
(the kernels' own derivatives are declared as the composed ones'), and ``vmap`` of the linear map runs
the composed JVP.

Applies where `applies` says (CPU, float32/float64, the standard two-gate block with avg/max pools, any
MLP activation, gate, concat order, kernel size, BatchNorm in either mode), train and eval alike: an
eval-mode call that is not differentiated still runs the one-pass inference kernel (`cpu_kernel`).
``CBAM_MULTI_CPU_KERNEL=0`` or ``cpu_kernel.disabled()`` turns both off. Unlike the inference call this path has
no ``jax.lax.platform_dependent`` fallback: it applies when JAX's default backend is the CPU, and a program to be
lowered for another platform meanwhile is traced inside ``disabled()``. (The fallback traced and differentiated
the composed ops beside the kernels in every program: +20-60 % compile time for each block, +40 s for the test
suite.) The kernels' sums run in another
order than XLA's (float32 gradients agree to ~1e-6 relative, float64 to ~1e-14).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from cbam_multi.spec import CBAMSpec

from . import cpu_kernel
from . import functional as F

__all__ = ["applies", "cbam"]

_FLOATS = (jnp.float32, jnp.float64)


def applies(spec: CBAMSpec, x) -> bool:
    """Whether ``cbam(params, x, spec)`` may run the kernels. Static facts only (same answer under ``jit``)."""
    return (
        not spec.no_spatial
        and spec.variant == "standard"
        and set(spec.channel_pools) <= {"avg", "max"}
        and x.ndim == 4
        and x.size > 0
        and x.dtype in _FLOATS
        and jax.default_backend() == "cpu"
        and cpu_kernel.available()
    )


@functools.partial(jax.jit, static_argnames=("spec", "train"))
def cbam(params, x, spec: CBAMSpec, train: bool):
    """`functional.cbam` (checked input, the spec's params) through the kernels -> ``(y, new_stats)``."""
    return _block(spec, train, params, x)


# ------------------------------------------------------------------ the block and its tangent
@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _block(spec, train, params, x):
    if not train and cpu_kernel.applies(spec, x, False):  # not differentiated: the one-pass inference kernel
        return cpu_kernel.cbam_infer(params, x, spec, functools.partial(F._composed, spec=spec)), {}
    y, stats, _ = _forward(spec, train, params, x)
    return y, stats


@_block.defjvp
def _block_jvp(spec, train, primals, tangents):
    params, x = primals
    t_params, t_x = tangents
    y, stats, res = _forward(spec, train, params, x)
    p_leaves, tree = jax.tree.flatten(params)
    t_leaves = jax.tree.leaves(t_params)
    t_y = _lin_p.bind(x, *p_leaves, *res, t_x, *t_leaves, spec=spec, train=train, tree=tree, n_res=len(res))
    return (y, stats), (t_y, jax.tree.map(jnp.zeros_like, stats))


def _composed_y(spec, train, params, x):
    return F._cbam(params, x, spec, train)[0]


# ------------------------------------------------------------------ forward kernels
@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _forward(spec, train, params, x):
    """-> (y, BN stats update, residuals for the backward): three kernel passes over x, the small maps by
    `functional`. Residuals: H,W avg, max, first max position, tie count (B, C); the channel gate ca (B, C);
    channel mean, max, first max channel, tie count (B, H, W); the spatial gate s (B, H, W)."""
    avg, mx, idx_hw, cnt_hw = cpu_kernel.train_call("PoolHW", x)
    ca = F._mlp_gate(params, [avg if k == "avg" else mx for k in spec.channel_pools], spec)
    mean, mxc, idx_c, cnt_c = cpu_kernel.train_call("Maps", x, ca)
    s, stats = F._gate_from_maps(params, {"mean": mean, "max": mxc}, spec, train, _kernel_conv)
    s = s[..., 0]
    (y,) = cpu_kernel.train_call("Gate", x, ca, s)
    return y, stats, (avg, mx, idx_hw, cnt_hw, ca, mean, mxc, idx_c, cnt_c, s)


@_forward.defjvp
def _forward_jvp(spec, train, primals, tangents):
    # Only reached under a second derivative (the first is `_block_jvp`'s). y's tangent is the composed ops';
    # the residuals' are declared zero: their only consumers, the tangent map and its transpose, take their
    # own derivatives from the composed ops, which do not read them.
    out = _forward(spec, train, *primals)
    _, t_y = jax.jvp(functools.partial(_composed_y, spec, train), primals, tangents)
    t_stats, t_res = jax.tree.map(_zero_tangent, (out[1], out[2]))
    return out, (t_y, t_stats, t_res)


def _zero_tangent(a):
    if jnp.issubdtype(a.dtype, jnp.floating):
        return jnp.zeros_like(a)
    return jnp.zeros(a.shape, jax.dtypes.float0)


# ------------------------------------------------------------------ the spatial conv
def _kernel_conv(m, kernel, padding):
    # Inside shard_map the maps vary over the manual mesh axes and the kernel (a replicated weight) does not;
    # the loops' weight gradient is per device: typed varying here, JAX transposes the cast into its sum
    axes = tuple(set(jax.typeof(m).manual_axis_type.varying) - set(jax.typeof(kernel).manual_axis_type.varying))
    return _conv(m, jax.lax.pcast(kernel, axes, to="varying") if axes else kernel, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(m, kernel, padding):
    """`functional._spatial_conv` (NHWC maps (B, H, W, Ci), HWIO kernel (k, k, Ci, 1), padding k // 2) as
    kernel loops, value and gradients: XLA's convolution gradients at this 2 -> 1 channel shape cost the
    block's backward more than its three full-size passes. Used inside `_forward` and `_backward` only, whose
    own derivatives are the composed ops'."""
    (z,) = cpu_kernel.train_call("Conv", _planes(m), _taps(kernel))
    return z[..., None]


def _planes(m):  # (B, H, W, Ci) -> the loops' (B, Ci, H, W)
    return jnp.moveaxis(m, -1, 1)


def _taps(kernel):  # HWIO (k, k, Ci, 1) -> the loops' (Ci, k, k)
    return jnp.transpose(kernel[..., 0], (2, 0, 1))


def _conv_fwd(m, kernel, padding):
    return _conv(m, kernel, padding), (m, kernel)


def _conv_bwd(padding, saved, g):
    m, kernel = saved
    planes = _planes(m)
    taps = _taps(kernel)
    g_planes, g_part = cpu_kernel.train_call("ConvGrad", g[..., 0], planes, taps)
    g_taps = g_part.sum(0).reshape(taps.shape)  # per-sample sums (in double, rounded once), added over the batch
    return jnp.moveaxis(g_planes, 1, -1), jnp.transpose(g_taps, (1, 2, 0))[..., None]


_conv.defvjp(_conv_fwd, _conv_bwd)


# ------------------------------------------------------------------ the tangent map: a linear primitive
_lin_p = Primitive("cbam_multi_cbam_lin")


def _unpack(args, tree, n_res):
    n_p = tree.num_leaves
    x, p_leaves = args[0], args[1 : 1 + n_p]
    res = args[1 + n_p : 1 + n_p + n_res]
    t_x, t_leaves = args[1 + n_p + n_res], args[2 + n_p + n_res :]
    return x, tree.unflatten(p_leaves), tuple(res), t_x, tree.unflatten(t_leaves)


def _lin_composed(*args, spec, train, tree, n_res):
    """The tangent of y as the composed ops' JVP (forward mode; vmap)."""
    x, params, _, t_x, t_params = _unpack(args, tree, n_res)
    return jax.jvp(functools.partial(_composed_y, spec, train), (params, x), (t_params, t_x))[1]


def _lin_transpose(ct, *args, spec, train, tree, n_res):
    """The backward kernels: cotangents for the tangent operands (t_x, the parameters' tangents) still to be
    computed (`ad.is_undefined_primal`); None for the rest."""
    if type(ct) is ad.Zero:
        return [None] * len(args)
    x, params, res, _, _ = _unpack(args, tree, n_res)
    g_params, g_x = _backward(spec, train, params, x, res, ct)
    lin = args[-(1 + tree.num_leaves) :]  # t_x, then the parameters' tangents in params' leaf order
    grads = [g_x, *jax.tree.leaves(g_params)]
    return [None] * (len(args) - len(lin)) + [g if ad.is_undefined_primal(t) else None for t, g in zip(lin, grads)]


def _lin_jvp(primals, tangents, **params):
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    return jax.jvp(functools.partial(_lin_composed, **params), primals, tangents)


def _lin_batch(args, dims, **params):
    moved = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims)]  # None: not mapped
    axes = [None if d is None else 0 for d in dims]
    return jax.vmap(functools.partial(_lin_composed, **params), in_axes=axes)(*moved), 0


_lin_p.def_impl(_lin_composed)
_lin_p.def_abstract_eval(lambda *avals, tree, n_res, **_: avals[1 + tree.num_leaves + n_res])  # t_x's
mlir.register_lowering(_lin_p, mlir.lower_fun(_lin_composed, multiple_results=False))
ad.primitive_jvps[_lin_p] = _lin_jvp
ad.primitive_transposes[_lin_p] = _lin_transpose
batching.primitive_batchers[_lin_p] = _lin_batch


# ------------------------------------------------------------------ backward kernels
@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _backward(spec, train, params, x, res, ct):
    """(dL/dparams, dL/dx) from the output cotangent ``ct``: three kernel passes over ct and x, the small
    maps' derivatives by ``jax.vjp`` of `functional`'s pieces."""
    avg, mx, idx_hw, cnt_hw, ca, mean, mxc, idx_c, cnt_c, s = res
    first = spec.tie_rule == "first"
    hw, c = x.shape[1] * x.shape[2], x.shape[3]
    (gs,) = cpu_kernel.train_call("GradS", ct, x, ca)

    def spatial(p, mean, mxc):
        return F._gate_from_maps(p, {"mean": mean, "max": mxc}, spec, train, _kernel_conv)[0][..., 0]

    g_sp, g_mean, g_max = jax.vjp(spatial, params, mean, mxc)[1](gs)
    gm = g_mean / c
    gr = g_max if first else g_max / cnt_c
    (gca,) = cpu_kernel.train_call("GradCa", ct, x, ca, s, gm, gr, mxc, idx_c, first=first)
    pools = [avg if k == "avg" else mx for k in spec.channel_pools]
    g_ch, g_pools = jax.vjp(lambda p, pools: F._mlp_gate(p, pools, spec), params, pools)[1](gca)
    by_kind = dict(zip(spec.channel_pools, g_pools))
    gavg = by_kind["avg"] / hw if "avg" in by_kind else jnp.zeros_like(avg)
    gmx = jnp.zeros_like(mx) if "max" not in by_kind else by_kind["max"] if first else by_kind["max"] / cnt_hw
    (g_x,) = cpu_kernel.train_call("GradX", ct, x, ca, s, gm, gr, mxc, idx_c, gavg, gmx, mx, idx_hw, first=first)
    return jax.tree.map(jnp.add, g_sp, g_ch), g_x


@_backward.defjvp
def _backward_jvp(spec, train, primals, tangents):
    # Under a second derivative: the composed ops' VJP, differentiated (the residuals do not enter it)
    params, x, res, ct = primals
    t_params, t_x, _, t_ct = tangents

    def composed_vjp(params, x, ct):
        return jax.vjp(functools.partial(_composed_y, spec, train), params, x)[1](ct)

    out = _backward(spec, train, params, x, res, ct)
    _, t_out = jax.jvp(composed_vjp, (params, x, ct), (t_params, t_x, t_ct))
    return out, t_out
