"""Figures for `cbam-multi plot`: both backends' training curves overlaid, and MNIST digits with the
spatial-attention maps each backend computes from one checkpoint. matplotlib (Agg) only."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cbam_multi._optional import require
from cbam_multi.errors import CBAMError
from cbam_multi.weights import atomic_write_bytes


def _pyplot():
    matplotlib = require("matplotlib", "cbam-multi plot")

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


# One look per backend, so overlaid runs stay distinguishable even where the curves coincide (same init,
# same batches: torch and JAX agree to float32 rounding): torch wide and solid underneath, JAX dashed on
# top, different markers; colours tell runs apart (e.g. CBAM vs --no-cbam).
BACKEND_STYLE = {
    "torch": {"linestyle": "-", "linewidth": 2.6, "alpha": 0.75, "marker": "o", "markerfacecolor": None, "zorder": 2},
    "jax": {"linestyle": "--", "linewidth": 1.4, "marker": "s", "markerfacecolor": "none", "zorder": 3},
}
_OTHER_STYLE = {"linestyle": ":", "linewidth": 1.4, "marker": "^", "markerfacecolor": None, "zorder": 4}
SMOOTH_POINTS = 100  # the loss curve is smoothed to about this many points (raw per-batch loss is noisy)


def loss_window(n_steps: int) -> int:
    return max(1, n_steps // SMOOTH_POINTS)


def loss_ylabel(window: int) -> str:
    return "train loss per step" if window == 1 else f"train loss (mean of {window} steps)"


def accuracy_limits(values_pct: Sequence[float]) -> tuple[float, float]:
    """y-limits that show a short run's accuracies without a misleading zoom or a value at the edge."""
    lo, hi = min(values_pct), max(values_pct)
    pad = max(0.5, 0.15 * (hi - lo))
    return max(0.0, lo - pad), min(100.0, hi + pad) + 0.1


def curves_figure(runs: Sequence):
    """The figure `plot_curves` saves: per-step training loss and per-epoch test accuracy of each run."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    windows, accs, max_epoch = set(), [], 1
    for i, run in enumerate(runs):
        m = load_metrics(run)
        style = dict(BACKEND_STYLE.get(m["backend"], _OTHER_STYLE), color=f"C{i}")
        if style["markerfacecolor"] is None:
            style["markerfacecolor"] = style["color"]
        name = f"{m['backend']} ({Path(str(run)).name})"
        losses = np.concatenate([e["train_losses"] for e in m["epochs"]])
        window = loss_window(len(losses))
        windows.add(window)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        steps = np.arange(window, len(losses) + 1)  # each mean is plotted at its window's last step
        ax_loss.plot(steps, smooth, label=name, markevery=max(1, len(smooth) // 10), markersize=5, **style)
        epochs = [e["epoch"] for e in m["epochs"]]
        acc = [100 * e["test_accuracy"] for e in m["epochs"]]
        accs += acc
        max_epoch = max(max_epoch, max(epochs))
        ax_acc.plot(epochs, acc, label=f"{name}: {acc[-1]:.2f} %", markersize=8, **style)
    ylabel = loss_ylabel(windows.pop()) if len(windows) == 1 else "train loss (smoothed)"
    ax_loss.set(xlabel="optimizer step", ylabel=ylabel, yscale="log", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy (legend: last epoch)")
    ax_acc.set_xlim(0.5, max_epoch + 0.5)
    ax_acc.set_ylim(*accuracy_limits(accs))
    if max_epoch <= 12:  # one tick per epoch; a 1-epoch run gets one tick, not 0.5, 0.6, ...
        ax_acc.set_xticks(range(1, max_epoch + 1))
    else:
        ax_acc.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    return fig


def plot_curves(runs: Sequence, out) -> Path:
    """Per-step training loss and per-epoch test accuracy of each run (a run dir or metrics.json)."""
    return _save(curves_figure(runs), out)


def attention_maps(backend: str, checkpoint, images_nhwc: np.ndarray) -> list[np.ndarray]:
    """Spatial-attention maps (one (N, H, W) array per CBAM block) that ``backend`` computes."""
    from cbam_multi.weights import load_weights

    weights, spec = load_weights(checkpoint)
    if not getattr(spec, "cbam", False):
        raise CBAMError(f"{checkpoint}: this model has no CBAM blocks (trained with --no-cbam)")
    if backend == "torch":
        torch = require("torch", "attention maps from torch")

        from cbam_multi.torch.models import MNISTNet, import_model_weights
        from cbam_multi.torch.models import mnist as tm

        model = import_model_weights(MNISTNet(spec, dtype=torch.float32), weights)
        x = torch.tensor(images_nhwc.transpose(0, 3, 1, 2), dtype=torch.float32)
        return [a.numpy() for a in tm.attention_maps(model, x)]
    jnp = require("jax.numpy", "attention maps from JAX")

    from cbam_multi.jax.models import MNISTNet, import_model_weights
    from cbam_multi.jax.models import mnist as jm

    model = import_model_weights(MNISTNet(spec, dtype=jnp.float32, use_running_average=True), weights)
    return [np.asarray(a) for a in jm.attention_maps(model, jnp.asarray(images_nhwc, jnp.float32))]


def attention_figure(checkpoint, images_uint8: np.ndarray, labels: np.ndarray, backends=("torch", "jax")):
    """The figure `plot_attention` saves: a row per digit, then per backend and CBAM block its map."""
    from cbam_multi.training.data import normalize

    x = normalize(images_uint8)
    maps = {b: attention_maps(b, checkpoint, x) for b in backends}
    n_blocks = len(next(iter(maps.values())))
    cols = 1 + len(backends) * n_blocks
    plt = _pyplot()
    fig, axes = plt.subplots(len(x), cols, figsize=(1.25 * cols + 1.0, 1.25 * len(x) + 0.8), squeeze=False, layout="constrained")
    fig.get_layout_engine().set(w_pad=0.02, h_pad=0.02, wspace=0.02, hspace=0.02)
    image = None
    for r in range(len(x)):
        axes[r, 0].imshow(images_uint8[r], cmap="gray")
        axes[r, 0].set_ylabel(f"label {labels[r]}", fontsize=8)
        c = 1
        for b in backends:
            for blk in range(n_blocks):
                image = axes[r, c].imshow(maps[b][blk][r], cmap="viridis", vmin=0.0, vmax=1.0)
                if r == 0:
                    h, w = maps[b][blk].shape[1:]
                    axes[r, c].set_title(f"{b}\nblock {blk + 1} ({h}×{w})", fontsize=8)
                c += 1
    axes[0, 0].set_title("input", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    bar = fig.colorbar(image, ax=axes[:, 1:], shrink=0.6, aspect=30, pad=0.02)
    bar.set_label("spatial gate σ(·): 0 suppressed, 1 kept", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    title = "CBAM spatial attention per block"
    if len(backends) == 2:
        diff = max(float(np.abs(a - b).max()) for a, b in zip(*(maps[b] for b in backends)))
        title += f"\nmax |{backends[0]} − {backends[1]}| = {diff:.1e}"
    fig.suptitle(title, fontsize=9)
    return fig


def plot_attention(checkpoint, images_uint8: np.ndarray, labels: np.ndarray, out, backends=("torch", "jax")) -> Path:
    """A grid: each digit, then for each backend and each CBAM block its spatial-attention map."""
    return _save(attention_figure(checkpoint, images_uint8, labels, backends), out)
