"""Whole-model canonical weights for every network in this package: one export / import / grads
implementation for any model class with a ``spec`` and a ``layouts()`` method (its family's
canonical <-> torch table, e.g. `cbam_multi.torch.models.mnist.model_layouts`).

(The CBAM layer's own ``cbam_multi.torch.export_weights`` moves one block; these move a whole network.)
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from torch import nn

from cbam_multi.errors import WeightsError
from cbam_multi.weights import validate_weights

from ..weights import Layout, copy_canonical, module_tensors, to_numpy

__all__ = ["export_model_weights", "import_model_weights", "export_model_grads"]


def _layouts(model) -> dict[str, Layout]:
    if not isinstance(model, nn.Module) or not callable(getattr(model, "layouts", None)):
        raise TypeError(f"expected a cbam_multi.torch.models network (MNISTNet, ResNet), got {type(model).__name__}")
    return model.layouts()


def export_model_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """Canonical weights (fresh C-contiguous NumPy copies, spec order) of the whole network."""
    layouts, tensors = _layouts(model), module_tensors(model)
    return {
        name: np.array(lay.to_canonical(to_numpy(tensors[lay.torch_name])), order="C", copy=True)
        for name, lay in layouts.items()
    }


def import_model_weights(model: nn.Module, weights: Mapping[str, np.ndarray]) -> nn.Module:
    """Copy canonical ``weights`` into ``model`` in place and return it (validated and converted first:
    a failed import changes nothing); values are cast to each tensor's dtype and device."""
    layouts = _layouts(model)
    arrays = {n: to_numpy(a) for n, a in weights.items()}
    validate_weights(arrays, model.spec)
    tensors = module_tensors(model)
    copy_canonical(arrays, {name: (lay, tensors[lay.torch_name]) for name, lay in layouts.items()})
    return model


def export_model_grads(model: nn.Module) -> dict[str, np.ndarray]:
    """``.grad`` of every trainable parameter in canonical names/layouts (after ``loss.backward()``)."""
    layouts, tensors = _layouts(model), module_tensors(model)
    out, missing = {}, []
    for name, lay in layouts.items():
        if not lay.trainable:
            continue
        grad = tensors[lay.torch_name].grad
        if grad is None:
            missing.append(name)
            continue
        out[name] = np.array(lay.to_canonical(to_numpy(grad)), order="C", copy=True)
    if missing:
        more = " ..." if len(missing) > 10 else ""
        raise WeightsError(f"no gradient for {missing[:10]}{more}: run a forward pass and loss.backward() first")
    return out
