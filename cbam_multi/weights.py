"""Canonical weights: a flat dict of framework-neutral names -> NumPy arrays, in the layouts a spec
declares (see `cbam_multi.spec`). Every backend has exactly one import and one export adapter to this
format; checkpoints are this dict in a safetensors file with the spec's JSON in its metadata.

Works for any spec object with ``param_shapes()``, ``param_inits()``, ``to_json()`` and a
``from_json()`` classmethod registered in `SPEC_TYPES` (CBAMSpec, and the MNIST model spec).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import tempfile
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cbam_multi.errors import CheckpointError, CheckpointWarning, SpecError, SpecMismatchError, WeightsError
from cbam_multi.spec import CBAMSpec

Weights = dict[str, np.ndarray]

SPEC_KEY = "cbam_multi.spec"
SPEC_TYPE_KEY = "cbam_multi.spec_type"
SPEC_TYPES: dict[str, type] = {"CBAMSpec": CBAMSpec}

FLOAT_DTYPES = (np.float16, np.float32, np.float64)


def register_spec_type(cls: type) -> type:
    """Let checkpoints hold specs of ``cls`` (used as a class decorator)."""
    SPEC_TYPES[cls.__name__] = cls
    return cls


def init_weights(spec, seed: int = 0, dtype=np.float32, scheme: str | None = None) -> Weights:
    """Fresh canonical weights from one seeded NumPy generator, drawn in ``param_shapes()`` order.

    ``spec.param_inits()`` gives ("uniform", bound), ("normal", std) or ("constant", value) per name;
    ``scheme`` selects another set of initialisers where the spec offers several (``ResNetSpec``:
    "canonical" or "official")."""
    rng = np.random.default_rng(seed)
    shapes = spec.param_shapes()
    weights: Weights = {}
    inits = spec.param_inits() if scheme is None else spec.param_inits(scheme)
    for name, (kind, value) in inits.items():
        shape = shapes[name]
        if kind == "uniform":
            arr = rng.uniform(-value, value, size=shape)
        elif kind == "normal":
            arr = rng.normal(0.0, value, size=shape)
        else:
            arr = np.full(shape, value)
        weights[name] = arr.astype(dtype)
    return weights


def validate_weights(weights: Mapping[str, np.ndarray], spec, part: str | None = None) -> None:
    """Raise WeightsError listing every mismatch between ``weights`` and ``spec`` at once.

    ``part`` checks only one gate's names (CBAMSpec: "channel" or "spatial").
    """
    expected = spec.param_shapes() if part is None else spec.param_shapes(part)
    problems = []
    missing = [n for n in expected if n not in weights]
    extra = [n for n in weights if n not in expected]
    if missing:
        problems.append(f"missing {missing}")
    if extra:
        problems.append(f"unexpected {extra}")
    for name, shape in expected.items():
        if name not in weights:
            continue
        arr = np.asarray(weights[name])
        if tuple(arr.shape) != tuple(shape):
            problems.append(f"{name}: shape {tuple(arr.shape)}, spec says {tuple(shape)}")
        if arr.dtype.type not in FLOAT_DTYPES and str(arr.dtype) != "bfloat16":
            problems.append(f"{name}: dtype {arr.dtype} is not floating point")
    if problems:
        raise WeightsError(f"weights do not match {type(spec).__name__}: " + "; ".join(problems))


def cast_weights(weights: Mapping[str, np.ndarray], dtype) -> Weights:
    return {n: np.asarray(a).astype(dtype) for n, a in weights.items()}


# ---------------------------------------------------------------- files
def _umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else set and restored."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file (0666 less the umask), for files made with mkstemp (0600)."""
    return 0o666 & ~_umask()


