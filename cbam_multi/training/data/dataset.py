"""The `Dataset` container: a validated train/test split of 28x28 uint8 digit images and int64 labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cbam_multi.errors import DataError

__all__ = ["Dataset", "NUM_CLASSES", "IMAGE_HW"]

NUM_CLASSES = 10
IMAGE_HW = (28, 28)


@dataclass(frozen=True, eq=False)  # eq=False: element-wise ndarray comparison has no single truth value
class Dataset:
    """Train/test split of 28x28 digit images, validated on construction.

    Images are uint8 ``(N, 28, 28)``; labels are int64 ``(N,)`` in ``0..9``.
    """

    name: str
    source: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            _check_split(
                f"{self.name} ({self.source}) {split}",
                getattr(self, f"{split}_images"),
                getattr(self, f"{split}_labels"),
            )

    @property
    def n_train(self) -> int:
        """Number of training examples."""
        return int(self.train_labels.shape[0])

    @property
    def n_test(self) -> int:
        """Number of test examples."""
        return int(self.test_labels.shape[0])


def _check_split(what: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Raise DataError unless images/labels have the dtypes, shapes and label range of a Dataset."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.shape[1:] != IMAGE_HW:
        got = f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}"
        raise DataError(f"{what}: images must be uint8 (N, 28, 28), got {got}")
    if not isinstance(labels, np.ndarray) or labels.dtype != np.int64 or labels.ndim != 1:
        got = f"{getattr(labels, 'dtype', type(labels).__name__)} {getattr(labels, 'shape', '')}"
        raise DataError(f"{what}: labels must be int64 (N,), got {got}")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{what}: {images.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(
            f"{what}: labels must be in 0..{NUM_CLASSES - 1}, got range {labels.min()}..{labels.max()}"
        )
