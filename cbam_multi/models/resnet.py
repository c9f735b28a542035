"""ResNet (He et al. 2016, the torchvision / "v1.5" form: stride on the 3x3 conv) with optional CBAM
after the last BatchNorm of every residual block, as plain data plus its float64 NumPy oracle (NCHW).

Where CBAM sits (the official code, Jongchan/attention-module ``MODELS/model_resnet.py``, and timm's
ResNet with ``attn_layer='cbam'``, which calls it ``se``): ``out = bn_last(conv_last(...))``, then
``out = cbam(out)``, then ``out += shortcut`` and ReLU, on ``planes * expansion`` channels.

Canonical names (kernels HWIO, dense (in, out)); ``<bn>`` stands for ``.scale .bias .mean .var``::

    stem.conv.kernel                       (7, 7, in, w) "imagenet" / (3, 3, in, w) "cifar"
    stem.bn<bn>
    layer{s}.{b}.conv1.kernel ... conv2 (basic) / conv3 (bottleneck), with bn1<bn> ... bn3<bn>
    layer{s}.{b}.downsample.conv.kernel    (1, 1, in, out) where the shortcut changes shape
    layer{s}.{b}.downsample.bn<bn>
    layer{s}.{b}.cbam.<CBAMSpec name>      with attention "cbam" (e.g. cbam.channel.fc1.kernel)
    fc.kernel (features, classes), fc.bias

BatchNorm everywhere in PyTorch's convention (``bn_momentum`` weighs the new batch statistic; the
running variance takes the unbiased batch variance), like the CBAM block's own BN.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np

from cbam_multi import reference
from cbam_multi.errors import InputError, SpecError
from cbam_multi.jsondata import JsonData
from cbam_multi.spec import TRAINABLE, CBAMSpec, check_field_types, check_float_input
from cbam_multi.weights import register_spec_type, validate_weights

__all__ = ["ResNetSpec", "Block", "LayerOps", "walk", "forward", "DEPTHS", "STEMS", "INIT_SCHEMES"]

RESNET_FORMAT_VERSION = 1

# depth -> (block kind, blocks per stage)
DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
STEMS = ("imagenet", "cifar")
ATTENTIONS = ("cbam", "none")
INIT_SCHEMES = ("canonical", "official")
BN_LEAVES = ("scale", "bias", "mean", "var")


class Block(NamedTuple):
    """One residual block: its name prefix, channels and stride."""

    name: str  # "layer1.0"
    in_channels: int
    planes: int
    out_channels: int  # planes * expansion: the channels CBAM sees
    stride: int
    downsample: bool


@register_spec_type
@dataclass(frozen=True)
class ResNetSpec(JsonData, json_format="cbam_multi.ResNetSpec", json_version=RESNET_FORMAT_VERSION, json_error=SpecError):
    depth: int = 50
    stem: str = "imagenet"  # 7x7/2 conv, BN, ReLU, 3x3/2 max-pool; "cifar": 3x3/1 conv, BN, ReLU
    in_channels: int = 3
    num_classes: int = 1000
    attention: str = "cbam"  # or "none"
    cbam_preset: str = "official"
    cbam_reduction: int | None = None  # override the preset's reduction
    width: int = 64  # stem / layer1 width (64 in every published ResNet; smaller only for quick tests)
    bn_momentum: float = 0.1  # PyTorch convention (nn.BatchNorm2d default)
    bn_eps: float = 1e-5

    def __post_init__(self) -> None:
        check_field_types(self, SpecError)  # "50" or 50.0 for depth: a SpecError naming the field

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise SpecError(msg)

        need(self.depth in DEPTHS, f"depth must be one of {sorted(DEPTHS)}, got {self.depth!r}")
        need(self.stem in STEMS, f"stem must be one of {STEMS}, got {self.stem!r}")
        need(self.attention in ATTENTIONS, f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        need(self.cbam_preset in CBAMSpec.PRESETS, f"cbam_preset must be one of {CBAMSpec.PRESETS}, got {self.cbam_preset!r}")
        for name in ("in_channels", "num_classes", "width"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name} must be an int >= 1, got {v!r}")
        need(0.0 <= self.bn_momentum <= 1.0, f"bn_momentum must be in [0, 1], got {self.bn_momentum!r}")
        need(self.bn_eps > 0, f"bn_eps must be > 0, got {self.bn_eps!r}")
        if self.attention == "cbam":
            for c in sorted({b.out_channels for b in self.blocks()}):
                self.cbam_spec(c)  # a zero hidden width fails here, naming the fix

    # ------------------------------------------------------------ derived
    @property
    def block_kind(self) -> str:
        return DEPTHS[self.depth][0]

    @property
    def expansion(self) -> int:
        return 1 if self.block_kind == "basic" else 4

    @property
    def has_cbam(self) -> bool:
        return self.attention == "cbam"

    @property
    def features(self) -> int:
        """Channels after layer4 (the fc input): 512 (basic) or 2048 (bottleneck) at width 64."""
        return self.width * 8 * self.expansion

    def cbam_spec(self, channels: int) -> CBAMSpec:
        overrides = {} if self.cbam_reduction is None else {"reduction": self.cbam_reduction}
        return CBAMSpec.preset(self.cbam_preset, channels, **overrides)

    def blocks(self) -> list[Block]:
        out, c_in = [], self.width
        for s, n in enumerate(DEPTHS[self.depth][1]):
            planes = self.width * 2**s
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                c_out = planes * self.expansion
                out.append(Block(f"layer{s + 1}.{b}", c_in, planes, c_out, stride, stride != 1 or c_in != c_out))
                c_in = c_out
        return out

    def block_convs(self, block: Block) -> list[tuple[str, int, int, int, int]]:
        """(conv name, kernel size, in, out, stride) of the block's main path, in order."""
        p = block.planes
        if self.block_kind == "basic":
            return [("conv1", 3, block.in_channels, p, block.stride), ("conv2", 3, p, p, 1)]
        return [
            ("conv1", 1, block.in_channels, p, 1),
            ("conv2", 3, p, p, block.stride),
            ("conv3", 1, p, block.out_channels, 1),
        ]

    def cbam_blocks(self) -> dict[str, CBAMSpec]:
        """Prefix (e.g. "layer1.0.cbam") -> its CBAMSpec; empty without attention."""
        if not self.has_cbam:
            return {}
        return {f"{b.name}.cbam": self.cbam_spec(b.out_channels) for b in self.blocks()}

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}

        def bn(prefix: str, c: int) -> None:
            for leaf in BN_LEAVES:
                shapes[f"{prefix}.{leaf}"] = (c,)

        k = 7 if self.stem == "imagenet" else 3
        shapes["stem.conv.kernel"] = (k, k, self.in_channels, self.width)
        bn("stem.bn", self.width)
        for block in self.blocks():
            for i, (conv, ks, c_in, c_out, _) in enumerate(self.block_convs(block), 1):
                shapes[f"{block.name}.{conv}.kernel"] = (ks, ks, c_in, c_out)
                bn(f"{block.name}.bn{i}", c_out)
            if block.downsample:
                shapes[f"{block.name}.downsample.conv.kernel"] = (1, 1, block.in_channels, block.out_channels)
                bn(f"{block.name}.downsample.bn", block.out_channels)
            if self.has_cbam:
                for name, shape in self.cbam_spec(block.out_channels).param_shapes().items():
                    shapes[f"{block.name}.cbam.{name}"] = shape
        shapes["fc.kernel"] = (self.features, self.num_classes)
        shapes["fc.bias"] = (self.num_classes,)
        return shapes

    def param_kinds(self) -> dict[str, str]:
        """Canonical name -> "param" or "stat" (every BN running mean/var, the CBAM blocks' included)."""
        return {n: "stat" if n.endswith((".mean", ".var")) else TRAINABLE for n in self.param_shapes()}

    def param_inits(self, scheme: str = "canonical") -> dict[str, tuple[str, float]]:
        """Canonical name -> ("uniform", bound) | ("normal", std) | ("constant", value).

        "canonical": PyTorch's default layer init (U(+-1/sqrt(fan_in)) for conv/dense weights and the fc
        bias), BN scale 1, the CBAM blocks' own spec init. "official": what ``ResNet.__init__`` of the
        official code does - every state_dict weight whose key contains "conv" gets kaiming normal,
        fan_out (std sqrt(2 / (out * k * k))): the stem and block convs and CBAM's spatial conv, but NOT
        the shortcut conv (its key is ``downsample.0.weight``; it keeps PyTorch's default U(+-1/sqrt(fan_in)),
        as do CBAM's MLP weights); BN scales 1 except CBAM's spatial BN (0); fc kaiming normal fan_in;
        every bias 0.
        """
        if scheme not in INIT_SCHEMES:
            raise SpecError(f"init scheme must be one of {INIT_SCHEMES}, got {scheme!r}")
        shapes = self.param_shapes()
        cbam_inits = {}
        for prefix, cspec in self.cbam_blocks().items():
            cbam_inits.update({f"{prefix}.{n}": v for n, v in cspec.param_inits().items()})
        inits: dict[str, tuple[str, float]] = {}
        for name in shapes:
            layer, leaf = name.rsplit(".", 1)
            official = scheme == "official"
            if leaf in ("mean", "var"):
                inits[name] = ("constant", 0.0 if leaf == "mean" else 1.0)
            elif leaf == "scale":  # a BN scale (CBAM's spatial BN included)
                spatial_bn = layer.endswith("cbam.spatial.bn")
                inits[name] = cbam_inits[name] if (spatial_bn and not official) else ("constant", 0.0 if spatial_bn else 1.0)
            elif leaf == "bias" and (official or f"{layer}.mean" in shapes):  # any bias (official), a BN bias
                inits[name] = ("constant", 0.0)
            elif name in cbam_inits and not (official and name.endswith("spatial.conv.kernel")):
                inits[name] = cbam_inits[name]
            else:
                kernel = shapes[f"{layer}.kernel"]
                fan_in = int(np.prod(kernel[:-1]))
                if not official or layer.endswith("downsample.conv") or (leaf == "bias"):
                    inits[name] = ("uniform", fan_in**-0.5)
                elif layer == "fc":
                    inits[name] = ("normal", (2.0 / fan_in) ** 0.5)
                else:  # kaiming normal, mode fan_out, ReLU gain
                    fan_out = kernel[-1] * int(np.prod(kernel[:-2]))
                    inits[name] = ("normal", (2.0 / fan_out) ** 0.5)
        return inits

    def num_params(self) -> int:
        """Trainable parameters (BN running statistics excluded), as ``sum(p.numel() for p in
        model.parameters())`` counts them: ResNet-50 25,557,032; with official CBAM 28,089,624."""
        kinds = self.param_kinds()
        return int(sum(int(np.prod(s)) for n, s in self.param_shapes().items() if kinds[n] == TRAINABLE))

    def check_input(self, shape, dtype_name: str, layout: str) -> None:
        shape = tuple(int(d) for d in shape)
        c_axis = 1 if layout == "NCHW" else 3
        if len(shape) != 4 or shape[c_axis] != self.in_channels or 0 in shape:
            other = 3 if layout == "NCHW" else 1
            hint = ""
            if len(shape) == 4 and shape[other] == self.in_channels and shape[c_axis] != self.in_channels:
                hint = f"; it looks like {'NHWC' if layout == 'NCHW' else 'NCHW'}: this backend expects {layout}"
            raise InputError(
                f"ResNet expects {layout} images with {self.in_channels} channels on axis {c_axis}, got shape {shape}{hint}"
            )
        check_float_input(dtype_name)  # CBAM's dtype message


