"""ResNet / ResNet-CBAM (`cbam_multi.models.resnet.ResNetSpec`) as a torch module, NCHW.

The state_dict reads like torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``,
``fc``), so plain torchvision/timm backbone keys need no renaming; CBAM blocks are this backend's
`cbam_multi.torch.CBAM` at ``layer{s}.{b}.cbam``. Values start from the spec's seeded canonical init
(``init="canonical"``) or the official code's init (``init="official"``), identical to the JAX module
for the same seed.

`model_layouts` is the one canonical <-> torch table: backbone entries from
`cbam_multi.checkpoint_keys.resnet_backbone_keys`, CBAM entries from the CBAM module's own table.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from cbam_multi.checkpoint_keys import resnet_backbone_keys, to_canonical_layout, to_torch_layout
from cbam_multi.errors import InputError
from cbam_multi.models.resnet import ResNetSpec
from cbam_multi.weights import init_weights

from .. import compiled, cpu_kernel, fused_bn
from ..guards import has_hooks
from ..modules import CBAM
from ..weights import Layout, torch_layouts
from .common import import_model_weights

__all__ = ["ResNet", "ResidualBlock", "model_layouts"]


def _bn(c: int, spec: ResNetSpec, dtype) -> nn.BatchNorm2d:
    # BatchNorm2d's momentum convention (weight of the new batch statistic) is the spec's
    return nn.BatchNorm2d(c, eps=spec.bn_eps, momentum=spec.bn_momentum, dtype=dtype)


def _conv(c_in: int, c_out: int, k: int, stride: int, dtype) -> nn.Conv2d:
    return skip_init(nn.Conv2d, c_in, c_out, k, stride=stride, padding=k // 2, bias=False, dtype=dtype)


class ResidualBlock(nn.Module):
    """BasicBlock (conv1, conv2) or Bottleneck (conv1, conv2, conv3), each conv followed by its BN;
    CBAM (if any) on the last BN's output, before the shortcut add; then ReLU."""

    def __init__(self, spec: ResNetSpec, block, dtype):
        super().__init__()
        self.n_convs = len(spec.block_convs(block))
        for i, (conv, k, c_in, c_out, stride) in enumerate(spec.block_convs(block), 1):
            setattr(self, conv, _conv(c_in, c_out, k, stride, dtype))
            setattr(self, f"bn{i}", _bn(c_out, spec, dtype))
        self.downsample = None
        if block.downsample:
            self.downsample = nn.Sequential(
                _conv(block.in_channels, block.out_channels, 1, block.stride, dtype), _bn(block.out_channels, spec, dtype)
            )
        self.cbam = CBAM(spec.cbam_spec(block.out_channels), dtype=dtype) if spec.has_cbam else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for i in range(1, self.n_convs):
            out = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(out)))
        h = getattr(self, f"conv{self.n_convs}")(out)
        if self._tail_in_one_kernel(h, x):
            # CPU inference: relu(cbam(bn(h)) + shortcut) in one kernel call, a downsample's BN applied by it too
            shortcut, shortcut_bn = x, None
            if self.downsample is not None and has_hooks(self.downsample):
                shortcut = self.downsample(x)  # its hooks see its output
            elif self.downsample is not None:
                conv, shortcut_bn = self.downsample
                shortcut = conv(x)
                if not cpu_kernel.eval_bn_folds(shortcut_bn, shortcut):
                    shortcut, shortcut_bn = shortcut_bn(shortcut), None
            return cpu_kernel.bn_then_cbam_infer(getattr(self, f"bn{self.n_convs}"), self.cbam, h, shortcut, shortcut_bn,
                                                 overwrite=self._last_conv_output_is_private())
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(self.last_bn_then_cbam(h) + shortcut)

    def _tail_in_one_kernel(self, h: torch.Tensor, x: torch.Tensor) -> bool:
        """Whether this block's tail runs as one inference-kernel call (the shortcut ``x``, or the downsample's
        output, has h's shape: ResNet's construction)."""
        if self.cbam is None or x.dtype != h.dtype or (self.downsample is None and x.shape != h.shape):
            return False
        if torch.is_grad_enabled() and (x.requires_grad or any(
                p.requires_grad for p in ([] if self.downsample is None else self.downsample.parameters()))):
            return False
        bn = getattr(self, f"bn{self.n_convs}")
        if compiled.applies(bn, self.cbam, h):
            return compiled.infers(bn, self.cbam, h)
        return cpu_kernel.bn_then_cbam_applies(bn, self.cbam, h)

    def _last_conv_output_is_private(self) -> bool:
        """Whether nothing but this block's tail can read its last conv's output (a plain conv without hooks, so no
        hook holds it): the tail kernel may write the block's output over it. Under torch.compile this only
        decides the op; functionalisation keeps a value anything else reads, and inductor writes in place
        where nothing does."""
        conv = getattr(self, f"conv{self.n_convs}")
        return type(conv) is nn.Conv2d and not has_hooks(conv)

    def last_bn_then_cbam(self, h: torch.Tensor) -> torch.Tensor:
        bn = getattr(self, f"bn{self.n_convs}")
        if self.cbam is None:
            return bn(h)
        if compiled.applies(bn, self.cbam, h):  # torch.compile: the CPU kernels as custom ops
            return compiled.bn_cbam(bn, self.cbam, h)
        if fused_bn.applies(bn, self.cbam, h):  # eager training: the pair saves h only, as the BN alone would
            return fused_bn.bn_cbam_train(bn, self.cbam, h)
        if cpu_kernel.bn_then_cbam_applies(bn, self.cbam, h):  # eager CPU inference: the BN's output stays in cache
            return cpu_kernel.bn_then_cbam_infer(bn, self.cbam, h)
        return self.cbam(bn(h))


