"""ResNet / ResNet-CBAM (`cbam_multi.models.resnet.ResNetSpec`) in JAX, NHWC: a pure function over the
canonical weights, and a Flax NNX module holding them.

`forward(params, x, spec, train=...)` takes the canonical flat dict (kernels HWIO, fc (in, out): Flax's
own layouts, so no transposes anywhere) and returns ``(logits, new_stats)``; every BatchNorm - the
backbone's and the CBAM blocks' - is `cbam_multi.jax.functional.batch_norm` (PyTorch's momentum
convention, unbiased running variance), the CBAM blocks are `cbam_multi.jax.functional.cbam`.

`ResNet` (NNX) keeps every variable at the path of its canonical name (``model.layer1["0"]...`` is
``"layer1.0.conv1.kernel"``): ``nnx.Param`` for trained tensors, ``nnx.BatchStat`` (>= float32) for running
statistics, updated in train mode (``model.train()`` / ``model.eval()``). Flax's ``dtype`` (compute) /
``param_dtype`` (storage) convention; values from `cbam_multi.weights.init_weights(spec, seed, scheme=init)`,
identical to ``cbam_multi.torch.models.ResNet(spec, seed=seed, init=init)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cbam_multi.errors import InputError
from cbam_multi.models.resnet import ResNetSpec, walk
from cbam_multi.weights import init_weights

from .. import functional as F
from .common import model_variables

__all__ = ["ResNet", "forward", "init_params", "split_params"]


class _JaxOps:
    """`cbam_multi.models.resnet.LayerOps` in JAX, NHWC, computing in the input's dtype."""

    def __init__(self, params: Mapping[str, jax.Array], spec: ResNetSpec, train: bool):
        self.params, self.spec, self.train, self.stats = params, spec, train, {}

    def conv(self, x, prefix, stride):
        kernel = self.params[f"{prefix}.kernel"]
        p = kernel.shape[0] // 2
        return jax.lax.conv_general_dilated(
            x, kernel.astype(x.dtype), (stride, stride), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    def bn(self, z, prefix):
        p = self.params
        out, new = F.batch_norm(
            z, p[f"{prefix}.scale"], p[f"{prefix}.bias"], p[f"{prefix}.mean"], p[f"{prefix}.var"],
            momentum=self.spec.bn_momentum, eps=self.spec.bn_eps, train=self.train,
        )
        if new is not None:
            self.stats[f"{prefix}.mean"], self.stats[f"{prefix}.var"] = new
        return out

    def relu(self, x):
        return jax.nn.relu(x)

    def max_pool_3x3_s2(self, x):
        # a Python -inf init makes this lax's differentiable reduce_window_max (a traced init would not be)
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))

    def cbam(self, x, prefix, spec):
        out, new = F.cbam({n: self.params[f"{prefix}.{n}"] for n in spec.param_shapes()}, x, spec, train=self.train)
        self.stats.update({f"{prefix}.{n}": v for n, v in new.items()})
        return out

    def bn_cbam_add_relu(self, z, bn_prefix, cbam_prefix, spec, shortcut):
        if self.train:  # batch statistics: the composed pair (XLA keeps no extra tensor in training)
            return self.relu(self.cbam(self.bn(z, bn_prefix), cbam_prefix, spec) + shortcut)
        p = self.params
        acc = F._acc_dtype(z.dtype)
        scale = p[f"{bn_prefix}.scale"].astype(acc) / jnp.sqrt(p[f"{bn_prefix}.var"].astype(acc) + self.spec.bn_eps)
        shift = p[f"{bn_prefix}.bias"].astype(acc) - p[f"{bn_prefix}.mean"].astype(acc) * scale
        sub = {n: p[f"{cbam_prefix}.{n}"] for n in spec.param_shapes()}
        out, new = F.cbam_after_affine(sub, z, scale, shift, spec, train=False, residual=shortcut)
        self.stats.update({f"{cbam_prefix}.{n}": v for n, v in new.items()})
        return out

    def head(self, x):
        pooled = jnp.mean(x.astype(F._acc_dtype(x.dtype)), axis=(1, 2)).astype(x.dtype)
        return pooled @ self.params["fc.kernel"].astype(x.dtype) + self.params["fc.bias"].astype(x.dtype)


def forward(params: Mapping[str, jax.Array], x: jax.Array, spec: ResNetSpec, *, train: bool = False):
    """Logits of NHWC images ``x`` (computed in ``x.dtype``) and, in train mode, the updated running
    statistics of every BatchNorm (canonical names; ``{}`` in eval mode). jit with ``spec``/``train`` static."""
    spec.check_input(x.shape, str(x.dtype), "NHWC")
    ops = _JaxOps(params, spec, train)
    return walk(spec, x, ops), ops.stats


def init_params(spec: ResNetSpec, seed: int = 0, dtype=jnp.float32, init: str = "canonical") -> dict[str, jax.Array]:
    """Canonical seeded weights as JAX arrays: parameters in ``dtype``, running statistics in >= float32."""
    kinds = spec.param_kinds()
    w = init_weights(spec, seed, np.float64, scheme=init)
    return {n: jnp.asarray(a, F.stat_dtype(dtype) if kinds[n] == "stat" else dtype) for n, a in w.items()}


def split_params(weights: Mapping[str, jax.Array], spec: ResNetSpec) -> tuple[dict, dict]:
    """(trainable parameters, running statistics) of a canonical dict, for the jitted steps."""
    kinds = spec.param_kinds()
    return ({n: v for n, v in weights.items() if kinds[n] == "param"}, {n: v for n, v in weights.items() if kinds[n] == "stat"})


class _Node(nnx.Module):
    """A named group of variables or sub-groups (``layer1``, ``"0"``, ``conv1``...): computes nothing."""


class ResNet(nnx.Module):
    """ResNet(-CBAM) on NHWC images ``(B, H, W, in_channels)`` -> logits ``(B, classes)``; BN in train mode
    by default (``use_running_average=False``, like a fresh torch module); ``model.eval()`` for inference."""

    def __init__(
        self, spec: ResNetSpec | None = None, *, dtype=jnp.float32, param_dtype=None, seed: int = 0,
        init: str = "canonical", use_running_average: bool = False,
    ):
        spec = ResNetSpec() if spec is None else spec
        if not isinstance(spec, ResNetSpec):
            raise TypeError(f"spec must be a ResNetSpec, got {type(spec).__name__}")
        self.spec = spec
        self.dtype = jnp.dtype(dtype)
        self.param_dtype = self.dtype if param_dtype is None else jnp.dtype(param_dtype)
        self.use_running_average = use_running_average
        kinds = spec.param_kinds()
        for name, value in init_params(spec, seed, self.param_dtype, init).items():
            *path, leaf = name.split(".")
            node = self
            for part in path:
                if not hasattr(node, part):
                    setattr(node, part, _Node())
                node = getattr(node, part)
            setattr(node, leaf, nnx.BatchStat(value) if kinds[name] == "stat" else nnx.Param(value))

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.dtype != self.dtype:
            raise InputError(f"input is {x.dtype} but this ResNet computes in {self.dtype}: cast the input")
        variables = model_variables(self)
        logits, stats = forward({n: v[...] for n, v in variables.items()}, x, self.spec, train=not self.use_running_average)
        for name, value in stats.items():
            variables[name][...] = value
        return logits

