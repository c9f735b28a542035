"""Stateless CBAM building blocks on NCHW tensors (the maths of `cbam_multi.reference`, fast).

The modules in `cbam_multi.torch.modules` compose these. Everything is shape-static and free of
data-dependent Python control flow, so it traces cleanly under ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cbam_multi.spec import LEAKY_SLOPE

from .guards import functorch_wrapped

__all__ = [
    "apply_gate", "amax", "max_reduce", "activation", "pool_hw", "stacked_pools", "shared_mlp", "channel_attention",
    "spatial_maps", "spatial_conv",
]


class _AMax(torch.autograd.Function):
    """``x.amax(dims, keepdim)`` with a leaner backward for eager autograd, bit-identical to amax's.

    torch's amax backward is ``(grad / mask.sum(dims)) * mask`` with ``mask = x == result`` a bool
    tensor; summing a bool tensor first casts it to int64 (a full-size 8-byte copy), and the product
    allocates again: ~3 ms for a 64x64x28x28 float32 input on 2 CPU cores, 25x the forward. Here the
    mask is written once as a float tensor, counted, and scaled in place (~0.4 ms). Ties share the
    gradient equally, exactly as amax (and JAX's max) do.
    """

    @staticmethod
    def forward(ctx, x, dims, keepdim):
        r = x.amax(dims, keepdim=True)
        ctx.save_for_backward(x, r)
        ctx.dims = dims
        return r if keepdim else r.squeeze(dims)

    @staticmethod
    def backward(ctx, grad):
        x, r = ctx.saved_tensors
        grad = grad.reshape(r.shape)  # restore the reduced dims (a view)
        mask = torch.eq(x, r, out=torch.empty_like(x))  # 1.0 where x attains the max, else 0.0
        acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else None  # exact counts
        count = mask.sum(ctx.dims, keepdim=True, dtype=acc).to(torch.int64)
        # same operands and promotion as amax's backward: (grad / int64 count) * mask
        return mask.mul_(grad / count), None, None


def amax(x: torch.Tensor, dims: tuple[int, ...], keepdim: bool = False) -> torch.Tensor:
    """``x.amax(dims, keepdim)``; in eager autograd through `_AMax`, whose backward is ~8x faster on CPU.
    Compiled code (inductor writes its own fused backward), no-grad calls and functorch transforms use
    ``torch.amax`` itself."""
    if (
        x.requires_grad
        and torch.is_grad_enabled()
        and type(x) is torch.Tensor
        and not torch.compiler.is_compiling()
        and not functorch_wrapped(x)
    ):
        return _AMax.apply(x, tuple(dims), keepdim)
    return x.amax(dims, keepdim=keepdim)


def max_reduce(x: torch.Tensor, dims: tuple[int, ...], tie_rule: str = "split", keepdim: bool = False) -> torch.Tensor:
    """Max of ``x`` over ``dims`` (``(2, 3)``: H and W of NCHW; ``(1,)``: channels), with the gradient
    rule of `cbam_multi.spec` ``tie_rule``: "split" shares a tied maximum's gradient (`amax`), "first"
    sends it to the lowest flat index, through the very ops the anchors call (``F.adaptive_max_pool2d``
    for H, W and ``torch.max(x, dim)``, which record that index; NCHW and channels_last alike)."""
    dims = tuple(dims)
    if tie_rule == "split":
        return amax(x, dims, keepdim=keepdim)
    if tie_rule != "first":
        raise ValueError(f"unknown tie_rule {tie_rule!r}")
    if dims == (2, 3):
        r = F.adaptive_max_pool2d(x, 1)
        return r if keepdim else r.flatten(1)
    if len(dims) == 1:
        return torch.max(x, dims[0], keepdim=keepdim).values
    raise ValueError(f"max_reduce with tie_rule='first' takes dims (2, 3) or one dim, got {dims}")


def activation(h: torch.Tensor, kind: str) -> torch.Tensor:
    """The shared MLP's activation (`cbam_multi.spec.ACTIVATIONS`; leaky_relu slope 0.01, torch's)."""
    if kind == "relu":
        return F.relu(h)
    if kind == "relu6":
        return F.relu6(h)
    if kind == "leaky_relu":
        return F.leaky_relu(h, LEAKY_SLOPE)
    if kind == "silu":
        return F.silu(h)
    raise ValueError(f"unknown activation {kind!r}")


def apply_gate(z: torch.Tensor, kind: str) -> torch.Tensor:
    """``sigmoid`` or ``hard_sigmoid`` (= relu6(z + 3) / 6); half-precision logits are gated in float32."""
    if z.dtype in (torch.bfloat16, torch.float16):  # e.g. under autocast: compute in float32, round once
        return apply_gate(z.float(), kind).to(z.dtype)
    if kind == "sigmoid":
        return torch.sigmoid(z)
    if kind == "hard_sigmoid":
        # Not F.hardsigmoid: its CPU backward uses a float32 1/6 even for float64 tensors, a 3e-8
        # relative gradient error that breaks float64 parity. The gate is a tiny (B, C) / (B, 1, H, W) map.
        return (z / 6.0 + 0.5).clamp(0.0, 1.0)
    raise ValueError(f"unknown gate {kind!r}")


def pool_hw(x: torch.Tensor, kind: str, tie_rule: str = "split") -> torch.Tensor:
    """Global pool over H, W of an NCHW tensor -> (B, C)."""
    if kind == "avg":
        return x.mean((2, 3))
    if kind == "max":
        return max_reduce(x, (2, 3), tie_rule)
    if kind == "lp":
        # official F.lp_pool2d(x, 2, (H, W)) = sqrt(sum x^2), a sum and not a mean
        return torch.linalg.vector_norm(x, 2, dim=(2, 3))
    if kind == "lse":
        # official logsumexp_2d: log of the *sum* of exponentials over H*W (max-shifted internally)
        return torch.logsumexp(x, dim=(2, 3))
    raise ValueError(f"unknown channel pool {kind!r}")


def stacked_pools(x: torch.Tensor, pools: Sequence[str], tie_rule: str = "split") -> torch.Tensor:
    """All pools of ``x`` stacked along the batch axis: (len(pools) * B, C), pool-major."""
    if len(pools) == 1:
        return pool_hw(x, pools[0], tie_rule)
    return torch.cat([pool_hw(x, kind, tie_rule) for kind in pools], dim=0)


def shared_mlp(
    p: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    act: str = "relu",
) -> torch.Tensor:
    """fc2(act(fc1(p))) on (N, C) rows. Weights in torch layout, (out, in) or conv1x1 (out, in, 1, 1):
    a 1x1 convolution on a 1x1 map is the same GEMM, so both run as `F.linear` (a free view)."""
    if fc1_weight.dim() == 4:
        fc1_weight = fc1_weight.flatten(1)
        fc2_weight = fc2_weight.flatten(1)
    return F.linear(activation(F.linear(p, fc1_weight, fc1_bias), act), fc2_weight, fc2_bias)


def channel_attention(
    x: torch.Tensor,
    pools: Sequence[str],
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    gate: str = "sigmoid",
    *,
    tie_rule: str = "split",
    act: str = "relu",
    light: bool = False,
) -> torch.Tensor:
    """x * gate(sum over pools of MLP(pool(x))): one MLP call on the (P*B, C) stack of pools. With
    ``light`` (timm's LightChannelAttn) one MLP call on the mean of the pools, 0.5 * avg + 0.5 * max."""
    b, c = x.shape[0], x.shape[1]
    if light:
        pooled = [pool_hw(x, kind, tie_rule) * (1.0 / len(pools)) for kind in pools]
        logits = shared_mlp(sum(pooled[1:], pooled[0]), fc1_weight, fc1_bias, fc2_weight, fc2_bias, act)
        return x * apply_gate(logits, gate)[:, :, None, None]
    logits = shared_mlp(stacked_pools(x, pools, tie_rule), fc1_weight, fc1_bias, fc2_weight, fc2_bias, act)
    if len(pools) > 1:
        logits = logits.view(len(pools), b, c).sum(0)
    return x * apply_gate(logits, gate)[:, :, None, None]


def spatial_maps(
    x: torch.Tensor, concat_order: Sequence[str], tie_rule: str = "split", light: bool = False
) -> torch.Tensor:
    """Mean and max over channels, concatenated in ``concat_order`` -> (B, 2, H, W); with ``light``
    (timm's LightSpatialAttn) the one map 0.5 * mean + 0.5 * max -> (B, 1, H, W)."""
    mean, mx = x.mean(1, keepdim=True), max_reduce(x, (1,), tie_rule, keepdim=True)
    if light:
        return 0.5 * mean + 0.5 * mx
    maps = {"mean": mean, "max": mx}
    return torch.cat([maps[name] for name in concat_order], dim=1)


def spatial_conv(
    maps: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, unrolled: bool = False
) -> torch.Tensor:
    """The k x k 'same' convolution of the (B, 2, H, W) spatial maps to one channel: ``F.conv2d``, or with
    ``unrolled`` the same sum written as 2 * k * k shifted multiply-adds of the zero-padded maps.

    The unrolled form is for torch.compile: inductor fuses it with the maps and the gate into its own
    kernels, where ``F.conv2d`` stays an extern oneDNN call with layout conversions around it (compiled
    forward at 64x64x28x28 on 2 CPU cores: ~0.95 -> ~0.79 ms, A/B in separate processes). Eagerly it
    would be 2 * k * k separate ops. Same terms, summed in another order.
    """
    k = weight.shape[-1]
    p = k // 2
    if not unrolled:
        return F.conv2d(maps, weight, bias, padding=p)
    h, w = maps.shape[-2:]
    acc = torch.float32 if maps.dtype in (torch.float16, torch.bfloat16) else maps.dtype  # as conv2d accumulates
    padded = F.pad(maps.to(acc), (p, p, p, p))
    weight = weight.to(acc)
    out = None
    for c in range(weight.shape[1]):
        for dy in range(k):
            for dx in range(k):
                term = weight[0, c, dy, dx] * padded[:, c : c + 1, dy : dy + h, dx : dx + w]
                out = term if out is None else out + term
    if bias is not None:
        out = out + bias.to(acc).view(1, 1, 1, 1)
    return out.to(maps.dtype)
