"""Float64 NumPy implementation of a CBAMSpec: the oracle every backend is tested against.

NCHW, written for clarity rather than speed. Train mode returns the updated BatchNorm running
statistics (PyTorch convention, see `cbam_multi.spec`) instead of mutating anything.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from cbam_multi.errors import InputError
from cbam_multi.spec import CBAMSpec
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


def channel_attention(x: np.ndarray, w: Mapping[str, np.ndarray], spec: CBAMSpec) -> np.ndarray:
    def mlp(p):
        h = p @ w["channel.fc1.kernel"] + (w["channel.fc1.bias"] if spec.mlp_bias else 0.0)
        h = np.maximum(h, 0.0)
        return h @ w["channel.fc2.kernel"] + (w["channel.fc2.bias"] if spec.mlp_bias else 0.0)

    logits = sum(mlp(pool_hw(x, kind)) for kind in spec.channel_pools)
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
    z = conv2d_same(np.stack([maps[k] for k in spec.concat_order], axis=1), w["spatial.conv.kernel"])
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
    return spatial_attention(y, w, spec, train)
