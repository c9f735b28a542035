"""ResNet(-CBAM) checkpoints <-> canonical weights: the official code, timm, torchvision. Framework-free.

One import (`from_state_dict`) and one export (`to_state_dict`) per format, driven by one explicit key
table per format (`state_dict_keys`: `cbam_multi.checkpoint_keys` for the backbone and the CBAM blocks):

* ``official``: Jongchan/attention-module's ``ResidualNet``; CBAM at ``layer{s}.{b}.cbam.ChannelGate...``.
  Its training checkpoints are ``torch.save({'epoch', 'arch', 'state_dict', 'best_prec1', 'optimizer'})`` of
  a DataParallel model (keys ``module.``-prefixed): `from_state_dict` unwraps and strips both;
  `official_checkpoint` writes that format back.
* ``timm``: timm ResNets with ``block_args=dict(attn_layer='cbam')``; CBAM at ``layer{s}.{b}.se.channel.fc1...``
  (``attn_layer='lcbam'``, timm's LightCbamModule, has the same keys and reads as preset ``timm_light``).
* ``torchvision``: plain ResNets (no CBAM keys); `add_cbam` loads such a backbone into a ResNet-CBAM,
  initialises the CBAM blocks and reports which tensors it initialised.

State dicts are dicts of arrays (NumPy, or torch tensors: converted with ``.numpy()``); the architecture is
read from the keys and shapes (`infer_spec`) unless a spec is given. Only ``.pth`` files need torch
(`read_pth`: ``torch.load(weights_only=True)``, no arbitrary unpickling); safetensors files need none.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cbam_multi.checkpoint_keys import (
    OFFICIAL_CBAM_KEYS,
    OFFICIAL_CBAM_LAYOUT,
    TIMM_CBAM_KEYS,
    TIMM_CBAM_LAYOUT,
    resnet_backbone_keys,
    to_canonical_layout,
    to_torch_layout,
)
from cbam_multi.errors import CheckpointError, WeightsError
from cbam_multi.models.resnet import DEPTHS, ResNetSpec
from cbam_multi.spec import CBAMSpec
from cbam_multi.weights import (
    atomic_write_bytes,
    init_weights,
    load_weights,
    read_checkpoint,
    save_weights,
    validate_weights,
)

__all__ = [
    "FORMATS",
    "state_dict_keys",
    "infer_spec",
    "from_state_dict",
    "to_state_dict",
    "official_checkpoint",
    "add_cbam",
    "list_cbam_blocks",
    "read_state_dict",
    "read_pth",
    "write_pth",
    "convert",
]

FORMATS = ("official", "timm", "torchvision")
# format -> (attribute holding CBAM in a residual block, CBAM key table, CBAM layout facts)
_CBAM = {"official": ("cbam", OFFICIAL_CBAM_KEYS, OFFICIAL_CBAM_LAYOUT), "timm": ("se", TIMM_CBAM_KEYS, TIMM_CBAM_LAYOUT)}
_PRESET_OF = {"official": "official", "timm": "timm"}


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise WeightsError(f"unknown checkpoint format {fmt!r}; choose one of {FORMATS}")


def _cbam_kind(name: str, mlp_kind: str) -> str:
    if name == "spatial.conv.kernel":
        return "conv"
    return mlp_kind if name.endswith("fc1.kernel") or name.endswith("fc2.kernel") else "vector"


def state_dict_keys(spec: ResNetSpec, fmt: str) -> dict[str, tuple[str, str]]:
    """Canonical name -> (``fmt`` state_dict key, layout kind), in spec order: THE table of a format."""
    _check_format(fmt)
    table = resnet_backbone_keys(spec)
    if spec.has_cbam:
        if fmt == "torchvision":
            raise WeightsError(
                "torchvision ResNets have no CBAM blocks: export a spec with attention='none', or use the "
                "'official' / 'timm' format (to load a torchvision backbone into a ResNet-CBAM use add_cbam)"
            )
        attr, names, layout = _CBAM[fmt]
        for prefix, cspec in spec.cbam_blocks().items():
            block = prefix[: -len(".cbam")]
            for n in cspec.param_shapes():
                table[f"{prefix}.{n}"] = (f"{block}.{attr}.{names[n]}", _cbam_kind(n, layout["mlp_kind"]))
    return {n: table[n] for n in spec.param_shapes()}


def _concat_order(fmt: str) -> tuple[str, str] | None:
    return tuple(_CBAM[fmt][2]["concat_order"]) if fmt in _CBAM else None


def _reorder(kernel: np.ndarray, src, dst) -> np.ndarray:
    """Swap an HWIO spatial kernel's two input channels when the concat orders differ."""
    return kernel if tuple(src) == tuple(dst) else kernel[:, :, ::-1, :]


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    return np.asarray(value)


