"""The MNIST classifier shared by both backends: a small CNN with a CBAM block after each conv block.

Like `CBAMSpec`, ``MNISTNetSpec`` is plain data that owns every derived fact (canonical parameter
names, shapes, initialisers), so a whole-model checkpoint moves between frameworks exactly like a
CBAM block does. ``forward`` below is the float64 NumPy oracle of the model (NCHW).

Architecture, per block i: ``convs_per_block`` x [k x k 'same' conv + bias, ReLU], CBAM (unless
``cbam`` is False: the ``--no-cbam`` baseline), 2x2 max-pool stride 2. Then flatten, dense + ReLU,
dense to logits.

Canonical names: ``block{i}.conv{j}.kernel`` (k, k, in, out) HWIO and ``.bias`` (out,);
``block{i}.cbam.<CBAMSpec name>``; ``head.fc1.kernel`` (H*W*C, dense) whose rows follow the
**NHWC flatten order** (h, w, c) — the torch adapter permutes them for its NCHW flatten —,
``head.fc1.bias``, ``head.fc2.kernel`` (dense, classes), ``head.fc2.bias``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from cbam_multi import reference
from cbam_multi.errors import InputError, SpecError
from cbam_multi.jsondata import JsonData
from cbam_multi.spec import TIE_RULES, TRAINABLE, CBAMSpec, check_float_input
from cbam_multi.weights import register_spec_type

MODEL_FORMAT_VERSION = 1


@register_spec_type
@dataclass(frozen=True)
class MNISTNetSpec(JsonData, json_format="cbam_multi.MNISTNetSpec", json_version=MODEL_FORMAT_VERSION, json_error=SpecError):
    conv_channels: tuple[int, ...] = (32, 64)
    convs_per_block: int = 1
    kernel: int = 3
    dense: int = 128
    num_classes: int = 10
    in_channels: int = 1
    image_size: int = 28
    cbam: bool = True
    cbam_preset: str = "seed"  # the blog's block: r=4, 3x3 spatial conv
    cbam_reduction: int | None = None  # override the preset's reduction
    # gradient at tied maxima of the 2x2 max-pool (`CBAMSpec.tie_rule`): "first" is torch's F.max_pool2d
    pool_tie_rule: str = "first"

    def __post_init__(self) -> None:
        object.__setattr__(self, "conv_channels", tuple(self.conv_channels))
        if not self.conv_channels or any(not isinstance(c, int) or c < 1 for c in self.conv_channels):
            raise SpecError(f"conv_channels must be positive ints, got {self.conv_channels!r}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise SpecError(f"kernel must be a positive odd int, got {self.kernel!r}")
        if self.convs_per_block < 1 or self.dense < 1 or self.num_classes < 2:
            raise SpecError("convs_per_block and dense must be >= 1 and num_classes >= 2")
        if self.image_size % (2 ** len(self.conv_channels)) != 0:
            raise SpecError(
                f"image_size {self.image_size} must be divisible by 2**{len(self.conv_channels)} "
                f"(one 2x2 max-pool per block)"
            )
        if self.pool_tie_rule not in TIE_RULES:
            raise SpecError(f"pool_tie_rule must be one of {TIE_RULES}, got {self.pool_tie_rule!r}")
        if self.cbam_preset not in CBAMSpec.PRESETS:
            raise SpecError(f"cbam_preset must be one of {CBAMSpec.PRESETS}, got {self.cbam_preset!r}")
        if self.cbam:
            for i in range(len(self.conv_channels)):
                self.cbam_spec(i)  # raises SpecError early, e.g. a zero hidden width

    # ------------------------------------------------------------ derived
    def cbam_spec(self, block: int) -> CBAMSpec:
        overrides = {} if self.cbam_reduction is None else {"reduction": self.cbam_reduction}
        return CBAMSpec.preset(self.cbam_preset, self.conv_channels[block], **overrides)

    @property
    def final_size(self) -> int:
        return self.image_size // 2 ** len(self.conv_channels)

    @property
    def flat_features(self) -> int:
        return self.final_size**2 * self.conv_channels[-1]

    def conv_layers(self) -> list[tuple[int, int, int, int]]:
        """(block, conv index, in channels, out channels) for every conv, in order."""
        layers, c_in = [], self.in_channels
        for i, c_out in enumerate(self.conv_channels):
            for j in range(self.convs_per_block):
                layers.append((i, j, c_in, c_out))
                c_in = c_out
        return layers

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        k = self.kernel
        shapes: dict[str, tuple[int, ...]] = {}
        for i, j, c_in, c_out in self.conv_layers():
            shapes[f"block{i}.conv{j}.kernel"] = (k, k, c_in, c_out)
            shapes[f"block{i}.conv{j}.bias"] = (c_out,)
            if self.cbam and j == self.convs_per_block - 1:
                for name, shape in self.cbam_spec(i).param_shapes().items():
                    shapes[f"block{i}.cbam.{name}"] = shape
        shapes["head.fc1.kernel"] = (self.flat_features, self.dense)
        shapes["head.fc1.bias"] = (self.dense,)
        shapes["head.fc2.kernel"] = (self.dense, self.num_classes)
        shapes["head.fc2.bias"] = (self.num_classes,)
        return shapes

    def _cbam_items(self, method: str) -> dict:
        items = {}
        if self.cbam:
            for i in range(len(self.conv_channels)):
                for name, value in getattr(self.cbam_spec(i), method)().items():
                    items[f"block{i}.cbam.{name}"] = value
        return items

    def param_kinds(self) -> dict[str, str]:
        kinds = self._cbam_items("param_kinds")
        return {n: kinds.get(n, TRAINABLE) for n in self.param_shapes()}

    def param_inits(self) -> dict[str, tuple[str, float]]:
        """PyTorch-default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for every conv/dense weight and bias."""
        shapes, cbam_inits = self.param_shapes(), self._cbam_items("param_inits")
        inits = {}
        for name in shapes:
            if name in cbam_inits:
                inits[name] = cbam_inits[name]
            else:
                kernel = shapes[name.rsplit(".", 1)[0] + ".kernel"]
                inits[name] = ("uniform", float(np.prod(kernel[:-1])) ** -0.5)
        return inits

    def num_params(self) -> int:
        kinds = self.param_kinds()
        return int(sum(np.prod(s) for n, s in self.param_shapes().items() if kinds[n] == TRAINABLE))

    def check_input(self, shape, dtype_name: str, layout: str) -> None:
        shape = tuple(int(d) for d in shape)
        c_axis = 1 if layout == "NCHW" else 3
        expected = (self.in_channels, self.image_size, self.image_size)
        got = (shape[c_axis],) + tuple(d for a, d in enumerate(shape) if a not in (0, c_axis)) if len(shape) == 4 else ()
        if len(shape) != 4 or got != expected:
            raise InputError(
                f"MNISTNet expects {layout} images of {self.in_channels}x{self.image_size}x{self.image_size} "
                f"(channels on axis {c_axis}), got shape {shape}"
            )
        check_float_input(dtype_name)  # CBAM's dtype message


# ------------------------------------------------------------ NumPy oracle
def _conv_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """NCHW x, HWIO kernel, zero 'same' padding, cross-correlation: the block oracle's convolution
    (`cbam_multi.reference.conv2d_same`) once per output channel."""
    out = np.stack([reference.conv2d_same(x, kernel[..., o : o + 1]) for o in range(kernel.shape[3])], axis=1)
    return out + bias[None, :, None, None]


def _maxpool2(x: np.ndarray) -> np.ndarray:
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def forward(x, weights: Mapping[str, np.ndarray], spec: MNISTNetSpec, train: bool = False):
    """Float64 logits of NCHW images; returns (logits, new CBAM BN stats)."""
    x = np.asarray(x)
    spec.check_input(x.shape, str(x.dtype), "NCHW")
    w = {n: np.asarray(a, np.float64) for n, a in weights.items()}
    h, stats = x.astype(np.float64), {}
    for i, j, _, _ in spec.conv_layers():
        h = np.maximum(_conv_same(h, w[f"block{i}.conv{j}.kernel"], w[f"block{i}.conv{j}.bias"]), 0.0)
        if j == spec.convs_per_block - 1:
            if spec.cbam:
                prefix = f"block{i}.cbam."
                sub = {n[len(prefix) :]: a for n, a in w.items() if n.startswith(prefix)}
                h, new = reference.cbam_forward(h, sub, spec.cbam_spec(i), train=train)
                stats.update({prefix + n: a for n, a in new.items()})
            h = _maxpool2(h)
    flat = h.transpose(0, 2, 3, 1).reshape(h.shape[0], -1)  # NHWC flatten order, as the canonical kernel
    hid = np.maximum(flat @ w["head.fc1.kernel"] + w["head.fc1.bias"], 0.0)
    return hid @ w["head.fc2.kernel"] + w["head.fc2.bias"], stats
