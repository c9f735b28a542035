"""Framework-free model specs and their float64 NumPy oracles, one file per family."""

from cbam_multi.models.mnist import MNISTNetSpec
from cbam_multi.models.resnet import ResNetSpec

__all__ = ["MNISTNetSpec", "ResNetSpec"]
