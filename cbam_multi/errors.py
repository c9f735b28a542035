"""Exception types shared by the spec, the NumPy reference and every backend.

All derive from ValueError so callers that only know "bad input" still catch them.
"""

__all__ = [
    "CBAMError",
    "SpecError",
    "InputError",
    "WeightsError",
    "CheckpointError",
    "DataError",
    "expect_instance",
]


class CBAMError(ValueError):
    """Base class of every error this package raises on purpose."""


class SpecError(CBAMError):
    """A CBAMSpec (or model spec) field is invalid, e.g. a zero hidden width or an even kernel."""


class InputError(CBAMError):
    """An input tensor has the wrong rank, channel count, layout or dtype."""


class WeightsError(CBAMError):
    """Canonical weights do not match a spec: missing/extra names, wrong shapes or dtypes."""


class CheckpointError(CBAMError):
    """A checkpoint file is missing, truncated, corrupt, or holds an invalid spec."""


class DataError(CBAMError):
    """A dataset file is missing, truncated, corrupt, has the wrong magic or a bad checksum."""


class SpecMismatchError(WeightsError, CheckpointError):
    """A checkpoint was written for a spec whose maths differs from the one it is loaded into (same tensor
    shapes or not); the message lists the differing fields."""


def expect_instance(value, cls: type, what: str):
    """``value`` itself if it is a ``cls``; else a TypeError naming ``what`` was expected and what came."""
    if not isinstance(value, cls):
        raise TypeError(f"expected {what}, got {type(value).__name__}")
    return value


class CheckpointWarning(UserWarning):
    """A checkpoint loaded, but something about it deserves attention (e.g. it predates the integrity digest)."""