def _plain(state_dict: Mapping) -> dict[str, Any]:
    """Unwrap a training checkpoint (``{'state_dict': ...}``) and strip DataParallel's ``module.``."""
    if not isinstance(state_dict, Mapping):
        raise WeightsError(f"expected a state_dict (a mapping of names to tensors), got {type(state_dict).__name__}")
    if isinstance(state_dict.get("state_dict"), Mapping):
        state_dict = state_dict["state_dict"]
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state_dict.items()}


def _shape(sd: Mapping, key: str) -> tuple[int, ...]:
    return tuple(np.shape(sd[key])) if not hasattr(sd[key], "shape") else tuple(sd[key].shape)


def infer_spec(state_dict: Mapping, fmt: str) -> ResNetSpec:
    """The `ResNetSpec` a ``fmt`` state_dict describes: depth (block kind and blocks per stage), stem (the
    first conv's kernel size), input channels, width, classes, CBAM presence, preset (official / timm) and
    reduction (the first CBAM block's hidden width)."""
    _check_format(fmt)
    sd = _plain(state_dict)
    for key in ("conv1.weight", "fc.weight"):
        if key not in sd:
            raise WeightsError(f"not a ResNet state_dict: no {key!r} (keys start with {sorted(sd)[:5]})")
    width, in_ch, k, _ = _shape(sd, "conv1.weight")
    classes, _features = _shape(sd, "fc.weight")
    kind = "bottleneck" if "layer1.0.conv3.weight" in sd else "basic"
    counts = tuple(len({k.split(".")[1] for k in sd if k.startswith(f"layer{s}.") and k.endswith(".conv1.weight")}) for s in range(1, 5))
    depth = next((d for d, (kd, n) in DEPTHS.items() if kd == kind and n == counts), None)
    if depth is None:
        raise WeightsError(f"{kind} blocks per stage {counts} match no ResNet depth {sorted(DEPTHS)}")
    if k not in (3, 7):
        raise WeightsError(f"conv1 kernel {k}x{k}: expected 7 (ImageNet stem) or 3 (CIFAR stem)")
    fields = dict(depth=depth, stem="imagenet" if k == 7 else "cifar", in_channels=in_ch, num_classes=classes, width=width)
    cbam_key = None
    if fmt in _CBAM:
        attr, names, _ = _CBAM[fmt]
        cbam_key = f"layer1.0.{attr}.{names['channel.fc1.kernel']}"
    if cbam_key is None or cbam_key not in sd:
        return ResNetSpec(**fields, attention="none")
    hidden, channels = _shape(sd, cbam_key)[:2]
    preset = _PRESET_OF[fmt]
    if fmt == "timm" and _light_block(sd, cbam_key[: -len(names["channel.fc1.kernel"])]):
        preset = "timm_light"  # attn_layer='lcbam': LightCbamModule, a (1, 1, k, k) spatial kernel
    spec = ResNetSpec(**fields, attention="cbam", cbam_preset=preset)
    if spec.cbam_spec(channels).hidden != hidden:
        spec = dataclasses.replace(spec, cbam_reduction=max(1, round(channels / hidden)))
    return spec


