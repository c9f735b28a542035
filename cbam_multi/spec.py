"""CBAMSpec: every detail on which CBAM implementations disagree, as plain, frozen data.

Imports neither torch nor jax. Everything derived from the fields (hidden width, canonical
parameter names, shapes, layouts, input checks) is computed here, in one place, so the NumPy
reference and every backend agree by construction.

Canonical parameter layouts (framework-neutral, what `cbam_multi.weights` stores):

=========================  ================  ==========================================
name                       shape             layout / meaning
=========================  ================  ==========================================
channel.fc1.kernel         (C, hidden)       dense, (in, out): h = pooled @ kernel
channel.fc1.bias           (hidden,)         only if ``mlp_bias``
channel.fc2.kernel         (hidden, C)       dense, (in, out)
channel.fc2.bias           (C,)              only if ``mlp_bias``
spatial.conv.kernel        (k, k, I, 1)      HWIO cross-correlation kernel. Standard variant:
                                             I = 2, input channel i is ``concat_order[i]``
                                             ("mean" or "max"); light variant: I = 1, the one
                                             map 0.5 * (mean + max)
spatial.conv.bias          (1,)              only if ``spatial_bias``
spatial.bn.scale/bias      (1,)              only if ``spatial_norm == "batchnorm"``
spatial.bn.mean/var        (1,)              running statistics (not trained by gradient)
=========================  ================  ==========================================

With ``no_spatial`` there is no spatial gate and no ``spatial.*`` parameter (the official
``CBAM(..., no_spatial=True)``).

Tie rule (``tie_rule``): where a max pool's maximum is attained more than once, "split" shares the
cotangent equally among the tied elements (``torch.amax``, ``jnp.max``: timm, the paper preset);
"first" sends all of it to the tied element of lowest flat index in the reduced axes (row-major
h * W + w for the pool over H, W; lowest channel for the max map), as ``torch.max(x, dim)``,
``F.max_pool2d`` and ``nn.AdaptiveMaxPool2d`` route it on CPU (the official code and the seed blog).
Outputs are identical; only gradients differ.

BatchNorm convention (PyTorch's, used by the reference and converted for Flax):
``running = (1 - momentum) * running + momentum * batch_stat``, the running variance is
updated with the *unbiased* batch variance, normalisation uses the *biased* one.
Flax's own ``BatchNorm(momentum=...)`` weighs the *old* value, i.e. ``flax_momentum = 1 - momentum``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from cbam_multi.errors import InputError, SpecError
from cbam_multi.jsondata import JsonData

POOLS = ("avg", "max", "lp", "lse")
GATES = ("sigmoid", "hard_sigmoid")
HIDDEN_RULES = ("floor", "round")
NORMS = ("none", "batchnorm")
MLP_KINDS = ("linear", "conv1x1")
SPATIAL_MAPS = ("mean", "max")
TIE_RULES = ("split", "first")
VARIANTS = ("standard", "light")
# The shared MLP's activation (timm's ``act_layer``, constructed with inplace=True; ReLU by default).
# leaky_relu has torch's default slope 0.01.
ACTIVATIONS = ("relu", "relu6", "leaky_relu", "silu")
LEAKY_SLOPE = 0.01

# Parameters moved by the optimizer vs. running statistics (state updated in train mode).
TRAINABLE, STATISTIC = "param", "stat"

SPEC_FORMAT_VERSION = 1


@dataclass(frozen=True)
class CBAMSpec(JsonData, json_format="cbam_multi.CBAMSpec", json_version=SPEC_FORMAT_VERSION, json_error=SpecError):
    """One CBAM block, fully specified. Defaults follow the seed blog (r=4, k=3, MLP bias)."""

    channels: int
    reduction: int = 4
    hidden_rule: Literal["floor", "round"] = "floor"
    mlp_bias: bool = True
    mlp_kind: Literal["linear", "conv1x1"] = "linear"  # torch module form only; same maths
    channel_pools: tuple[str, ...] = ("avg", "max")
    spatial_kernel: int = 3
    concat_order: tuple[str, str] = ("mean", "max")
    spatial_bias: bool = True
    spatial_norm: Literal["none", "batchnorm"] = "none"
    norm_momentum: float = 0.1  # PyTorch convention: weight of the new batch statistic
    norm_eps: float = 1e-5
    norm_gamma_init: float = 1.0  # the official code zero-initialises the spatial BN scale
    gate: Literal["sigmoid", "hard_sigmoid"] = "sigmoid"
    # Fields added after format version 1 was fixed: their defaults are the behaviour before they existed,
    # so spec JSON written without them loads unchanged.
    tie_rule: Literal["split", "first"] = "split"  # gradient at tied maxima, see the module docstring
    no_spatial: bool = False  # official CBAM(..., no_spatial=True): the channel gate only
    variant: Literal["standard", "light"] = "standard"  # "light": timm's LightCbamModule
    mlp_act: Literal["relu", "relu6", "leaky_relu", "silu"] = "relu"  # timm's act_layer
    hidden_channels: int | None = None  # explicit hidden width (timm's rd_channels); overrides the rule
    hidden_divisor: int = 1  # timm's rd_divisor: with hidden_rule "round", a multiple of this (>= it)

    def __post_init__(self) -> None:
        check_field_types(self, SpecError)
        # Accept lists (e.g. from JSON) but store tuples so the spec stays hashable.
        object.__setattr__(self, "channel_pools", tuple(self.channel_pools))
        object.__setattr__(self, "concat_order", tuple(self.concat_order))
        self._validate()

    # ----------------------------------------------------------------- presets
    @classmethod
    def seed(cls, channels: int, **overrides) -> CBAMSpec:
        """The blog this project started from: r=4, 3x3 spatial conv, biases, no BN; its max pools
        (``AdaptiveMaxPool2d``, ``torch.max(x, 1)``) route a tied maximum's gradient to the first."""
        return cls(channels, **{"tie_rule": "first", **overrides})

    @classmethod
    def paper(cls, channels: int, **overrides) -> CBAMSpec:
        """Woo et al. 2018 as described: r=16, 7x7 spatial conv, [mean, max]."""
        return cls(channels, **{"reduction": 16, "spatial_kernel": 7, **overrides})

    @classmethod
    def official(cls, channels: int, **overrides) -> CBAMSpec:
        """Jongchan/attention-module: r=16, k=7, [max, mean], conv without bias + BN(momentum 0.01),
        BN scale zero-initialised (as its ResNet init does for SpatialGate); max pools ``F.max_pool2d``
        and ``torch.max(x, 1)`` route a tied maximum's gradient to the first."""
        return cls(
            channels,
            **{
                "tie_rule": "first",
                "reduction": 16,
                "spatial_kernel": 7,
                "concat_order": ("max", "mean"),
                "spatial_bias": False,
                "spatial_norm": "batchnorm",
                "norm_momentum": 0.01,
                "norm_gamma_init": 0.0,
                **overrides,
            },
        )

    @classmethod
    def timm(cls, channels: int, **overrides) -> CBAMSpec:
        """timm ``CbamModule`` defaults: rd_ratio 1/16 rounded (>=1), 1x1-conv MLP without bias,
        k=7, [mean, max], ConvNormAct (conv without bias + BN momentum 0.1)."""
        return cls(
            channels,
            **{
                "reduction": 16,
                "hidden_rule": "round",
                "mlp_bias": False,
                "mlp_kind": "conv1x1",
                "spatial_kernel": 7,
                "spatial_bias": False,
                "spatial_norm": "batchnorm",
                "norm_momentum": 0.1,
                **overrides,
            },
        )

    @classmethod
    def timm_light(cls, channels: int, **overrides) -> CBAMSpec:
        """timm ``LightCbamModule``: as `timm`, but the channel MLP runs once on 0.5 * (avg + max) and
        the spatial gate convolves the one map 0.5 * (mean + max) (a (k, k, 1, 1) kernel)."""
        return cls.timm(channels, **{"variant": "light", **overrides})

    PRESETS = ("seed", "paper", "official", "timm", "timm_light")

    @classmethod
    def preset(cls, name: str, channels: int, **overrides) -> CBAMSpec:
        if name not in cls.PRESETS:
            raise SpecError(f"unknown preset {name!r}; choose one of {cls.PRESETS}")
        return getattr(cls, name)(channels, **overrides)

    # ------------------------------------------------------------ validation
    def _validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise SpecError(msg)

        need(_is_int(self.channels) and self.channels >= 1, f"channels must be an int >= 1, got {self.channels!r}")
        need(_is_int(self.reduction) and self.reduction >= 1, f"reduction must be an int >= 1, got {self.reduction!r}")
        need(self.hidden_rule in HIDDEN_RULES, f"hidden_rule must be one of {HIDDEN_RULES}, got {self.hidden_rule!r}")
        need(self.mlp_kind in MLP_KINDS, f"mlp_kind must be one of {MLP_KINDS}, got {self.mlp_kind!r}")
        need(len(self.channel_pools) >= 1, "channel_pools must name at least one pool")
        need(len(set(self.channel_pools)) == len(self.channel_pools), f"channel_pools repeats a pool: {self.channel_pools}")
        for pool in self.channel_pools:
            need(pool in POOLS, f"unknown channel pool {pool!r}; choose from {POOLS}")
        need(
            _is_int(self.spatial_kernel) and self.spatial_kernel >= 1 and self.spatial_kernel % 2 == 1,
            f"spatial_kernel must be a positive odd int ('same' padding k//2 is only symmetric for odd k), "
            f"got {self.spatial_kernel!r}",
        )
        need(
            sorted(self.concat_order) == sorted(SPATIAL_MAPS),
            f"concat_order must be ('mean', 'max') or ('max', 'mean'), got {self.concat_order!r}",
        )
        need(self.spatial_norm in NORMS, f"spatial_norm must be one of {NORMS}, got {self.spatial_norm!r}")
        need(0.0 <= self.norm_momentum <= 1.0, f"norm_momentum must be in [0, 1], got {self.norm_momentum!r}")
        need(self.norm_eps > 0.0, f"norm_eps must be > 0, got {self.norm_eps!r}")
        need(self.gate in GATES, f"gate must be one of {GATES}, got {self.gate!r}")
        need(self.tie_rule in TIE_RULES, f"tie_rule must be one of {TIE_RULES}, got {self.tie_rule!r}")
        need(self.variant in VARIANTS, f"variant must be one of {VARIANTS}, got {self.variant!r}")
        need(self.mlp_act in ACTIVATIONS, f"mlp_act must be one of {ACTIVATIONS}, got {self.mlp_act!r}")
        need(
            self.hidden_channels is None or (_is_int(self.hidden_channels) and self.hidden_channels >= 1),
            f"hidden_channels must be None or an int >= 1, got {self.hidden_channels!r}",
        )
        need(
            _is_int(self.hidden_divisor) and self.hidden_divisor >= 1,
            f"hidden_divisor must be an int >= 1, got {self.hidden_divisor!r}",
        )
        need(
            self.hidden_divisor == 1 or self.hidden_rule == "round" or self.hidden_channels is not None,
            f"hidden_divisor={self.hidden_divisor} only applies to hidden_rule='round' (timm's make_divisible); "
            f"set hidden_rule='round' or leave hidden_divisor at 1",
        )
        for flag in ("mlp_bias", "spatial_bias", "no_spatial"):
            need(isinstance(getattr(self, flag), bool), f"{flag} must be a bool")
        need(
            self.hidden >= 1,
            f"hidden width is 0: channels={self.channels} // reduction={self.reduction} with hidden_rule='floor'; "
            f"use a smaller reduction or hidden_rule='round' (timm's rule keeps >= 1)",
        )

    # ------------------------------------------------------- derived facts
    @property
    def hidden(self) -> int:
        """Width of the shared MLP's hidden layer: ``hidden_channels`` if set, else C // r ("floor",
        the official code and the blog) or timm's ``make_divisible(C * (1 / r), hidden_divisor,
        round_limit=0)`` ("round": round half up to a multiple of the divisor, at least the divisor)."""
        if self.hidden_channels is not None:
            return self.hidden_channels
        if self.hidden_rule == "floor":
            return self.channels // self.reduction
        d = self.hidden_divisor
        v = self.channels * (1.0 / self.reduction)  # timm multiplies by rd_ratio = 1 / r
        return max(d, int(v + d / 2) // d * d)

    @property
    def spatial_inputs(self) -> int:
        """Input channels of the spatial conv: 2 maps (standard) or 1 (light)."""
        return 1 if self.variant == "light" else 2

    def maths_fields(self) -> dict:
        """The facts that decide what the block computes, forward and backward, in training and in
        inference: every field except those that only pick a module form (``mlp_kind``) or an initial
        value (``norm_gamma_init``), with the hidden width in place of the fields that derive it, and
        without the fields a setting makes irrelevant (spatial fields with ``no_spatial``, BN fields
        without BN, ``concat_order`` in the light variant). Two specs with equal `maths_fields` are
        interchangeable for a checkpoint."""
        facts = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("mlp_kind", "norm_gamma_init", "reduction", "hidden_rule", "hidden_channels", "hidden_divisor"):
            facts.pop(name)
        facts["hidden"] = self.hidden
        spatial = ("spatial_kernel", "concat_order", "spatial_bias", "spatial_norm", "norm_momentum", "norm_eps")
        if self.no_spatial:
            drop = spatial
        else:
            drop = () if self.has_norm else ("norm_momentum", "norm_eps")
            if self.variant == "light":
                drop += ("concat_order",)
        if self.no_spatial and "max" not in self.channel_pools:
            drop += ("tie_rule",)  # no max pool left whose gradient it could route
        for name in drop:
            facts.pop(name)
        return facts

    def maths_diff(self, other: CBAMSpec) -> list[str]:
        """``"field: mine vs theirs"`` for every maths fact (`maths_fields`) in which ``other`` differs."""
        a, b = self.maths_fields(), other.maths_fields()
        return [f"{k}: {a.get(k, '-')!r} vs {b.get(k, '-')!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]

    @property
    def padding(self) -> int:
        return self.spatial_kernel // 2

    @property
    def has_norm(self) -> bool:
        """Whether the block has the spatial BatchNorm (and its running statistics)."""
        return self.spatial_norm == "batchnorm" and not self.no_spatial

    @property
    def flax_momentum(self) -> float:
        """The same BatchNorm momentum in Flax's convention (weight of the old running value)."""
        return 1.0 - self.norm_momentum

    PARTS = ("channel", "spatial")

    def param_shapes(self, part: str | None = None) -> dict[str, tuple[int, ...]]:
        """Canonical parameter names -> shapes, in a fixed order (see module docstring).

        ``part`` ("channel" or "spatial") restricts to one gate's names, for the standalone modules.
        """
        if part is not None:
            if part not in self.PARTS:
                raise SpecError(f"part must be one of {self.PARTS} or None, got {part!r}")
            return {n: s for n, s in self.param_shapes().items() if n.startswith(part + ".")}
        c, h, k = self.channels, self.hidden, self.spatial_kernel
        shapes: dict[str, tuple[int, ...]] = {"channel.fc1.kernel": (c, h)}
        if self.mlp_bias:
            shapes["channel.fc1.bias"] = (h,)
        shapes["channel.fc2.kernel"] = (h, c)
        if self.mlp_bias:
            shapes["channel.fc2.bias"] = (c,)
        if self.no_spatial:
            return shapes
        shapes["spatial.conv.kernel"] = (k, k, self.spatial_inputs, 1)
        if self.spatial_bias:
            shapes["spatial.conv.bias"] = (1,)
        if self.has_norm:
            for name in ("scale", "bias", "mean", "var"):
                shapes[f"spatial.bn.{name}"] = (1,)
        return shapes

    def param_kinds(self) -> dict[str, str]:
        """Canonical name -> TRAINABLE or STATISTIC (BN running mean/var)."""
        return {n: STATISTIC if n.endswith((".mean", ".var")) else TRAINABLE for n in self.param_shapes()}

    def param_layouts(self) -> dict[str, str]:
        """Canonical name -> axis meaning, for humans and converters."""
        layouts = {}
        for name, shape in self.param_shapes().items():
            layouts[name] = {2: "in,out", 4: "H,W,in,out"}.get(len(shape), "vector")
        return layouts

    def param_inits(self) -> dict[str, tuple[str, float]]:
        """Canonical name -> ("uniform", bound) or ("constant", value).

        Weights and biases follow PyTorch's default Linear/Conv init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
        drawn by `cbam_multi.weights.init_weights` from one seeded NumPy generator so that every backend
        starts from identical numbers.
        """
        shapes = self.param_shapes()
        inits: dict[str, tuple[str, float]] = {}
        for name in shapes:
            layer, leaf = name.rsplit(".", 1)
            if layer.endswith(".bn"):
                value = {"scale": self.norm_gamma_init, "bias": 0.0, "mean": 0.0, "var": 1.0}[leaf]
                inits[name] = ("constant", value)
            else:
                kernel = shapes[f"{layer}.kernel"]
                fan_in = 1
                for d in kernel[:-1]:
                    fan_in *= d
                inits[name] = ("uniform", fan_in**-0.5)
        return inits

    def num_params(self, trainable_only: bool = True) -> int:
        kinds = self.param_kinds()
        total = 0
        for name, shape in self.param_shapes().items():
            if trainable_only and kinds[name] != TRAINABLE:
                continue
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    # --------------------------------------------------------- input checks
    def check_input(self, shape: Sequence[int], dtype_name: str, layout: Literal["NCHW", "NHWC"]) -> None:
        """Raise InputError naming the problem if ``shape``/``dtype`` is not a valid input.

        Shared by every backend so the messages are the same whichever framework you use.
        """
        shape = tuple(int(d) for d in shape)
        if len(shape) != 4:
            raise InputError(
                f"CBAM expects a rank-4 {layout} tensor, got rank {len(shape)} with shape {shape}"
                + (" (add a batch axis with x[None])" if len(shape) == 3 else "")
            )
        c_axis, other_axis = (1, 3) if layout == "NCHW" else (3, 1)
        other_layout = "NHWC" if layout == "NCHW" else "NCHW"
        if shape[c_axis] != self.channels:
            hint = ""
            if shape[other_axis] == self.channels:
                fix = "x.permute(0, 3, 1, 2)" if layout == "NCHW" else "x.transpose(0, 2, 3, 1)"
                hint = (
                    f"; it looks like {other_layout} (channels on axis {other_axis}) but this backend "
                    f"expects {layout}: convert with {fix}"
                )
            raise InputError(
                f"CBAM expects {layout} input with {self.channels} channels on axis {c_axis}, "
                f"got shape {shape}{hint}"
            )
        if 0 in shape:
            raise InputError(f"CBAM input has an empty axis: shape {shape}")
        check_float_input(dtype_name)

    # ---------------------------------------------------------------- JSON (`cbam_multi.jsondata.JsonData`)
    @classmethod
    def _from_fields(cls, fields: dict) -> CBAMSpec:
        if "channels" not in fields:
            raise SpecError("CBAMSpec JSON lacks 'channels'")
        return cls(**fields)


def require_spec(spec) -> CBAMSpec:
    """``spec`` if it is a CBAMSpec; else a TypeError saying so (instead of an AttributeError deep inside)."""
    if not isinstance(spec, CBAMSpec):
        raise TypeError(f"spec must be a CBAMSpec, got {type(spec).__name__}; build one with CBAMSpec(channels, ...)")
    return spec



# ------------------------------------------------------------------ field types from the annotations
def check_field_types(obj, error: type[Exception]) -> None:
    """Raise ``error`` naming the first field of dataclass ``obj`` whose value does not fit its annotation.

    Runs before any value check, so a string where a number belongs, ``None`` or a bare string where a
    list of names belongs, or a non-finite float, fails as ``error`` with the field's name instead of a
    raw TypeError (or a string read letter by letter) further on. Driven by the annotations, so a new
    field is checked as soon as it is declared: ``int`` (not bool), ``float`` (int or float, finite),
    ``bool``, ``str``, ``Literal[...]`` (one of the values), ``tuple[str, ...]`` / ``tuple[str, str]``
    (a list or tuple of those), ``X | None``. Other annotations are left to the class's own checks.
    """
    hints = _type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name in hints and not _fits(value, hints[f.name]):
            raise error(f"{type(obj).__name__}.{f.name} must be {_describe(hints[f.name])}, got {value!r}")


@functools.cache
def _type_hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _fits(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    return True  # an annotation this checker does not know: the class's own checks judge the value


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return f"one of {args}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        plural = {str: "strings", int: "ints", float: "numbers", bool: "bools"}
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list or tuple of {plural.get(args[0], args[0])}"
        if len(set(args)) == 1:
            return f"a list or tuple of {len(args)} {plural.get(args[0], args[0])}"
        return f"a list or tuple ({', '.join(_describe(a) for a in args)})"
    names = {type(None): "None", bool: "a bool", int: "an int", float: "a finite number", str: "a string"}
    return names.get(hint, str(hint))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_float_dtype_name(name: str) -> bool:
    name = str(name).replace("torch.", "")
    return name in ("float16", "bfloat16", "float32", "float64", "half", "float", "double")


def check_float_input(dtype_name: str) -> None:
    """Raise InputError unless ``dtype_name`` names a floating-point dtype (the message every backend gives)."""
    if not _is_float_dtype_name(dtype_name):
        raise InputError(
            f"CBAM expects a floating-point input (float16/bfloat16/float32/float64), got dtype {dtype_name}; "
            f"cast with x.float() / x.astype(jnp.float32)"
        )
