"""MNIST training and evaluation with JAX / Flax NNX / optax: ``train_and_evaluate`` and ``evaluate``.

The epoch loop, schedule, batches, metrics and checkpoint formats are shared with the torch backend
(`cbam_multi.training`); this module only provides the JAX `Trainer`:

* the model is split once (``nnx.split``) into a static graphdef, the ``nnx.Param`` state and the rest
  (BatchNorm statistics); ONE ``jax.jit``-compiled function does forward, backward, the optax update
  and the statistics update, with the parameter, statistic and optimizer buffers donated;
* optimizers are optax chains matching torch.optim exactly (formulas in `cbam_multi.config`), wrapped
  in ``optax.inject_hyperparams`` so the learning rate of `cbam_multi.training.lr_at` is an input of
  the compiled step (no recompilation, the same numbers as torch);
* compiled steps are cached per (graphdef, optimizer, dtype), so repeated runs in one process
  (tests, resumes) compile once.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cbam_multi import training
from cbam_multi.config import ConfigError, TrainConfig
from cbam_multi.data import Dataset
from cbam_multi.model import MNISTNetSpec

from .model import MNISTNet, export_weights, import_weights

__all__ = ["train_and_evaluate", "evaluate", "JaxTrainer", "make_optimizer"]

# canonical slot name -> field of the optax state that holds it
_SLOT_FIELDS = {"mu": "mu", "nu": "nu", "momentum": "trace"}


def _check_dtype(dtype: str) -> jnp.dtype:
    if dtype not in ("float32", "float64"):
        raise ConfigError(f"dtype must be float32 or float64, got {dtype!r}")
    if dtype == "float64" and not jax.config.jax_enable_x64:
        raise ConfigError(
            "dtype float64 needs JAX's x64 mode (else JAX silently computes in float32): call "
            "jax.config.update('jax_enable_x64', True) first (the CLI does this for --dtype float64)"
        )
    return jnp.dtype(dtype)


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

    return optax.inject_hyperparams(factory, hyperparam_dtype=jnp.dtype(config.dtype))(learning_rate=config.lr)


_STEP_CACHE: dict[Any, Any] = {}
_PREDICT_CACHE: dict[Any, Any] = {}


def _train_step_fn(graphdef, config: TrainConfig):
    key = (graphdef, _optimizer_key(config))
    if key not in _STEP_CACHE:
        tx = make_optimizer(config)

        def step(params, rest, opt_state, x, y, lr):
            def loss_fn(p):
                model = nnx.merge(graphdef, p, rest)
                logits = model(x)
                loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
                return loss, nnx.state(model, nnx.BatchStat)

            (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            opt_state.hyperparams["learning_rate"] = jnp.asarray(lr, opt_state.hyperparams["learning_rate"].dtype)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return params, new_rest, opt_state, loss

        _STEP_CACHE[key] = (tx, jax.jit(step, donate_argnums=(0, 1, 2)))
    return _STEP_CACHE[key]


def _predict_fn(graphdef):
    if graphdef not in _PREDICT_CACHE:

        def predict(params, rest, x):
            return nnx.merge(graphdef, params, rest)(x)

        _PREDICT_CACHE[graphdef] = jax.jit(predict)
    return _PREDICT_CACHE[graphdef]


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
    """Eval-mode logits of NHWC NumPy batches; pads a ragged tail to the compiled batch size."""

    def __init__(self, model: MNISTNet, batch_size: int | None = None):
        model.eval()
        self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
        model.train()
        self.fn = _predict_fn(self.graphdef)
        self.dtype = model.dtype
        self.batch_size = batch_size

    def __call__(self, x: np.ndarray, params=None, rest=None) -> np.ndarray:
        n = len(x)
        size = max(n, self.batch_size or n)
        if size > n:  # one static shape for every batch, the tail included (no recompile)
            x = np.concatenate([x, np.zeros((size - n,) + x.shape[1:], x.dtype)], axis=0)
        logits = self.fn(self.params if params is None else params, self.rest if rest is None else rest, jnp.asarray(x, self.dtype))
        return np.asarray(logits)[:n]


class JaxTrainer:
    """`cbam_multi.training.Trainer` for JAX: NHWC NNX model split once, one jitted, donating train step."""

    backend = "jax"

    def __init__(self, config: TrainConfig):
        self.config = config
        self.dtype = _check_dtype(config.dtype)
        self.model = MNISTNet(config.model, dtype=self.dtype, seed=config.seed)
        self.model.train()
        self.graphdef, self.params, self.rest = nnx.split(self.model, nnx.Param, ...)
        self.tx, self._step = _train_step_fn(self.graphdef, config)
        self.opt_state = self.tx.init(self.params)
        self.slots = training.optimizer_slots(config)
        self._predictor = _Predictor(self.model, config.eval_batch_size)

    # ---------------------------------------------------------------- weights / optimizer state
    def _sync_model(self) -> None:
        """Write the trained state back into the NNX module (for export / prediction)."""
        nnx.update(self.model, self.params, self.rest)

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        self._sync_model()  # the module may still point at buffers a train step donated
        import_weights(self.model, weights)
        _, self.params, self.rest = nnx.split(self.model, nnx.Param, ...)

    def get_weights(self) -> dict[str, np.ndarray]:
        self._sync_model()
        return export_weights(self.model)

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
        self.opt_state = _set_counts(state, step)

    def get_opt_state(self) -> dict[str, dict[str, np.ndarray]]:
        out = {}
        for slot in self.slots:
            tree = optax.tree_utils.tree_get(self.opt_state, _SLOT_FIELDS[slot])
            out[slot] = {name: np.array(var[...]) for name, var in _flat(tree).items()}
        return out

    # ---------------------------------------------------------------- steps
    def _lr(self, lr: float):
        return np.asarray(lr, dtype=self.dtype)

    def warmup(self, x: np.ndarray, y: np.ndarray) -> float:
        """Compile the train step and the prediction function, so epoch timings exclude compilation.

        The step runs once on copies of the state (its buffers are donated), which fills jit's cache.
        """
        t0 = time.perf_counter()
        copies = jax.tree.map(jnp.copy, (self.params, self.rest, self.opt_state))
        jax.block_until_ready(self._step(*copies, jnp.asarray(x, self.dtype), jnp.asarray(y), self._lr(self.config.lr)))
        self._predictor(np.zeros((1,) + x.shape[1:], x.dtype), self.params, self.rest)
        return time.perf_counter() - t0

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float):
        self.params, self.rest, self.opt_state, loss = self._step(
            self.params, self.rest, self.opt_state, jnp.asarray(x, self.dtype), jnp.asarray(y), self._lr(lr)
        )
        return loss

    def losses(self, handles: Sequence[Any]) -> np.ndarray:
        return np.asarray(jax.device_get(list(handles)), dtype=np.float64).reshape(-1)

    def predict(self, x: np.ndarray) -> np.ndarray:
        # eval graphdef, current trained state; the state objects are only read (not donated)
        return self._predictor(x, self.params, self.rest)

    def device(self) -> str:
        d = jax.devices()[0]
        return f"jax {d.platform}: {getattr(d, 'device_kind', d)} ({jax.device_count()} device(s))"


def train_and_evaluate(config: TrainConfig, *, data: Dataset | None = None, stop_after_epoch: int | None = None) -> dict:
    """Train and evaluate ``config`` with JAX/Flax/optax; see `cbam_multi.training.fit` (identical in torch).

    Writes ``<out>/metrics.json``, ``<out>/checkpoint.safetensors`` and ``<out>/train_state.safetensors``
    after every epoch; ``data`` overrides loading (a preloaded `cbam_multi.data.Dataset`).
    """
    if config.backend != "jax":
        raise ConfigError(f"cbam_multi.jax.train got a config for backend {config.backend!r}; use config.replace(backend='jax')")
    _check_dtype(config.dtype)
    return training.fit(config, JaxTrainer, data=data, stop_after_epoch=stop_after_epoch)


def evaluate(
    checkpoint,
    *,
    dataset: str = "auto",
    data_dir=None,
    n_test: int | None = None,
    batch_size: int = 1000,
    dtype: str = "float32",
    data: Dataset | None = None,
    progress: bool = False,
) -> dict:
    """Evaluate a model checkpoint written by either backend (file or run directory) on the test split.

    Returns ``{"accuracy", "loss", "predictions", "logits", "correct", "n", ...}``; the tail batch is kept
    (padded to the compiled batch size, then cut).
    """

    def build(weights, spec: MNISTNetSpec, dtype_name: str):
        model = MNISTNet(spec, dtype=_check_dtype(dtype_name))
        import_weights(model, weights)
        return _Predictor(model, batch_size), "jax"

    return training.evaluate_checkpoint(
        checkpoint, build, dataset=dataset, data_dir=data_dir, n_test=n_test, batch_size=batch_size,
        dtype=dtype, data=data, progress=progress,
    )
