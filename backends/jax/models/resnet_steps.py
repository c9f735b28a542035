"""Jitted, donating, data-parallel train and eval steps for the JAX ResNet (pure functions over canonical dicts).

Like the MNIST trainer (`cbam_multi.jax.train`), each step is ONE ``jax.jit`` over a ``("data",)`` mesh from
`cbam_multi.jax.sharding`: parameters, BatchNorm statistics and optimizer state replicated, the batch split
over devices (XLA inserts the gradient all-reduce and the all-reduce of every BN's batch statistics, so BN
sees the global batch as on one device), and the parameter / statistic / optimizer buffers donated.

    step = make_train_step(spec, optax.sgd(0.1, momentum=0.9))
    params, stats = split_params(init_params(spec, seed), spec)
    params, stats, opt_state = step.place(params, stats, step.tx.init(params))
    params, stats, opt_state, loss = step(params, stats, opt_state, x_nhwc, labels)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax

from cbam_multi.models.resnet import ResNetSpec

from .. import sharding
from .resnet import forward

__all__ = ["make_train_step", "make_eval_step", "TrainStep", "EvalStep"]


def _loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # bf16 logits: the loss in float32
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@dataclass
class TrainStep:
    """``self(params, stats, opt_state, x, y) -> (params, stats, opt_state, loss)``; the first three are donated."""

    tx: optax.GradientTransformation
    fn: Callable
    mesh: Any

    def __call__(self, params, stats, opt_state, x, y):
        return self.fn(params, stats, opt_state, sharding.shard_batch(x, self.mesh), sharding.shard_batch(y, self.mesh))

    def place(self, *trees):
        """``trees`` replicated over the mesh (fresh buffers: the step may donate them)."""
        return tuple(sharding.replicate(t, self.mesh) for t in trees)


def make_train_step(spec: ResNetSpec, tx: optax.GradientTransformation, *, dtype=None, mesh=None) -> TrainStep:
    """Forward in train mode, cross-entropy, backward, the optax update and the BN statistics update in one
    jitted function. ``dtype``: compute dtype (default: the parameters'); ``mesh``: default all devices."""
    mesh = sharding.data_mesh() if mesh is None else mesh

    def step(params, stats, opt_state, x, y):
        def loss_fn(p):
            logits, new_stats = forward({**p, **stats}, x.astype(dtype or x.dtype), spec, train=True)
            return _loss(logits, y), new_stats

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    repl, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    fn = jax.jit(
        step, in_shardings=(repl, repl, repl, batch, batch), out_shardings=(repl, repl, repl, repl), donate_argnums=(0, 1, 2)
    )
    return TrainStep(tx, fn, mesh)


@dataclass
class EvalStep:
    """``self(params, stats, x) -> logits`` in eval mode (running statistics), batch split over the mesh."""

    fn: Callable
    mesh: Any

    def __call__(self, params, stats, x):
        return self.fn(params, stats, sharding.shard_batch(x, self.mesh))


def make_eval_step(spec: ResNetSpec, *, dtype=None, mesh=None) -> EvalStep:
    mesh = sharding.data_mesh() if mesh is None else mesh

    def predict(params, stats, x):
        return forward({**params, **stats}, x.astype(dtype or x.dtype), spec, train=False)[0]

    repl = sharding.replicated(mesh)
    return EvalStep(jax.jit(predict, in_shardings=(repl, repl, sharding.batch_sharding(mesh)), out_shardings=repl), mesh)
