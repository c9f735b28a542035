"""CBAM as torch modules (NCHW), built from a `CBAMSpec`.

Parameters are torch-native (``nn.Linear``/``nn.Conv2d``/``nn.BatchNorm2d``), so the state_dict
reads like ordinary torch (``channel.fc1.weight``, ``spatial.conv.weight``, ``spatial.bn.running_mean``, ...).
Initial values are the spec's canonical seeded weights (`cbam_multi.weights.init_weights`), so the
torch and JAX backends start from identical numbers for the same seed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import skip_init

from cbam_multi.errors import InputError
from cbam_multi.spec import CBAMSpec
from cbam_multi.weights import init_weights

from . import compiled, cpu_kernel, fused
from . import functional as CF
from .guards import functorch_wrapped, has_hooks
from .weights import import_weights

__all__ = ["ChannelAttention", "SpatialAttention", "CBAM"]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_input(spec: CBAMSpec, x: torch.Tensor, param: torch.Tensor, train_bn: bool) -> None:
    """Shape/dtype checks only: static under torch.compile, where they run once at trace time."""
    spec.check_input(tuple(x.shape), str(x.dtype), "NCHW")
    if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
        raise InputError(
            f"input is {_dtype_name(x.dtype)} but module parameters are {_dtype_name(param.dtype)}: "
            f"cast the input or call module.to({x.dtype})"
        )
    if train_bn and x.shape[0] * x.shape[2] * x.shape[3] < 2:
        raise InputError(
            f"BatchNorm in train mode needs more than 1 value per channel (B*H*W >= 2), got input shape "
            f"{tuple(x.shape)}; use a larger batch or call module.eval()"
        )


class _Gate(nn.Module):
    """Shared input validation. Eager mode remembers the (shape, dtype, device, train) keys that passed
    (cleared whenever ``.to()``/``.double()``/... changes the parameters), so repeated shapes cost a
    set lookup instead of ~3 us of Python; compiled code runs the checks at trace time, for free."""

    _PART: str | None = None
    _CACHE_SIZE = 16

    def _first_param(self) -> torch.Tensor:
        raise NotImplementedError

    def _validate(self, x: torch.Tensor, train_bn: bool = False) -> None:
        if torch.compiler.is_compiling():
            _check_input(self.spec, x, self._first_param(), train_bn)
            return
        key = (x.shape, x.dtype, x.device.type, train_bn)
        if key in self._checked:
            return
        param = self._first_param()
        _check_input(self.spec, x, param, train_bn)
        if x.dtype == param.dtype:  # a mismatch allowed under autocast is re-checked every call
            if len(self._checked) >= self._CACHE_SIZE:
                self._checked.clear()
            self._checked.add(key)

    def _apply(self, fn, *args, **kwargs):
        self._checked.clear()
        return super()._apply(fn, *args, **kwargs)


def _may_overwrite(y, spatial: nn.Module) -> bool:
    """True when CBAM.forward may apply the spatial gate to its intermediate ``y`` in place: eager mode,
    a plain tensor that autograd does not track (no_grad / inference_mode / frozen weights), no functorch
    transform, and no hooks that could observe the spatial module's input."""
    return (
        type(y) is torch.Tensor
        and not torch.compiler.is_compiling()
        and not y.requires_grad
        and not functorch_wrapped(y)
        and not has_hooks(spatial)
    )


def _unroll_conv(conv: nn.Module, maps: torch.Tensor) -> bool:
    """Whether to let torch.compile see the spatial conv as shifted multiply-adds (`CF.spatial_conv`):
    when compiling, outside autocast (which runs convolutions in low precision) and with no hooks on
    the conv module that a functional call would skip. Evaluated at trace time only."""
    return (
        torch.compiler.is_compiling()
        and not torch.is_autocast_enabled(maps.device.type)
        and not has_hooks(conv)
    )


def _check_spec(spec) -> None:
    if not isinstance(spec, CBAMSpec):
        raise TypeError(f"spec must be a CBAMSpec, got {type(spec).__name__}")


def _init_part(spec: CBAMSpec, seed: int, part: str) -> dict:
    """The ``part`` slice of the canonical seeded draw for the whole block (drawn in spec order)."""
    weights = init_weights(spec, seed)
    return {name: weights[name] for name in spec.param_shapes(part)}


def _dense(spec: CBAMSpec, n_in: int, n_out: int, dtype: torch.dtype) -> nn.Module:
    # skip_init: no default init drawn (and no global torch RNG consumed); values come from the spec
    if spec.mlp_kind == "linear":
        return skip_init(nn.Linear, n_in, n_out, bias=spec.mlp_bias, dtype=dtype)
    return skip_init(nn.Conv2d, n_in, n_out, 1, bias=spec.mlp_bias, dtype=dtype)


class ChannelAttention(_Gate):
    """Channel gate: ``x * gate(sum_p MLP(pool_p(x)))`` with ONE MLP shared by the pools.

    The pools are stacked into one (P*B, C) batch so the MLP runs once.
    """

    _PART = "channel"

    def __init__(self, spec: CBAMSpec, *, dtype: torch.dtype = torch.float32, seed: int = 0):
        super().__init__()
        _check_spec(spec)
        self.spec = spec
        self._checked: set = set()
        self.fc1 = _dense(spec, spec.channels, spec.hidden, dtype)
        self.fc2 = _dense(spec, spec.hidden, spec.channels, dtype)
        import_weights(self, _init_part(spec, seed, self._PART))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._validate(x)
        fc1, fc2 = self.fc1, self.fc2
        spec = self.spec
        return CF.channel_attention(
            x, spec.channel_pools, fc1.weight, fc1.bias, fc2.weight, fc2.bias, spec.gate,
            tie_rule=spec.tie_rule, act=spec.mlp_act, light=spec.variant == "light",
        )

    def _first_param(self) -> torch.Tensor:
        return self.fc1.weight

    def extra_repr(self) -> str:
        s = self.spec
        return f"pools={list(s.channel_pools)}, gate={s.gate!r}, act={s.mlp_act!r}, tie_rule={s.tie_rule!r}" + (
            ", variant='light'" if s.variant == "light" else ""
        )


