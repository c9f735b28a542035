"""Networks built from this backend's CBAM layer, one file per model family."""

from .mnist import MNISTNet

__all__ = ["MNISTNet"]
