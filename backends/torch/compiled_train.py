"""CBAM's training kernels inside a torch.compile graph: the block (or a ResNet block's last BN with it) as
traced code, so inductor compiles everything but the full-size passes.

The eager Functions (`fused`, `fused_bn`) keep the small maps (the MLP on the pooled vectors, the spatial
conv, BN and gates) as little autograd graphs and differentiate them with ``torch.autograd.grad`` between
their backward kernels; that cannot be traced, and run as opaque custom ops those bodies cost ~2 ms of
Python per block and step (benchmarks/RESULTS.md). Here the small maps are ordinary traced ops, and each
kernel pass is a functional custom op (``cbam_multi::c_*``) inside one of three autograd Functions:

    forward:   _Pools (H,W pools)  ->  MLP, gate  ->  _Maps (channel maps)  ->  conv, BN, gate  ->  _Gate (product)
    backward:  _Pools: dL/dx pass  <-  MLP grads  <-  _Maps: dL/dca pass   <-  conv, BN grads  <-  _Gate: dL/ds pass

The backward passes run in the eager Function's order because autograd's own data flow orders them. What a
pass needs from a later stage (the output's cotangent ``g``, the spatial gate, the routed map gradients,
the per-plane sums) travels as the "gradient" of a token: a zero output of the earlier Function (an
expanded scalar, no memory) taken as an input by the later one, whose backward returns the data as that
input's gradient. So autograd, AOTAutograd and inductor see one ordinary graph, the same passes as eager.

The custom ops take either layout (``flexible_layout``: inductor hands them channels_last buffers after its
layout optimisation) and call the NCHW or the channels_last kernel at run time. Non-finite inputs stay on
the kernels (the eager Functions hand them to torch ops; a data-dependent switch would break the graph): the
NaN and infinity patterns of the output and the gradients are the composed ops' (tests/test_torch_compiled.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import fused, fused_bn

__all__ = ["bn_cbam_traced", "register_ops"]

_ops = torch.ops.cbam_multi


# ------------------------------------------------------------------ the kernel passes as custom ops
_kernel = fused._kernel  # the NCHW or the channels_last kernel, by x's layout (as the eager Functions pick it)


def _like(t: Tensor, x: Tensor) -> Tensor:
    return t.contiguous(memory_format=fused._memory_format(x))


def _small(*ts):
    return [None if t is None else t.contiguous() for t in ts]


def c_pool_hw(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _kernel("train_pool_hw", x)(x)


def c_maps(x: Tensor, ca: Tensor, al: Tensor | None, be: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _kernel("train_maps", x)(x, *_small(ca, al, be))


def c_gate(x: Tensor, ca: Tensor, s: Tensor, al: Tensor | None, be: Tensor | None) -> Tensor:
    return _kernel("train_gate", x)(x, *_small(ca, s, al, be))


def c_grad_s(g: Tensor, x: Tensor, ca: Tensor) -> Tensor:
    return _kernel("train_grad_s", x)(_like(g, x), x, ca.contiguous())


def c_grad_ca(g: Tensor, x: Tensor, ca: Tensor, s: Tensor, gm: Tensor, gr: Tensor, mxc: Tensor, idxc: Tensor,
              first: bool) -> Tensor:
    return _kernel("train_grad_ca", x)(_like(g, x), x, *_small(ca, s, gm, gr, mxc, idxc), first)


def c_grad_x(g: Tensor, x: Tensor, ca: Tensor, s: Tensor, gm: Tensor, gr: Tensor, mxc: Tensor, idxc: Tensor,
             gavg: Tensor, gmx: Tensor, mx: Tensor, idx: Tensor, first: bool) -> Tensor:
    return _kernel("train_grad_x", x)(_like(g, x), x, *_small(ca, s, gm, gr, mxc, idxc, gavg, gmx, mx, idx), first)


def c_bn_pool(h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _kernel("bn_pool", h)(h)


def c_bn_grad_s(g: Tensor, h: Tensor, al: Tensor, be: Tensor, ca: Tensor, s: Tensor, mu: Tensor) -> tuple[Tensor, Tensor]:
    return _kernel("bn_grad_s", h)(_like(g, h), h, *_small(al, be, ca, s, mu))


def c_bn_plane_sums(h: Tensor, al: Tensor, be: Tensor, ca: Tensor, gm: Tensor, gr: Tensor, mxc: Tensor, idxc: Tensor,
                    mx: Tensor, mu: Tensor, first: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _kernel("bn_plane_sums", h)(h, *_small(al, be, ca, gm, gr, mxc, idxc, mx, mu), first)


def c_bn_grad_h(g: Tensor, h: Tensor, al: Tensor, be: Tensor, ca: Tensor, s: Tensor, gm: Tensor, gr: Tensor,
                mxc: Tensor, idxc: Tensor, gavg: Tensor, gmx: Tensor, mx: Tensor, idx: Tensor, coef: Tensor,
                first: bool) -> Tensor:
    return _kernel("bn_grad_h", h)(_like(g, h), h, *_small(al, be, ca, s, gm, gr, mxc, idxc, gavg, gmx, mx, idx, coef),
                                   first)


def _bc(x: Tensor, dtype=None) -> Tensor:
    return x.new_empty(x.shape[:2], dtype=dtype)


def _map(x: Tensor, dtype=None) -> Tensor:
    return x.new_empty((x.shape[0], 1, *x.shape[2:]), dtype=dtype)


def _sums(x: Tensor, k: int) -> Tensor:
    return x.new_empty((*x.shape[:2], k), dtype=torch.float64)


# (implementation, fake implementation): the fakes give each result's shape, dtype and (full-size) layout
_FAKES = {
    c_pool_hw: lambda x: (_bc(x), _bc(x), _bc(x, torch.int64), _bc(x)),
    c_maps: lambda x, *a: (_map(x), _map(x), _map(x, torch.int64), _map(x)),
    c_gate: lambda x, *a: torch.empty_like(x),
    c_grad_s: lambda g, x, ca: _map(x),
    c_grad_ca: lambda g, x, *a: _bc(x),
    c_grad_x: lambda g, x, *a: torch.empty_like(x),
    c_bn_pool: lambda h: (_bc(h, torch.float64), _bc(h, torch.float64), _bc(h), _bc(h)),
    c_bn_grad_s: lambda g, h, *a: (_map(h), _sums(h, 3)),
    c_bn_plane_sums: lambda h, *a: (_sums(h, 6), _bc(h, torch.int64), _bc(h)),
    c_bn_grad_h: lambda g, h, *a: torch.empty_like(h),
}
_registered: list = []


def register_ops() -> None:
    """Define the ``cbam_multi::c_*`` ops and the other traced ops' fake implementations, once (call with the
    kernel library loaded; `compiled.register` does)."""
    if not _registered:
        tags = (torch.Tag.flexible_layout,)
        for impl, fake in _FAKES.items():
            op = torch.library.custom_op(f"cbam_multi::{impl.__name__}", impl, mutates_args=(), device_types="cpu",
                                         tags=tags)
            op.register_fake(fake)
        # the small-map ops the eager code calls directly: shapes for tracing
        torch.library.register_fake("cbam_multi::spatial_conv_fwd")(
            lambda maps, w: maps.new_empty((maps.shape[0], 1, *maps.shape[2:])))
        torch.library.register_fake("cbam_multi::spatial_conv_bwd")(
            lambda g, maps, w: (torch.empty_like(maps), torch.empty_like(w)))
        torch.library.register_fake("cbam_multi::bn_pool_finish")(
            lambda s, hmax, hmin, al, be, hw: (torch.empty_like(hmax), torch.empty_like(hmax)))
        _registered.append(True)


# ------------------------------------------------------------------ the three stages
def _token(x: Tensor, shape, dtype=None) -> Tensor:
    """A zero of ``shape`` that takes no memory: its gradient carries a later stage's data back."""
    return x.new_zeros((), dtype=dtype or x.dtype).expand(shape)