# ------------------------------------------------------------ the network, once
class LayerOps(Protocol):
    """What a backend that computes ResNet op by op (the NumPy oracle, JAX) provides to `walk`. Weights are
    named by canonical prefix (``conv(x, "layer1.0.conv1", 1)`` uses ``layer1.0.conv1.kernel``); ``bn`` and
    ``cbam`` keep their own updated running statistics."""

    def conv(self, x, prefix: str, stride: int): ...  # "same" padding: kernel size // 2
    def bn(self, x, prefix: str): ...
    def relu(self, x): ...
    def max_pool_3x3_s2(self, x): ...  # padding 1, like torch's MaxPool2d(3, 2, 1)
    def cbam(self, x, prefix: str, spec: CBAMSpec): ...
    # a CBAM block's tail, relu(cbam(bn(x)) + shortcut): may be fused (one kernel call in JAX eval on CPU)
    def bn_cbam_add_relu(self, x, bn_prefix: str, cbam_prefix: str, spec: CBAMSpec, shortcut): ...
    def head(self, x): ...  # global average pool, then fc


def walk(spec: ResNetSpec, x, ops: LayerOps):
    """The logits of ``x`` through the network ``spec`` describes, computed by ``ops``: the order of the
    layers written once for every op-by-op backend (the torch modules are built independently of it)."""
    h = ops.relu(ops.bn(ops.conv(x, "stem.conv", 2 if spec.stem == "imagenet" else 1), "stem.bn"))
    if spec.stem == "imagenet":
        h = ops.max_pool_3x3_s2(h)
    for block in spec.blocks():
        out = h
        convs = spec.block_convs(block)
        for i, (conv, _, _, _, stride) in enumerate(convs[:-1], 1):
            out = ops.relu(ops.bn(ops.conv(out, f"{block.name}.{conv}", stride), f"{block.name}.bn{i}"))
        conv, *_, stride = convs[-1]
        z = ops.conv(out, f"{block.name}.{conv}", stride)
        shortcut = h
        if block.downsample:
            shortcut = ops.bn(ops.conv(h, f"{block.name}.downsample.conv", block.stride), f"{block.name}.downsample.bn")
        last_bn = f"{block.name}.bn{len(convs)}"
        if spec.has_cbam:  # the last BN, CBAM, the shortcut add and ReLU
            h = ops.bn_cbam_add_relu(z, last_bn, f"{block.name}.cbam", spec.cbam_spec(block.out_channels), shortcut)
        else:
            h = ops.relu(ops.bn(z, last_bn) + shortcut)
    return ops.head(h)


