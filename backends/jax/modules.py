"""Flax NNX modules for CBAM (NHWC). Thin stateful wrappers over `cbam_multi.jax.functional`.

Parameters start from the canonical seeded weights (`cbam_multi.weights.init_weights`), so a torch
and a JAX module built from the same spec and seed are identical; no ``rngs`` argument is needed.

State layout: every leaf sits at the path of its canonical name, e.g. ``CBAM.channel.fc1.kernel`` is
``nnx.state(model)["channel"]["fc1"]["kernel"]`` and ``"channel.fc1.kernel"`` in canonical weights.
Trainable tensors are ``nnx.Param``; the BatchNorm running statistics are ``nnx.BatchStat`` (kept in
at least float32) and are updated in place when the module is in train mode.

Dtypes follow Flax (``nnx.Linear``): parameters are stored in ``param_dtype`` (default float32; BN running
statistics in at least float32) and the block computes in ``dtype``, or with ``dtype=None`` (the default)
in the promoted dtype of the input and the parameters: a float64 input is computed in float64, never
rounded to float32. ``dtype=jnp.bfloat16`` with float32 parameters is mixed precision.

BatchNorm mode: ``SpatialAttention.use_running_average`` (False = train, the default, like a fresh
``torch.nn.Module`` and ``nnx.BatchNorm``), toggled by ``model.train()`` / ``model.eval()`` or
``nnx.view(model, use_running_average=...)``. Momentum is PyTorch's ``spec.norm_momentum`` (weight of
the new statistic); Flax's ``nnx.BatchNorm`` convention would be ``spec.flax_momentum`` = 1 - m.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cbam_multi.spec import CBAMSpec, require_spec

from . import functional as F

__all__ = ["ChannelAttention", "SpatialAttention", "CBAM"]


class _Layer(nnx.Module):
    """A named group of variables (``fc1``, ``conv``, ``bn``...): holds leaves, computes nothing."""


def _build(module: nnx.Module, spec: CBAMSpec, part: str, dtype, seed: int) -> None:
    """Create the Param/BatchStat leaves of ``part`` on ``module`` at their canonical sub-paths."""
    require_spec(spec)
    kinds = spec.param_kinds()
    for name, value in F.init_params(spec, seed, dtype, part=part).items():
        _, layer, leaf = name.split(".")
        if not hasattr(module, layer):
            setattr(module, layer, _Layer())
        var = nnx.BatchStat(value) if kinds[name] == "stat" else nnx.Param(value)
        setattr(getattr(module, layer), leaf, var)


def variables_of(module: nnx.Module) -> dict[str, nnx.Variable]:
    """Canonical name -> the module's Variable object (its own part only for a gate module)."""
    out = {}
    for part, sub in _parts(module):
        for name in module.spec.param_shapes(part):
            _, layer, leaf = name.split(".")
            out[name] = getattr(getattr(sub, layer), leaf)
    return out


def _parts(module: nnx.Module):
    if isinstance(module, CBAM):
        parts = (("channel", module.channel), ("spatial", module.spatial))
        return tuple((p, m) for p, m in parts if m is not None)
    if isinstance(module, (ChannelAttention, SpatialAttention)):
        return ((module._PART, module),)
    raise TypeError(f"expected a cbam_multi.jax CBAM/ChannelAttention/SpatialAttention, got {type(module).__name__}")


def _values(module: nnx.Module) -> dict[str, jax.Array]:
    return {n: v[...] for n, v in variables_of(module).items()}


class ChannelAttention(nnx.Module):
    """CBAM channel gate. Leaves: ``fc1.kernel`` (C, hidden), ``fc1.bias``, ``fc2.kernel``, ``fc2.bias``."""

    _PART = "channel"  # its part of the canonical weights; the torch modules' attribute name too

    def __init__(self, spec: CBAMSpec, *, dtype=None, param_dtype=jnp.float32, seed: int = 0):
        self.spec = spec
        self.dtype, self.param_dtype = dtype, param_dtype
        _build(self, spec, self._PART, param_dtype, seed)

    def __call__(self, x: jax.Array) -> jax.Array:
        values = _values(self)
        return F.channel_attention(values, F.promote_input(x, values, self.dtype), self.spec)


class SpatialAttention(nnx.Module):
    """CBAM spatial gate. Leaves: ``conv.kernel`` (k, k, 2, 1) HWIO, ``conv.bias``, and with BatchNorm
    ``bn.scale``/``bn.bias`` (Param) and ``bn.mean``/``bn.var`` (BatchStat)."""

    _PART = "spatial"

    def __init__(
        self, spec: CBAMSpec, *, dtype=None, param_dtype=jnp.float32, seed: int = 0, use_running_average: bool = False
    ):
        if require_spec(spec).no_spatial:
            raise ValueError("spec has no_spatial=True: it has no spatial gate to build")
        self.spec = spec
        self.dtype, self.param_dtype = dtype, param_dtype
        self.use_running_average = use_running_average
        _build(self, spec, self._PART, param_dtype, seed)

    def set_view(self, use_running_average: bool | None = None):
        """Used by ``nnx.view(model, use_running_average=...)``."""
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def _update_stats(self, stats) -> None:
        for name, value in stats.items():
            getattr(self.bn, name.rsplit(".", 1)[1])[...] = value

    def __call__(self, x: jax.Array) -> jax.Array:
        values = _values(self)
        x = F.promote_input(x, values, self.dtype)
        y, stats = F.spatial_attention(values, x, self.spec, train=not self.use_running_average)
        self._update_stats(stats)
        return y


class CBAM(nnx.Module):
    """CBAM block (channel gate, then spatial gate) on NHWC input; submodules ``.channel``, ``.spatial``
    (``.spatial`` is None for a ``no_spatial`` spec)."""

    _PART = None

    def __init__(
        self, spec: CBAMSpec, *, dtype=None, param_dtype=jnp.float32, seed: int = 0, use_running_average: bool = False
    ):
        self.spec = spec
        self.dtype, self.param_dtype = dtype, param_dtype
        self.use_running_average = use_running_average  # kept here too: a no_spatial block has no .spatial
        self.channel = ChannelAttention(spec, dtype=dtype, param_dtype=param_dtype, seed=seed)
        self.spatial = (
            None if spec.no_spatial else SpatialAttention(
                spec, dtype=dtype, param_dtype=param_dtype, seed=seed, use_running_average=use_running_average
            )
        )

    def set_view(self, use_running_average: bool | None = None):
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def __call__(self, x: jax.Array) -> jax.Array:
        values = _values(self)
        train = not (self.use_running_average if self.spatial is None else self.spatial.use_running_average)
        y, stats = F.cbam(values, F.promote_input(x, values, self.dtype), self.spec, train=train)
        if self.spatial is not None:
            self.spatial._update_stats(stats)
        return y
