"""The IDX file format of MNIST: the four canonical files, their checksums, and a validating reader."""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cbam_multi.errors import DataError

__all__ = ["MNIST_FILES", "SHA256_RAW", "GZIP_MAGIC", "read_idx", "magic_for", "resolve_files"]

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

_MAGIC_LABELS = 0x00000801  # dtype 0x08 (uint8), rank 1
_MAGIC_IMAGES = 0x00000803  # dtype 0x08 (uint8), rank 3
_MAGIC_DESC = {_MAGIC_LABELS: "IDX1 uint8 labels", _MAGIC_IMAGES: "IDX3 uint8 images"}
GZIP_MAGIC = b"\x1f\x8b"


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
    if not data.startswith(GZIP_MAGIC):
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


def magic_for(name: str) -> int:
    """The IDX magic a canonical MNIST file name implies."""
    return _MAGIC_LABELS if "idx1" in name else _MAGIC_IMAGES


def resolve_files(folder: Path) -> tuple[dict[str, Path], list[str]]:
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
