"""Training and evaluation (MNISTNet or ResNet: `cbam_multi.jax.models.MODELS`) with JAX / Flax NNX / optax.

The epoch loop, schedule, batches, metrics and checkpoint formats are shared with the torch backend
(`cbam_multi.training`); this module only provides the JAX `Trainer`:

* the model is split once (``nnx.split``) into a static graphdef, the ``nnx.Param`` state and the rest
  (BatchNorm statistics); ONE ``jax.jit``-compiled function does forward, backward, the optax update
  and the statistics update, with the parameter, statistic and optimizer buffers donated;
* optimizers are optax chains matching torch.optim exactly (formulas in `cbam_multi.training.config`), wrapped
  in ``optax.inject_hyperparams`` so the learning rate of `cbam_multi.training.schedule.lr_at` is an input of
  the compiled step (no recompilation, the same numbers as torch);
* compiled steps are cached per (graphdef, optimizer, dtype, mesh), so repeated runs in one process
  (tests, resumes) compile once.

Scale-out and precision (see docs/SCALE_OUT.md and `cbam_multi.jax.sharding`):

* data parallel over ``jax.devices()`` (all processes' devices) with ``jax.sharding``: parameters,
  statistics and optimizer state replicated (``NamedSharding(mesh, P())``), the batch split over the
  ``"data"`` axis (``P("data")``), fed per process with ``jax.make_array_from_process_local_data``;
  XLA inserts the all-reduces. One device = a one-device mesh: the same numbers as unsharded code;
* ``dtype="bfloat16"``: mixed precision. The model computes in bf16 (inputs cast inside the step,
  float32 parameters cast to bf16 where they are used, Flax's ``dtype``/``param_dtype``), gradients
  arrive in float32 (the transpose of the cast), optax updates float32 master weights; the loss
  (softmax cross-entropy) runs on float32 logits. Checkpoints stay float32.
* TPU-ready step: static shapes (the last partial batch is dropped; evaluation pads its tail to the
  compiled size), no host callbacks or syncs inside ``jit`` (losses are fetched once per epoch),
  donated parameter / statistic / optimizer buffers.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cbam_multi.models import build_network
from cbam_multi.training.config import ConfigError, TrainConfig
from cbam_multi.training.state import optimizer_slots

from . import sharding
from .models import MODELS, export_model_weights, import_model_weights

__all__ = ["JaxTrainer", "build_predict", "make_optimizer"]

# canonical slot name -> field of the optax state that holds it
_SLOT_FIELDS = {"mu": "mu", "nu": "nu", "momentum": "trace"}


def _check_dtype(dtype: str) -> jnp.dtype:
    """The compute dtype (float32, float64 or bfloat16)."""
    if dtype not in ("float32", "float64", "bfloat16"):
        raise ConfigError(f"dtype must be float32, float64 or bfloat16, got {dtype!r}")
    if dtype == "float64" and not jax.config.jax_enable_x64:
        raise ConfigError(
            "dtype float64 needs JAX's x64 mode (else JAX silently computes in float32): call "
            "jax.config.update('jax_enable_x64', True) first (the CLI does this for --dtype float64)"
        )
    return jnp.dtype(dtype)


def _param_dtype(dtype: str) -> jnp.dtype:
    """Storage dtype of parameters / optimizer state: float32 for bfloat16 (mixed precision)."""
    return jnp.dtype("float32" if dtype == "bfloat16" else dtype)


def _optimizer_key(config: TrainConfig) -> tuple:
    return (config.optimizer, config.betas, config.eps, config.weight_decay, config.momentum, config.nesterov, config.dtype)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """The optax chain equivalent to `cbam_multi.torch.train.make_optimizer`; lr injected per step.

    adam:  add_decayed_weights(wd) -> scale_by_adam(b1, b2, eps) -> -lr     (= torch Adam, L2 coupled)
    adamw: scale_by_adam(b1, b2, eps) -> add_decayed_weights(wd) -> -lr     (= torch AdamW, decoupled)
    sgd:   add_decayed_weights(wd) -> trace(momentum, nesterov) -> -lr      (= torch SGD, dampening 0)
    """
    b1, b2 = config.betas
    wd = config.weight_decay

    def decay() -> list:
        return [optax.add_decayed_weights(wd)] if wd > 0 else []

    def factory(learning_rate):
        if config.optimizer == "adam":
            return optax.chain(*decay(), optax.adam(learning_rate, b1=b1, b2=b2, eps=config.eps, eps_root=0.0))
        if config.optimizer == "adamw":
            return optax.adamw(learning_rate, b1=b1, b2=b2, eps=config.eps, eps_root=0.0, weight_decay=wd)
        momentum = config.momentum if config.momentum > 0 else None
        return optax.chain(*decay(), optax.sgd(learning_rate, momentum=momentum, nesterov=config.nesterov))

    return optax.inject_hyperparams(factory, hyperparam_dtype=_param_dtype(config.dtype))(learning_rate=config.lr)


# XLA:CPU options for the MNIST train / predict programs (per executable: the user's other JAX programs
# are untouched; nothing changes off CPU). Figures: benchmarks/RESULTS.md, "XLA:CPU compiler options".
# * YNNPACK library fusions only for dots: YNNPACK's convolutions and reductions are slower than XLA's own
#   kernels for this network, and XLA's own dots drift further from float64 in float32.
# * fast min/max: NaN-propagating max *reductions* are emitted as scalar loops (CBAM's max pools, the
#   2x2 max-pool); without NaN propagation they vectorise. Only reductions change: elementwise max (ReLU),
#   the convolutions and CBAM's mean pools still carry a NaN input to the loss
#   (tests/test_training.py::test_a_nan_in_the_batch_shows_as_a_nan_loss).
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    "xla_cpu_enable_fast_min_max": True,
}


def compiler_options(mesh) -> dict:
    """The XLA options our jitted train / predict functions are compiled with on ``mesh``'s platform:
    on CPU, those of `CPU_COMPILER_OPTIONS` that this jaxlib's XLA accepts (it rejects unknown ones)."""
    platforms = {d.platform for d in (jax.devices() if mesh is None else mesh.devices.flat)}
    if platforms != {"cpu"}:
        return {}
    return {k: v for k, v in CPU_COMPILER_OPTIONS.items() if _accepted(k, v)}


