"""Networks built from the framework-free model specs (`cbam_multi.models`), JAX side (NHWC)."""

from .resnet import ResNet

__all__ = ["ResNet"]
