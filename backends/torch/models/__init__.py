"""Networks built from this backend's CBAM layer (NCHW), one file per model family, with their whole-model
canonical weight import / export (``*_model_weights``; the layer's ``export_weights`` moves one block)."""

from .mnist import MNISTNet, export_model_grads, export_model_weights, import_model_weights
from .resnet import ResNet

__all__ = ["MNISTNet", "ResNet", "export_model_weights", "import_model_weights", "export_model_grads"]
