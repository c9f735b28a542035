"""Float64 NumPy implementation of a CBAMSpec: the oracle every backend is tested against.

NCHW, written for clarity rather than speed. Train mode returns the updated BatchNorm running
statistics (PyTorch convention, see `cbam_multi.spec`) instead of mutating anything.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from cbam_multi.errors import InputError
from cbam_multi.spec import LEAKY_SLOPE, CBAMSpec
from cbam_multi.weights import validate_weights


def gate(z: np.ndarray, kind: str) -> np.ndarray:
    if kind == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    return np.clip(z / 6.0 + 0.5, 0.0, 1.0)  # hard_sigmoid = relu6(z + 3) / 6


def pool_hw(x: np.ndarray, kind: str) -> np.ndarray:
    """Global pool over H, W of an NCHW array -> (B, C)."""
    if kind == "avg":
        return x.mean(axis=(2, 3))
    if kind == "max":
        return x.max(axis=(2, 3))
    if kind == "lp":  # official code: F.lp_pool2d(x, 2, (H, W)) = sqrt(sum x^2)
        return np.sqrt((x**2).sum(axis=(2, 3)))
    # "lse", official logsumexp_2d: a log of the *sum* (not mean) of exponentials, max-shifted
    s = x.max(axis=(2, 3), keepdims=True)
    return (s + np.log(np.exp(x - s).sum(axis=(2, 3), keepdims=True)))[:, :, 0, 0]


def activation(h: np.ndarray, kind: str) -> np.ndarray:
    """The shared MLP's activation (`cbam_multi.spec.ACTIVATIONS`)."""
    if kind == "relu":
        return np.maximum(h, 0.0)
    if kind == "relu6":
        return np.clip(h, 0.0, 6.0)
    if kind == "leaky_relu":
        return np.where(h >= 0.0, h, LEAKY_SLOPE * h)
    return h / (1.0 + np.exp(-h))  # silu


def max_routing(x: np.ndarray, axes: tuple[int, ...], tie_rule: str) -> np.ndarray:
    """How a max pool over ``axes`` routes its cotangent: an array shaped like ``x`` holding, for each
    element, the fraction of its reduction's cotangent it receives. "split": 1 / (number of tied maxima)
    at every maximum; "first": 1 at the maximum of lowest flat index over ``axes`` (row-major), else 0.
    The gradient of ``x.max(axes)`` for a cotangent ``g`` is ``routing * g`` broadcast back."""
    x = np.asarray(x)
    mask = x == x.max(axis=axes, keepdims=True)
    if tie_rule == "split":
        return mask / mask.sum(axis=axes, keepdims=True)
    rest = [a for a in range(x.ndim) if a not in axes]
    moved = np.transpose(mask, rest + list(axes))
    flat = moved.reshape(moved.shape[: len(rest)] + (-1,))
    first = np.zeros_like(flat)
    np.put_along_axis(first, flat.argmax(axis=-1)[..., None], True, axis=-1)  # argmax: the first True
    return np.transpose(first.reshape(moved.shape), np.argsort(rest + list(axes))).astype(np.float64)


def channel_attention(x: np.ndarray, w: Mapping[str, np.ndarray], spec: CBAMSpec) -> np.ndarray:
    def mlp(p):
        h = p @ w["channel.fc1.kernel"] + (w["channel.fc1.bias"] if spec.mlp_bias else 0.0)
        h = activation(h, spec.mlp_act)
        return h @ w["channel.fc2.kernel"] + (w["channel.fc2.bias"] if spec.mlp_bias else 0.0)

    pooled = [pool_hw(x, kind) for kind in spec.channel_pools]
    if spec.variant == "light":  # timm LightChannelAttn: one MLP call on the mean of the pools
        logits = mlp(sum(p * (1.0 / len(pooled)) for p in pooled))
    else:
        logits = sum(mlp(p) for p in pooled)
    return x * gate(logits, spec.gate)[:, :, None, None]


