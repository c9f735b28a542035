"""Canonical weights <-> state_dicts of the two public PyTorch CBAMs.

* official: Jongchan/attention-module, ``MODELS/cbam.py`` (``CBAM`` with ``ChannelGate``/``SpatialGate``)::

      ChannelGate.mlp.1.weight/.bias    nn.Linear(C, C//r) (index 0 of the Sequential is a Flatten)
      ChannelGate.mlp.3.weight/.bias    nn.Linear(C//r, C)
      SpatialGate.spatial.conv.weight   (1, 2, k, k), no bias; input channels [max, mean] (ChannelPool)
      SpatialGate.spatial.bn.weight/bias/running_mean/running_var/num_batches_tracked

  Its ResNet checkpoints come from DataParallel: ``module.layer1.0.cbam.ChannelGate.mlp.1.weight``, ...

* timm: ``timm/layers/cbam.py`` ``CbamModule``::

      channel.fc1.weight (hid, C, 1, 1), channel.fc2.weight (C, hid, 1, 1), (+ .bias if mlp_bias)
      spatial.conv.conv.weight (1, 2, k, k); input channels [mean, max]
      spatial.conv.bn.weight/bias/running_mean/running_var/num_batches_tracked

* timm ``LightCbamModule``: the same keys; ``spatial.conv.conv.weight`` is (1, 1, k, k), the one map
  0.5 * (mean + max). Use a light spec (``CBAMSpec.timm_light(C)``) with the timm functions.
* official ``CBAM(..., no_spatial=True)``: the ``ChannelGate.*`` keys only; use ``CBAMSpec.official(C,
  no_spatial=True)``.

``from_*`` strips a leading ``module.`` from every key, then keeps the keys under ``prefix`` (e.g.
``"layer1.0.cbam."``) and converts them; ``num_batches_tracked`` is ignored. The spatial kernel's input
channels are reordered to ``spec.concat_order`` if the source uses the other order, so the result is
right for any spec. State dicts hold only tensors: the spec must describe the rest of the source model
(pools, gate, BN momentum/eps), e.g. ``CBAMSpec.official(C)`` / ``CBAMSpec.timm(C)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from cbam_multi.checkpoint_keys import OFFICIAL_CBAM_KEYS, OFFICIAL_CBAM_LAYOUT, TIMM_CBAM_KEYS, TIMM_CBAM_LAYOUT
from cbam_multi.errors import WeightsError
from cbam_multi.spec import CBAMSpec
from cbam_multi.weights import validate_weights

from .weights import to_numpy, torch_layouts, torch_shape

__all__ = ["from_official_state_dict", "to_official_state_dict", "from_timm_state_dict", "to_timm_state_dict"]


class _Format:
    def __init__(
        self, title: str, names: dict[str, str], mlp_kind: str, concat_order: tuple[str, str], bn: str,
        light: bool = True,
    ):
        self.title = title
        self.names = names  # canonical -> source key
        self.mlp_kind = mlp_kind  # layout of the source's MLP weights
        self.concat_order = concat_order  # meaning of the source spatial kernel's input channels
        self.bn = bn  # source BatchNorm path, for num_batches_tracked
        self.light = light  # whether the source has a light variant (timm's LightCbamModule)

    def check_spec(self, spec) -> None:
        if not isinstance(spec, CBAMSpec):
            raise TypeError(f"spec must be a CBAMSpec, got {type(spec).__name__}")
        if spec.variant == "light" and not self.light:
            raise WeightsError(f"the {self.title} has no light variant; use a standard spec (variant='standard')")

    def keys(self, spec: CBAMSpec) -> dict[str, str]:
        return {self.names[name]: name for name in spec.param_shapes()}


_OFFICIAL = _Format("official (Jongchan/attention-module) CBAM", OFFICIAL_CBAM_KEYS, **OFFICIAL_CBAM_LAYOUT, light=False)
_TIMM = _Format("timm CbamModule", TIMM_CBAM_KEYS, **TIMM_CBAM_LAYOUT)


def _reorder(kernel: np.ndarray, src: tuple[str, str], dst: tuple[str, str]) -> np.ndarray:
    """Swap the HWIO kernel's two input channels if the concat orders differ."""
    return kernel if tuple(src) == tuple(dst) else kernel[:, :, ::-1, :]


def _candidate_prefixes(keys, anchor: str) -> list[str]:
    return sorted({k[: -len(anchor)] for k in keys if k.endswith(anchor)})


