"""Framework-free model specs and their float64 NumPy oracles, one file per family."""

from cbam_multi.models.mnist import MNISTNetSpec

__all__ = ["MNISTNetSpec"]
