"""JSON for the library's plain-data classes and files: one base for the JSON dataclasses (`CBAMSpec`, the
model specs, `TrainConfig`), NumPy-aware encoding and atomic JSON files."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

__all__ = ["JsonData", "json_object", "plain_data_fields", "json_default", "write_json_atomic"]


class JsonData:
    """``to_dict`` / ``to_json`` / ``from_dict`` / ``from_json`` for a frozen dataclass, written once.

    A subclass names its ``format`` tag, format version and the `cbam_multi.errors` class its bad files
    raise as class keywords (``class CBAMSpec(JsonData, json_format=..., json_version=1,
    json_error=SpecError)``; read back as ``JSON_FORMAT``, ``JSON_VERSION``, ``JSON_ERROR``), and may override
    ``_from_fields`` to check or convert fields before construction. Tuples are written as lists; nested
    `JsonData` values as their dicts.
    """

    JSON_FORMAT = ""
    JSON_VERSION = 1
    JSON_ERROR: type[Exception] = ValueError

    def __init_subclass__(cls, *, json_format: str, json_version: int, json_error: type[Exception], **kwargs):
        super().__init_subclass__(**kwargs)
        cls.JSON_FORMAT, cls.JSON_VERSION, cls.JSON_ERROR = json_format, json_version, json_error

    def to_dict(self) -> dict:
        d = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"format": self.JSON_FORMAT, "version": self.JSON_VERSION, **d}

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=indent)

    @classmethod
    def from_dict(cls, d: dict):
        return cls._from_fields(plain_data_fields(cls, d, cls.JSON_FORMAT, cls.JSON_VERSION, cls.JSON_ERROR))

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json_object(text, cls.__name__, cls.JSON_ERROR))

    @classmethod
    def _from_fields(cls, fields: dict):
        return cls(**fields)


def _plain(value):
    if isinstance(value, JsonData):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def json_object(text: str, what: str, error: type[Exception]) -> dict:
    """``text`` parsed as a JSON object; ``error`` names ``what`` when it is not valid JSON or not an object."""
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{what} JSON is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise error(f"{what} JSON must be an object, got {type(d).__name__}")
    return d


def plain_data_fields(cls, d, fmt: str, version: int, error: type[Exception]) -> dict:
    """The dataclass fields of ``cls`` in ``d`` (a ``to_dict()`` result or hand-written JSON). The
    ``format``/``version`` keys may be left out, but must be ``fmt``/``version`` when present; an unknown
    field name (a typo) is an error rather than silently ignored. Shared by CBAMSpec, MNISTNetSpec and
    TrainConfig, so their files fail alike."""
    what = cls.__name__
    if not isinstance(d, dict):
        raise error(f"{what} must be given as a dict (JSON object), got {type(d).__name__}")
    d = dict(d)
    got_fmt, got_version = d.pop("format", fmt), d.pop("version", version)
    if got_fmt != fmt:
        raise error(f"not a {what}: format {got_fmt!r}")
    if got_version != version:
        raise error(f"{what} format version {got_version!r} is not supported (this is {version})")
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise error(f"unknown {what} field(s) {unknown}")
    return d


def json_default(o):
    """``json.dumps(default=...)`` for NumPy scalars and arrays, and paths."""
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json_atomic(path, obj) -> Path:
    """``obj`` as indented JSON in ``path``, written atomically."""
    from cbam_multi.weights import atomic_write_bytes  # weights imports the specs, which import this module

    return atomic_write_bytes(path, (json.dumps(obj, indent=1, default=json_default) + "\n").encode())
