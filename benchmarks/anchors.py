"""Outside reference implementations of CBAM, run in the same process as ours.

* `BlogCBAM`: the plain PyTorch CBAM of the seed blog post, written from its description (r=4, 3x3
  spatial conv, biases): ``ChannelAttention`` with ``nn.AdaptiveAvgPool2d(1)`` / ``nn.AdaptiveMaxPool2d(1)``
  and *separate* passes of the shared 1x1-conv MLP for the two pools; ``SpatialAttention`` with
  ``torch.mean`` / ``torch.max(dim=1)`` (values of the (values, indices) tuple), ``torch.cat`` and
  ``nn.Conv2d(2, 1, 3, padding=1)``; CBAM multiplies x by each gate in turn. Same maths as
  ``CBAMSpec.seed(C)``; `load_seed_weights` copies canonical weights in.
* `OfficialCBAM`: a faithful minimal copy of the official CBAM (Jongchan/attention-module ``MODELS/cbam.py``,
  ``no_spatial`` included); the torch backend's tests use it for parity.
* `TimmLightCbamModule`: timm's ``LightCbamModule`` (``LightChannelAttn``, ``LightSpatialAttn``), likewise.
* `TimmCbamModule`: a faithful minimal copy of timm's ``CbamModule`` (timm is not importable on every
  machine); the torch backend's tests use this copy for parity, the benchmarks for timing.
* `real_timm_cbam`: timm's own ``CbamModule`` when ``import timm`` works, else the reason it does not.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "BlogCBAM",
    "load_seed_weights",
    "timm_make_divisible",
    "timm_gate",
    "TimmConvNormAct",
    "TimmChannelAttn",
    "TimmSpatialAttn",
    "TimmCbamModule",
    "TimmLightChannelAttn",
    "TimmLightSpatialAttn",
    "TimmLightCbamModule",
    "OfficialCBAM",
    "real_timm_cbam",
]


# --------------------------------------------------------------------------------------------------
# The seed blog's CBAM (plain PyTorch, written from the blog's description).
class BlogChannelAttention(nn.Module):
    def __init__(self, in_planes, ratio=4):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.max_pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Sequential(
            nn.Conv2d(in_planes, in_planes // ratio, 1),
            nn.ReLU(),
            nn.Conv2d(in_planes // ratio, in_planes, 1),
        )
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        avg_out = self.fc(self.avg_pool(x))
        max_out = self.fc(self.max_pool(x))
        return self.sigmoid(avg_out + max_out)


class BlogSpatialAttention(nn.Module):
    def __init__(self, kernel_size=3):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        avg_out = torch.mean(x, dim=1, keepdim=True)
        max_out, _ = torch.max(x, dim=1, keepdim=True)
        x = torch.cat([avg_out, max_out], dim=1)
        return self.sigmoid(self.conv1(x))


class BlogCBAM(nn.Module):
    def __init__(self, in_planes, ratio=4, kernel_size=3):
        super().__init__()
        self.ca = BlogChannelAttention(in_planes, ratio)
        self.sa = BlogSpatialAttention(kernel_size)

    def forward(self, x):
        x = x * self.ca(x)
        x = x * self.sa(x)
        return x


def load_seed_weights(blog: BlogCBAM, weights: Mapping[str, np.ndarray]) -> BlogCBAM:
    """Copy canonical ``CBAMSpec.seed`` weights (dense (in, out), conv HWIO, concat [mean, max]) in."""
    p = next(blog.parameters())

    def t(a):
        return torch.as_tensor(np.asarray(a), dtype=p.dtype, device=p.device)

    with torch.no_grad():
        blog.ca.fc[0].weight.copy_(t(weights["channel.fc1.kernel"]).T[:, :, None, None])
        blog.ca.fc[0].bias.copy_(t(weights["channel.fc1.bias"]))
        blog.ca.fc[2].weight.copy_(t(weights["channel.fc2.kernel"]).T[:, :, None, None])
        blog.ca.fc[2].bias.copy_(t(weights["channel.fc2.bias"]))
        blog.sa.conv1.weight.copy_(t(weights["spatial.conv.kernel"]).permute(3, 2, 0, 1))
        blog.sa.conv1.bias.copy_(t(weights["spatial.conv.bias"]))
    return blog


# --------------------------------------------------------------------------------------------------
# Faithful minimal copy of the official CBAM: Jongchan/attention-module, MODELS/cbam.py
# (https://github.com/Jongchan/attention-module/blob/master/MODELS/cbam.py). Only formatting changed.
class OfficialBasicConv(nn.Module):
    def __init__(self, in_planes, out_planes, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 relu=True, bn=True, bias=False):
        super().__init__()
        self.out_channels = out_planes
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size=kernel_size, stride=stride, padding=padding,
                              dilation=dilation, groups=groups, bias=bias)
        self.bn = nn.BatchNorm2d(out_planes, eps=1e-5, momentum=0.01, affine=True) if bn else None
        self.relu = nn.ReLU() if relu else None

    def forward(self, x):
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.relu is not None:
            x = self.relu(x)
        return x


class OfficialFlatten(nn.Module):
    def forward(self, x):
        return x.view(x.size(0), -1)


class OfficialChannelGate(nn.Module):
    def __init__(self, gate_channels, reduction_ratio=16, pool_types=["avg", "max"]):  # noqa: B006 (as the original)
        super().__init__()
        self.gate_channels = gate_channels
        self.mlp = nn.Sequential(
            OfficialFlatten(),
            nn.Linear(gate_channels, gate_channels // reduction_ratio),
            nn.ReLU(),
            nn.Linear(gate_channels // reduction_ratio, gate_channels),
        )
        self.pool_types = pool_types

    def forward(self, x):
        channel_att_sum = None
        for pool_type in self.pool_types:
            if pool_type == "avg":
                avg_pool = F.avg_pool2d(x, (x.size(2), x.size(3)), stride=(x.size(2), x.size(3)))
                channel_att_raw = self.mlp(avg_pool)
            elif pool_type == "max":
                max_pool = F.max_pool2d(x, (x.size(2), x.size(3)), stride=(x.size(2), x.size(3)))
                channel_att_raw = self.mlp(max_pool)
            elif pool_type == "lp":
                lp_pool = F.lp_pool2d(x, 2, (x.size(2), x.size(3)), stride=(x.size(2), x.size(3)))
                channel_att_raw = self.mlp(lp_pool)
            elif pool_type == "lse":
                lse_pool = official_logsumexp_2d(x)
                channel_att_raw = self.mlp(lse_pool)
            if channel_att_sum is None:
                channel_att_sum = channel_att_raw
            else:
                channel_att_sum = channel_att_sum + channel_att_raw
        scale = F.sigmoid(channel_att_sum).unsqueeze(2).unsqueeze(3).expand_as(x)
        return x * scale


def official_logsumexp_2d(tensor):
    tensor_flatten = tensor.view(tensor.size(0), tensor.size(1), -1)
    s, _ = torch.max(tensor_flatten, dim=2, keepdim=True)
    outputs = s + (tensor_flatten - s).exp().sum(dim=2, keepdim=True).log()
    return outputs


class OfficialChannelPool(nn.Module):
    def forward(self, x):
        return torch.cat((torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)), dim=1)


class OfficialSpatialGate(nn.Module):
    def __init__(self):
        super().__init__()
        kernel_size = 7
        self.compress = OfficialChannelPool()
        self.spatial = OfficialBasicConv(2, 1, kernel_size, stride=1, padding=(kernel_size - 1) // 2, relu=False)

    def forward(self, x):
        x_compress = self.compress(x)
        x_out = self.spatial(x_compress)
        scale = F.sigmoid(x_out)  # broadcasting
        return x * scale


class OfficialCBAM(nn.Module):
    def __init__(self, gate_channels, reduction_ratio=16, pool_types=["avg", "max"], no_spatial=False):  # noqa: B006
        super().__init__()
        self.ChannelGate = OfficialChannelGate(gate_channels, reduction_ratio, pool_types)
        self.no_spatial = no_spatial
        if not no_spatial:
            self.SpatialGate = OfficialSpatialGate()

    def forward(self, x):
        x_out = self.ChannelGate(x)
        if not self.no_spatial:
            x_out = self.SpatialGate(x_out)
        return x_out


# --------------------------------------------------------------------------------------------------
# Faithful minimal copy of timm's CbamModule: huggingface/pytorch-image-models, timm/layers/cbam.py
# (ChannelAttn, SpatialAttn, CbamModule), with timm/layers/helpers.py make_divisible and a minimal
# timm/layers/conv_bn_act.py ConvNormAct (conv -> bn, apply_act=False; 'same' padding k//2 for stride 1;
# BatchNormAct2d is a BatchNorm2d with an identity act, so its state_dict keys are BatchNorm2d's).
def timm_make_divisible(v, divisor=8, min_value=None, round_limit=0.9):
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def timm_gate(gate_layer):
    """``create_act_layer(gate_layer)`` for the two gates CBAMSpec has (timm's ``Sigmoid``, ``nn.Hardsigmoid``)."""
    layers = {"sigmoid": nn.Sigmoid, "hard_sigmoid": nn.Hardsigmoid, "hardsigmoid": nn.Hardsigmoid}
    if gate_layer not in layers:
        raise ValueError(f"this copy of timm's CBAM knows gate_layer 'sigmoid' and 'hard_sigmoid', got {gate_layer!r}")
    return layers[gate_layer]()


class TimmConvNormAct(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size=1, bias=False, apply_act=True):
        super().__init__()
        assert not apply_act
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        return self.bn(self.conv(x))


class TimmChannelAttn(nn.Module):
    def __init__(self, channels, rd_ratio=1.0 / 16, rd_channels=None, rd_divisor=1, act_layer=nn.ReLU,
                 gate_layer="sigmoid", mlp_bias=False):
        super().__init__()
        if not rd_channels:
            rd_channels = timm_make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=mlp_bias)
        self.act = act_layer(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=mlp_bias)
        self.gate = timm_gate(gate_layer)  # create_act_layer(gate_layer)

    def forward(self, x):
        x_avg = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        x_max = self.fc2(self.act(self.fc1(x.amax((2, 3), keepdim=True))))
        return x * self.gate(x_avg + x_max)


