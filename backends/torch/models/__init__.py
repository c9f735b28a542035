"""Networks built from this backend's CBAM layer (NCHW), one file per model family, and one whole-model
canonical weight import / export for all of them (`common`: ``*_model_weights``; the layer's
``export_weights`` moves one block)."""

from cbam_multi.models import MNISTNetSpec, ResNetSpec

from .common import export_model_grads, export_model_weights, import_model_weights
from .mnist import MNISTNet
from .resnet import ResNet

__all__ = ["MNISTNet", "ResNet", "MODELS", "build_model", "export_model_weights", "import_model_weights", "export_model_grads"]

# spec class -> this backend's network class (the trainer and ``build_predict`` build from this table)
MODELS = {MNISTNetSpec: MNISTNet, ResNetSpec: ResNet}


def build_model(spec, **kwargs):
    """The network of ``spec``'s family (`MODELS`), ``kwargs`` (dtype, seed, ...) passed to its constructor."""
    if type(spec) not in MODELS:
        raise TypeError(f"no {__name__} network for a {type(spec).__name__}: one of {[c.__name__ for c in MODELS]}")
    return MODELS[type(spec)](spec, **kwargs)
