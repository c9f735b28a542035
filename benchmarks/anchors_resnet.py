"""Outside ResNet-CBAM implementations, written from their published structure (module names, so the
state_dict keys are theirs; forward order; init), for checkpoint tests and benchmarks.

* `official_resnet(network_type, depth, num_classes, att_type)`: Jongchan/attention-module's
  ``ResidualNet`` (``MODELS/model_resnet.py`` + ``MODELS/cbam.py``): blocks ``conv1/bn1/relu/conv2/bn2
  (/conv3/bn3)/downsample/cbam``; CBAM(planes * expansion, 16) applied after the last BN, before the residual
  add; ``ChannelGate.mlp`` = Sequential(Flatten, Linear, ReLU, Linear) run once per pool; ``SpatialGate``:
  ChannelPool [max, mean] -> ``spatial`` (conv 7x7 no bias, BN momentum 0.01); the ImageNet type ends with
  ``AvgPool2d(7)`` (224x224 inputs), the CIFAR types with ``avg_pool2d(x, 4)`` (32x32 inputs). Init: kaiming
  normal fan_out for every weight whose key contains "conv", BN weights 1 (SpatialGate's 0), fc kaiming
  normal, every bias 0. With ``att_type=None`` it is the plain torchvision-layout ResNet.
* `timm_resnet_cbam(depth, num_classes)`: timm's ResNet with ``block_args=dict(attn_layer='cbam')``:
  the same backbone keys, the CBAM block (`TimmCbamModule`) at ``layer{s}.{b}.se`` after the last BN.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn import init

from .anchors import TimmCbamModule, TimmLightCbamModule

__all__ = ["OfficialCBAM", "official_resnet", "timm_resnet_cbam"]

_LAYERS = {18: ("basic", [2, 2, 2, 2]), 34: ("basic", [3, 4, 6, 3]), 50: ("bottleneck", [3, 4, 6, 3]), 101: ("bottleneck", [3, 4, 23, 3])}


class _Flatten(nn.Module):
    def forward(self, x):
        return x.reshape(x.shape[0], -1)


class _OfficialChannelGate(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = channels // reduction
        self.mlp = nn.Sequential(_Flatten(), nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))

    def forward(self, x):
        hw = (x.shape[2], x.shape[3])
        att = self.mlp(F.avg_pool2d(x, hw, stride=hw)) + self.mlp(F.max_pool2d(x, hw, stride=hw))
        return x * torch.sigmoid(att)[:, :, None, None]


class _OfficialBasicConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)

    def forward(self, x):
        return self.bn(self.conv(x))


class _OfficialSpatialGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.spatial = _OfficialBasicConv()

    def forward(self, x):
        pooled = torch.cat([x.max(dim=1, keepdim=True)[0], x.mean(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


class OfficialCBAM(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.ChannelGate = _OfficialChannelGate(channels, reduction)
        self.SpatialGate = _OfficialSpatialGate()

    def forward(self, x):
        return self.SpatialGate(self.ChannelGate(x))


class _Block(nn.Module):
    def __init__(self, kind: str, inplanes: int, planes: int, stride: int, downsample, attention):
        super().__init__()
        self.kind = kind
        expansion = 1 if kind == "basic" else 4
        if kind == "basic":
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
        else:
            self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.attn_name = attention[0] if attention else None
        if attention:
            setattr(self, attention[0], attention[1](planes * expansion))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        if self.kind == "basic":
            out = self.bn2(self.conv2(out))
        else:
            out = self.bn3(self.conv3(self.relu(self.bn2(self.conv2(out)))))
        if self.attn_name:
            out = getattr(self, self.attn_name)(out)
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


class _ResNet(nn.Module):
    def __init__(self, depth: int, network_type: str, num_classes: int, attention):
        super().__init__()
        kind, layers = _LAYERS[depth]
        expansion = 1 if kind == "basic" else 4
        self.network_type = network_type
        if network_type in ("ImageNet", "timm"):
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            self.avgpool = nn.AvgPool2d(7) if network_type == "ImageNet" else nn.AdaptiveAvgPool2d(1)
        else:
            self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        inplanes = 64
        for s, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if s == 0 else 2
            downsample = None
            if stride != 1 or inplanes != planes * expansion:
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes * expansion, 1, stride, bias=False), nn.BatchNorm2d(planes * expansion)
                )
            blocks = [_Block(kind, inplanes, planes, stride, downsample, attention)]
            inplanes = planes * expansion
            blocks += [_Block(kind, inplanes, planes, 1, None, attention) for _ in range(1, n)]
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(512 * expansion, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        if self.network_type != "CIFAR":
            x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = F.avg_pool2d(x, 4) if self.network_type == "CIFAR" else self.avgpool(x)
        return self.fc(x.reshape(x.shape[0], -1))


def official_resnet(network_type: str = "ImageNet", depth: int = 50, num_classes: int = 1000, att_type: str | None = "CBAM") -> nn.Module:
    """``network_type`` "ImageNet", or "CIFAR10" / "CIFAR100" (3x3 stem, no max-pool)."""
    attention = ("cbam", OfficialCBAM) if att_type == "CBAM" else None
    model = _ResNet(depth, "ImageNet" if network_type == "ImageNet" else "CIFAR", num_classes, attention)
    init.kaiming_normal_(model.fc.weight)
    state = model.state_dict()
    for key in state:
        leaf = key.split(".")[-1]
        if leaf == "weight":
            if "conv" in key:
                init.kaiming_normal_(state[key], mode="fan_out")
            if "bn" in key:
                state[key][...] = 0 if "SpatialGate" in key else 1
        elif leaf == "bias":
            state[key][...] = 0
    return model


def timm_resnet_cbam(depth: int = 50, num_classes: int = 1000, light: bool = False) -> nn.Module:
    """Structure (keys, CBAM placement) of timm's ``resnet{depth}`` with ``attn_layer='cbam'`` (``'lcbam'``
    with ``light``: `TimmLightCbamModule`); torch's default init (timm's own init differs, irrelevant to
    checkpoint conversion)."""
    return _ResNet(depth, "timm", num_classes, ("se", TimmLightCbamModule if light else TimmCbamModule))