def _map_token(x: Tensor, k: int) -> Tensor:
    return _token(x, (x.shape[0], k, *x.shape[2:]))


def _unpack_maps(packed: Tensor):
    """The (B, 5, H, W) map token's gradient -> s, gm, gr, max_c, idx_c (each (B, 1, H, W))."""
    s, gm, gr, max_c, idx_c = packed.split(1, dim=1)
    return s, gm, gr, max_c, idx_c.long()


class _Pools(torch.autograd.Function):
    """CBAM alone. Forward: the H,W pools. Backward (last): dL/dx in one pass."""

    @staticmethod
    def forward(ctx, x, first: bool):
        avg, mx, idx, cnt = _ops.c_pool_hw(x)
        ctx.save_for_backward(x, mx, idx, cnt)
        ctx.first = first
        b, c = avg.shape
        return avg, mx, _token(x, x.shape), _map_token(x, 5), _token(x, (b, c, 1))

    @staticmethod
    def backward(ctx, gavg, gmx, g, maps, per_channel):
        x, mx, idx, cnt = ctx.saved_tensors
        s, gm, gr, max_c, idx_c = _unpack_maps(maps)
        ca4 = per_channel[..., None]
        gmx = gmx if ctx.first else gmx / cnt
        gx = _ops.c_grad_x(g, x, ca4, s, gm, gr, max_c, idx_c, gavg / (x.shape[2] * x.shape[3]), gmx, mx, idx, ctx.first)
        return gx, None


