"""Downloading MNIST: each file from the first mirror that serves valid content, with retries on transient
errors, verified and renamed into place atomically."""

from __future__ import annotations

import http.client
import os
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from cbam_multi.errors import DataError
from cbam_multi.training.data.idx import GZIP_MAGIC, MNIST_FILES, SHA256_RAW, magic_for, read_idx, resolve_files
from cbam_multi.training.progress import bar as progress_bar
from cbam_multi.weights import new_file_mode

__all__ = ["MIRRORS", "download_mnist"]

MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

_RETRY_BACKOFF_S = 0.5  # base of the exponential back-off between retries of one mirror
_CHUNK = 1 << 16


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
    fetch_missing(Path(dest_dir).expanduser(), mirrors, timeout, retries, checksums, progress)
    return Path(dest_dir).expanduser()


def fetch_missing(
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
    created = [d for d in (dest, *dest.parents) if not d.exists()]  # deepest first
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{dest}: cannot create download dir: {exc}") from exc
    used: dict[str, str] = {}
    try:
        for name in MNIST_FILES:
            if _already_valid(dest, name, checksums[name]):
                continue
            used[name] = _fetch_one(dest, name, checksums[name], mirrors, timeout, retries, progress)
    except BaseException:
        _remove_empty(created)  # a failed first download leaves no empty cache folders behind
        raise
    return used


def _remove_empty(folders: Sequence[Path]) -> None:
    """Remove the folders this download created, deepest first, as long as they are empty (files that
    did verify stay, and so do the folders holding them)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _already_valid(dest: Path, name: str, sha256: str) -> bool:
    """True if the copy of ``name`` that loading would pick in ``dest`` exists and verifies."""
    current = resolve_files(dest)[0].get(name)
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
            os.fchmod(out.fileno(), new_file_mode())  # as readable as any file this user writes, not mkstemp's 0600
            _stream(url, out, timeout, progress, desc=f"{name}.gz")
        try:
            read_idx(tmp, expected_sha256=sha256, expected_magic=magic_for(name))
        except DataError as exc:
            # Name the URL, not the temp file, which is about to be deleted.
            raise _Permanent(f"bad content: {str(exc).replace(str(tmp), 'downloaded file')}") from exc
        with tmp.open("rb") as fh:  # keep the .gz suffix only when the content really is gzip
            final = dest / (f"{name}.gz" if fh.read(2) == GZIP_MAGIC else name)
        os.replace(tmp, final)
        # A stale copy under the other name (raw vs .gz) failed verification; drop it so loading
        # (which prefers the raw name) picks the fresh file.
        other = dest / name if final.name.endswith(".gz") else dest / f"{name}.gz"
        other.unlink(missing_ok=True)
    finally:
        tmp.unlink(missing_ok=True)  # no-op after a successful os.replace


def _stream(url: str, out, timeout: float, progress: bool, desc: str) -> None:
    """Copy the body of ``url`` into the open binary file ``out``, with a tqdm bar; classify errors."""
    request = urllib.request.Request(url, headers={"User-Agent": "cbam-multi/mnist-downloader"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with progress_bar(None, progress, total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024) as bar:
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
    except TimeoutError as exc:
        raise _Transient(f"timed out after {timeout}s") from exc
    except (OSError, http.client.HTTPException) as exc:  # connection reset, IncompleteRead, ...
        raise _Transient(f"{type(exc).__name__}: {exc}") from exc
