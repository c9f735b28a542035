"""Canonical weights: a flat dict of framework-neutral names -> NumPy arrays, in the layouts a spec
declares (see `cbam_multi.spec`). Every backend has exactly one import and one export adapter to this
format; checkpoints are this dict in a safetensors file with the spec's JSON in its metadata.

Works for any spec object with ``param_shapes()``, ``param_inits()``, ``to_json()`` and a
``from_json()`` classmethod registered in `SPEC_TYPES` (CBAMSpec, and the MNIST model spec).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cbam_multi.errors import CheckpointError, SpecError, SpecMismatchError, WeightsError
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
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_weights(path, weights: Mapping[str, np.ndarray], spec, extra_metadata: Mapping[str, str] | None = None) -> Path:
    """Validate, then atomically write ``weights`` + the spec JSON as one safetensors file."""
    from safetensors.numpy import save

    validate_weights(weights, spec)
    metadata = {SPEC_KEY: spec.to_json(), SPEC_TYPE_KEY: type(spec).__name__, **(extra_metadata or {})}
    tensors = {n: np.ascontiguousarray(weights[n]) for n in spec.param_shapes()}
    return atomic_write_bytes(path, save(tensors, metadata=metadata))


def read_checkpoint(path) -> tuple[Weights, dict[str, str]]:
    """Read every tensor and the metadata of a safetensors file; CheckpointError if it is not one."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118  (safe_open is not a dict)
    except (SafetensorError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors checkpoint (truncated or corrupt?): {e}") from None
    return tensors, metadata


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