def _light_block(sd: Mapping, prefix: str) -> bool:
    """Whether the timm CBAM block at ``prefix`` is a ``LightCbamModule`` (its spatial conv sees one map)."""
    key = prefix + TIMM_CBAM_KEYS["spatial.conv.kernel"]
    return key in sd and len(_shape(sd, key)) == 4 and _shape(sd, key)[1] == 1


def from_state_dict(state_dict: Mapping, fmt: str, spec: ResNetSpec | None = None) -> tuple[dict[str, np.ndarray], ResNetSpec]:
    """(canonical weights, spec) of a ``fmt`` state_dict or training checkpoint. Every missing or unexpected
    key and every wrong shape is listed in one WeightsError; ``num_batches_tracked`` buffers are ignored."""
    sd = _plain(state_dict)
    spec = infer_spec(sd, fmt) if spec is None else spec
    table = state_dict_keys(spec, fmt)
    shapes = spec.param_shapes()
    wanted = {key for key, _ in table.values()}
    missing = sorted(key for key in wanted if key not in sd)
    unexpected = sorted(k for k in sd if k not in wanted and not k.endswith("num_batches_tracked"))
    problems = []
    if missing:
        problems.append(f"missing {missing[:20]}{' ...' if len(missing) > 20 else ''}")
    if unexpected:
        problems.append(f"unexpected {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
    weights = {}
    order = _concat_order(fmt)
    for name, (key, kind) in table.items():
        if key not in sd:
            continue
        arr = _to_numpy(sd[key])
        want = to_torch_layout(np.empty(shapes[name], np.uint8), kind).shape
        if arr.shape != want:
            problems.append(f"{key}: shape {arr.shape}, expected {want}")
            continue
        arr = to_canonical_layout(arr, kind)
        if name.endswith("spatial.conv.kernel") and order is not None:
            arr = _reorder(arr, order, spec.cbam_spec(spec_channels(spec, name)).concat_order)
        weights[name] = np.array(arr, order="C", copy=True)
    if problems:
        raise WeightsError(f"{fmt} state_dict does not match {spec}: " + "; ".join(problems))
    validate_weights(weights, spec)
    return weights, spec


def to_state_dict(weights: Mapping[str, np.ndarray], spec: ResNetSpec, fmt: str) -> dict[str, np.ndarray]:
    """A ``fmt`` state_dict (NumPy arrays in torch layouts, ``num_batches_tracked`` 0 for every BN), loadable
    with ``load_state_dict(strict=True)`` into the format's module built for ``spec``."""
    arrays = {n: _to_numpy(a) for n, a in weights.items()}
    validate_weights(arrays, spec)
    order = _concat_order(fmt)
    out: dict[str, np.ndarray] = {}
    for name, (key, kind) in state_dict_keys(spec, fmt).items():
        arr = arrays[name]
        if name.endswith("spatial.conv.kernel") and order is not None:
            arr = _reorder(arr, spec.cbam_spec(spec_channels(spec, name)).concat_order, order)
        out[key] = np.array(to_torch_layout(arr, kind), order="C", copy=True)
        if key.endswith(".running_var"):
            out[key[: -len("running_var")] + "num_batches_tracked"] = np.array(0, np.int64)
    return out


def spec_channels(spec: ResNetSpec, name: str) -> int:
    """Channels of the CBAM block a canonical ``...cbam.*`` name belongs to."""
    prefix = name.split(".cbam.")[0]
    return next(b.out_channels for b in spec.blocks() if b.name == prefix)


def official_checkpoint(weights: Mapping[str, np.ndarray], spec: ResNetSpec, *, epoch: int = 0, best_prec1: float = 0.0) -> dict:
    """The official training-checkpoint dict: ``{'epoch', 'arch': 'resnet', 'state_dict' ('module.' keys),
    'best_prec1', 'optimizer'}`` (an SGD state with the official hyper-parameters and no momentum buffers,
    one param index per trainable tensor, so ``optimizer.load_state_dict`` accepts it too)."""
    sd = {f"module.{k}": v for k, v in to_state_dict(weights, spec, "official").items()}
    n_params = sum(1 for kind in spec.param_kinds().values() if kind == "param")
    group = {"lr": 0.1, "momentum": 0.9, "dampening": 0, "weight_decay": 1e-4, "nesterov": False, "params": list(range(n_params))}
    optimizer = {"state": {}, "param_groups": [group]}
    return {"epoch": epoch, "arch": "resnet", "state_dict": sd, "best_prec1": best_prec1, "optimizer": optimizer}


def add_cbam(state_dict: Mapping, *, preset: str = "official", reduction: int | None = None, seed: int = 0,
             init: str = "official") -> tuple[dict[str, np.ndarray], ResNetSpec, list[str]]:
    """Load a plain ResNet (torchvision / official key layout, no CBAM keys) into a ResNet-CBAM.

    Returns (canonical weights, the CBAM spec, the canonical names it initialised): every backbone tensor
    comes from ``state_dict``; the CBAM blocks get ``init_weights(spec, seed, scheme=init)`` - with the
    official init the spatial BN scale is 0, so each block starts as a channel gate times a constant 0.5.
    """
    backbone, plain_spec = from_state_dict(state_dict, "torchvision")
    spec = dataclasses.replace(plain_spec, attention="cbam", cbam_preset=preset, cbam_reduction=reduction)
    dtype = backbone["stem.conv.kernel"].dtype
    fresh = init_weights(spec, seed, np.float64, scheme=init)
    initialised = [n for n in spec.param_shapes() if n not in backbone]
    weights = {n: backbone[n] if n in backbone else fresh[n].astype(dtype) for n in spec.param_shapes()}
    return weights, spec, initialised


def _block_preset(shapes: Mapping[str, tuple], channels: int, fmt: str) -> str:
    """The preset whose parameter names and shapes this block's tensors have (structure only), or "custom"."""
    for preset in ("official", "timm", "timm_light", "paper", "seed"):
        cspec = CBAMSpec.preset(preset, channels)
        if fmt == "canonical":
            expected = dict(cspec.param_shapes())
        else:
            _, names, layout = _CBAM[fmt]
            expected = {
                names[n]: to_torch_layout(np.empty(s, np.uint8), _cbam_kind(n, layout["mlp_kind"])).shape
                for n, s in cspec.param_shapes().items()
            }
        if expected == dict(shapes):
            return preset
    return "custom"


def list_cbam_blocks(source) -> list[dict]:
    """Every CBAM block in a checkpoint (path or state_dict; official, timm or canonical names):
    ``[{"prefix", "format", "channels", "hidden", "preset"}]``, preset detected from the tensor names/shapes."""
    sd = read_state_dict(source)[0] if isinstance(source, (str, Path)) else _plain(source)
    anchors = {"official": OFFICIAL_CBAM_KEYS["channel.fc1.kernel"], "timm": TIMM_CBAM_KEYS["channel.fc1.kernel"],
               "canonical": "channel.fc1.kernel"}
    blocks = []
    for key in sorted(sd, key=_natural):
        for fmt, anchor in anchors.items():
            if not key.endswith(anchor) or (fmt == "timm" and key[: -len(anchor)] + "spatial.conv.conv.weight" not in sd):
                continue
            prefix = key[: -len(anchor)]
            shapes = {k[len(prefix) :]: tuple(np.shape(_to_numpy(v))) for k, v in sd.items()
                      if k.startswith(prefix) and not k.endswith("num_batches_tracked")}
            s = shapes[anchor]
            channels, hidden = (s[0], s[1]) if fmt == "canonical" else (s[1], s[0])
            blocks.append({"prefix": prefix.rstrip("."), "format": fmt, "channels": int(channels), "hidden": int(hidden),
                           "preset": _block_preset(shapes, int(channels), fmt)})
    return blocks


def _natural(key: str):
    return [int(p) if p.isdigit() else p for p in key.split(".")]


# ---------------------------------------------------------------- files
def read_pth(path) -> Any:
    """``torch.load(path, map_location='cpu', weights_only=True)``: tensors, dicts, lists and numbers only."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading .pth files needs torch (pip install torch); safetensors files do not") from None
    import pickle

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refusing to unpickle arbitrary Python objects (torch.load weights_only=True: {first}); "
            "re-save it as a plain dict of tensors, e.g. torch.save(model.state_dict(), path)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): {str(e).splitlines()[0]}") from None


def read_state_dict(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(state_dict as NumPy arrays with 'module.' stripped, safetensors metadata or {}) of a ``.safetensors``
    file (no torch needed) or a torch file (``.pth``, ``.pt``, ``.tar``, ``.bin``: needs torch)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        tensors, metadata = read_checkpoint(path)
        return _plain(tensors), metadata
    obj = read_pth(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state_dict or training checkpoint dict")
    return {k: _to_numpy(v) for k, v in _plain(obj).items()}, {}


def _to_torch(obj):
    import torch

    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj, copy=True))
    if isinstance(obj, Mapping):
        return {k: _to_torch(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_torch(v) for v in obj]
    return obj


def write_pth(path, obj) -> Path:
    """``torch.save`` of ``obj`` (NumPy arrays become tensors), written atomically."""
    import torch

    buf = io.BytesIO()
    torch.save(_to_torch(obj), buf)
    return atomic_write_bytes(path, buf.getvalue())


def convert(src_path, dst_path, src: str, dst: str, *, add_cbam_preset: str | None = None, seed: int = 0,
            init: str = "official") -> dict:
    """Convert a checkpoint file between ``canonical`` (our safetensors + spec) and the anchors' formats.

    ``src`` torchvision with ``add_cbam_preset``: the plain backbone goes into a ResNet-CBAM (see `add_cbam`).
    ``dst`` official writes the training-checkpoint dict (``.pth``); timm / torchvision write a state_dict
    (``.safetensors`` without torch, else ``.pth``). Returns a report: spec, initialised names, output path.
    """
    initialised: list[str] = []
    if dst == "official" and str(dst_path).endswith(".safetensors"):
        raise CheckpointError(f"{dst_path}: official checkpoints are torch.save files: use a .pth or .pth.tar name")
    if src == "canonical":
        weights, spec = load_weights(src_path)
        if not isinstance(spec, ResNetSpec):
            raise CheckpointError(f"{src_path}: holds a {type(spec).__name__}, not a ResNetSpec checkpoint")
    else:
        _check_format(src)
        sd, _ = read_state_dict(src_path)
        if add_cbam_preset:
            if src != "torchvision":
                raise WeightsError("adding CBAM blocks needs a plain ResNet: use --from torchvision")
            weights, spec, initialised = add_cbam(sd, preset=add_cbam_preset, seed=seed, init=init)
        else:
            weights, spec = from_state_dict(sd, src)
    if dst == "canonical":
        save_weights(dst_path, weights, spec)
    elif dst == "official":
        write_pth(dst_path, official_checkpoint(weights, spec))
    else:
        _check_format(dst)
        sd = to_state_dict(weights, spec, dst)
        if str(dst_path).endswith(".safetensors"):
            from safetensors.numpy import save

            atomic_write_bytes(dst_path, save({k: np.ascontiguousarray(v) for k, v in sd.items()}))
        else:
            write_pth(dst_path, sd)
    return {"spec": spec, "initialised": initialised, "out": str(dst_path), "tensors": len(weights)}