_ACCEPTED: dict[tuple, bool] = {}


def _accepted(key: str, value) -> bool:
    """Whether XLA compiles a trivial function with option ``key=value`` (checked once per process)."""
    if (key, value) not in _ACCEPTED:
        try:
            jax.jit(lambda x: x + 1, compiler_options={key: value}).lower(jnp.zeros((), jnp.float32)).compile()
            _ACCEPTED[(key, value)] = True
        except Exception:  # e.g. "No such compile option" in another jaxlib: compile without it
            _ACCEPTED[(key, value)] = False
    return _ACCEPTED[(key, value)]


_STEP_CACHE: dict[Any, Any] = {}
_PREDICT_CACHE: dict[Any, Any] = {}


def _train_step_fn(graphdef, config: TrainConfig, mesh):
    """``(tx, step)``: the optax transformation and the ONE jitted, donating, data-parallel train step
    ``step(params, rest, opt_state, x, y, lr) -> (params, rest, opt_state, loss)`` for ``mesh``."""
    key = (graphdef, _optimizer_key(config), mesh)
    if key not in _STEP_CACHE:
        tx = make_optimizer(config)
        compute, master = _check_dtype(config.dtype), _param_dtype(config.dtype)

        def step(params, rest, opt_state, x, y, lr):
            def loss_fn(p, r):
                # fresh Variables for the BatchNorm statistics, created in this (grad) trace, so CBAM may
                # update them (value_and_grad passes non-differentiated arguments through as they are)
                model = nnx.merge(graphdef, p, jax.tree.map(lambda a: a, r))
                logits = model(x.astype(compute))  # bf16: params are cast where used (module dtype)
                loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(master), y).mean()
                return loss, nnx.state(model, nnx.BatchStat)

            (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest)
            opt_state.hyperparams["learning_rate"] = jnp.asarray(lr, opt_state.hyperparams["learning_rate"].dtype)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return params, new_rest, opt_state, loss

        repl, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
        jitted = jax.jit(
            step,
            in_shardings=(repl, repl, repl, batch, batch, repl),
            out_shardings=(repl, repl, repl, repl),
            donate_argnums=(0, 1, 2),
            compiler_options=compiler_options(mesh),
        )
        _STEP_CACHE[key] = (tx, jitted)
    return _STEP_CACHE[key]


