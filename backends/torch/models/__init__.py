"""Networks built from this backend's CBAM layer (NCHW), one file per model family, and one whole-model
canonical weight import / export for all of them (`common`: ``*_model_weights``; the layer's
``export_weights`` moves one block)."""

from cbam_multi.models import MNISTNetSpec, ResNetSpec

from .common import export_model_grads, export_model_weights, import_model_weights
from .mnist import MNISTNet
from .resnet import ResNet

__all__ = ["MNISTNet", "ResNet", "MODELS", "export_model_weights", "import_model_weights", "export_model_grads"]

# spec class -> this backend's network class: trainers build with `cbam_multi.models.build_network(MODELS, spec)`
MODELS = {MNISTNetSpec: MNISTNet, ResNetSpec: ResNet}