class _Terminated(BaseException):
    """Raised by the temporary SIGTERM handler so that the temp file is removed before the process dies."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half of it.

    The file gets the mode an ordinary ``open()`` would give (0666 less the umask), not mkstemp's 0600,
    so a checkpoint is as readable as any other file its owner writes. The temporary file is removed
    whatever stops the write: an exception, Ctrl-C, or SIGTERM (in the main thread, where no other
    handler is installed, SIGTERM is caught for the duration of the write, the temp file removed, and
    the signal re-delivered so the process still ends as killed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    catch_term = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if catch_term:
        signal.signal(signal.SIGTERM, _raise_terminated)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), new_file_mode())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, _Terminated):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)  # die as the sender meant
        raise
    finally:
        if catch_term:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return path


def _raise_terminated(signum, frame):
    raise _Terminated


# ---------------------------------------------------------------- integrity digest
DIGEST_KEY = "cbam_multi.sha256"
_warned_undigested: set[tuple[str, int]] = set()


def checkpoint_digest(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes, in name order) and every metadata entry but
    the digest itself: a flipped bit anywhere in the data, or an edited spec, changes it."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(json.dumps(["tensor", name, a.dtype.str, list(a.shape)]).encode())
        h.update(a.tobytes())
    for key in sorted(k for k in metadata if k != DIGEST_KEY):
        h.update(json.dumps(["meta", key, metadata[key]]).encode())
    return h.hexdigest()


def encode_checkpoint(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """safetensors bytes of ``tensors`` with ``metadata`` plus their digest (`DIGEST_KEY`), which
    `read_checkpoint` verifies. Every cbam_multi safetensors file is written through here."""
    from safetensors.numpy import save

    # Little-endian, contiguous: what safetensors stores and loads, so the digest sees the same bytes.
    tensors = {n: np.ascontiguousarray(a, dtype=np.asarray(a).dtype.newbyteorder("<")) for n, a in tensors.items()}
    metadata = dict(metadata)
    metadata[DIGEST_KEY] = checkpoint_digest(tensors, metadata)
    return save(tensors, metadata=metadata)


def save_weights(path, weights: Mapping[str, np.ndarray], spec, extra_metadata: Mapping[str, str] | None = None) -> Path:
    """Validate, then atomically write ``weights`` + the spec JSON as one safetensors file."""
    validate_weights(weights, spec)
    metadata = {SPEC_KEY: spec.to_json(), SPEC_TYPE_KEY: type(spec).__name__, **(extra_metadata or {})}
    tensors = {n: np.ascontiguousarray(weights[n]) for n in spec.param_shapes()}
    return atomic_write_bytes(path, encode_checkpoint(tensors, metadata))


def read_checkpoint(path) -> tuple[Weights, dict[str, str]]:
    """Read every tensor and the metadata of a safetensors file and verify its digest; CheckpointError
    if it cannot be read (naming a permission problem as such), is not safetensors, or fails the digest.
    A file written before the digest existed loads with one `CheckpointWarning`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    _check_readable(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118  (safe_open is not a dict)
    except (SafetensorError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors checkpoint (truncated or corrupt?): {e}") from None
    if DIGEST_KEY in metadata:
        computed = checkpoint_digest(tensors, metadata)
        if computed != metadata[DIGEST_KEY]:
            raise CheckpointError(
                f"{path}: checkpoint is corrupt: its sha256 digest does not match its contents (stored "
                f"{metadata[DIGEST_KEY][:16]}..., computed {computed[:16]}...); restore the file from a copy or retrain"
            )
    elif metadata:  # a foreign file without metadata fails later, on what it lacks
        key = (str(path.resolve()), path.stat().st_mtime_ns)
        if key not in _warned_undigested:
            _warned_undigested.add(key)
            warnings.warn(
                f"{path}: written before checkpoints carried a sha256 digest, so it loads unverified; "
                f"save it again to add one",
                CheckpointWarning,
                stacklevel=2,
            )
    return tensors, metadata


def _check_readable(path: Path) -> None:
    """CheckpointError saying why ``path`` cannot be opened: missing, a directory, or no permission."""
    try:
        with open(path, "rb"):
            pass
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file") from None
    except PermissionError:
        raise CheckpointError(
            f"{path}: permission denied: this user may not read the file (or search a directory above it); "
            f"ask its owner to grant read access"
        ) from None


def spec_from_metadata(metadata: Mapping[str, str], where: str = "checkpoint"):
    if SPEC_KEY not in metadata:
        raise CheckpointError(f"{where}: no spec in the metadata (key {SPEC_KEY!r}); not a cbam_multi checkpoint")
    type_name = metadata.get(SPEC_TYPE_KEY, "CBAMSpec")
    if type_name not in SPEC_TYPES:
        raise CheckpointError(f"{where}: unknown spec type {type_name!r}; known: {sorted(SPEC_TYPES)}")
    try:
        return SPEC_TYPES[type_name].from_json(metadata[SPEC_KEY])
    except (SpecError, TypeError) as e:
        raise CheckpointError(f"{where}: invalid spec in metadata: {e}") from None


def spec_differences(stored, expected) -> list[str]:
    """``"field: stored vs expected"`` for every difference between two specs that changes the maths:
    `CBAMSpec.maths_diff` for CBAM blocks (module form and init-only fields do not count), every field
    for other spec types (whose fields all shape the model), or the type itself."""
    if type(stored) is not type(expected):
        return [f"spec type: {type(stored).__name__} vs {type(expected).__name__}"]
    if hasattr(stored, "maths_diff"):
        return stored.maths_diff(expected)
    return [
        f"{f.name}: {getattr(stored, f.name)!r} vs {getattr(expected, f.name)!r}"
        for f in dataclasses.fields(stored)
        if getattr(stored, f.name) != getattr(expected, f.name)
    ]


def check_spec_match(stored, expected, where: str, allow_spec_mismatch: bool = False) -> None:
    """Raise SpecMismatchError listing `spec_differences` unless there are none or ``allow_spec_mismatch``."""
    diff = spec_differences(stored, expected)
    if diff and not allow_spec_mismatch:
        raise SpecMismatchError(
            f"{where}: checkpoint written for another spec; differing fields (checkpoint vs expected): "
            f"{'; '.join(diff)}. Build the module from the checkpoint's spec (load_weights(path)[1]) or pass "
            f"allow_spec_mismatch=True to load the tensors anyway"
        )


def load_weights(path, expected_spec=None, *, allow_spec_mismatch: bool = False) -> tuple[Weights, object]:
    """Load (weights, spec) from a checkpoint written by `save_weights`. Fails whole: nothing is
    returned unless every name, shape and dtype matches the stored spec.

    With ``expected_spec`` (the spec of the module the weights are for), a stored spec that differs in
    anything that changes the maths (`spec_differences`: e.g. ``concat_order``, the pools, ``tie_rule``,
    even where the tensor shapes agree) raises SpecMismatchError naming the fields; with
    ``allow_spec_mismatch=True`` the weights load anyway when their names and shapes fit ``expected_spec``.
    Checkpoints written before a spec field existed carry its default (the behaviour of that time)."""
    tensors, metadata = read_checkpoint(path)
    spec = spec_from_metadata(metadata, where=str(path))
    if expected_spec is not None:
        check_spec_match(spec, expected_spec, str(path), allow_spec_mismatch)
    try:
        validate_weights(tensors, spec)
        if expected_spec is not None:
            validate_weights(tensors, expected_spec)
    except WeightsError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return {n: tensors[n] for n in spec.param_shapes()}, spec


def load_module_checkpoint(module, path, import_weights, *, allow_spec_mismatch: bool = False):
    """Load a `save_weights` checkpoint into a backend's CBAM / ChannelAttention / SpatialAttention ``module``
    with that backend's ``import_weights`` and return the module: the one body of both backends'
    ``load_checkpoint``. The module's own part of the weights is named by ``module._PART`` ("channel",
    "spatial", or None for the whole block), the attribute both backends' modules define.

    The checkpoint's spec must match ``module.spec`` in everything that changes the maths (SpecMismatchError
    lists the differing fields; ``allow_spec_mismatch=True`` loads anyway where names and shapes fit), as
    `load_weights` checks it. A failed load changes nothing (``import_weights`` is all-or-nothing)."""
    weights, _ = load_weights(path, module.spec, allow_spec_mismatch=allow_spec_mismatch)
    part = getattr(module, "_PART", None)
    return import_weights(module, {n: weights[n] for n in module.spec.param_shapes(part)})
