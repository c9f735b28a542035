"""Preprocessing and batching: normalization, the seeded per-epoch order, batch indices and subsets.
Stdlib + NumPy only, so both backends see byte-identical arrays in identical order for the same seed."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import numpy as np

from cbam_multi.errors import DataError, InputError
from cbam_multi.training.data.dataset import Dataset

__all__ = ["MNIST_MEAN", "MNIST_STD", "normalize", "epoch_permutation", "batches_per_epoch", "iterate_batches", "subset"]

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


def normalize(images_uint8: np.ndarray, dtype=np.float32) -> np.ndarray:
    """(N, H, W) uint8 -> (N, H, W, 1) NHWC, scaled to [0, 1] then standardized with MNIST mean/std.

    Backends transpose to NCHW themselves; doing the arithmetic here in one dtype keeps both
    backends' inputs bit-identical.
    """
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise InputError(f"normalize: expected uint8 (N, H, W) images, got {images.dtype} {images.shape}")
    dt = np.dtype(dtype)
    scaled = images.astype(dt) / dt.type(255)
    return ((scaled - dt.type(MNIST_MEAN)) / dt.type(MNIST_STD))[..., None]


def _check_nonneg_int(what: str, value) -> int:
    """Return ``value`` as int, rejecting bools, non-integers and negatives."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InputError(f"{what} must be a non-negative int, got {value!r}")
    return int(value)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffle order of epoch ``epoch``: ``np.random.default_rng([seed, epoch]).permutation(n)``.

    A fresh generator per (seed, epoch) makes any epoch reproducible on its own (e.g. after a
    resume) and identical across backends.
    """
    n = _check_nonneg_int("n", n)
    key = [_check_nonneg_int("seed", seed), _check_nonneg_int("epoch", epoch)]
    return np.random.default_rng(key).permutation(n)


def batches_per_epoch(n: int, batch_size: int, drop_last: bool = True) -> int:
    """Number of batches :func:`iterate_batches` yields for ``n`` examples."""
    n = _check_nonneg_int("n", n)
    if _check_nonneg_int("batch_size", batch_size) == 0:
        raise InputError("batch_size must be positive, got 0")
    return n // batch_size if drop_last else -(-n // batch_size)


def iterate_batches(
    n: int, batch_size: int, *, seed: int, epoch: int, drop_last: bool = True
) -> Iterator[np.ndarray]:
    """Yield index arrays for one epoch, in :func:`epoch_permutation` order.

    ``drop_last`` drops the ragged tail so every batch has the same static shape (no jit recompiles).
    """
    count = batches_per_epoch(n, batch_size, drop_last)
    order = epoch_permutation(n, seed, epoch)
    for i in range(count):
        yield order[i * batch_size : (i + 1) * batch_size]


def subset(ds: Dataset, n_train: int | None = None, n_test: int | None = None) -> Dataset:
    """The first ``n_train`` / ``n_test`` examples of each split (None keeps the split whole).

    Asking for more than a split holds is a DataError rather than a silent clamp, so a
    CI-sized run never quietly trains on less than requested.
    """
    def take(split: str, k: int | None) -> dict[str, np.ndarray]:
        images, labels = getattr(ds, f"{split}_images"), getattr(ds, f"{split}_labels")
        if k is None:
            return {}
        k = _check_nonneg_int(f"n_{split}", k)
        if k > len(labels):
            raise DataError(f"subset: n_{split}={k} but {ds.name} has only {len(labels)} {split} examples")
        return {f"{split}_images": images[:k], f"{split}_labels": labels[:k]}

    return replace(ds, **take("train", n_train), **take("test", n_test))
