"""Flax linen modules for CBAM (NHWC), over the same pure functions as the NNX modules.

Variables: ``{"params": {"channel": {"fc1": {"kernel", "bias"}, "fc2": {...}}, "spatial": {"conv": {...},
"bn": {"scale", "bias"}}}, "batch_stats": {"spatial": {"bn": {"mean", "var"}}}}`` - joining the keys
with "." gives the canonical names. The initializers ignore the PRNG key and return the canonical
seeded weights, so ``model.init(key, x) == init_variables(spec, seed)``.

Dtypes follow Flax: ``param_dtype`` (default float32) for the initial parameters, ``dtype`` for the
computation, or with ``dtype=None`` (default) the promoted dtype of the input and the parameters passed
to ``apply`` (as ``nn.Dense`` promotes): a float64 input with float64 variables computes in float64.

Train mode: ``model.apply(variables, x, train=True, mutable=["batch_stats"])`` returns
``(y, {"batch_stats": ...})``. BatchNorm momentum is PyTorch's ``spec.norm_momentum`` (weight of the
new statistic); in Flax's ``nn.BatchNorm(momentum=...)`` convention it would be ``spec.flax_momentum``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cbam_multi.spec import CBAMSpec, require_spec

from . import functional as F
from .weights import export_variables, import_variables, init_variables

__all__ = ["ChannelAttention", "SpatialAttention", "CBAM", "init_variables", "export_variables", "import_variables"]


class _Layer(nn.Module):
    """Declares the variables of one canonical layer (``prefix`` e.g. "spatial.bn") and returns their
    values by canonical name; with ``update`` (canonical name -> new value) it writes running stats."""

    spec: CBAMSpec
    seed: int
    param_dtype: Any
    prefix: str

    @nn.compact
    def __call__(self, update: Mapping[str, jax.Array] | None = None) -> dict[str, jax.Array]:
        kinds = self.spec.param_kinds()
        part = self.prefix.split(".")[0]
        names = [n for n in self.spec.param_shapes(part) if n.rsplit(".", 1)[0] == self.prefix]
        values, stats = {}, {}
        for name in names:
            leaf = name.rsplit(".", 1)[1]
            init = lambda *_, _n=name: F.init_params(self.spec, self.seed, self.param_dtype, part=part)[_n]
            if kinds[name] == "stat":
                stats[name] = self.variable("batch_stats", leaf, init)
                values[name] = stats[name].value
            else:
                values[name] = self.param(leaf, init)  # the rng is ignored: canonical seeded values
        if update and not self.is_initializing():
            for name, value in update.items():
                stats[name].value = value
        return values


def _layers(spec: CBAMSpec, part: str) -> list[str]:
    seen = []
    for name in spec.param_shapes(part):
        layer = name.rsplit(".", 1)[0]
        if layer not in seen:
            seen.append(layer)
    return seen


class _Module(nn.Module):
    """The fields every linen CBAM module takes, in this positional order, and the spec check of its setup."""

    spec: CBAMSpec
    seed: int = 0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    _PART = None  # its part of the canonical weights (None: all), as on the NNX and torch modules

    def setup(self):
        require_spec(self.spec)


class _Gate(_Module):
    """Common setup: one `_Layer` submodule per canonical layer of ``_PART``."""

    def setup(self):
        super().setup()
        if self._PART == "spatial" and self.spec.no_spatial:
            raise ValueError("spec has no_spatial=True: it has no spatial gate to build")
        # Attribute name = canonical layer name ("fc1", "conv", "bn"), hence the variable paths.
        for layer in _layers(self.spec, self._PART):
            setattr(self, layer.split(".")[1], _Layer(self.spec, self.seed, self.param_dtype, layer))

    def values(self) -> dict[str, jax.Array]:
        out = {}
        for layer in _layers(self.spec, self._PART):
            out.update(getattr(self, layer.split(".")[1])())
        return out


class ChannelAttention(_Gate):
    """CBAM channel gate; ``__call__(x, *, train=False)`` (``train`` is accepted for symmetry)."""

    _PART = "channel"

    def __call__(self, x, *, train: bool = False):
        values = self.values()
        return F.channel_attention(values, F.promote_input(x, values, self.dtype), self.spec)


class SpatialAttention(_Gate):
    """CBAM spatial gate; with BatchNorm and ``train=True`` pass ``mutable=["batch_stats"]``."""

    _PART = "spatial"

    def update_stats(self, stats) -> None:
        if stats:
            self.bn(stats)

    def __call__(self, x, *, train: bool = False):
        values = self.values()
        y, stats = F.spatial_attention(values, F.promote_input(x, values, self.dtype), self.spec, train=train)
        self.update_stats(stats)
        return y


class CBAM(_Module):
    """CBAM block on NHWC input: submodules ``channel`` and ``spatial``, one `F.cbam` call."""

    def setup(self):
        super().setup()
        self.channel = ChannelAttention(self.spec, self.seed, self.dtype, self.param_dtype)
        if not self.spec.no_spatial:
            self.spatial = SpatialAttention(self.spec, self.seed, self.dtype, self.param_dtype)

    def __call__(self, x, *, train: bool = False):
        params = dict(self.channel.values())
        if not self.spec.no_spatial:
            params.update(self.spatial.values())
        y, stats = F.cbam(params, F.promote_input(x, params, self.dtype), self.spec, train=train)
        if not self.spec.no_spatial:
            self.spatial.update_stats(stats)
        return y
