"""Figures for `cbam-multi plot`: both backends' training curves overlaid, and MNIST digits with the
spatial-attention maps each backend computes from one checkpoint. matplotlib (Agg) only."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cbam_multi.errors import CBAMError
from cbam_multi.weights import atomic_write_bytes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: works headless and in CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def load_metrics(path) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.json"
    try:
        metrics = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CBAMError(f"{p}: cannot read training metrics: {e}") from None
    if metrics.get("format") != "cbam_multi.TrainMetrics" or not metrics.get("epochs"):
        raise CBAMError(f"{p}: not a cbam_multi metrics.json with at least one epoch")
    return metrics


def plot_curves(runs: Sequence, out) -> Path:
    """Per-step training loss and per-epoch test accuracy of each run (a run dir or metrics.json)."""
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        m = load_metrics(run)
        label = f"{m['backend']} ({Path(str(run)).name})"
        losses = np.concatenate([e["train_losses"] for e in m["epochs"]])
        steps = np.arange(1, len(losses) + 1)
        window = max(1, len(losses) // 100)  # light smoothing: the raw per-batch loss is noisy
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax_loss.plot(steps[window - 1 :], smooth, label=label, alpha=0.8)
        epochs = [e["epoch"] for e in m["epochs"]]
        ax_acc.plot(epochs, [100 * e["test_accuracy"] for e in m["epochs"]], marker="o", label=label)
    ax_loss.set(xlabel="step", ylabel="train loss (moving mean)", yscale="log", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, out)


def attention_maps(backend: str, checkpoint, images_nhwc: np.ndarray) -> list[np.ndarray]:
    """Spatial-attention maps (one (N, H, W) array per CBAM block) that ``backend`` computes."""
    from cbam_multi.weights import load_weights

    weights, spec = load_weights(checkpoint)
    if not getattr(spec, "cbam", False):
        raise CBAMError(f"{checkpoint}: this model has no CBAM blocks (trained with --no-cbam)")
    if backend == "torch":
        import torch

        from cbam_multi.torch.models import MNISTNet, import_model_weights
        from cbam_multi.torch.models import mnist as tm

        model = import_model_weights(MNISTNet(spec, dtype=torch.float32), weights)
        x = torch.tensor(images_nhwc.transpose(0, 3, 1, 2), dtype=torch.float32)
        return [a.numpy() for a in tm.attention_maps(model, x)]
    import jax.numpy as jnp

    from cbam_multi.jax.models import MNISTNet, import_model_weights
    from cbam_multi.jax.models import mnist as jm

    model = import_model_weights(MNISTNet(spec, dtype=jnp.float32, use_running_average=True), weights)
    return [np.asarray(a) for a in jm.attention_maps(model, jnp.asarray(images_nhwc, jnp.float32))]


def plot_attention(checkpoint, images_uint8: np.ndarray, labels: np.ndarray, out, backends=("torch", "jax")) -> Path:
    """A grid: each digit, then for each backend and each CBAM block its spatial-attention map."""
    from cbam_multi.training.data import normalize

    x = normalize(images_uint8)
    maps = {b: attention_maps(b, checkpoint, x) for b in backends}
    n_blocks = len(next(iter(maps.values())))
    cols = 1 + len(backends) * n_blocks
    plt = _pyplot()
    fig, axes = plt.subplots(len(x), cols, figsize=(1.6 * cols, 1.6 * len(x)), squeeze=False)
    for r in range(len(x)):
        axes[r, 0].imshow(images_uint8[r], cmap="gray")
        axes[r, 0].set_title(f"label {labels[r]}", fontsize=8)
        c = 1
        for b in backends:
            for blk in range(n_blocks):
                axes[r, c].imshow(maps[b][blk][r], cmap="viridis", vmin=0.0, vmax=1.0)
                if r == 0:
                    axes[r, c].set_title(f"{b} block{blk}", fontsize=8)
                c += 1
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    diff = max(float(np.abs(a - b).max()) for a, b in zip(*(maps[b] for b in backends))) if len(backends) == 2 else 0.0
    fig.suptitle(f"spatial attention (sigmoid gate) per block; max |torch - jax| = {diff:.1e}", fontsize=9)
    return _save(fig, out)
