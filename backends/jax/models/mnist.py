"""The MNIST classifier (`cbam_multi.models.MNISTNetSpec`) as a Flax NNX module, NHWC, with this backend's CBAM.

Every variable sits at the path of its canonical name (``model.block0.conv0.kernel`` is
``"block0.conv0.kernel"``, ``model.block1.cbam.channel.fc1.kernel`` is ``"block1.cbam.channel.fc1.kernel"``),
so canonical weights need no transposes: conv kernels are HWIO and the NHWC flatten before
``head.fc1`` is the canonical row order. Values start from `cbam_multi.weights.init_weights(spec, seed)`,
identical to `cbam_multi.torch.models.mnist.MNISTNet(spec, seed=seed)`.

Train/eval: ``model.train()`` / ``model.eval()`` (only matters for CBAM specs with BatchNorm, whose
running statistics are ``nnx.BatchStat`` and update in train mode).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cbam_multi.errors import InputError, expect_instance
from cbam_multi.models import MNISTNetSpec
from cbam_multi.weights import init_weights

from ..modules import CBAM
from .common import import_model_weights

__all__ = [
    "MNISTNet",
    "max_pool_2x2",
    "attention_maps",
]


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2, NHWC, whose gradient goes to the FIRST maximum of each window in row-major
    order - torch's ``F.max_pool2d`` rule. (Ties are common on MNIST: ReLU zeros and flat background.)

    Also much faster on XLA:CPU than ``nnx.max_pool``'s reduce_window, whose select-and-scatter gradient
    dominated the whole train step (measured ~64 ms of ~117 ms per batch of 128).
    """
    return _windows(x).max(axis=-1)


def _windows(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, H/2, W/2, C, 4): each 2x2 window's elements in row-major (dy, dx) order."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, h // 2, w // 2, c, 4)


def _max_pool_fwd(x):
    win = _windows(x)
    first = jnp.argmax(win, axis=-1)  # first occurrence of the maximum
    # the max itself by a plain reduce: picking it with take_along_axis(win, first) is a gather, ~1.7 ms of
    # a ~35 ms MNIST step on XLA:CPU
    return win.max(axis=-1), (first, x.shape)


def _max_pool_bwd(res, g):
    first, (b, h, w, c) = res
    onehot = first[..., None] == jnp.arange(4)
    dwin = jnp.where(onehot, g[..., None], jnp.zeros((), g.dtype))  # (B, H/2, W/2, C, 4)
    dx = dwin.reshape(b, h // 2, w // 2, c, 2, 2).transpose(0, 1, 4, 2, 5, 3).reshape(b, h, w, c)
    return (dx,)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


class _Block(nnx.Module):
    """Container: ``conv0 .. conv{n-1}`` (nnx.Conv) and, unless the spec disables it, ``cbam``."""


class _Head(nnx.Module):
    """Container: ``fc1``, ``fc2`` (nnx.Linear)."""


class MNISTNet(nnx.Module):
    """Per block: convs_per_block x (k x k 'same' conv + ReLU), CBAM, 2x2 max-pool; then dense+ReLU, dense.

    NHWC input ``(B, 28, 28, 1)`` -> logits ``(B, num_classes)``; computes in ``dtype``. Parameters are
    stored in ``param_dtype`` (default: ``dtype``); ``dtype=bfloat16, param_dtype=float32`` is mixed
    precision: float32 master weights cast to bf16 inside the forward pass (Flax's ``dtype``/``param_dtype``).
    """

    def __init__(
        self, spec: MNISTNetSpec | None = None, *, dtype=jnp.float32, seed: int = 0, use_running_average: bool = False,
        param_dtype=None,
    ):
        spec = MNISTNetSpec() if spec is None else spec
        if not isinstance(spec, MNISTNetSpec):
            raise TypeError(f"spec must be a MNISTNetSpec, got {type(spec).__name__}")
        self.spec = spec
        self.dtype = jnp.dtype(dtype)
        param_dtype = self.dtype if param_dtype is None else jnp.dtype(param_dtype)
        # The flax initializers draw throw-away values; import_model_weights below sets the canonical ones.
        # (Default initializers keep the graphdef identical between instances, so jitted steps are reused.)
        rngs = nnx.Rngs(0)
        k, p = spec.kernel, spec.kernel // 2
        for i in range(len(spec.conv_channels)):
            setattr(self, f"block{i}", _Block())
        for i, j, c_in, c_out in spec.conv_layers():
            conv = nnx.Conv(c_in, c_out, (k, k), padding=((p, p), (p, p)), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            setattr(getattr(self, f"block{i}"), f"conv{j}", conv)
        if spec.cbam:
            for i in range(len(spec.conv_channels)):
                getattr(self, f"block{i}").cbam = CBAM(
                    spec.cbam_spec(i), dtype=self.dtype, param_dtype=param_dtype, seed=seed,
                    use_running_average=use_running_average,
                )
        self.head = _Head()
        self.head.fc1 = nnx.Linear(spec.flat_features, spec.dense, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.head.fc2 = nnx.Linear(spec.dense, spec.num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        import_model_weights(self, init_weights(spec, seed, np.float64))

    def __call__(self, x: jax.Array) -> jax.Array:
        spec = self.spec
        spec.check_input(x.shape, str(x.dtype), "NHWC")
        if x.dtype != self.dtype:
            raise InputError(f"input is {x.dtype} but MNISTNet computes in {self.dtype}: cast the input")
        h = x
        for i in range(len(spec.conv_channels)):
            block = getattr(self, f"block{i}")
            for j in range(spec.convs_per_block):
                h = jax.nn.relu(getattr(block, f"conv{j}")(h))
            if spec.cbam:
                h = block.cbam(h)
            h = max_pool_2x2(h) if spec.pool_tie_rule == "first" else _windows(h).max(axis=-1)  # "split": jnp.max
        h = jax.nn.relu(self.head.fc1(h.reshape(h.shape[0], -1)))  # NHWC flatten = canonical row order
        return self.head.fc2(h)



class _RecordInput(nnx.Module):
    """Stands in for a CBAM block during `attention_maps`: hands its input to ``record``, then runs it."""

    def __init__(self, inner: CBAM, record):
        self.inner, self.record = inner, record

    def __call__(self, h: jax.Array) -> jax.Array:
        self.record(self.inner, h)
        return self.inner(h)


def attention_maps(model: MNISTNet, x: jax.Array) -> list[jax.Array]:
    """The spatial-attention map (B, H, W) of every CBAM block for NHWC images ``x``, in eval mode.

    Runs the model once (eagerly) with each CBAM block wrapped to record its input (mirrors the torch
    `attention_maps`), then evaluates that block's gates on it with the pure functions.
    """
    from .. import functional as F
    from ..weights import export_weights as export_block

    spec = expect_instance(model, MNISTNet, "a cbam_multi.jax MNISTNet").spec
    if not spec.cbam:
        raise InputError("this MNISTNet has no CBAM blocks (cbam=False): no attention maps")
    model.eval()
    inputs: list = []
    blocks = [getattr(model, f"block{i}") for i in range(len(spec.conv_channels))]
    originals = [b.cbam for b in blocks]
    for b in blocks:
        b.cbam = _RecordInput(b.cbam, lambda m, h: inputs.append((m, h)))
    try:
        model(x)
    finally:
        for b, original in zip(blocks, originals):
            b.cbam = original
    maps = []
    for m, h in inputs:
        gate, _ = F.spatial_gate(export_block(m.spatial), m.channel(h), m.spec)
        maps.append(gate[..., 0])
    return maps