# ------------------------------------------------------------ NumPy oracle (float64, NCHW)
class _NumpyOps:
    def __init__(self, w: Mapping[str, np.ndarray], spec: ResNetSpec, train: bool):
        self.w, self.spec, self.train, self.stats = w, spec, train, {}

    def conv(self, x, prefix, stride):
        kernel = self.w[f"{prefix}.kernel"]
        return reference.conv2d(x, kernel, stride=stride, padding=kernel.shape[0] // 2)

    def bn(self, z, prefix):
        w, m = self.w, self.spec.bn_momentum
        if self.train:
            n = z.shape[0] * z.shape[2] * z.shape[3]
            if n < 2:
                raise InputError(f"BatchNorm in train mode needs more than 1 value per channel at {prefix} (got shape {z.shape})")
            mean, var = z.mean(axis=(0, 2, 3)), z.var(axis=(0, 2, 3))
            self.stats[f"{prefix}.mean"] = (1 - m) * w[f"{prefix}.mean"] + m * mean
            self.stats[f"{prefix}.var"] = (1 - m) * w[f"{prefix}.var"] + m * var * n / (n - 1)  # unbiased, as torch
        else:
            mean, var = w[f"{prefix}.mean"], w[f"{prefix}.var"]
        inv = w[f"{prefix}.scale"] / np.sqrt(var + self.spec.bn_eps)
        return (z - mean[None, :, None, None]) * inv[None, :, None, None] + w[f"{prefix}.bias"][None, :, None, None]

    def relu(self, x):
        return np.maximum(x, 0.0)

    def max_pool_3x3_s2(self, x):
        xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
        h, w = (x.shape[2] - 1) // 2 + 1, (x.shape[3] - 1) // 2 + 1
        return np.max([xp[:, :, i : i + 2 * h - 1 : 2, j : j + 2 * w - 1 : 2] for i in range(3) for j in range(3)], axis=0)

    def cbam(self, x, prefix, spec):
        sub = {n: self.w[f"{prefix}.{n}"] for n in spec.param_shapes()}
        out, new = reference.cbam_forward(x, sub, spec, train=self.train)
        self.stats.update({f"{prefix}.{n}": a for n, a in new.items()})
        return out

    def bn_cbam_add_relu(self, x, bn_prefix, cbam_prefix, spec, shortcut):
        return self.relu(self.cbam(self.bn(x, bn_prefix), cbam_prefix, spec) + shortcut)

    def head(self, x):
        return x.mean(axis=(2, 3)) @ self.w["fc.kernel"] + self.w["fc.bias"]


def forward(x, weights: Mapping[str, np.ndarray], spec: ResNetSpec, train: bool = False):
    """Float64 logits of NCHW images; returns (logits, updated BN running statistics in train mode)."""
    x = np.asarray(x)
    spec.check_input(x.shape, str(x.dtype), "NCHW")
    validate_weights(weights, spec)
    ops = _NumpyOps({n: np.asarray(a, np.float64) for n, a in weights.items()}, spec, train)
    return walk(spec, x.astype(np.float64), ops), ops.stats
