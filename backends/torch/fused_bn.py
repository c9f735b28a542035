"""Eager training path of "BatchNorm, then CBAM" (a ResNet block's last BN and its CBAM) in one Function.

The CBAM Function (`fused`) keeps one full-size tensor, its input ``x``; inside a ResNet block ``x`` is
the last BatchNorm's output, which nothing else keeps (the BN keeps its own input ``h``, the conv's output,
and the residual add and ReLU keep nothing of ``x``). So the network saves one full-size tensor per block
more than without CBAM: ResNet-50-CBAM's saved activations were 1.26x ResNet-50's. Here the pair saves
``h`` (what the BN alone would keep) and per-channel vectors, and recomputes ``x`` in the backward: the
network saves what it saves without CBAM, plus the small maps.

Two implementations. `_BNThenCBAM` (any device and layout): ``x = h * alpha + beta`` with ``alpha = weight *
invstd`` and ``beta = bias - mean * alpha`` per channel, computed by one torch op in the forward and the same
op in the backward, so the recomputed ``x`` is the forward's bit for bit (the max-pool masks compare against
it); the statistics and running averages are torch's (`torch.batch_norm_update_stats`, with
``nn.BatchNorm2d``'s momentum and ``num_batches_tracked`` rule), the BN gradients torch's
(`native_batch_norm_backward`). `_BNThenCBAMKernels` (CPU, NCHW or channels_last, the default there): the
kernels of csrc/cbam_bn_train.cpp (cbam_bn_train_cl.cpp) form ``x = fma(h, alpha, beta)`` in every pass and
never store it; the statistics come from per-plane sums (float64, Chan's combination), the running averages
follow the same rule, and the BN gradients are assembled from per-plane sums of the backward passes (the
BN's backward is linear in dL/dx). Eval-mode BN (running statistics) is covered by both.

`applies` holds where both halves would take their eager training paths: a plain ``nn.BatchNorm2d`` with
affine parameters and no hooks, and `fused.applies` for the CBAM block; otherwise the caller runs
``cbam(bn(h))``. ``fused.disabled()`` and ``CBAM_MULTI_FUSED_TRAIN=0`` turn this path off with the other.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import fused
from .guards import has_hooks

__all__ = ["applies", "bn_cbam_train", "momentum_factor"]


def applies(bn: nn.Module, cbam, h: torch.Tensor) -> bool:
    """Whether ``cbam(bn(h))`` (autograd recording) may run `bn_cbam_train`."""
    return (
        type(bn) is nn.BatchNorm2d
        and bn.affine
        and bn.weight.dtype == h.dtype
        and not has_hooks(bn)
        and fused.applies(cbam, h)
        and (h.numel() > h.shape[1] or not (bn.training or bn.running_mean is None))  # 1 value per channel: torch's error
    )


def bn_cbam_train(bn: nn.BatchNorm2d, cbam, h: torch.Tensor) -> torch.Tensor:
    """``cbam(bn(h))`` through `_BNThenCBAMKernels` (CPU: x never stored) or `_BNThenCBAM` (call only
    where `applies`); updates ``bn``'s running statistics as ``bn(h)`` would."""
    params = (bn.weight, bn.bias, *cbam.channel.parameters(), *cbam.spatial.parameters())
    pool = kernel_pool(bn, h)
    if pool is not None:
        return _BNThenCBAMKernels.apply(h, bn, cbam, pool, *params)
    return _BNThenCBAM.apply(h, bn, cbam, *params)


def kernel_pool(bn, h: torch.Tensor):
    """``bn_pool(h)`` (NCHW or channels_last) where `_BNThenCBAMKernels` takes this call, else None: the CPU
    kernels apply (`fused._kernel_applies`), the BN's affine map is finite and so is h (a NaN or inf in h: the
    torch ops keep torch's NaN rules). ``bn``: the module or a stand-in with its attributes."""
    if not (fused._kernel_applies(h) and _finite_affine(bn)):
        return None
    with torch.no_grad():
        pool = fused._kernel("bn_pool", h)(h)
    return pool if bool(torch.isfinite(pool[0]).all()) else None