class ResNet(nn.Module):
    """ResNet(-CBAM) for NCHW images ``(B, in_channels, H, W)`` in the module's dtype -> logits ``(B, classes)``.

    ``init``: "canonical" (PyTorch's default layer init, drawn from one seeded NumPy generator) or
    "official" (Jongchan/attention-module's ResNet init); see `ResNetSpec.param_inits`.
    """

    def __init__(self, spec: ResNetSpec | None = None, *, dtype: torch.dtype = torch.float32, seed: int = 0, init: str = "canonical"):
        super().__init__()
        spec = ResNetSpec() if spec is None else spec
        if not isinstance(spec, ResNetSpec):
            raise TypeError(f"spec must be a ResNetSpec, got {type(spec).__name__}")
        self.spec = spec
        stride = 2 if spec.stem == "imagenet" else 1
        k = 7 if spec.stem == "imagenet" else 3
        self.conv1 = _conv(spec.in_channels, spec.width, k, stride, dtype)
        self.bn1 = _bn(spec.width, spec, dtype)
        stages: dict[str, list] = {}
        for block in spec.blocks():
            stages.setdefault(block.name.split(".")[0], []).append(ResidualBlock(spec, block, dtype))
        for name, blocks in stages.items():
            setattr(self, name, nn.Sequential(*blocks))
        self.fc = skip_init(nn.Linear, spec.features, spec.num_classes, dtype=dtype)
        import_model_weights(self, init_weights(spec, seed, np.float64, scheme=init))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The layer4 feature map (B, features, H', W')."""
        self.spec.check_input(tuple(x.shape), str(x.dtype), "NCHW")
        if x.dtype != self.fc.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise InputError(f"input is {x.dtype} but ResNet parameters are {self.fc.weight.dtype}: cast the input")
        h = F.relu(self.bn1(self.conv1(x)))
        if self.spec.stem == "imagenet":
            h = F.max_pool2d(h, 3, 2, 1)
        return self.layer4(self.layer3(self.layer2(self.layer1(h))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x).mean(dim=(2, 3)))

    def layouts(self) -> dict[str, Layout]:
        """This network's canonical <-> torch table (used by `cbam_multi.torch.models.export_model_weights` etc.)."""
        return model_layouts(self.spec)


# ------------------------------------------------------------------ canonical weights
def _vector(a):
    return a


def model_layouts(spec: ResNetSpec) -> dict[str, Layout]:
    """Canonical name -> `Layout` (state_dict key of `ResNet`, transforms, trainable), in spec order."""
    out: dict[str, Layout] = {}
    kinds = spec.param_kinds()
    for name, (key, kind) in resnet_backbone_keys(spec).items():
        out[name] = Layout(
            name, key, lambda a, k=kind: to_torch_layout(a, k), lambda a, k=kind: to_canonical_layout(a, k), kinds[name] == "param"
        )
    for prefix, cspec in spec.cbam_blocks().items():
        for name, lay in torch_layouts(cspec).items():
            c = f"{prefix}.{name}"
            out[c] = Layout(c, f"{prefix}.{lay.torch_name}", lay.to_torch, lay.to_canonical, lay.trainable)
    return {name: out[name] for name in spec.param_shapes()}

