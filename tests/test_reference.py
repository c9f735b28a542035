"""The NumPy oracle itself, checked against independent, deliberately naive loops."""

import numpy as np
import pytest

from cbam_multi import CBAMSpec, InputError, init_weights
from cbam_multi.reference import cbam_forward


def naive_cbam(x, w, spec, train=False):
    """Per-pixel loops, straight from the paper's equations; no shared code with the reference."""
    b, c, h, wd = x.shape
    sig = lambda z: 1 / (1 + np.exp(-z))
    out = np.empty_like(x)
    for n in range(b):
        logits = np.zeros(c)
        for pool in (x[n].mean(axis=(1, 2)), x[n].max(axis=(1, 2))):
            hid = np.array([max(0.0, sum(pool[i] * w["channel.fc1.kernel"][i, j] for i in range(c))
                                + w["channel.fc1.bias"][j]) for j in range(spec.hidden)])
            logits += np.array([sum(hid[j] * w["channel.fc2.kernel"][j, i] for j in range(spec.hidden))
                                + w["channel.fc2.bias"][i] for i in range(c)])
        out[n] = x[n] * sig(logits)[:, None, None]
    maps = {"mean": out.mean(axis=1), "max": out.max(axis=1)}
    stacked = [maps[k] for k in spec.concat_order]
    k, p = spec.spatial_kernel, spec.padding
    z = np.zeros((b, h, wd))
    for n in range(b):
        for i in range(h):
            for j in range(wd):
                acc = w["spatial.conv.bias"][0]
                for ch in range(2):
                    for di in range(k):
                        for dj in range(k):
                            ii, jj = i + di - p, j + dj - p
                            if 0 <= ii < h and 0 <= jj < wd:
                                acc += stacked[ch][n, ii, jj] * w["spatial.conv.kernel"][di, dj, ch, 0]
                z[n, i, j] = acc
    return out * sig(z)[:, None]


@pytest.mark.parametrize("concat_order", [("mean", "max"), ("max", "mean")])
def test_reference_matches_naive_loops(concat_order):
    spec = CBAMSpec(6, reduction=2, spatial_kernel=3, concat_order=concat_order)
    w = init_weights(spec, seed=5, dtype=np.float64)
    x = np.random.default_rng(0).normal(size=(2, 6, 5, 4))
    y, stats = cbam_forward(x, w, spec)
    err = np.abs(y - naive_cbam(x, w, spec)).max()
    assert err < 1e-12, f"max abs error {err:.3e}"
    assert stats == {}


def test_reference_batchnorm_train_uses_torch_conventions():
    spec = CBAMSpec.official(4, reduction=2, norm_gamma_init=1.0)
    w = init_weights(spec, dtype=np.float64)
    x = np.random.default_rng(1).normal(size=(3, 4, 4, 4))
    y_eval, _ = cbam_forward(x, w, spec, train=False)
    y_train, stats = cbam_forward(x, w, spec, train=True)
    assert not np.allclose(y_eval, y_train)
    # Recompute the batch statistics of the spatial logits by hand from the eval-mode pieces.
    from cbam_multi.reference import channel_attention, conv2d_same

    xc = channel_attention(x, w, spec)
    z = conv2d_same(np.stack([xc.max(1), xc.mean(1)], 1), w["spatial.conv.kernel"])
    n = z.size
    assert stats["spatial.bn.mean"] == pytest.approx(0.99 * 0 + 0.01 * z.mean(), abs=1e-15)
    assert stats["spatial.bn.var"] == pytest.approx(0.99 * 1 + 0.01 * z.var() * n / (n - 1), abs=1e-15)


def test_reference_rejects_single_value_batchnorm_training():
    spec = CBAMSpec.timm(4)
    with pytest.raises(InputError, match="more than 1 value"):
        cbam_forward(np.ones((1, 4, 1, 1)), init_weights(spec), spec, train=True)