class TimmSpatialAttn(nn.Module):
    def __init__(self, kernel_size=7, gate_layer="sigmoid"):
        super().__init__()
        self.conv = TimmConvNormAct(2, 1, kernel_size, apply_act=False)
        self.gate = timm_gate(gate_layer)

    def forward(self, x):
        x_attn = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        x_attn = self.conv(x_attn)
        return x * self.gate(x_attn)


class TimmCbamModule(nn.Module):
    def __init__(self, channels, rd_ratio=1.0 / 16, rd_channels=None, rd_divisor=1, spatial_kernel_size=7,
                 act_layer=nn.ReLU, gate_layer="sigmoid", mlp_bias=False):
        super().__init__()
        self.channel = TimmChannelAttn(channels, rd_ratio=rd_ratio, rd_channels=rd_channels, rd_divisor=rd_divisor,
                                       act_layer=act_layer, gate_layer=gate_layer, mlp_bias=mlp_bias)
        self.spatial = TimmSpatialAttn(spatial_kernel_size, gate_layer=gate_layer)

    def forward(self, x):
        x = self.channel(x)
        x = self.spatial(x)
        return x


# timm's LightCbamModule (same file): the channel MLP on 0.5 * avg + 0.5 * amax with F.sigmoid, the spatial
# conv (ConvNormAct(1, 1, k)) on the one map 0.5 * mean + 0.5 * amax; gate_layer is not passed to the spatial part.
class TimmLightChannelAttn(TimmChannelAttn):
    def forward(self, x):
        x_pool = 0.5 * x.mean((2, 3), keepdim=True) + 0.5 * x.amax((2, 3), keepdim=True)
        x_attn = self.fc2(self.act(self.fc1(x_pool)))
        return x * F.sigmoid(x_attn)


