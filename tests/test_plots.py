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
