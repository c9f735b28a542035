"""The MNIST classifier (`cbam_multi.models.MNISTNetSpec`) as a torch module, NCHW, with this backend's CBAM.

Parameters start from the canonical seeded weights (`cbam_multi.weights.init_weights(spec, seed)`),
so ``MNISTNet(spec, seed=s)`` here and in `cbam_multi.jax.models.mnist` are the same function.

Canonical <-> torch (`model_layouts`, the one table `cbam_multi.torch.models.common` moves weights with):

* ``block{i}.conv{j}.kernel`` HWIO <-> ``block{i}.conv{j}.weight`` OIHW; biases unchanged;
* ``block{i}.cbam.*`` <-> the CBAM module's own table (`cbam_multi.torch.weights.torch_layouts`);
* ``head.fc1.kernel`` rows are in NHWC flatten order (h, w, c); torch flattens NCHW as (c, h, w), so
  the rows are permuted (and the matrix transposed to nn.Linear's (out, in));
* ``head.fc2.kernel`` (in, out) <-> ``head.fc2.weight`` (out, in).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from cbam_multi.errors import InputError, expect_instance
from cbam_multi.models import MNISTNetSpec
from cbam_multi.weights import init_weights

from ..modules import CBAM
from ..weights import TRANSFORMS, Layout, torch_layouts
from .common import import_model_weights

__all__ = [
    "MNISTNet",
    "model_layouts",
    "fc1_to_torch",
    "fc1_to_canonical",
    "attention_maps",
]


def fc1_to_torch(kernel: np.ndarray, spec: MNISTNetSpec) -> np.ndarray:
    """Canonical head.fc1.kernel (H*W*C rows in NHWC order, out) -> nn.Linear weight (out, C*H*W in NCHW order)."""
    s, c = spec.final_size, spec.conv_channels[-1]
    return kernel.reshape(s, s, c, -1).transpose(3, 2, 0, 1).reshape(kernel.shape[-1], c * s * s)


def fc1_to_canonical(weight: np.ndarray, spec: MNISTNetSpec) -> np.ndarray:
    """Inverse of `fc1_to_torch`."""
    s, c = spec.final_size, spec.conv_channels[-1]
    return weight.reshape(-1, c, s, s).transpose(2, 3, 1, 0).reshape(s * s * c, weight.shape[0])


def model_layouts(spec: MNISTNetSpec) -> dict[str, Layout]:
    """Canonical name -> `Layout` (torch state_dict name, transforms, trainable) for every model tensor."""
    kinds = spec.param_kinds()
    out: dict[str, Layout] = {}
    for i, j, _, _ in spec.conv_layers():
        p = f"block{i}.conv{j}"
        out[f"{p}.kernel"] = Layout(f"{p}.kernel", f"{p}.weight", *TRANSFORMS["conv"], True)
        out[f"{p}.bias"] = Layout(f"{p}.bias", f"{p}.bias", *TRANSFORMS["vector"], True)
        if spec.cbam and j == spec.convs_per_block - 1:
            for name, lay in torch_layouts(spec.cbam_spec(i)).items():
                c = f"block{i}.cbam.{name}"
                out[c] = Layout(c, f"block{i}.cbam.{lay.torch_name}", lay.to_torch, lay.to_canonical, lay.trainable)
    out["head.fc1.kernel"] = Layout(
        "head.fc1.kernel", "head.fc1.weight", lambda k: fc1_to_torch(k, spec), lambda w: fc1_to_canonical(w, spec), True
    )
    out["head.fc1.bias"] = Layout("head.fc1.bias", "head.fc1.bias", *TRANSFORMS["vector"], True)
    out["head.fc2.kernel"] = Layout("head.fc2.kernel", "head.fc2.weight", *TRANSFORMS["dense:linear"], True)
    out["head.fc2.bias"] = Layout("head.fc2.bias", "head.fc2.bias", *TRANSFORMS["vector"], True)
    assert list(out) == list(spec.param_shapes()) and all(
        (kinds[n] == "param") == lay.trainable for n, lay in out.items()
    ), "model_layouts out of sync with MNISTNetSpec.param_shapes"
    return out


class _Block(nn.Module):
    """Container: ``conv0 .. conv{n-1}`` and, unless the spec disables it, ``cbam``."""


class _Head(nn.Module):
    """Container: ``fc1``, ``fc2``."""


class MNISTNet(nn.Module):
    """Per block: convs_per_block x (k x k 'same' conv + ReLU), CBAM, 2x2 max-pool; then dense+ReLU, dense.

    NCHW input ``(B, 1, 28, 28)`` in the module's dtype -> logits ``(B, num_classes)``.
    """

    def __init__(self, spec: MNISTNetSpec | None = None, *, dtype: torch.dtype = torch.float32, seed: int = 0):
        super().__init__()
        spec = MNISTNetSpec() if spec is None else spec
        if not isinstance(spec, MNISTNetSpec):
            raise TypeError(f"spec must be a MNISTNetSpec, got {type(spec).__name__}")
        self.spec = spec
        k = spec.kernel
        for i in range(len(spec.conv_channels)):
            setattr(self, f"block{i}", _Block())
        for i, j, c_in, c_out in spec.conv_layers():
            conv = skip_init(nn.Conv2d, c_in, c_out, k, padding=k // 2, dtype=dtype)
            setattr(getattr(self, f"block{i}"), f"conv{j}", conv)
        if spec.cbam:
            for i in range(len(spec.conv_channels)):
                getattr(self, f"block{i}").cbam = CBAM(spec.cbam_spec(i), dtype=dtype, seed=seed)
        self.head = _Head()
        self.head.fc1 = skip_init(nn.Linear, spec.flat_features, spec.dense, dtype=dtype)
        self.head.fc2 = skip_init(nn.Linear, spec.dense, spec.num_classes, dtype=dtype)
        # one draw for the whole model (the CBAM blocks' own init above is overwritten by their slice)
        import_model_weights(self, init_weights(spec, seed, np.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.spec.check_input(tuple(x.shape), str(x.dtype), "NCHW")
        param = self.head.fc1.weight
        if x.dtype != param.dtype:
            raise InputError(f"input is {x.dtype} but MNISTNet parameters are {param.dtype}: cast the input")
        h = x
        for i in range(len(self.spec.conv_channels)):
            block = getattr(self, f"block{i}")
            for j in range(self.spec.convs_per_block):
                h = F.relu(getattr(block, f"conv{j}")(h))
            if self.spec.cbam:
                h = block.cbam(h)
            h = _max_pool_2x2(h, self.spec.pool_tie_rule)
        h = F.relu(self.head.fc1(h.flatten(1)))
        return self.head.fc2(h)

    def layouts(self) -> dict[str, Layout]:
        """This network's canonical <-> torch table (used by `cbam_multi.torch.models.export_model_weights` etc.)."""
        return model_layouts(self.spec)


