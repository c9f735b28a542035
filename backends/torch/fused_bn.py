"""Eager training path of "BatchNorm, then CBAM" (a ResNet block's last BN and its CBAM) in one Function.

The CBAM Function (`fused`) keeps one full-size tensor, its input ``x``; inside a ResNet block ``x`` is
the last BatchNorm's output, which nothing else keeps (the BN keeps its own input ``h``, the conv's output,
and the residual add and ReLU keep nothing of ``x``). So the network saves one full-size tensor per block
more than without CBAM: ResNet-50-CBAM's saved activations were 1.26x ResNet-50's. Here the pair saves
``h`` (what the BN alone would keep) and per-channel vectors, and recomputes ``x`` in the backward: the
network saves what it saves without CBAM, plus the small maps.

``x = h * alpha + beta`` with ``alpha = weight * invstd`` and ``beta = bias - mean * alpha`` per channel (how
torch's CPU BatchNorm applies its statistics), computed by one torch op in the forward and the same op in
the backward, so the recomputed ``x`` is the forward's bit for bit (the max-pool masks compare against it).
The statistics and the running averages are torch's own (`torch.batch_norm_update_stats`, with
``nn.BatchNorm2d``'s momentum and ``num_batches_tracked`` rule), the BN gradients torch's own
(`native_batch_norm_backward`); eval-mode BN (running statistics) is covered too.

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

__all__ = ["applies", "bn_cbam_train"]


def applies(bn: nn.Module, cbam, h: torch.Tensor) -> bool:
    """Whether ``cbam(bn(h))`` (autograd recording) may run `bn_cbam_train`."""
    return (
        type(bn) is nn.BatchNorm2d
        and bn.affine
        and bn.weight.dtype == h.dtype
        and not has_hooks(bn)
        and fused.applies(cbam, h)
    )


def bn_cbam_train(bn: nn.BatchNorm2d, cbam, h: torch.Tensor) -> torch.Tensor:
    """``cbam(bn(h))`` through `_BNThenCBAM` (call only where `applies`); updates ``bn``'s running statistics
    as ``bn(h)`` would."""
    return _BNThenCBAM.apply(h, bn, cbam, bn.weight, bn.bias, *cbam.channel.parameters(), *cbam.spatial.parameters())


def _statistics(bn: nn.BatchNorm2d, h: torch.Tensor):
    """(mean, biased variance, batch statistics used?) as ``nn.BatchNorm2d.forward`` chooses them, updating
    the running averages and ``num_batches_tracked`` exactly where it does."""
    batch_stats = bn.training or bn.running_mean is None
    if not batch_stats:
        return bn.running_mean.clone(), bn.running_var.clone(), False
    if bn.training and bn.track_running_stats:
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(bn.num_batches_tracked)
        mean, var = torch.batch_norm_update_stats(h, bn.running_mean, bn.running_var, momentum)
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
