"""cbam-multi: one CBAM spec, a NumPy oracle, and mirrored PyTorch / JAX-Flax backends.

Framework-free core; pick a backend by import: ``import cbam_multi.torch`` or ``import cbam_multi.jax``.
"""

from cbam_multi.errors import (
    CBAMError,
    CheckpointError,
    DataError,
    InputError,
    SpecError,
    SpecMismatchError,
    WeightsError,
)
from cbam_multi.models import MNISTNetSpec, ResNetSpec  # importing them registers the spec types for checkpoints
from cbam_multi.spec import CBAMSpec
from cbam_multi.weights import init_weights, load_weights, save_weights, validate_weights

__version__ = "0.1.0"

__all__ = [
    "CBAMSpec",
    "MNISTNetSpec",
    "ResNetSpec",
    "CBAMError",
    "CheckpointError",
    "DataError",
    "InputError",
    "SpecError",
    "SpecMismatchError",
    "WeightsError",
    "init_weights",
    "load_weights",
    "save_weights",
    "validate_weights",
]
