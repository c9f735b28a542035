"""The arrays a run trains and evaluates on: the split loaded and subset, normalized NHWC in the parameter
dtype, padded with the background to the size the model is fed, and the seeded random-shift augmentation
(NumPy only, so both backends see identical batches)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from cbam_multi.models import MNISTNetSpec, ResNetSpec
from cbam_multi.training.config import ConfigError, TrainConfig
from cbam_multi.training.data import Dataset, load_mnist, normalize, subset

__all__ = [
    "PreparedData", "load_dataset", "prepare_data", "dataset_digest", "augment_rng", "random_shift", "model_image_size", "pad_to_model",
]

# spec class -> the square image size that model family is fed (None: as loaded). A cifar-stem ResNet is
# built for 32x32 inputs (three stride-2 stages: 32 -> 4), so MNIST's 28x28 digits are padded to 32.
_IMAGE_SIZE = {
    MNISTNetSpec: lambda spec: spec.image_size,
    ResNetSpec: lambda spec: 32 if spec.stem == "cifar" else None,
}


def model_image_size(spec) -> int | None:
    """The square image size ``spec``'s model is fed, or None when it takes the images as they are."""
    return _IMAGE_SIZE[type(spec)](spec)


def pad_to_model(x: np.ndarray, spec) -> np.ndarray:
    """Normalized NHWC images padded evenly with the background (a 0 pixel) to `model_image_size`."""
    size = model_image_size(spec)
    h = x.shape[1]
    if size is None or size == h:
        return x
    if size < h or x.shape[2] != h:
        raise ConfigError(f"{type(spec).__name__} is fed {size}x{size} images; the data is {h}x{x.shape[2]}")
    before = (size - h) // 2
    background = normalize(np.zeros((1, 1, 1), np.uint8), x.dtype)[0, 0, 0, 0]
    pad = ((0, 0), (before, size - h - before), (before, size - h - before), (0, 0))
    return np.pad(x, pad, constant_values=background)


@dataclass(frozen=True, eq=False)
class PreparedData:
    """Normalized NHWC arrays in the training parameter dtype (identical bytes for both backends)."""

    name: str
    source: str
    x_train: np.ndarray  # (N, S, S, 1): S = 28, or the model's size
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
        pad_to_model(normalize(ds.train_images, dt), config.model),
        ds.train_labels,
        pad_to_model(normalize(ds.test_images, dt), config.model),
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

