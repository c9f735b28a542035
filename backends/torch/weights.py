"""Canonical weights <-> the torch modules' parameters.

`torch_layouts` is the one table of names and layout transforms between canonical weights
(see `cbam_multi.spec`) and torch tensors; `export_weights`, `import_weights`, `export_grads` and
the checkpoint adapters all use it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from cbam_multi.errors import WeightsError
from cbam_multi.spec import TRAINABLE, CBAMSpec
from cbam_multi.weights import load_module_checkpoint, validate_weights

__all__ = ["load_checkpoint", "Layout", "TRANSFORMS", "torch_layouts", "export_weights", "import_weights", "export_grads"]

Array = np.ndarray


@dataclass(frozen=True)
class Layout:
    """How one canonical parameter lives in torch."""

    canonical: str  # canonical name, e.g. "channel.fc1.kernel"
    torch_name: str  # its state_dict key in our `CBAM`, e.g. "channel.fc1.weight"
    to_torch: Callable[[Array], Array]  # canonical array -> torch-layout array
    to_canonical: Callable[[Array], Array]  # inverse
    trainable: bool  # False for BN running statistics


def _same(a: Array) -> Array:
    return a


# canonical name -> (torch name, kind of transform)
_TABLE = {
    "channel.fc1.kernel": ("channel.fc1.weight", "dense"),
    "channel.fc1.bias": ("channel.fc1.bias", "vector"),
    "channel.fc2.kernel": ("channel.fc2.weight", "dense"),
    "channel.fc2.bias": ("channel.fc2.bias", "vector"),
    "spatial.conv.kernel": ("spatial.conv.weight", "conv"),
    "spatial.conv.bias": ("spatial.conv.bias", "vector"),
    "spatial.bn.scale": ("spatial.bn.weight", "vector"),
    "spatial.bn.bias": ("spatial.bn.bias", "vector"),
    "spatial.bn.mean": ("spatial.bn.running_mean", "vector"),
    "spatial.bn.var": ("spatial.bn.running_var", "vector"),
}

# THE layout-transform table of this backend (the models use it too): kind -> (to torch, to canonical)
TRANSFORMS: dict[str, tuple[Callable[[Array], Array], Callable[[Array], Array]]] = {
    # dense kernel (in, out) <-> nn.Linear weight (out, in)
    "dense:linear": (lambda k: k.T, lambda w: w.T),
    # dense kernel (in, out) <-> nn.Conv2d(in, out, 1) weight (out, in, 1, 1)
    "dense:conv1x1": (lambda k: k.T[:, :, None, None], lambda w: w[:, :, 0, 0].T),
    # HWIO (k, k, 2, 1) <-> OIHW (1, 2, k, k)
    "conv": (lambda k: k.transpose(3, 2, 0, 1), lambda w: w.transpose(2, 3, 1, 0)),
    "vector": (_same, _same),
}


def torch_layouts(spec: CBAMSpec, part: str | None = None, mlp_kind: str | None = None) -> dict[str, Layout]:
    """Canonical name -> `Layout` for every parameter of ``spec`` (or of one ``part``), in spec order.

    ``mlp_kind`` overrides ``spec.mlp_kind`` (the adapters use it: official checkpoints hold
    Linear weights, timm's hold 1x1 convolutions, whatever module form the spec asks for).
    """
    mlp_kind = mlp_kind or spec.mlp_kind
    kinds = spec.param_kinds()
    layouts = {}
    for name in spec.param_shapes(part):
        torch_name, kind = _TABLE[name]
        to_torch, to_canonical = TRANSFORMS[f"dense:{mlp_kind}" if kind == "dense" else kind]
        layouts[name] = Layout(name, torch_name, to_torch, to_canonical, kinds[name] == TRAINABLE)
    return layouts


def torch_shape(layout: Layout, canonical_shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(layout.to_torch(np.empty(canonical_shape, dtype=np.uint8)).shape)


def to_numpy(value) -> Array:
    """A torch tensor (any device, bfloat16 as float32) or array-like -> NumPy array (may share memory)."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()
    arr = np.asarray(value)
    if arr.dtype.name == "bfloat16":  # ml_dtypes bfloat16 (e.g. from JAX): torch cannot take it directly
        arr = arr.astype(np.float32)
    return arr


def _module_scope(module: torch.nn.Module) -> tuple[CBAMSpec, str | None, str]:
    """(spec, part, prefix to strip from torch names) of one of our modules."""
    part = getattr(module, "_PART", "-")
    spec = getattr(module, "spec", None)
    if part == "-" or not isinstance(spec, CBAMSpec):
        raise TypeError(
            f"expected a cbam_multi.torch CBAM, ChannelAttention or SpatialAttention module, got {type(module).__name__}"
        )
    return spec, part, "" if part is None else part + "."


def module_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` by its state_dict name."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def copy_canonical(arrays: Mapping[str, np.ndarray], targets: Mapping[str, tuple[Layout, torch.Tensor]]) -> None:
    """Copy canonical ``arrays`` into torch tensors, all or nothing: every array is first converted to its
    target's layout, dtype and device and its shape checked (``targets``: canonical name -> (Layout, tensor)),
    and only then are they all copied in, so a failure leaves every tensor unchanged."""
    staged = []
    for name, (lay, target) in targets.items():
        src = torch.from_numpy(np.array(lay.to_torch(arrays[name]), order="C", copy=True))
        if tuple(src.shape) != tuple(target.shape):  # cannot happen for a valid spec; guard anyway
            raise WeightsError(f"{name}: converted shape {tuple(src.shape)} != {lay.torch_name} {tuple(target.shape)}")
        staged.append((target, src.to(device=target.device, dtype=target.dtype)))
    with torch.no_grad():
        for target, src in staged:
            target.copy_(src)


def export_weights(module: torch.nn.Module) -> dict[str, Array]:
    """The module's parameters and BN running statistics as canonical weights (fresh NumPy copies).

    Only the module's own part: "channel.*" for ChannelAttention, "spatial.*" for SpatialAttention,
    everything for CBAM. bfloat16 parameters come out as float32 (NumPy has no bfloat16).
    """
    spec, part, prefix = _module_scope(module)
    tensors = module_tensors(module)
    out = {}
    for name, lay in torch_layouts(spec, part).items():
        arr = lay.to_canonical(to_numpy(tensors[lay.torch_name[len(prefix) :]]))
        out[name] = np.array(arr, order="C", copy=True)
    return out


def import_weights(module: torch.nn.Module, weights: Mapping[str, Array]) -> torch.nn.Module:
    """Copy canonical ``weights`` into ``module`` in place and return it.

    Validates first (one WeightsError naming every missing/unexpected name, wrong shape or dtype),
    converts every array to the parameter's layout, dtype and device, and only then copies: a failed
    import leaves the module unchanged. Values are cast to the module's dtype.
    """
    spec, part, prefix = _module_scope(module)
    arrays = {name: to_numpy(value) for name, value in weights.items()}
    validate_weights(arrays, spec, part)
    tensors = module_tensors(module)
    targets = {name: (lay, tensors[lay.torch_name[len(prefix) :]]) for name, lay in torch_layouts(spec, part).items()}
    copy_canonical(arrays, targets)
    return module


def export_grads(module: torch.nn.Module) -> dict[str, Array]:
    """``.grad`` of every trainable parameter, in canonical names and layouts (BN statistics have none).

    Raises WeightsError naming the parameters without a gradient (run ``loss.backward()`` first).
    """
    spec, part, prefix = _module_scope(module)
    tensors = module_tensors(module)
    out, missing = {}, []
    for name, lay in torch_layouts(spec, part).items():
        if not lay.trainable:
            continue
        grad = tensors[lay.torch_name[len(prefix) :]].grad
        if grad is None:
            missing.append(f"{name} ({lay.torch_name})")
            continue
        out[name] = np.array(lay.to_canonical(to_numpy(grad)), order="C", copy=True)
    if missing:
        raise WeightsError(f"no gradient for {missing}: run a forward pass and loss.backward() first")
    return out


def load_checkpoint(module, path, *, allow_spec_mismatch: bool = False):
    """Load a `cbam_multi.save_weights` checkpoint into a CBAM / ChannelAttention / SpatialAttention ``module``
    (spec checked, all-or-nothing) and return it: `cbam_multi.weights.load_module_checkpoint` with this backend's
    `import_weights`."""
    return load_module_checkpoint(module, path, import_weights, allow_spec_mismatch=allow_spec_mismatch)