class _BNPools(torch.autograd.Function):
    """A BN then CBAM. Forward: per-plane sums of h, the BN's statistics and affine map (al, be), the H,W pools
    of x = h * al + be. Backward (last): dL/dh in one pass and the BN's weight and bias gradients, assembled
    from per-plane sums (float64) as `fused_bn._BNThenCBAMKernels` does."""

    @staticmethod
    def forward(ctx, h, weight, bias, running_mean, running_var, batch_stats: bool, eps: float, first: bool):
        b, c, hw = h.shape[0], h.shape[1], h.shape[2] * h.shape[3]
        psum, pm2, hmax, hmin = _ops.c_bn_pool(h)
        if batch_stats:
            mean, var = fused_bn.batch_statistics(psum, pm2, hw)
        else:
            mean, var = running_mean.to(torch.float64, copy=True), running_var.to(torch.float64, copy=True)
        invstd = torch.rsqrt(var + eps)
        al, be = fused_bn.affine_map(weight, bias, mean, invstd, h.dtype)
        avg, mx = _ops.bn_pool_finish(psum, hmax, hmin, al, be, hw)
        ctx.save_for_backward(h, weight, al, be, mx, psum, mean, invstd)
        ctx.batch_stats, ctx.first = batch_stats, first
        ctx.mark_non_differentiable(al, be, mean, var)
        return avg, mx, al, be, mean, var, _token(h, h.shape), _map_token(h, 5), _token(h, (b, c, 6), torch.float64)

    @staticmethod
    def backward(ctx, gavg, gmx, _al, _be, _mean, _var, g, maps, per_channel):
        h, weight, al, be, mx, psum, mean, invstd = ctx.saved_tensors
        first, dt = ctx.first, h.dtype
        b, c, hw = h.shape[0], h.shape[1], h.shape[2] * h.shape[3]
        s, gm, gr, max_c, idx_c = _unpack_maps(maps)
        ca64, cnt_hw, q2_5, idx_hw, t1, t2 = per_channel.unbind(-1)
        gavg = gavg / hw
        gmx = gmx if first else gmx / cnt_hw.to(dt)
        mu = mean.to(dt).double()  # the kernels' sums are centred on the mean as rounded to h's dtype
        s1, s2 = fused_bn.bn_grad_sums(t1, t2, gavg.double(), gmx.double(), 1.0 if first else cnt_hw, q2_5, psum, mu,
                                       mean, invstd, hw)
        coef = fused_bn.grad_h_coef(weight, invstd, mean, s1, s2, b * hw, ctx.batch_stats)
        gh = _ops.c_bn_grad_h(g, h, al, be, ca64.to(dt).view(b, c, 1, 1), s, gm, gr, max_c, idx_c, gavg, gmx, mx,
                              idx_hw.long(), coef.to(dt), first)
        return gh, s2.to(dt), s1.to(dt), None, None, None, None, None