def _max_pool_2x2(h: torch.Tensor, tie_rule: str) -> torch.Tensor:
    """2x2 max-pool, stride 2: ``F.max_pool2d`` ("first": a tie's gradient to the first in row-major
    order), or with "split" the windows' amax (a tie's gradient shared)."""
    if tie_rule == "first":
        return F.max_pool2d(h, 2)
    return h.unflatten(3, (h.shape[3] // 2, 2)).unflatten(2, (h.shape[2] // 2, 2)).amax((3, 5))



@torch.no_grad()
def attention_maps(model: MNISTNet, x: torch.Tensor) -> list[torch.Tensor]:
    """The spatial-attention map (B, H, W) of every CBAM block for NCHW images ``x``, in eval mode.

    Runs the model once with a forward hook recording each CBAM block's input (mirrors the JAX
    `attention_maps`), then evaluates that block's gates on it.
    """
    spec = expect_instance(model, MNISTNet, "a cbam_multi.torch MNISTNet").spec
    if not spec.cbam:
        raise InputError("this MNISTNet has no CBAM blocks (cbam=False): no attention maps")
    model.eval()
    inputs: list[tuple[nn.Module, torch.Tensor]] = []
    blocks = [getattr(model, f"block{i}").cbam for i in range(len(spec.conv_channels))]
    hooks = [b.register_forward_pre_hook(lambda m, args: inputs.append((m, args[0].clone()))) for b in blocks]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return [m.spatial.gate_map(m.channel(h))[:, 0] for m, h in inputs]