def conv2d_same(m: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Cross-correlate (B, I, H, W) maps with an HWIO (k, k, I, 1) kernel, zero 'same' padding -> (B, H, W)."""
    k = kernel.shape[0]
    p = k // 2
    padded = np.pad(m, ((0, 0), (0, 0), (p, p), (p, p)))
    h, w = m.shape[2:]
    out = np.zeros((m.shape[0], h, w))
    for i in range(k):
        for j in range(k):
            out += np.einsum("bchw,c->bhw", padded[:, :, i : i + h, j : j + w], kernel[i, j, :, 0])
    return out


def conv2d(x: np.ndarray, kernel: np.ndarray, stride: int = 1, padding: int = 0) -> np.ndarray:
    """Cross-correlate NCHW ``x`` with an HWIO kernel, zero padding, any stride -> (B, O, H', W').

    im2col + one matmul, so that whole networks (the ResNet oracle) run in float64 in seconds."""
    kh, kw, c_in, c_out = kernel.shape
    if padding:
        x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    b, c, h, w = x.shape
    ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
    cols = np.empty((b, ho, wo, kh, kw, c), dtype=np.result_type(x, kernel))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, :, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride]
            cols[:, :, :, i, j, :] = patch.transpose(0, 2, 3, 1)
    out = cols.reshape(b * ho * wo, kh * kw * c) @ kernel.reshape(kh * kw * c_in, c_out)
    return out.reshape(b, ho, wo, c_out).transpose(0, 3, 1, 2)


def batch_norm(z: np.ndarray, w: Mapping[str, np.ndarray], spec: CBAMSpec, train: bool):
    """BatchNorm of the single spatial-logit channel z (B, H, W). Returns (out, new running stats)."""
    if train:
        n = z.size
        if n < 2:
            raise InputError("BatchNorm in train mode needs more than 1 value per channel (B*H*W >= 2)")
        mean, var = z.mean(), z.var()
        m = spec.norm_momentum
        stats = {
            "spatial.bn.mean": (1 - m) * w["spatial.bn.mean"] + m * mean,
            "spatial.bn.var": (1 - m) * w["spatial.bn.var"] + m * var * n / (n - 1),  # unbiased, as torch
        }
    else:
        mean, var = w["spatial.bn.mean"][0], w["spatial.bn.var"][0]
        stats = {}
    out = (z - mean) / np.sqrt(var + spec.norm_eps) * w["spatial.bn.scale"][0] + w["spatial.bn.bias"][0]
    return out, stats


def spatial_attention(x: np.ndarray, w: Mapping[str, np.ndarray], spec: CBAMSpec, train: bool = False):
    """Returns (y, new running stats); the stats dict is empty unless BN runs in train mode."""
    maps = {"mean": x.mean(axis=1), "max": x.max(axis=1)}
    if spec.variant == "light":  # timm LightSpatialAttn: the one map 0.5 * mean + 0.5 * max
        stacked = (0.5 * maps["mean"] + 0.5 * maps["max"])[:, None]
    else:
        stacked = np.stack([maps[k] for k in spec.concat_order], axis=1)
    z = conv2d_same(stacked, w["spatial.conv.kernel"])
    if spec.spatial_bias:
        z = z + w["spatial.conv.bias"][0]
    stats = {}
    if spec.has_norm:
        z, stats = batch_norm(z, w, spec, train)
    return x * gate(z, spec.gate)[:, None], stats


def cbam_forward(x, weights: Mapping[str, np.ndarray], spec: CBAMSpec, train: bool = False):
    """CBAM on an NCHW array in float64: channel gate, then spatial gate. Returns (y, new_stats)."""
    x = np.asarray(x)
    spec.check_input(x.shape, str(x.dtype), "NCHW")
    validate_weights(weights, spec)
    w = {n: np.asarray(a, dtype=np.float64) for n, a in weights.items()}
    y = channel_attention(x.astype(np.float64), w, spec)
    if spec.no_spatial:
        return y, {}
    return spatial_attention(y, w, spec, train)