class SpatialAttention(_Gate):
    """Spatial gate: ``x * gate(BN?(conv([mean_c(x), max_c(x)] in spec.concat_order)))``; light variant:
    ``x * gate(BN?(conv(0.5 * mean_c(x) + 0.5 * max_c(x))))``."""

    _PART = "spatial"

    def __init__(self, spec: CBAMSpec, *, dtype: torch.dtype = torch.float32, seed: int = 0):
        super().__init__()
        _check_spec(spec)
        if spec.no_spatial:
            raise ValueError("spec has no_spatial=True: it has no spatial gate to build")
        self.spec = spec
        self._checked: set = set()
        k = spec.spatial_kernel
        self.conv = skip_init(nn.Conv2d, spec.spatial_inputs, 1, k, padding=k // 2, bias=spec.spatial_bias, dtype=dtype)
        # BatchNorm2d's convention (momentum = weight of the new batch statistic) IS the spec's
        self._has_bn = spec.has_norm
        self.bn = (
            nn.BatchNorm2d(1, eps=spec.norm_eps, momentum=spec.norm_momentum, dtype=dtype) if spec.has_norm else None
        )
        import_weights(self, _init_part(spec, seed, self._PART))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._validate(x, train_bn=self._has_bn and self.training)
        return self._gate_input(x, overwrite=False)

    def gate_map(self, x: torch.Tensor) -> torch.Tensor:
        """The spatial attention map (B, 1, H, W) that `forward` multiplies into ``x`` (unchecked input)."""
        spec = self.spec
        maps = CF.spatial_maps(x, spec.concat_order, spec.tie_rule, light=spec.variant == "light")
        if _unroll_conv(self.conv, maps):
            z = CF.spatial_conv(maps, self.conv.weight, self.conv.bias, unrolled=True)
        else:
            z = self.conv(maps)
        if self._has_bn:
            z = self.bn(z)
        return CF.apply_gate(z, self.spec.gate)

    def _gate_input(self, x: torch.Tensor, overwrite: bool) -> torch.Tensor:
        """``x * gate(...)``; with ``overwrite`` the product is written into ``x`` itself (the caller
        owns ``x`` and autograd does not need it), saving a full-size allocation and write."""
        s = self.gate_map(x)
        if overwrite and s.dtype == x.dtype:  # same dtype: x.mul_(s) == x * s exactly
            return x.mul_(s)
        return x * s

    def _first_param(self) -> torch.Tensor:
        return self.conv.weight

    def extra_repr(self) -> str:
        s = self.spec
        maps = "0.5*(mean+max)" if s.variant == "light" else list(s.concat_order)
        return f"maps={maps}, gate={s.gate!r}, tie_rule={s.tie_rule!r}"


class CBAM(_Gate):
    """Convolutional Block Attention Module (Woo et al. 2018): channel gate, then spatial gate. NCHW."""

    _PART = None

    def __init__(self, spec: CBAMSpec, *, dtype: torch.dtype = torch.float32, seed: int = 0):
        super().__init__()
        _check_spec(spec)
        self.spec = spec
        self._checked: set = set()
        self.channel = ChannelAttention(spec, dtype=dtype, seed=seed)
        # each part takes its slice of the same canonical draw, so CBAM(spec, seed=s) holds init_weights(spec, s)
        # no_spatial (the official CBAM(..., no_spatial=True)): the channel gate alone, no `spatial` submodule
        self.spatial = None if spec.no_spatial else SpatialAttention(spec, dtype=dtype, seed=seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spatial is None:
            return self.channel(x)
        if compiled.applies(None, self, x):  # torch.compile: the CPU kernels as custom ops
            self.channel._validate(x)
            self.spatial._validate(x, train_bn=self.spatial._has_bn and self.spatial.training)
            return compiled.bn_cbam(None, self, x)
        if cpu_kernel.applies(self, x):  # CPU inference: the whole block in one fused kernel
            self.channel._validate(x)
            return cpu_kernel.cbam_infer(self, x)
        if fused.applies(self, x):  # eager autograd: one Function that saves no full-size intermediate
            self.channel._validate(x)
            self.spatial._validate(x, train_bn=self.spatial._has_bn and self.spatial.training)
            return fused.cbam_train(self, x)
        # the input checks run at the top of self.channel's forward (and self.spatial's)
        y = self.channel(x)
        if _may_overwrite(y, self.spatial):
            # Eager inference: the channel-gated tensor is a temporary nobody else holds, so the spatial
            # gate multiplies into it in place. One full-size buffer per call instead of two: less memory
            # traffic, and no glibc heap trim + page faults on every call (see benchmarks/RESULTS.md).
            self.spatial._validate(y, train_bn=self.spatial._has_bn and self.spatial.training)
            return self.spatial._gate_input(y, overwrite=True)
        return self.spatial(y)

    def _first_param(self) -> torch.Tensor:
        return self.channel.fc1.weight
