"""`cbam-multi plot` pieces: attention maps agree across backends; both PNGs are written."""

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("flax")
pytest.importorskip("matplotlib")

from cbam_multi import MNISTNetSpec, init_weights, save_weights
from cbam_multi.training import plots
from cbam_multi.training.data import normalize


@pytest.fixture()
def checkpoint(tmp_path):
    spec = MNISTNetSpec(conv_channels=(8, 16), dense=16)
    return save_weights(tmp_path / "checkpoint.safetensors", init_weights(spec, seed=3), spec)


def test_attention_maps_agree_across_backends(checkpoint):
    images = np.random.default_rng(0).integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    x = normalize(images)
    torch_maps = plots.attention_maps("torch", checkpoint, x)
    jax_maps = plots.attention_maps("jax", checkpoint, x)
    assert [m.shape for m in torch_maps] == [m.shape for m in jax_maps] == [(3, 28, 28), (3, 14, 14)]
    for t, j in zip(torch_maps, jax_maps):
        err = np.abs(t - j).max()
        assert err < 1e-5, f"attention maps differ by {err:.2e}"
        assert t.min() >= 0.0 and t.max() <= 1.0  # sigmoid gate


def test_plots_write_pngs(checkpoint, tmp_path):
    for backend in ("torch", "jax"):
        run = tmp_path / backend
        run.mkdir()
        epochs = [{"epoch": e, "test_accuracy": 0.9 + e / 100, "train_losses": list(np.linspace(1, 0.1, 20) / e)}
                  for e in (1, 2)]
        (run / "metrics.json").write_text(json.dumps({"format": "cbam_multi.TrainMetrics", "backend": backend, "epochs": epochs}))
    curves = plots.plot_curves([tmp_path / "torch", tmp_path / "jax"], tmp_path / "out" / "curves.png")
    images = np.random.default_rng(1).integers(0, 256, size=(2, 28, 28), dtype=np.uint8)
    grid = plots.plot_attention(checkpoint, images, np.array([3, 7]), tmp_path / "out" / "attention.png")
    for png in (curves, grid):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_metrics_is_a_clear_error(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(Exception, match="not a cbam_multi metrics.json"):
        plots.load_metrics(tmp_path)


def _write_run(folder, backend, n_epochs, steps_per_epoch, acc0=0.93):
    folder.mkdir(parents=True)
    epochs = [
        {"epoch": e, "test_accuracy": acc0 + e / 1000, "train_losses": list(np.linspace(2, 0.1, steps_per_epoch) / e)}
        for e in range(1, n_epochs + 1)
    ]
    metrics = {"format": "cbam_multi.TrainMetrics", "backend": backend, "epochs": epochs}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_curves_tell_backends_apart_and_label_axes_honestly(tmp_path):
    runs = [_write_run(tmp_path / b, b, n_epochs=1, steps_per_epoch=100) for b in ("torch", "jax")]
    fig = plots.curves_figure(runs)
    ax_loss, ax_acc = fig.axes
    (t_loss, j_loss), (t_acc, j_acc) = ax_loss.get_lines(), ax_acc.get_lines()
    for t, j in ((t_loss, j_loss), (t_acc, j_acc)):  # identical data: the styles must differ
        assert t.get_linestyle() != j.get_linestyle()
        assert t.get_marker() != j.get_marker()
        assert t.get_color() != j.get_color()
    assert ax_loss.get_ylabel() == "train loss per step"  # 100 steps: no smoothing, so no "moving mean"
    # one epoch: one tick at 1, the point well inside the axes, not a 0.96-1.04 zoom
    assert list(ax_acc.get_xticks()) == [1] and ax_acc.get_xlim() == (0.5, 1.5)
    lo, hi = ax_acc.get_ylim()
    assert lo == pytest.approx(93.1 - 0.5) and hi == pytest.approx(93.1 + 0.6)  # 0.5 pad (+0.1 marker room)
    assert "93.10 %" in ax_acc.get_legend().get_texts()[0].get_text()
    plots._pyplot().close(fig)


def test_curves_smoothing_window_is_in_the_label(tmp_path):
    runs = [_write_run(tmp_path / "t", "torch", n_epochs=3, steps_per_epoch=400)]
    fig = plots.curves_figure(runs)
    assert fig.axes[0].get_ylabel() == "train loss (mean of 12 steps)"  # 1,200 steps // 100
    assert list(fig.axes[1].get_xticks()) == [1, 2, 3]
    plots._pyplot().close(fig)


def test_accuracy_limits():
    assert plots.accuracy_limits([99.9, 99.95]) == (99.4, 100.1)  # capped at 100 (+ room for the marker)
    lo, hi = plots.accuracy_limits([50.0, 90.0])
    assert lo == 44.0 and hi == pytest.approx(96.1)


def test_attention_figure_has_colour_bar_and_one_header_row(checkpoint):
    images = np.random.default_rng(2).integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    fig = plots.attention_figure(checkpoint, images, np.array([1, 2, 3]))
    bars = [ax for ax in fig.axes if "spatial gate" in ax.get_ylabel()]
    assert len(bars) == 1, "one shared colour bar for every attention map"
    assert bars[0].get_ylim() == (0.0, 1.0)
    grid = [ax for ax in fig.axes if ax is not bars[0]]
    titled = [ax for ax in grid if ax.get_title()]
    assert len(titled) == 5  # the header row only: input + 2 backends x 2 blocks
    assert [ax.get_ylabel() for ax in grid[::5]] == ["label 1", "label 2", "label 3"]
    assert fig.get_layout_engine() is not None  # constrained layout: no blank band under the title
    assert "max |torch − jax|" in fig._suptitle.get_text()
    plots._pyplot().close(fig)
