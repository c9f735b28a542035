"""Stateless CBAM building blocks on NCHW tensors (the maths of `cbam_multi.reference`, fast).

The modules in `cbam_multi.torch.modules` compose these. Everything is shape-static and free of
data-dependent Python control flow, so it traces cleanly under ``torch.compile``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["apply_gate", "pool_hw", "stacked_pools", "shared_mlp", "channel_attention", "spatial_maps"]


def apply_gate(z: torch.Tensor, kind: str) -> torch.Tensor:
    """``sigmoid`` or ``hard_sigmoid`` (= relu6(z + 3) / 6)."""
    if kind == "sigmoid":
        return torch.sigmoid(z)
    if kind == "hard_sigmoid":
        # Not F.hardsigmoid: its CPU backward uses a float32 1/6 even for float64 tensors, a 3e-8
        # relative gradient error that breaks float64 parity. The gate is a tiny (B, C) / (B, 1, H, W) map.
        return (z / 6.0 + 0.5).clamp(0.0, 1.0)
    raise ValueError(f"unknown gate {kind!r}")


def pool_hw(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Global pool over H, W of an NCHW tensor -> (B, C)."""
    if kind == "avg":
        return x.mean((2, 3))
    if kind == "max":
        return x.amax((2, 3))  # amax: no argmax indices, unlike torch.max / F.max_pool2d
    if kind == "lp":
        # official F.lp_pool2d(x, 2, (H, W)) = sqrt(sum x^2), a sum and not a mean
        return torch.linalg.vector_norm(x, 2, dim=(2, 3))
    if kind == "lse":
        # official logsumexp_2d: log of the *sum* of exponentials over H*W (max-shifted internally)
        return torch.logsumexp(x, dim=(2, 3))
    raise ValueError(f"unknown channel pool {kind!r}")


def stacked_pools(x: torch.Tensor, pools: Sequence[str]) -> torch.Tensor:
    """All pools of ``x`` stacked along the batch axis: (len(pools) * B, C), pool-major."""
    if len(pools) == 1:
        return pool_hw(x, pools[0])
    return torch.cat([pool_hw(x, kind) for kind in pools], dim=0)


def shared_mlp(
    p: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
) -> torch.Tensor:
    """fc2(relu(fc1(p))) on (N, C) rows. Weights in torch layout, (out, in) or conv1x1 (out, in, 1, 1):
    a 1x1 convolution on a 1x1 map is the same GEMM, so both run as `F.linear` (a free view)."""
    if fc1_weight.dim() == 4:
        fc1_weight = fc1_weight.flatten(1)
        fc2_weight = fc2_weight.flatten(1)
    return F.linear(F.relu(F.linear(p, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)


def channel_attention(
    x: torch.Tensor,
    pools: Sequence[str],
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    gate: str = "sigmoid",
) -> torch.Tensor:
    """x * gate(sum over pools of MLP(pool(x))): one MLP call on the (P*B, C) stack of pools."""
    b, c = x.shape[0], x.shape[1]
    logits = shared_mlp(stacked_pools(x, pools), fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    if len(pools) > 1:
        logits = logits.view(len(pools), b, c).sum(0)
    return x * apply_gate(logits, gate)[:, :, None, None]


def spatial_maps(x: torch.Tensor, concat_order: Sequence[str]) -> torch.Tensor:
    """Mean and max over channels, concatenated in ``concat_order`` -> (B, 2, H, W)."""
    maps = {"mean": x.mean(1, keepdim=True), "max": x.amax(1, keepdim=True)}
    return torch.cat([maps[name] for name in concat_order], dim=1)
