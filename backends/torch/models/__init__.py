"""Networks built from the framework-free model specs (`cbam_multi.models`), torch side (NCHW)."""

from .resnet import ResNet

__all__ = ["ResNet"]
