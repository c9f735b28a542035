"""The arrays a run trains and evaluates on: the split loaded and subset, normalized NHWC in the parameter
dtype, and the seeded random-shift augmentation (NumPy only, so both backends see identical batches)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from cbam_multi.training.config import TrainConfig
from cbam_multi.training.data import Dataset, load_mnist, normalize, subset

__all__ = ["PreparedData", "load_dataset", "prepare_data", "dataset_digest", "augment_rng", "random_shift"]


@dataclass(frozen=True, eq=False)
class PreparedData:
    """Normalized NHWC arrays in the training parameter dtype (identical bytes for both backends)."""

    name: str
    source: str
    x_train: np.ndarray  # (N, 28, 28, 1)
    y_train: np.ndarray  # int64 (N,)
    x_test: np.ndarray
    y_test: np.ndarray
    sha256: str = ""  # of the raw images and labels used (both splits, after the subset): `dataset_digest`

    def info(self) -> dict:
        return {
            "name": self.name, "source": self.source, "n_train": len(self.y_train), "n_test": len(self.y_test),
            "sha256": self.sha256,
        }


def load_dataset(dataset: str = "auto", data_dir=None, data: Dataset | None = None) -> Dataset:
    """``data`` if given (tests pass a preloaded Dataset), else `cbam_multi.training.data.load_mnist`."""
    if data is not None:
        return data
    return load_mnist(data_dir, dataset=dataset)


def prepare_data(config: TrainConfig, data: Dataset | None = None) -> PreparedData:
    ds = subset(load_dataset(config.dataset, config.data_dir, data), config.n_train, config.n_test)
    dt = np.dtype(config.param_dtype)  # bfloat16 runs feed float32 and cast on the device
    return PreparedData(
        ds.name,
        ds.source,
        normalize(ds.train_images, dt),
        ds.train_labels,
        normalize(ds.test_images, dt),
        ds.test_labels,
        dataset_digest(ds),
    )


def dataset_digest(ds: Dataset) -> str:
    """SHA-256 of the raw images and labels of both splits (shapes included): what a run trained on, so a
    resume can refuse other data under the same flags (the full set gone, the sample in its place)."""
    h = hashlib.sha256()
    for a in (ds.train_images, ds.train_labels, ds.test_images, ds.test_labels):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def augment_rng(config: TrainConfig, epoch: int) -> np.random.Generator:
    """The augmentation generator of one epoch: a pure function of (data_seed, epoch), like the batch order,
    so a resumed run draws the same shifts."""
    return np.random.default_rng([config.data_seed, epoch, 1])


def random_shift(x: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
    """Translate each NHWC image by (dy, dx) uniform in [-max_shift, max_shift], filling with the
    background (the normalized value of a 0 pixel). NumPy only, so both backends see identical batches."""
    if max_shift == 0:
        return x
    b, h, w, _ = x.shape
    background = normalize(np.zeros((1, 1, 1), np.uint8), x.dtype)[0, 0, 0, 0]
    s = max_shift
    padded = np.pad(x, ((0, 0), (s, s), (s, s), (0, 0)), constant_values=background)
    dy, dx = rng.integers(0, 2 * s + 1, size=(2, b))
    rows = (dy[:, None] + np.arange(h))[:, :, None]
    cols = (dx[:, None] + np.arange(w))[:, None, :]
    return padded[np.arange(b)[:, None, None], rows, cols]

