"""Whole-model canonical weights for every network in this package: one export / import / grads
implementation for any NNX model with a ``spec``. Every network keeps each variable at the attribute
path of its canonical name (``"layer1.0.conv1.kernel"`` is ``model.layer1["0"].conv1.kernel``), in the
canonical layout, so moving weights is a lookup and a dtype cast.

(The CBAM layer's own ``cbam_multi.jax.export_weights`` moves one block; these move a whole network.)
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from cbam_multi.errors import WeightsError
from cbam_multi.weights import validate_weights

__all__ = ["model_variables", "export_model_weights", "import_model_weights", "export_model_grads"]


def model_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    """Canonical name -> the model's live Variable, in spec order."""
    if not isinstance(model, nnx.Module) or not hasattr(model, "spec"):
        raise TypeError(f"expected a cbam_multi.jax.models network (MNISTNet, ResNet), got {type(model).__name__}")
    out = {}
    for name in model.spec.param_shapes():
        node = model
        for part in name.split("."):
            node = getattr(node, part, None)
        if not isinstance(node, nnx.Variable):
            raise WeightsError(f"{type(model).__name__} has no variable at {name!r}: the model does not match its spec")
        out[name] = node
    return out


def export_model_weights(model: nnx.Module) -> dict[str, np.ndarray]:
    """Canonical weights of the whole network (NumPy copies, spec order)."""
    return {name: np.array(var[...]) for name, var in model_variables(model).items()}


def import_model_weights(model: nnx.Module, weights: Mapping[str, np.ndarray]) -> nnx.Module:
    """Set the model's variables from canonical ``weights`` in place and return it (validated and converted
    first: a failed import changes nothing); values are cast to each variable's dtype."""
    variables = model_variables(model)
    arrays = {n: np.asarray(a) for n, a in weights.items()}
    validate_weights(arrays, model.spec)
    new = {name: jnp.asarray(arrays[name], dtype=var[...].dtype) for name, var in variables.items()}
    for name, var in variables.items():
        var.set_value(new[name])
    return model


def export_model_grads(grads) -> dict[str, np.ndarray]:
    """Canonical names -> gradients (NumPy), from the ``nnx.State`` that ``nnx.grad`` returns for a network,
    or from a canonical dict of gradients (the pure-function steps)."""
    if isinstance(grads, nnx.State):
        flat = nnx.to_flat_state(grads)
        return {".".join(map(str, p)): np.asarray(v[...] if isinstance(v, nnx.Variable) else v) for p, v in flat}
    if isinstance(grads, Mapping):
        return {n: np.asarray(v) for n, v in grads.items()}
    raise TypeError(f"expected the nnx.State from nnx.grad or a canonical dict of gradients, got {type(grads).__name__}")
