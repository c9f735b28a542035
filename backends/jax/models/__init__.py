"""Flax NNX networks (NHWC) on this backend's CBAM layer, a file per family; `common` moves whole-model canonical
weights (``*_model_weights``) for every one of them, the layer's ``export_weights`` one block."""

from cbam_multi.models import MNISTNetSpec, ResNetSpec

from .common import export_model_grads, export_model_weights, import_model_weights
from .mnist import MNISTNet
from .resnet import ResNet

__all__ = ["MNISTNet", "ResNet", "MODELS", "export_model_weights", "import_model_weights", "export_model_grads"]

# spec class -> this backend's network class: trainers build with `cbam_multi.models.build_network(MODELS, spec)`
MODELS = {MNISTNetSpec: MNISTNet, ResNetSpec: ResNet}