def _from_state_dict(state_dict: Mapping, spec: CBAMSpec, prefix: str, fmt: _Format) -> dict[str, np.ndarray]:
    fmt.check_spec(spec)
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]  # a whole training checkpoint ({"epoch", "state_dict", ...})
    stripped = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    scoped = {k[len(prefix) :]: v for k, v in stripped.items() if k.startswith(prefix)}
    expected = fmt.keys(spec)  # source key -> canonical name
    ignored = {f"{fmt.bn}.num_batches_tracked"} if spec.has_norm else set()
    layouts = torch_layouts(spec, mlp_kind=fmt.mlp_kind)
    shapes = spec.param_shapes()

    problems = []
    missing = [k for k in expected if k not in scoped]
    unexpected = [k for k in scoped if k not in expected and k not in ignored]
    if missing:
        problems.append(f"missing {missing}")
    if unexpected:
        shown = unexpected[:20] + ([f"... {len(unexpected) - 20} more"] if len(unexpected) > 20 else [])
        problems.append(f"unexpected {shown}")
    arrays = {}
    for key, name in expected.items():
        if key not in scoped:
            continue
        arr = to_numpy(scoped[key])
        want = torch_shape(layouts[name], shapes[name])
        if tuple(arr.shape) != want:
            hint = ""
            if name == "spatial.conv.kernel" and arr.ndim == 4 and arr.shape[1] in (1, 2):
                hint = (
                    " - a light (LightCbamModule) state_dict: use a spec with variant='light'" if arr.shape[1] == 1
                    else " - a standard (two-map) state_dict: use a spec with variant='standard'"
                )
            problems.append(
                f"{key}: shape {tuple(arr.shape)}, spec expects {want} (canonical {name} {shapes[name]}){hint}"
            )
        else:
            arrays[name] = arr
    if problems:
        anchor = fmt.names["channel.fc1.kernel"]
        found = _candidate_prefixes(stripped, anchor)
        hint = ""
        if found and prefix not in found:
            hint = f". Keys ending in {anchor!r} exist under prefix(es) {found[:8]}" + (" ..." if len(found) > 8 else "")
        where = f" under prefix {prefix!r}" if prefix else ""
        raise WeightsError(
            f"{fmt.title} state_dict{where} does not match {spec}: " + "; ".join(problems) + hint
        )

    weights = {}
    for name in shapes:
        canonical = layouts[name].to_canonical(arrays[name])
        if name == "spatial.conv.kernel":
            canonical = _reorder(canonical, fmt.concat_order, spec.concat_order)
        weights[name] = np.array(canonical, order="C", copy=True)
    validate_weights(weights, spec)  # dtypes (e.g. an integer tensor)
    return weights


def _to_state_dict(weights: Mapping, spec: CBAMSpec, fmt: _Format) -> dict[str, torch.Tensor]:
    fmt.check_spec(spec)
    arrays = {name: to_numpy(value) for name, value in weights.items()}
    validate_weights(arrays, spec)
    layouts = torch_layouts(spec, mlp_kind=fmt.mlp_kind)
    out: dict[str, torch.Tensor] = {}
    for name, lay in layouts.items():
        arr = arrays[name]
        if name == "spatial.conv.kernel":
            arr = _reorder(arr, spec.concat_order, fmt.concat_order)
        out[fmt.names[name]] = torch.from_numpy(np.array(lay.to_torch(arr), order="C", copy=True))
        if name == "spatial.bn.var":
            out[f"{fmt.bn}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return out


def from_official_state_dict(state_dict: Mapping, spec: CBAMSpec, prefix: str = "") -> dict[str, np.ndarray]:
    """Canonical weights from an official (Jongchan/attention-module) CBAM state_dict or ResNet checkpoint.

    A leading ``module.`` (DataParallel) is stripped first, then ``prefix`` (e.g. ``"layer1.0.cbam."``).
    A training checkpoint dict with a ``"state_dict"`` entry is unwrapped. Raises WeightsError listing
    missing/unexpected keys under the prefix and shapes that do not match ``spec``.
    """
    return _from_state_dict(state_dict, spec, prefix, _OFFICIAL)


def to_official_state_dict(weights: Mapping, spec: CBAMSpec) -> dict[str, torch.Tensor]:
    """A state_dict for the official ``CBAM(C)`` module (``num_batches_tracked`` set to 0).

    Keys mirror ``spec`` (biases only where the spec has them), so it loads strictly into the
    official module exactly when the spec describes it (``CBAMSpec.official(C)``).
    """
    return _to_state_dict(weights, spec, _OFFICIAL)


def from_timm_state_dict(state_dict: Mapping, spec: CBAMSpec, prefix: str = "") -> dict[str, np.ndarray]:
    """Canonical weights from a timm ``CbamModule`` state_dict (or a model's, with ``prefix``); a
    ``LightCbamModule``'s with a light spec (``CBAMSpec.timm_light(C)``)."""
    return _from_state_dict(state_dict, spec, prefix, _TIMM)


def to_timm_state_dict(weights: Mapping, spec: CBAMSpec) -> dict[str, torch.Tensor]:
    """A state_dict for timm's ``CbamModule`` (``num_batches_tracked`` set to 0), or for its
    ``LightCbamModule`` when ``spec`` is light; keys mirror ``spec``."""
    return _to_state_dict(weights, spec, _TIMM)