class TimmLightSpatialAttn(nn.Module):
    def __init__(self, kernel_size=7, gate_layer="sigmoid"):
        super().__init__()
        self.conv = TimmConvNormAct(1, 1, kernel_size, apply_act=False)
        self.gate = timm_gate(gate_layer)

    def forward(self, x):
        x_attn = 0.5 * x.mean(dim=1, keepdim=True) + 0.5 * x.amax(dim=1, keepdim=True)
        x_attn = self.conv(x_attn)
        return x * self.gate(x_attn)


class TimmLightCbamModule(nn.Module):
    def __init__(self, channels, rd_ratio=1.0 / 16, rd_channels=None, rd_divisor=1, spatial_kernel_size=7,
                 act_layer=nn.ReLU, gate_layer="sigmoid", mlp_bias=False):
        super().__init__()
        self.channel = TimmLightChannelAttn(channels, rd_ratio=rd_ratio, rd_channels=rd_channels,
                                            rd_divisor=rd_divisor, act_layer=act_layer, gate_layer=gate_layer,
                                            mlp_bias=mlp_bias)
        self.spatial = TimmLightSpatialAttn(spatial_kernel_size)

    def forward(self, x):
        x = self.channel(x)
        x = self.spatial(x)
        return x


# --------------------------------------------------------------------------------------------------
def real_timm_cbam():
    """``(timm.layers.cbam.CbamModule, timm version)`` or ``(None, "not importable: <reason>")``.

    Any exception counts (on this project's CPU box ``import timm`` fails inside torchvision).
    """
    try:
        import timm
        from timm.layers.cbam import CbamModule  # timm 1.0.29 does not re-export it from timm.layers (seen on a GPU box)

        return CbamModule, getattr(timm, "__version__", "?")
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        reason = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        return None, f"not importable: {reason}"