def _finite_affine(bn: nn.BatchNorm2d) -> bool:
    """The BN's weight, bias and (eval) running statistics are finite: with a finite h, the kernels' x is then
    finite too (a NaN there would be dropped by their max pools, where torch's max propagates it)."""
    ts = [bn.weight, bn.bias]
    if not bn.training and bn.running_mean is not None:
        ts += [bn.running_mean, bn.running_var]
    with torch.no_grad():
        return all(bool(torch.isfinite(t).all()) for t in ts)


def momentum_factor(bn) -> float:
    """The weight ``nn.BatchNorm2d.forward`` gives this batch in the running averages (``momentum``, or with
    ``momentum=None`` the cumulative average's 1 / batches), advancing ``num_batches_tracked`` where it does
    (training with running statistics). ``bn``: the module, or a stand-in with its attributes."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            factor = 1.0 / float(bn.num_batches_tracked)
    return factor


def _statistics(bn: nn.BatchNorm2d, h: torch.Tensor):
    """(mean, biased variance, batch statistics used?) as ``nn.BatchNorm2d.forward`` chooses them, updating
    the running averages and ``num_batches_tracked`` exactly where it does."""
    batch_stats = bn.training or bn.running_mean is None
    if not batch_stats:
        return bn.running_mean.clone(), bn.running_var.clone(), False
    if bn.training and bn.track_running_stats:
        mean, var = torch.batch_norm_update_stats(h, bn.running_mean, bn.running_var, momentum_factor(bn))
    else:  # batch statistics without running averages (track_running_stats=False)
        mean, var = torch.batch_norm_update_stats(h, None, None, 0.0)
    return mean, var, True


def _normalise(h: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    # the one op that makes x, in the forward and again in the backward: same inputs, same bits
    return torch.addcmul(beta[None, :, None, None], h, alpha[None, :, None, None])


class _BNThenCBAM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, bn, cbam, weight, bias, *cbam_params):
        mean, var, batch_stats = _statistics(bn, h)
        invstd = torch.rsqrt(var + bn.eps)
        alpha = weight * invstd
        beta = bias - mean * alpha
        x = _normalise(h, alpha, beta)
        out, small = fused.block_forward(ctx, x, cbam)
        del x  # recomputed from h in the backward
        ctx.batch_stats, ctx.eps = batch_stats, bn.eps
        ctx.save_for_backward(h, weight, alpha, beta, mean, var, invstd, *small)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        h, weight, alpha, beta, mean, var, invstd, *small = ctx.saved_tensors
        need_h, _, _, need_w, need_b = ctx.needs_input_grad[:5]
        x = _normalise(h, alpha, beta)
        gx = fused.block_backward(ctx, g, x, small, need_h or need_w or need_b)
        del x
        gh = gw = gb = None
        if gx is not None:
            if ctx.batch_stats:  # torch's BN backward through the batch statistics
                gh, gw, gb = torch.ops.aten.native_batch_norm_backward(
                    gx, h, weight, None, None, mean, invstd, True, ctx.eps, [need_h, need_w, need_b])
            else:  # running statistics: the BN is a per-channel affine map of h
                gh, gw, gb = torch.ops.aten.native_batch_norm_backward(
                    gx, h, weight, mean, var, None, None, False, ctx.eps, [need_h, need_w, need_b])
        return (gh, None, None, gw, gb, *ctx.param_grads)


def _kernel_statistics(bn: nn.BatchNorm2d, psum: torch.Tensor, pm2: torch.Tensor, hw: int):
    """(mean, biased variance, batch statistics used?) in float64 from the per-plane sums and squared
    deviations of ``bn_pool`` (Chan's combination), updating the running averages as `_statistics` does."""
    batch_stats = bn.training or bn.running_mean is None
    if not batch_stats:
        return bn.running_mean.to(torch.float64, copy=True), bn.running_var.to(torch.float64, copy=True), False
    mean, var = batch_statistics(psum, pm2, hw)
    update_running_stats(bn, mean, var, psum.shape[0] * hw)
    return mean, var, True


# ------------------------------------------------------------------ the kernels' BN maths, shared with
# `compiled_train` (which runs the same passes as traced code, split over three autograd Functions)
def batch_statistics(psum: torch.Tensor, pm2: torch.Tensor, hw: int):
    """float64 (mean, biased variance) per channel from ``bn_pool``'s per-plane sums and squared deviations
    (Chan's combination)."""
    n = psum.shape[0] * hw
    mean = psum.sum(0) / n
    return mean, (pm2 + hw * (psum / hw - mean) ** 2).sum(0) / n


def update_running_stats(bn, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
    """What ``nn.BatchNorm2d.forward`` writes in training from these float64 batch statistics of ``n`` values per
    channel: the counter and the running averages (momentum, or for ``momentum=None`` the cumulative average;
    its factor a tensor, so torch.compile traces it). ``bn``: the module, or a stand-in with its attributes."""
    if not (bn.training and bn.track_running_stats):
        return
    with torch.no_grad():
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                factor = 1.0 / bn.num_batches_tracked.double()
        rm, rv = bn.running_mean, bn.running_var
        rm.copy_(rm.double() * (1 - factor) + mean * factor)
        rv.copy_(rv.double() * (1 - factor) + var * (n / (n - 1)) * factor)


def affine_map(weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, dtype):
    """(al, be) in ``dtype``: the BN's output ``x = h * al + be`` as the kernels form it, from float64 statistics."""
    w64 = weight.detach().double()
    return (w64 * invstd).to(dtype), (bias.detach().double() - mean * w64 * invstd).to(dtype)


def plane_terms(q1: torch.Tensor, q2: torch.Tensor, ca4: torch.Tensor, gm: torch.Tensor):
    """From the per-plane sums of ``bn_grad_s`` (q1) and ``bn_plane_sums`` (q2): dL/dca (float64, (B, C); it is
    sum g*s*x + sum gm*x + sum hit*gr*x) and the two (B, C) float64 terms of the BN's gradient sums that need no
    pooled-vector gradient (`bn_grad_sums` adds those)."""
    b, c = ca4.shape[:2]
    ca64 = ca4.view(b, c).double()
    gm_total = gm.double().sum((1, 2, 3))[:, None]
    gca = q1[..., 1] + q2[..., 0] + q2[..., 3]
    return gca, ca64 * (q1[..., 0] + gm_total + q2[..., 2]), ca64 * (q1[..., 2] + q2[..., 1] + q2[..., 4])


def bn_grad_sums(t1, t2, gavg, gmx, n_hits, q2_5, psum, mu, mean, invstd, hw: int):
    """The BN's gradient sums per channel, float64: S1 = sum dL/dx and S2 = sum dL/dx * xhat. dL/dx = (g*s + gm +
    hit*gr) * ca + gavg + hit_hw * gmx is linear in g, so they come from `plane_terms` (t1, t2) and the pooled
    vectors' gradients (gavg, gmx float64; n_hits: 1 or the H,W tie counts; q2_5: bn_plane_sums' hit_hw * (h - mu)
    sums); the kernels centre their sums on ``mu`` (the mean as rounded to h's dtype, float64 here)."""
    s1 = (t1 + hw * gavg + gmx * n_hits).sum(0)
    # sum dL/dx * (h - mu), then sum dL/dx * xhat = invstd * (that + (mu - mean) * S1)
    s_gh = (t2 + gavg * (psum - hw * mu) + gmx * q2_5).sum(0)
    return s1, invstd * (s_gh + (mu - mean) * s1)


def grad_h_coef(weight, invstd, mean, s1, s2, n: int, batch_stats: bool) -> torch.Tensor:
    """(C, 4) float64 coefficients of ``bn_grad_h``: dh = a * (dx - S1/N - xhat * S2/N) with batch statistics,
    dh = a * dx with running ones (the BN is then a per-channel affine map)."""
    a = weight.detach().double() * invstd
    if batch_stats:
        return torch.stack([a, -a * invstd * s2 / n, -a * s1 / n, mean], 1)
    return torch.stack([a, torch.zeros_like(a), torch.zeros_like(a), mean], 1)


class _BNThenCBAMKernels(torch.autograd.Function):
    """The pair through csrc/cbam_bn_train.cpp (cbam_bn_train_cl.cpp for channels_last): every pass reads h and
    forms x = fma(h, al, be) on the fly, so x is neither stored nor written; the BN's gradients come from
    per-plane sums of the backward passes."""

    @staticmethod
    def forward(ctx, h, bn, cbam, pool, weight, bias, *cbam_params):
        ops = torch.ops.cbam_multi
        spec = cbam.spec
        hw = h.shape[2] * h.shape[3]
        psum, pm2, hmax, hmin = pool  # bn_pool(h) (or bn_pool_cl), checked finite by the caller
        mean, var, batch_stats = _kernel_statistics(bn, psum, pm2, hw)
        invstd = torch.rsqrt(var + bn.eps)
        al, be = affine_map(weight, bias, mean, invstd, h.dtype)
        avg, mx = ops.bn_pool_finish(psum, hmax, hmin, al, be, hw)
        ca, leaves1 = fused.channel_graph(cbam, [avg if kind == "avg" else mx for kind in spec.channel_pools])
        ca4 = ca.detach().contiguous()[:, :, None, None]
        mean_c, max_c, idx_c, cnt_c = fused._kernel("train_maps", h)(h, ca4, al, be)
        s, leaves2 = fused.spatial_graph(cbam, mean_c, max_c, True)
        sd = s.detach().contiguous()
        ctx.graphs = (ca, leaves1, s, leaves2)
        ctx.param_groups = (list(cbam.channel.parameters()), list(cbam.spatial.parameters()))
        ctx.batch_stats, ctx.first, ctx.pools = batch_stats, spec.tie_rule == "first", spec.channel_pools
        ctx.save_for_backward(h, weight, al, be, ca4, sd, mx, max_c, idx_c, cnt_c, psum, mean, invstd)
        return fused._kernel("train_gate", h)(h, ca4, sd, al, be)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        h, weight, al, be, ca4, s, mx, max_c, idx_c, cnt_c, psum, mean, invstd = ctx.saved_tensors
        ca, leaves1, s_graph, leaves2 = ctx.graphs
        ch_params, sp_params = ctx.param_groups
        ctx.graphs = None
        need_h, _, _, _, need_w, need_b = ctx.needs_input_grad[:6]
        first, dt = ctx.first, h.dtype
        b, c, hw = h.shape[0], h.shape[1], h.shape[2] * h.shape[3]
        g = g.contiguous(memory_format=fused._memory_format(h))
        # spatial gate: dL/ds, then its small graph -> the maps' gradients (gm per channel, gr routed)
        mu = mean.to(dt).contiguous()  # the sums over h are centred on the mean (as rounded to h's dtype)
        gs, q1 = fused._kernel("bn_grad_s", h)(g, h, al, be, ca4, s, mu)
        sp_train = [p for p in sp_params if p.requires_grad]
        grads2 = torch.autograd.grad(s_graph, [leaves2["mean"], leaves2["max"], *sp_train], gs, allow_unused=True)
        gm = (grads2[0] / c).contiguous()
        gr = (grads2[1] if first else grads2[1] / cnt_c).contiguous()
        q2, idx_hw, cnt_hw = fused._kernel("bn_plane_sums", h)(h, al, be, ca4, gm, gr, max_c, idx_c, mx, mu, first)
        gca, t1, t2 = plane_terms(q1, q2, ca4, gm)
        gca = gca.to(dt)
        ch_train = [p for p in ch_params if p.requires_grad]
        grads1 = torch.autograd.grad(ca, [*leaves1, *ch_train], gca, allow_unused=True)
        by_kind = dict(zip(ctx.pools, grads1[: len(ctx.pools)]))
        zeros = torch.zeros(b, c, dtype=dt)
        gavg = by_kind["avg"] / hw if "avg" in by_kind else zeros
        gmx = zeros if "max" not in by_kind else (by_kind["max"] if first else by_kind["max"] / cnt_hw)
        n_hits = 1.0 if first else cnt_hw.double()
        s1, s2 = bn_grad_sums(t1, t2, gavg.double(), gmx.double(), n_hits, q2[..., 5], psum, mu.double(), mean, invstd, hw)
        gh = None
        if need_h:
            coef = grad_h_coef(weight, invstd, mean, s1, s2, b * hw, ctx.batch_stats)
            gh = fused._kernel("bn_grad_h", h)(g, h, al, be, ca4, s, gm, gr, max_c, idx_c, gavg.contiguous(), gmx.contiguous(), mx,
                               idx_hw, coef.to(dt).contiguous(), first)
        gw = s2.to(dt) if need_w else None
        gb = s1.to(dt) if need_b else None
        cbam_grads = fused._param_grads(ch_params, sp_params, ch_train, sp_train, grads1[len(ctx.pools):], grads2[2:])
        return (gh, None, None, None, gw, gb, *cbam_grads)
