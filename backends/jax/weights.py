"""Canonical weights <-> Flax (NNX modules and linen variable dicts): one import and one export each.

Canonical names and layouts are Flax-native (dense kernels (in, out), conv HWIO), so conversion is
only (un)nesting by the "." in the names; no transposes. BatchNorm running statistics travel under
``spatial.bn.mean``/``spatial.bn.var``; the canonical momentum is PyTorch's ``spec.norm_momentum``
(Flax's convention, where it is exposed, is ``spec.flax_momentum`` = 1 - momentum).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from cbam_multi.spec import CBAMSpec
from cbam_multi.weights import load_module_checkpoint, validate_weights

from . import functional as F

Weights = dict[str, np.ndarray]

__all__ = [
    "load_checkpoint",
    "export_weights",
    "import_weights",
    "export_grads",
    "export_variables",
    "import_variables",
    "init_variables",
]

_PART_OF_LAYER = {"fc1": "channel", "fc2": "channel", "conv": "spatial", "bn": "spatial"}


# ------------------------------------------------------------------ NNX
def export_weights(module: nnx.Module) -> Weights:
    """Canonical weights of an NNX ``CBAM`` (all names) or ``Channel/SpatialAttention`` (its part)."""
    from .modules import variables_of

    return {name: np.asarray(var[...]) for name, var in variables_of(module).items()}


def import_weights(module: nnx.Module, weights: Mapping[str, Any]) -> nnx.Module:
    """Set ``module``'s leaves from canonical ``weights`` in place and return it.

    All-or-nothing: ``weights`` is validated first (WeightsError listing every problem) and every
    array is converted before the first leaf is written, so a failed import changes nothing. Values
    are cast to each leaf's current dtype (the module's ``dtype``; >= float32 for running stats).
    """
    from .modules import variables_of

    variables = variables_of(module)  # raises TypeError for a foreign object
    validate_weights(weights, module.spec, part=module._PART)
    new = {}
    for name, var in variables.items():
        new[name] = jnp.asarray(np.asarray(weights[name]), dtype=var[...].dtype)
    for name, var in variables.items():
        var.set_value(new[name])
    return module


def export_grads(grads) -> Weights:
    """Canonical names -> gradients, from the ``nnx.State`` that ``nnx.grad`` returns for a module
    (or a canonical flat dict, e.g. ``jax.grad`` of the functional API, passed through as NumPy).

    For a standalone gate module the state paths lack the part ("fc1.kernel"); it is added back.
    """
    if isinstance(grads, nnx.State):
        flat = _flatten(nnx.to_pure_dict(grads))
    elif isinstance(grads, Mapping):
        flat = _flatten(grads)
    else:
        raise TypeError(f"expected the nnx.State from nnx.grad (or a dict), got {type(grads).__name__}")
    out = {}
    for name, value in flat.items():
        first = name.split(".", 1)[0]
        if first in _PART_OF_LAYER:
            name = f"{_PART_OF_LAYER[first]}.{name}"
        out[name] = np.asarray(value)
    return out


# ------------------------------------------------------------------ linen
def export_variables(variables: Mapping[str, Any]) -> Weights:
    """Canonical weights from linen variables ``{"params": ..., "batch_stats": ...}`` of a CBAM
    (for a standalone gate's variables the part prefix is added back, as in `export_grads`)."""
    out = {}
    for collection in ("params", "batch_stats"):
        if collection in variables:
            out.update(export_grads(dict(variables[collection])))
    return out


def import_variables(weights: Mapping[str, Any], spec: CBAMSpec, dtype=None) -> dict:
    """Linen variables for a full ``CBAM`` from canonical ``weights`` (validated first, WeightsError
    listing every problem). ``dtype`` None keeps each array's dtype; else params are cast to it
    and running statistics to at least float32."""
    validate_weights(weights, spec)
    flat = {}
    for name in spec.param_shapes():
        arr = np.asarray(weights[name])
        if dtype is None:
            flat[name] = jnp.asarray(arr)
        else:
            flat[name] = jnp.asarray(arr, dtype=F.stat_dtype(dtype) if name in F.BN_STATS else dtype)
    return _nest_variables(flat)


def init_variables(spec: CBAMSpec, seed: int = 0, dtype=jnp.float32) -> dict:
    """The variables ``linen.CBAM(spec, seed, param_dtype=dtype).init(key, x)`` returns, without tracing."""
    return _nest_variables(F.init_params(spec, seed, dtype))


# ------------------------------------------------------------------ helpers
def _nest_variables(flat: Mapping[str, Any]) -> dict:
    variables: dict[str, dict] = {"params": {}}
    for name, value in flat.items():
        collection = "batch_stats" if name in F.BN_STATS else "params"
        node = variables.setdefault(collection, {})
        *path, leaf = name.split(".")
        for key in path:
            node = node.setdefault(key, {})
        node[leaf] = value
    return variables


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def load_checkpoint(module, path, *, allow_spec_mismatch: bool = False):
    """Load a `cbam_multi.save_weights` checkpoint into a CBAM / ChannelAttention / SpatialAttention ``module``
    (spec checked, all-or-nothing) and return it: `cbam_multi.weights.load_module_checkpoint` with this backend's
    `import_weights`."""
    return load_module_checkpoint(module, path, import_weights, allow_spec_mismatch=allow_spec_mismatch)
