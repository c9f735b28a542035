"""State-dict key tables of the public PyTorch code this project reads and writes (framework-free facts).

One table per source, canonical name -> source key, plus the array layout of each entry. The torch
backend's CBAM adapters and the ResNet checkpoint converters both read these tables.

* official CBAM (Jongchan/attention-module ``MODELS/cbam.py``): ``ChannelGate.mlp.1`` / ``.mlp.3`` are
  ``nn.Linear`` (index 0 of the Sequential is a Flatten, 2 the ReLU); ``SpatialGate.spatial.conv`` has no
  bias and input channels [max, mean]; ``SpatialGate.spatial.bn`` is BatchNorm2d(1, momentum=0.01).
* timm ``CbamModule`` (``timm/layers/cbam.py``): 1x1-conv MLP ``channel.fc1`` / ``channel.fc2``,
  ``spatial.conv`` a ConvNormAct (``.conv``, ``.bn``), input channels [mean, max].
* ResNet backbones (torchvision ``resnet.py``, the official ``model_resnet.py`` and timm ``resnet.py`` share
  them): ``conv1``, ``bn1``, ``layer{s}.{b}.conv{i}`` / ``.bn{i}``, ``layer{s}.{b}.downsample.0`` (conv) /
  ``.downsample.1`` (BN), ``fc``. The CBAM block is ``layer{s}.{b}.cbam`` (official) or ``.se`` (timm).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "OFFICIAL_CBAM_KEYS",
    "TIMM_CBAM_KEYS",
    "BN_KEYS",
    "to_torch_layout",
    "to_canonical_layout",
    "resnet_backbone_keys",
]

OFFICIAL_CBAM_KEYS = {
    "channel.fc1.kernel": "ChannelGate.mlp.1.weight",
    "channel.fc1.bias": "ChannelGate.mlp.1.bias",
    "channel.fc2.kernel": "ChannelGate.mlp.3.weight",
    "channel.fc2.bias": "ChannelGate.mlp.3.bias",
    "spatial.conv.kernel": "SpatialGate.spatial.conv.weight",
    "spatial.conv.bias": "SpatialGate.spatial.conv.bias",
    "spatial.bn.scale": "SpatialGate.spatial.bn.weight",
    "spatial.bn.bias": "SpatialGate.spatial.bn.bias",
    "spatial.bn.mean": "SpatialGate.spatial.bn.running_mean",
    "spatial.bn.var": "SpatialGate.spatial.bn.running_var",
}
OFFICIAL_CBAM_LAYOUT = {"mlp_kind": "linear", "concat_order": ("max", "mean"), "bn": "SpatialGate.spatial.bn"}

TIMM_CBAM_KEYS = {
    "channel.fc1.kernel": "channel.fc1.weight",
    "channel.fc1.bias": "channel.fc1.bias",
    "channel.fc2.kernel": "channel.fc2.weight",
    "channel.fc2.bias": "channel.fc2.bias",
    "spatial.conv.kernel": "spatial.conv.conv.weight",
    "spatial.conv.bias": "spatial.conv.conv.bias",
    "spatial.bn.scale": "spatial.conv.bn.weight",
    "spatial.bn.bias": "spatial.conv.bn.bias",
    "spatial.bn.mean": "spatial.conv.bn.running_mean",
    "spatial.bn.var": "spatial.conv.bn.running_var",
}
TIMM_CBAM_LAYOUT = {"mlp_kind": "conv1x1", "concat_order": ("mean", "max"), "bn": "spatial.conv.bn"}

# canonical BN leaf -> nn.BatchNorm2d state_dict leaf (num_batches_tracked has no canonical twin)
BN_KEYS = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


# ---------------------------------------------------------------- array layouts
def to_torch_layout(arr: np.ndarray, kind: str) -> np.ndarray:
    """Canonical array -> its torch state_dict layout. ``kind``: "conv" (HWIO -> OIHW), "linear"
    ((in, out) -> nn.Linear (out, in)), "conv1x1" ((in, out) -> (out, in, 1, 1)), "vector"."""
    if kind == "conv":
        return arr.transpose(3, 2, 0, 1)
    if kind == "linear":
        return arr.T
    if kind == "conv1x1":
        return arr.T[:, :, None, None]
    return arr


def to_canonical_layout(arr: np.ndarray, kind: str) -> np.ndarray:
    """Inverse of `to_torch_layout`."""
    if kind == "conv":
        return arr.transpose(2, 3, 1, 0)
    if kind == "linear":
        return arr.T
    if kind == "conv1x1":
        return arr[:, :, 0, 0].T
    return arr


def resnet_backbone_keys(spec) -> dict[str, tuple[str, str]]:
    """Canonical name -> (torchvision-style state_dict key, layout kind) for every non-CBAM tensor of a
    `cbam_multi.models.resnet.ResNetSpec`, in spec order."""
    out: dict[str, tuple[str, str]] = {}

    def bn(prefix: str, key: str) -> None:
        for leaf, tleaf in BN_KEYS.items():
            out[f"{prefix}.{leaf}"] = (f"{key}.{tleaf}", "vector")

    out["stem.conv.kernel"] = ("conv1.weight", "conv")
    bn("stem.bn", "bn1")
    for block in spec.blocks():
        for i, (conv, *_rest) in enumerate(spec.block_convs(block), 1):
            out[f"{block.name}.{conv}.kernel"] = (f"{block.name}.{conv}.weight", "conv")
            bn(f"{block.name}.bn{i}", f"{block.name}.bn{i}")
        if block.downsample:
            out[f"{block.name}.downsample.conv.kernel"] = (f"{block.name}.downsample.0.weight", "conv")
            bn(f"{block.name}.downsample.bn", f"{block.name}.downsample.1")
    out["fc.kernel"] = ("fc.weight", "linear")
    out["fc.bias"] = ("fc.bias", "vector")
    return out


def bn_counter_keys(torch_keys) -> list[str]:
    """The ``num_batches_tracked`` buffer key of every BatchNorm among ``torch_keys`` (its running_var keys)."""
    return [k[: -len("running_var")] + "num_batches_tracked" for k in torch_keys if k.endswith(".running_var")]