class _Maps(torch.autograd.Function):
    """Forward: the channel mean and max maps of x * ca. Backward: dL/dca in one pass (with a BN: the
    per-plane sums its gradients need, handed to `_BNPools`)."""

    @staticmethod
    def forward(ctx, x, ca4, al, be, mx, mu, tg, tmaps, tchannel, first: bool):
        mean_c, max_c, idx_c, cnt_c = _ops.c_maps(x, ca4, al, be)
        ctx.save_for_backward(x, ca4, al, be, mx, mu, max_c, idx_c, cnt_c)
        ctx.first = first
        b, c = x.shape[:2]
        return mean_c, max_c, _token(x, x.shape), _map_token(x, 1), _token(x, (b, c, 3), torch.float64)

    @staticmethod
    def backward(ctx, gmean, gmax, g, s, q1):
        x, ca4, al, be, mx, mu, max_c, idx_c, cnt_c = ctx.saved_tensors
        first, dt = ctx.first, x.dtype
        b, c = x.shape[:2]
        gm = gmean / c
        gr = gmax if first else gmax / cnt_c
        if al is None:
            gca = _ops.c_grad_ca(g, x, ca4, s, gm, gr, max_c, idx_c, first)
            per_channel = ca4.view(b, c, 1)
        else:
            q2, idx_hw, cnt_hw = _ops.c_bn_plane_sums(x, al, be, ca4, gm, gr, max_c, idx_c, mx, mu, first)
            gca, t1, t2 = fused_bn.plane_terms(q1, q2, ca4, gm)
            gca = gca.to(dt)
            per_channel = torch.stack([ca4.view(b, c).double(), cnt_hw.double(), q2[..., 5], idx_hw.double(), t1, t2], -1)
        maps = torch.cat([s, gm, gr, max_c, idx_c.to(dt)], 1)
        return None, gca.view(b, c, 1, 1), None, None, None, None, g, maps, per_channel, None


class _Gate(torch.autograd.Function):
    """Forward: x * ca * s. Backward (first): dL/ds in one pass (with a BN: and per-plane sums)."""

    @staticmethod
    def forward(ctx, x, ca4, s, al, be, mu, tg, ts, tq):
        ctx.save_for_backward(x, ca4, s, al, be, mu)
        return _ops.c_gate(x, ca4, s, al, be)

    @staticmethod
    def backward(ctx, g):
        x, ca4, s, al, be, mu = ctx.saved_tensors
        q1 = None
        if al is None:
            gs = _ops.c_grad_s(g, x, ca4)
        else:
            gs, q1 = _ops.c_bn_grad_s(g, x, al, be, ca4, s, mu)
        return None, None, gs, None, None, None, g, s, q1


def bn_cbam_traced(bn, cbam, h: Tensor) -> Tensor:
    """``cbam(bn(h))`` (``cbam(h)`` for ``bn=None``) as traced code around the kernel passes (call only where
    `compiled.applies` holds and the inference kernel does not)."""
    spec = cbam.spec
    first = spec.tie_rule == "first"
    if bn is None:
        avg, mx, tg, tmaps, tchannel = _Pools.apply(h, first)
        al = be = mu = None
    else:
        batch_stats = bn.training or bn.running_mean is None
        avg, mx, al, be, mean, var, tg, tmaps, tchannel = _BNPools.apply(
            h, bn.weight, bn.bias, bn.running_mean, bn.running_var, batch_stats, bn.eps, first)
        if batch_stats:
            fused_bn.update_running_stats(bn, mean, var, h.shape[0] * h.shape[2] * h.shape[3])
        mu = mean.to(h.dtype)
    ca = fused.channel_gate(cbam, [avg if kind == "avg" else mx for kind in spec.channel_pools])
    ca4 = ca[:, :, None, None]
    mean_c, max_c, ug, us, uq = _Maps.apply(h, ca4, al, be, mx, mu, tg, tmaps, tchannel, first)
    s = fused.spatial_gate(cbam, mean_c, max_c, True)
    return _Gate.apply(h, ca4, s, al, be, mu, ug, us, uq)