def _predict_fn(graphdef, mesh=None):
    key = (graphdef, mesh)
    if key not in _PREDICT_CACHE:

        def predict(params, rest, x):
            model = nnx.merge(graphdef, params, rest)
            logits = model(x.astype(model.dtype))
            return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # bf16 logits come back as float32

        options = compiler_options(mesh)
        if mesh is None:
            _PREDICT_CACHE[key] = jax.jit(predict, compiler_options=options)
        else:
            repl = sharding.replicated(mesh)
            _PREDICT_CACHE[key] = jax.jit(
                predict, in_shardings=(repl, repl, sharding.batch_sharding(mesh)), out_shardings=repl,
                compiler_options=options,
            )
    return _PREDICT_CACHE[key]


def _flat(state) -> dict[str, Any]:
    """nnx.State -> {canonical name: Variable}."""
    return {".".join(map(str, path)): v for path, v in nnx.to_flat_state(state)}


def _set_counts(opt_state, step: int):
    """Set EVERY ``count`` in an optax state (inject_hyperparams' and scale_by_adam's: the bias
    correction uses the latter) to ``step``. (optax.tree_utils.tree_set stops at the first match.)"""

    def visit(path, leaf):
        last = path[-1] if path else None
        if getattr(last, "name", None) == "count":
            return jnp.asarray(step, dtype=leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(visit, opt_state)


class _Predictor:
    """Eval-mode logits of NHWC NumPy batches; pads a ragged tail to the compiled batch size (so a whole
    evaluation compiles once). With a ``mesh`` the batch is split over its ``data`` axis (the padded size
    rounded up to a multiple of the device count) and the logits come back replicated."""

    def __init__(self, model, batch_size: int | None = None, mesh=None):
        model.eval()
        self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
        model.train()
        self.mesh = mesh
        self.fn = _predict_fn(self.graphdef, mesh)
        self.dtype = model.dtype
        self.batch_size = batch_size
        self.multiple = 1 if mesh is None else int(mesh.devices.size)

    def __call__(self, x: np.ndarray, params=None, rest=None) -> np.ndarray:
        n = len(x)
        size = max(n, self.batch_size or n)
        size = -(-size // self.multiple) * self.multiple
        if size > n:  # one static shape for every batch, the tail included (no recompile)
            x = np.concatenate([x, np.zeros((size - n,) + x.shape[1:], x.dtype)], axis=0)
        xs = jnp.asarray(x, self.dtype) if self.mesh is None else sharding.shard_batch(x, self.mesh)
        logits = self.fn(self.params if params is None else params, self.rest if rest is None else rest, xs)
        return np.asarray(logits)[:n]


class JaxTrainer:
    """`cbam_multi.training.fit.Trainer` for JAX: NHWC NNX model split once, one jitted, donating train step,
    data parallel over ``devices`` (default ``jax.devices()``: every device of every process).

    ``self.dtype`` is the compute dtype, ``self.param_dtype`` that of parameters and optimizer state.
    """

    backend = "jax"

    def __init__(self, config: TrainConfig, devices=None):
        self.config = config
        self.dtype = _check_dtype(config.dtype)
        self.param_dtype = _param_dtype(config.dtype)
        self.mesh = sharding.data_mesh(devices)
        sharding.check_global_batch(config.batch_size, self.mesh)
        self.is_main = jax.process_index() == 0
        self.parallel = sharding.describe(self.mesh)
        self.model = build_network(MODELS, config.model, dtype=self.dtype, param_dtype=self.param_dtype, seed=config.seed)
        self.model.train()
        self.graphdef, params, rest = nnx.split(self.model, nnx.Param, ...)
        self.params, self.rest = self._replicate((params, rest))
        self.tx, self._step = _train_step_fn(self.graphdef, config, self.mesh)
        self.opt_state = self._replicate(self.tx.init(self.params))
        self.slots = optimizer_slots(config)
        self._predictor = _Predictor(self.model, config.eval_batch_size, self.mesh)

    def _replicate(self, tree):
        return sharding.replicate(tree, self.mesh)

    # ---------------------------------------------------------------- weights / optimizer state
    def _sync_model(self) -> None:
        """Write the trained state back into the NNX module (for export / prediction)."""
        nnx.update(self.model, self.params, self.rest)

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        self._sync_model()  # the module may still point at buffers a train step donated
        import_model_weights(self.model, weights)
        _, params, rest = nnx.split(self.model, nnx.Param, ...)
        self.params, self.rest = self._replicate((params, rest))

    def get_weights(self) -> dict[str, np.ndarray]:
        self._sync_model()
        return export_model_weights(self.model)

    def set_opt_state(self, slots: Mapping[str, Mapping[str, np.ndarray]], step: int) -> None:
        state = self.tx.init(self.params)
        values = {}
        for slot in self.slots:
            template = optax.tree_utils.tree_get(state, _SLOT_FIELDS[slot])
            flat = _flat(template)
            missing = sorted(set(flat) - set(slots[slot]))
            if missing:
                raise ConfigError(f"optimizer slot {slot!r} lacks {missing}")
            for name, var in flat.items():
                var.set_value(jnp.asarray(np.asarray(slots[slot][name]), dtype=var[...].dtype))
            values[_SLOT_FIELDS[slot]] = template
        state = optax.tree_utils.tree_set(state, **values) if values else state
        self.opt_state = self._replicate(_set_counts(state, step))

    def get_opt_state(self) -> dict[str, dict[str, np.ndarray]]:
        out = {}
        for slot in self.slots:
            tree = optax.tree_utils.tree_get(self.opt_state, _SLOT_FIELDS[slot])
            out[slot] = {name: np.array(var[...]) for name, var in _flat(tree).items()}
        return out

    # ---------------------------------------------------------------- steps
    def _lr(self, lr: float):
        return np.asarray(lr, dtype=self.param_dtype)

    def _inputs(self, x: np.ndarray, y: np.ndarray):
        """The global batch as arrays split over the mesh's ``data`` axis (this process feeds its rows).
        Images stay in the parameter dtype (a bf16 step casts on the device); labels are int32."""
        x = np.asarray(x, dtype=self.param_dtype)
        return sharding.shard_batch(x, self.mesh), sharding.shard_batch(np.asarray(y, dtype=np.int32), self.mesh)

    def warmup(self, x: np.ndarray, y: np.ndarray) -> float:
        """Compile the train step and the prediction function, so epoch timings exclude compilation.

        The step runs once on copies of the state (its buffers are donated), which fills jit's cache.
        """
        t0 = time.perf_counter()
        copies = jax.tree.map(jnp.copy, (self.params, self.rest, self.opt_state))
        jax.block_until_ready(self._step(*copies, *self._inputs(x, y), self._lr(self.config.lr)))
        self._predictor(np.zeros((1,) + x.shape[1:], x.dtype), self.params, self.rest)
        return time.perf_counter() - t0

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float):
        """One step on the GLOBAL batch; returns the (replicated) mean loss as a device scalar: no host sync."""
        self.params, self.rest, self.opt_state, loss = self._step(self.params, self.rest, self.opt_state, *self._inputs(x, y), self._lr(lr))
        return loss

    def losses(self, handles: Sequence[Any]) -> np.ndarray:
        return np.asarray(jax.device_get(list(handles)), dtype=np.float64).reshape(-1)

    def predict(self, x: np.ndarray) -> np.ndarray:
        # eval graphdef, current trained state; the state objects are only read (not donated)
        return self._predictor(x, self.params, self.rest)

    def device(self) -> str:
        d = jax.devices()[0]
        desc = f"jax {d.platform}: {getattr(d, 'device_kind', d)} ({jax.device_count()} device(s)"
        if self.mesh.devices.size > 1 or jax.process_count() > 1:
            desc += f"; data mesh of {self.mesh.devices.size} over {jax.process_count()} process(es)"
        desc += ")"
        if self.dtype != self.param_dtype:
            desc += f", {self.dtype} compute / {self.param_dtype} params"
        return desc


def build_predict(weights, spec, dtype: str, batch_size: int):
    """The predict function (NHWC NumPy batch -> logits) of a model with canonical ``weights``, compiled for
    ``batch_size`` (a smaller tail is padded, then cut). For `cbam_multi.training.evaluate`."""
    model = build_network(MODELS, spec, dtype=_check_dtype(dtype), param_dtype=_param_dtype(dtype))
    import_model_weights(model, weights)
    return _Predictor(model, batch_size)
