"""Framework-free training machinery shared by `cbam_multi.torch.train` and `cbam_multi.jax.train`.

The epoch loop, the learning-rate schedule, batching, evaluation, metrics and checkpoints live here
ONCE; a backend only supplies a small `Trainer` (build the model, one optimizer step, logits,
canonical weights and optimizer state). Both backends therefore run the same loop on the same
batches with the same learning rates, and their files are interchangeable:

* ``<out>/checkpoint.safetensors``: the model's canonical weights + spec (`cbam_multi.save_weights`),
  loadable by `cbam_multi.load_weights` and by either backend's ``evaluate`` / ``init_from``.
* ``<out>/train_state.safetensors``: everything a resume needs, in canonical names, in ONE atomic file:
  the model weights (``model.<name>``), the optimizer slots (``opt.mu.<name>``, ``opt.nu.<name>`` for
  Adam(W), ``opt.momentum.<name>`` for SGD with momentum), the step and epoch, the config and the
  metrics history (JSON metadata). Data order needs no RNG state: it is a pure function of
  (``data_seed``, epoch). A resumed run is bit-identical to an uninterrupted one, and because the
  state is canonical it can even be resumed by the other framework.
* ``<out>/metrics.json``: per-epoch metrics, written atomically after every epoch.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from cbam_multi.config import ConfigError, TrainConfig
from cbam_multi.data import Dataset, batches_per_epoch, iterate_batches, load_mnist, normalize, subset
from cbam_multi.errors import CheckpointError
from cbam_multi.model import MNISTNetSpec
from cbam_multi.weights import atomic_write_bytes, load_weights, read_checkpoint, save_weights, validate_weights

CHECKPOINT_FILE = "checkpoint.safetensors"
TRAIN_STATE_FILE = "train_state.safetensors"
METRICS_FILE = "metrics.json"
TRAIN_STATE_FORMAT = "cbam_multi.TrainState"
TRAIN_STATE_VERSION = 1
METRICS_FORMAT_VERSION = 1

__all__ = [
    "CHECKPOINT_FILE",
    "TRAIN_STATE_FILE",
    "METRICS_FILE",
    "lr_at",
    "lr_schedule",
    "optimizer_slots",
    "PreparedData",
    "prepare_data",
    "cross_entropy",
    "evaluate_arrays",
    "TrainState",
    "Trainer",
    "fit",
    "resolve_checkpoint",
    "versions",
    "write_json_atomic",
    "train_and_evaluate",
    "evaluate",
]


# ------------------------------------------------------------------ learning-rate schedule
def lr_at(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """THE learning rate of optimizer step ``step`` (0-based); both backends call only this.

    ``total = epochs * steps_per_epoch``; ``warmup = round(warmup_frac * total)`` steps ramp linearly
    to ``lr`` (step s gets ``lr * (s + 1) / warmup``), then the lr decays from ``lr`` towards
    ``final_lr_frac * lr`` over the remaining steps: ``cosine`` = half a cosine, ``linear`` = a line,
    ``constant`` = no warmup and no decay. Python floats (float64), so both sides get identical numbers.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    peak = config.lr
    if config.schedule == "constant":
        return peak
    total = config.epochs * steps_per_epoch
    warmup = int(round(config.warmup_frac * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    decay_steps = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    final = peak * config.final_lr_frac
    if config.schedule == "cosine":
        return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak + (final - peak) * progress  # linear


def lr_schedule(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """``lr_at`` with the config and epoch length bound: ``schedule(step) -> float``."""
    return lambda step: lr_at(config, step, steps_per_epoch)


def optimizer_slots(config: TrainConfig) -> tuple[str, ...]:
    """Names of the per-parameter optimizer state slots, in canonical train-state files."""
    if config.optimizer in ("adam", "adamw"):
        return ("mu", "nu")  # first and second moments (torch exp_avg / exp_avg_sq)
    return ("momentum",) if config.momentum > 0 else ()  # torch momentum_buffer / optax trace


# ------------------------------------------------------------------ data
@dataclass(frozen=True, eq=False)
class PreparedData:
    """Normalized NHWC arrays in the training parameter dtype (identical bytes for both backends)."""

    name: str
    source: str
    x_train: np.ndarray  # (N, 28, 28, 1)
    y_train: np.ndarray  # int64 (N,)
    x_test: np.ndarray
    y_test: np.ndarray

    def info(self) -> dict:
        return {"name": self.name, "source": self.source, "n_train": int(len(self.y_train)), "n_test": int(len(self.y_test))}


def load_dataset(dataset: str = "auto", data_dir=None, data: Dataset | None = None) -> Dataset:
    """``data`` if given (tests pass a preloaded Dataset), else `cbam_multi.data.load_mnist`."""
    if data is not None:
        return data
    return load_mnist(data_dir, dataset=dataset)


def prepare_data(config: TrainConfig, data: Dataset | None = None) -> PreparedData:
    ds = subset(load_dataset(config.dataset, config.data_dir, data), config.n_train, config.n_test)
    dt = np.dtype(config.param_dtype)  # bfloat16 runs feed float32 and cast on the device
    return PreparedData(
        ds.name,
        ds.source,
        normalize(ds.train_images, dt),
        ds.train_labels,
        normalize(ds.test_images, dt),
        ds.test_labels,
    )


def augment_rng(config: TrainConfig, epoch: int) -> np.random.Generator:
    """The augmentation generator of one epoch: a pure function of (data_seed, epoch), like the batch order,
    so a resumed run draws the same shifts."""
    return np.random.default_rng([config.data_seed, epoch, 1])


def random_shift(x: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
    """Translate each NHWC image by (dy, dx) uniform in [-max_shift, max_shift], filling with the
    background (the normalized value of a 0 pixel). NumPy only, so both backends see identical batches."""
    if max_shift == 0:
        return x
    b, h, w, _ = x.shape
    background = normalize(np.zeros((1, 1, 1), np.uint8), x.dtype)[0, 0, 0, 0]
    s = max_shift
    padded = np.pad(x, ((0, 0), (s, s), (s, s), (0, 0)), constant_values=background)
    dy, dx = rng.integers(0, 2 * s + 1, size=(2, b))
    rows = (dy[:, None] + np.arange(h))[:, :, None]
    cols = (dx[:, None] + np.arange(w))[:, None, :]
    return padded[np.arange(b)[:, None, None], rows, cols]


# ------------------------------------------------------------------ evaluation
def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-example cross-entropy of ``logits`` (N, classes), computed in float64 with NumPy."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logz = np.log(np.exp(z).sum(axis=1))
    return logz - z[np.arange(len(labels)), np.asarray(labels)]


def evaluate_arrays(
    predict: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    progress: bool = False,
    desc: str = "eval",
) -> dict:
    """Run ``predict`` (NHWC batch -> logits) over ``x`` in batches, the ragged tail included.

    Returns accuracy, mean cross-entropy (float64, NumPy: the same formula for both backends),
    predictions (argmax) and the logits.
    """
    n = len(y)
    if n == 0:
        raise ValueError("evaluate: no examples")
    logits = []
    starts = range(0, n, batch_size)
    for start in _bar(starts, progress, desc=desc, total=len(starts)):
        logits.append(np.asarray(predict(x[start : start + batch_size])))
    logits = np.concatenate(logits, axis=0)
    if logits.shape[0] != n:
        raise RuntimeError(f"predict returned {logits.shape[0]} rows for {n} examples")
    predictions = logits.argmax(axis=1).astype(np.int64)
    correct = int((predictions == y).sum())
    return {
        "accuracy": correct / n,
        "loss": float(cross_entropy(logits, y).mean()),
        "correct": correct,
        "n": n,
        "predictions": predictions,
        "logits": logits,
    }


# ------------------------------------------------------------------ canonical train state
@dataclass(eq=False)
class TrainState:
    """Everything a bit-identical resume needs, framework-free and in canonical names."""

    config: TrainConfig
    weights: dict[str, np.ndarray]
    opt: dict[str, dict[str, np.ndarray]]  # slot -> canonical name -> array
    step: int  # optimizer steps taken
    epoch: int  # completed epochs
    history: list[dict]  # per-epoch metrics so far
    written_by: str = ""

    def save(self, path) -> Path:
        from safetensors.numpy import save

        spec = self.config.model
        validate_weights(self.weights, spec)
        tensors = {f"model.{n}": np.ascontiguousarray(self.weights[n]) for n in spec.param_shapes()}
        trainable = [n for n, k in spec.param_kinds().items() if k == "param"]
        for slot, arrays in self.opt.items():
            missing = [n for n in trainable if n not in arrays]
            if missing:
                raise CheckpointError(f"optimizer slot {slot!r} lacks {missing}")
            for n in trainable:
                tensors[f"opt.{slot}.{n}"] = np.ascontiguousarray(arrays[n])
        meta = {
            "format": TRAIN_STATE_FORMAT,
            "version": str(TRAIN_STATE_VERSION),
            "config": self.config.to_json(),
            "step": str(int(self.step)),
            "epoch": str(int(self.epoch)),
            "history": json.dumps(self.history),
            "written_by": self.written_by,
        }
        return atomic_write_bytes(path, save(tensors, metadata=meta))

    @classmethod
    def load(cls, path) -> "TrainState":
        tensors, meta = read_checkpoint(path)
        if meta.get("format") != TRAIN_STATE_FORMAT or meta.get("version") != str(TRAIN_STATE_VERSION):
            raise CheckpointError(f"{path}: not a {TRAIN_STATE_FORMAT} v{TRAIN_STATE_VERSION} file (metadata {sorted(meta)})")
        try:
            config = TrainConfig.from_json(meta["config"])
            step, epoch, history = int(meta["step"]), int(meta["epoch"]), json.loads(meta["history"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt train-state metadata: {e}") from None
        weights = {n[len("model.") :]: a for n, a in tensors.items() if n.startswith("model.")}
        try:
            validate_weights(weights, config.model)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        opt: dict[str, dict[str, np.ndarray]] = {slot: {} for slot in optimizer_slots(config)}
        for name, arr in tensors.items():
            if name.startswith("opt."):
                slot, pname = name[len("opt.") :].split(".", 1)
                if slot not in opt:
                    raise CheckpointError(f"{path}: unexpected optimizer slot {slot!r} for {config.optimizer}")
                opt[slot][pname] = arr
        trainable = [n for n, k in config.model.param_kinds().items() if k == "param"]
        for slot, arrays in opt.items():
            if sorted(arrays) != sorted(trainable):
                raise CheckpointError(f"{path}: optimizer slot {slot!r} does not cover the trainable parameters")
        return cls(config, weights, opt, step, epoch, history, meta.get("written_by", ""))


# ------------------------------------------------------------------ the backend interface
class Trainer(Protocol):
    """What a backend provides to `fit`. Arrays in and out are NumPy; images NHWC; names canonical."""

    backend: str

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None: ...
    def get_weights(self) -> dict[str, np.ndarray]: ...
    def set_opt_state(self, slots: Mapping[str, Mapping[str, np.ndarray]], step: int) -> None: ...
    def get_opt_state(self) -> dict[str, dict[str, np.ndarray]]: ...
    def warmup(self, x: np.ndarray, y: np.ndarray) -> float: ...  # compile; returns seconds
    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> Any: ...  # returns a loss handle
    def losses(self, handles: Sequence[Any]) -> np.ndarray: ...  # waits for the device
    def predict(self, x: np.ndarray) -> np.ndarray: ...  # logits, eval mode
    def device(self) -> str: ...

    # Optional (data parallelism; defaults in brackets):
    #   is_main: bool            only the main process writes files and prints [True]
    #   parallel: dict           {"engine", "processes", "devices", ...} recorded in the metrics [one process]
    # ``train_step`` always receives the GLOBAL batch (the same on every process, from `iterate_batches`);
    # a data-parallel trainer feeds its devices their slices and returns the loss of the global batch.


# ------------------------------------------------------------------ the loop
def fit(
    config: TrainConfig,
    make_trainer: Callable[[TrainConfig], Trainer],
    *,
    data: Dataset | None = None,
    stop_after_epoch: int | None = None,
) -> dict:
    """Train ``config.epochs`` epochs (or resume), evaluating and checkpointing after every epoch.

    ``stop_after_epoch`` ends the run after that (1-based) epoch as if interrupted; a later run with
    ``resume=True`` continues bit-identically. Returns the metrics dict also written to metrics.json.
    """
    out = config.out_dir
    prepared = prepare_data(config, data)
    n = len(prepared.y_train)
    steps_per_epoch = batches_per_epoch(n, config.batch_size)  # drop_last: static shapes, no recompiles
    if steps_per_epoch == 0:
        raise ConfigError(f"batch_size {config.batch_size} is larger than the {n} training examples")
    total_steps = steps_per_epoch * config.epochs
    schedule = lr_schedule(config, steps_per_epoch)

    trainer = make_trainer(config)
    is_main = bool(getattr(trainer, "is_main", True))  # data parallel: only process 0 writes and prints
    show = config.progress and is_main
    history: list[dict] = []
    start_epoch, step, started = 0, 0, {"how": "fresh", "seed": config.seed}
    if config.resume:
        state_path = out / TRAIN_STATE_FILE
        if not state_path.is_file():
            raise CheckpointError(f"--resume: no {TRAIN_STATE_FILE} in {out} (nothing to resume; drop --resume)")
        state = TrainState.load(state_path)
        problems = config.resume_mismatches(state.config)
        if problems:
            raise ConfigError(f"--resume: {state_path} was written with a different config: " + "; ".join(problems))
        if state.step != state.epoch * steps_per_epoch:
            raise CheckpointError(
                f"{state_path}: step {state.step} != epoch {state.epoch} x {steps_per_epoch} steps per epoch "
                f"(different data size?)"
            )
        if config.epochs != state.config.epochs and config.schedule != "constant" and is_main:
            print(
                f"note: resuming with epochs={config.epochs} (checkpoint planned {state.config.epochs}): the lr "
                f"schedule is recomputed over the new length",
                file=sys.stderr,
            )
        trainer.set_weights(state.weights)
        trainer.set_opt_state(state.opt, state.step)
        history, start_epoch, step = list(state.history), state.epoch, state.step
        started = {"how": "resume", "from_epoch": state.epoch, "written_by": state.written_by}
    elif config.init_from:
        path = resolve_checkpoint(config.init_from)
        weights, spec = load_weights(path)
        if spec != config.model:
            raise ConfigError(f"--init-from {path}: checkpoint model {spec} differs from the configured {config.model}")
        trainer.set_weights(weights)
        started = {"how": "init_from", "checkpoint": str(path)}

    first = next(iter(iterate_batches(n, config.batch_size, seed=config.data_seed, epoch=0)))
    compile_seconds = trainer.warmup(prepared.x_train[first], prepared.y_train[first])

    base = {
        "format": "cbam_multi.TrainMetrics",
        "version": METRICS_FORMAT_VERSION,
        "backend": trainer.backend,
        "config": config.to_dict(),
        "dataset": prepared.info(),
        "model": {"num_params": config.model.num_params(), "spec": config.model.to_dict()},
        "versions": versions(),
        "device": trainer.device(),
        "parallel": getattr(trainer, "parallel", {"engine": "none", "processes": 1, "devices": 1}),
        "host": host_info(),
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "compile_seconds": compile_seconds,
        "started": started,
        "checkpoint": str(out / CHECKPOINT_FILE),
        "train_state": str(out / TRAIN_STATE_FILE),
    }
    metrics = _metrics(base, history)
    for epoch in range(start_epoch, config.epochs):
        handles, lrs = [], []
        aug = augment_rng(config, epoch)
        bar = _bar(None, show, total=steps_per_epoch, desc=f"{trainer.backend} epoch {epoch + 1}/{config.epochs}")
        t0 = time.perf_counter()
        for i, idx in enumerate(iterate_batches(n, config.batch_size, seed=config.data_seed, epoch=epoch)):
            lr = schedule(step)
            xb = random_shift(prepared.x_train[idx], aug, config.augment_shift)
            handles.append(trainer.train_step(xb, prepared.y_train[idx], lr))
            lrs.append(lr)
            step += 1
            bar.update(1)
            if show and (i % 50 == 49 or i == steps_per_epoch - 1):
                bar.set_postfix(loss=f"{float(trainer.losses(handles[-1:])[0]):.4f}", lr=f"{lr:.2e}")
        losses = trainer.losses(handles)  # waits for the last step
        train_seconds = time.perf_counter() - t0
        bar.close()
        t1 = time.perf_counter()
        ev = evaluate_arrays(trainer.predict, prepared.x_test, prepared.y_test, config.eval_batch_size)
        eval_seconds = time.perf_counter() - t1
        record = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": float(np.mean(losses)),
            "test_loss": ev["loss"],
            "test_accuracy": ev["accuracy"],
            "test_correct": ev["correct"],
            "epoch_seconds": train_seconds,
            "eval_seconds": eval_seconds,
            "images_per_s": steps_per_epoch * config.batch_size / train_seconds,
            "lr_first": lrs[0],
            "lr_last": lrs[-1],
            "train_losses": [float(v) for v in losses],
        }
        history.append(record)
        weights, opt_state = trainer.get_weights(), trainer.get_opt_state()  # on every process (no collectives)
        metrics = _metrics(base, history)
        if is_main:  # atomic writes, by one process only
            save_weights(out / CHECKPOINT_FILE, weights, config.model, extra_metadata={"cbam_multi.written_by": trainer.backend, "cbam_multi.epoch": str(epoch + 1)})
            TrainState(config, weights, opt_state, step, epoch + 1, history, trainer.backend).save(out / TRAIN_STATE_FILE)
            write_json_atomic(out / METRICS_FILE, metrics)
        if show:
            print(
                f"[{trainer.backend}] epoch {epoch + 1}/{config.epochs}: train loss {record['train_loss']:.4f}, "
                f"test loss {ev['loss']:.4f}, test acc {100 * ev['accuracy']:.2f}%, {train_seconds:.1f} s "
                f"({record['images_per_s']:.0f} img/s), eval {eval_seconds:.1f} s",
                file=sys.stderr,
                flush=True,
            )
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break
    if not history:
        raise ConfigError(f"nothing to do: the checkpoint in {out} already finished {start_epoch} epochs")
    return metrics


def _metrics(base: dict, history: list[dict]) -> dict:
    final = None
    if history:
        last = history[-1]
        final = {k: last[k] for k in ("epoch", "step", "train_loss", "test_loss", "test_accuracy")}
        final["mean_epoch_seconds"] = float(np.mean([h["epoch_seconds"] for h in history]))
    return {**base, "epochs": history, "final": final}


# ------------------------------------------------------------------ evaluation of a checkpoint
def resolve_checkpoint(path) -> Path:
    """A run directory means its ``checkpoint.safetensors``; a file is taken as is."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_FILE
    if not p.is_file():
        raise CheckpointError(f"{path}: no such checkpoint (give a .safetensors file or a run directory)")
    return p


def evaluate_checkpoint(
    checkpoint,
    build_predict: Callable[[dict, MNISTNetSpec, str], tuple[Callable[[np.ndarray], np.ndarray], str]],
    *,
    dataset: str = "auto",
    data_dir=None,
    n_test: int | None = None,
    batch_size: int = 1000,
    dtype: str = "float32",
    data: Dataset | None = None,
    progress: bool = False,
) -> dict:
    """Shared body of both backends' ``evaluate``: load, build (via ``build_predict``), evaluate."""
    path = resolve_checkpoint(checkpoint)
    weights, spec = load_weights(path)
    if not isinstance(spec, MNISTNetSpec):
        raise CheckpointError(f"{path}: holds a {type(spec).__name__}, not an MNISTNetSpec model")
    ds = subset(load_dataset(dataset, data_dir, data), None, n_test)
    x = normalize(ds.test_images, np.dtype("float32" if dtype == "bfloat16" else dtype))  # bf16: cast on the device
    predict, backend = build_predict(weights, spec, dtype)
    result = evaluate_arrays(predict, x, ds.test_labels, batch_size, progress, desc=f"{backend} eval")
    result.update(
        {
            "backend": backend,
            "checkpoint": str(path),
            "written_by": read_checkpoint(path)[1].get("cbam_multi.written_by", "unknown"),
            "dataset": {"name": ds.name, "source": ds.source, "n_test": ds.n_test},
            "dtype": dtype,
        }
    )
    return result


# ------------------------------------------------------------------ dispatch
def train_and_evaluate(config: TrainConfig, **kwargs) -> dict:
    """Dispatch to ``cbam_multi.<config.backend>.train.train_and_evaluate``."""
    if config.backend == "torch":
        from cbam_multi.torch.train import train_and_evaluate as run
    else:
        from cbam_multi.jax.train import train_and_evaluate as run
    return run(config, **kwargs)


def evaluate(checkpoint, backend: str = "torch", **kwargs) -> dict:
    """Dispatch to ``cbam_multi.<backend>.train.evaluate``."""
    if backend == "torch":
        from cbam_multi.torch.train import evaluate as run
    elif backend == "jax":
        from cbam_multi.jax.train import evaluate as run
    else:
        raise ConfigError(f"backend must be 'torch' or 'jax', got {backend!r}")
    return run(checkpoint, **kwargs)


# ------------------------------------------------------------------ misc
def versions() -> dict[str, str | None]:
    """Installed versions (no imports: reading package metadata only)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("cbam-multi", "numpy", "torch", "jax", "jaxlib", "flax", "optax", "safetensors"):
        try:
            out[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def host_info() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count()}


def write_json_atomic(path, obj) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=1, default=_json_default) + "\n").encode())


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def _bar(iterable, enabled: bool, **kwargs):
    if enabled:
        from tqdm import tqdm

        return tqdm(iterable, leave=False, dynamic_ncols=True, **kwargs)
    if iterable is None:
        return _NoBar()
    return iterable


# ------------------------------------------------------------------ cross-framework trajectory parity
# THE tolerance table of training parity (tests and `cbam-multi parity --train` both use it).
# Same init, same batches, same lrs; two runs of N optimizer steps (default config: AdamW, cosine
# schedule, real MNIST). Keys are (kind, longest horizon in steps); a run uses the first row of its kind
# whose horizon covers it (so a 1-step row bounds the first loss of a longer run: same weights, forward only).
# Kinds:
#   "float64", "float32", "bfloat16":  torch vs JAX in that dtype (batch 64);
#   "bfloat16-vs-float32":             one backend, mixed precision (bf16 compute, float32 params) vs float32;
#   "sharded:float64|float32":         JAX data-parallel over 4 devices (jax.sharding) vs 1 device;
#   "ddp:float64|float32":             torch DDP, 2 processes (gloo) vs 1 process, same global batch.
# Quantities:
#   loss_rel:        max over steps of |loss_a - loss_b| / |loss_a|
#   window_loss_rel: |mean loss of the last N/4 steps, a / b - 1|   (smoothed curves)
#   weights_rel:     max over tensors of max|w_a - w_b| / max|w_a| after the last step
#   agreement:       fraction of equal test predictions (1,000 images) of the two final models
# None = not bounded at that horizon.
# Measured (2-core CPU, torch 2.13 / jax 0.10.2):
#   float64, 30 and 200 steps: loss_rel <= 2.3e-15, weights_rel <= 2.3e-13, agreement 1.0.
#   float32, 30 steps, data seeds 0-5: loss_rel 3e-7 .. 4.4e-4, weights_rel 1.5e-4 .. 6.5e-3, agreement >= 0.999.
#   float32, 200 steps, data seeds 0-2: loss_rel up to 0.14, weights_rel up to 0.59 (single weights whose
#     Adam-normalised updates follow rounding noise), window_loss_rel <= 1.1e-2, agreement >= 0.997.
#   The float32 drift is torch's: against the exact (float64) trajectory, torch float32 (oneDNN convs)
#   leaves 1e-3 at step ~45 and reaches 8e-2, JAX float32 stays below 3.3e-3 over 200 steps (with
#   torch.backends.mkldnn disabled torch float32 tracks float64 to 2e-6 over 30 steps); with SGD both
#   stay within ~1e-7 of float64 over 30 steps.
#   bfloat16, 30 steps, data seeds 0-5 (`trajectory_parity(..., runs=...)`):
#     first step (forward only): loss_rel <= 1.6e-5 (torch vs JAX and bf16 vs float32, both backends);
#     torch-bf16 vs jax-bf16: loss_rel <= 0.077, window_loss_rel <= 0.038, weights_rel <= 0.85, agreement >= 0.970;
#     bf16 vs float32: torch loss_rel <= 0.12, jax <= 0.066; window_loss_rel <= 0.038; weights_rel <= 0.85;
#     agreement >= 0.951 (test accuracy within 0.9 points either way). bf16 rounding (8-bit mantissa) of
#     activations dominates: torch-bf16 vs jax-bf16 differ about as much as either differs from float32.
#   sharded (JAX, 4 forced host devices vs 1), 20 steps of 64, data seeds 0-3, presets seed and official (BN):
#     float64 loss_rel <= 1.6e-15, weights_rel <= 2.4e-12; float32 loss_rel <= 4.5e-6, weights_rel <= 1.3e-3.
#     Multi-process (2 processes x 2 devices, float64, 10 steps of 32): loss_rel 2.2e-16, weights_rel 1.2e-13.
#   ddp (torch, torchrun 2 x gloo vs 1 process), 20 steps of 32, data seeds 0-3: float64 loss_rel <= 2.2e-16;
#     float32 loss_rel <= 1.9e-7, weights_rel <= 2.2e-4.
# Bounds = measured worst case with >= 4x margin (sharded/ddp float64: the 1e-10 scale-out criterion).
TRAJECTORY_TOLERANCES: dict[tuple[str, int], dict[str, float | None]] = {
    ("float64", 200): {"loss_rel": 1e-8, "window_loss_rel": 1e-8, "weights_rel": 1e-8, "agreement": 1.0},
    ("float32", 50): {"loss_rel": 5e-3, "window_loss_rel": 5e-3, "weights_rel": 5e-2, "agreement": 0.995},
    ("float32", 200): {"loss_rel": None, "window_loss_rel": 5e-2, "weights_rel": None, "agreement": 0.99},
    ("bfloat16", 1): {"loss_rel": 1e-4, "window_loss_rel": None, "weights_rel": None, "agreement": None},
    ("bfloat16", 30): {"loss_rel": 0.3, "window_loss_rel": 0.15, "weights_rel": None, "agreement": 0.88},
    ("bfloat16-vs-float32", 1): {"loss_rel": 1e-4, "window_loss_rel": None, "weights_rel": None, "agreement": None},
    ("bfloat16-vs-float32", 30): {"loss_rel": 0.5, "window_loss_rel": 0.15, "weights_rel": None, "agreement": 0.8},
    ("sharded:float64", 20): {"loss_rel": 1e-10, "window_loss_rel": 1e-10, "weights_rel": 1e-8, "agreement": 1.0},
    ("sharded:float32", 20): {"loss_rel": 2e-5, "window_loss_rel": 2e-5, "weights_rel": 5e-3, "agreement": 0.995},
    ("ddp:float64", 20): {"loss_rel": 1e-10, "window_loss_rel": 1e-10, "weights_rel": 1e-8, "agreement": 1.0},
    ("ddp:float32", 20): {"loss_rel": 1e-6, "window_loss_rel": 1e-6, "weights_rel": 1e-3, "agreement": 0.995},
}


def trajectory_tolerance(dtype: str, steps: int) -> dict[str, float | None]:
    """The `TRAJECTORY_TOLERANCES` row for ``steps`` steps of kind ``dtype`` (a dtype or e.g. ``"ddp:float32"``)."""
    rows = sorted((h, tol) for (d, h), tol in TRAJECTORY_TOLERANCES.items() if d == dtype)
    for horizon, tol in rows:
        if steps <= horizon:
            return tol
    raise ValueError(f"no trajectory tolerance stated for {steps} steps in {dtype} (longest: {rows[-1][0] if rows else None})")


def default_mnist_dir() -> Path | None:
    """``$CBAM_MNIST_DIR``, else ``../shared/mnist`` next to the repository root, if it exists."""
    env = os.environ.get("CBAM_MNIST_DIR")
    if env:
        return Path(env)
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "mnist"
    return shared if shared.is_dir() else None


def trajectory_parity(
    steps: int = 30,
    dtype: str = "float64",
    *,
    batch_size: int = 64,
    n_test: int = 1000,
    data: Dataset | None = None,
    dataset: str = "mnist",
    data_dir=None,
    out_root=None,
    base: TrainConfig | None = None,
    runs: Sequence[tuple[str, str]] | None = None,
    tolerance: str | None = None,
) -> dict:
    """Train ``steps`` optimizer steps twice from the same init on the same batches and compare the
    per-step losses, the final weights and the final models' test predictions.

    By default the two runs are torch and JAX in ``dtype``; ``runs`` names any two ``(backend, dtype)``
    runs instead, e.g. ``[("torch", "float32"), ("torch", "bfloat16")]`` for mixed precision against
    float32. ``tolerance`` is the `TRAJECTORY_TOLERANCES` row kind (default ``dtype``). Both runs are
    ordinary `train_and_evaluate` calls (one epoch of ``steps * batch_size`` examples), so everything
    the real runs use is exercised. Returns a report dict (see `format_trajectory`); ``losses_torch`` /
    ``losses_jax`` hold the first / second run's losses.
    """
    import tempfile

    base = base or TrainConfig()
    root = Path(out_root) if out_root is not None else Path(tempfile.mkdtemp(prefix="cbam-trajectory-"))
    pair = list(runs) if runs is not None else [("torch", dtype), ("jax", dtype)]
    if len(pair) != 2 or pair[0] == pair[1]:
        raise ValueError(f"runs must name two different (backend, dtype) runs, got {pair}")
    cfg = base.replace(
        epochs=1,
        batch_size=batch_size,
        n_train=steps * batch_size,
        n_test=n_test,
        eval_batch_size=min(base.eval_batch_size, n_test),
        dataset=dataset,
        data_dir=None if data_dir is None else str(data_dir),
        resume=False,
        init_from=None,
        progress=False,
    )
    labels = [f"{b}-{d}" if runs is not None else b for b, d in pair]
    results, weights, preds = [], [], []
    for (backend, dt), label in zip(pair, labels):
        c = cfg.replace(backend=backend, dtype=dt, out=str(root / label))
        results.append(train_and_evaluate(c, data=data))
        weights.append(load_weights(c.out_dir / CHECKPOINT_FILE)[0])
    for (backend, dt), label in zip(pair, labels):
        ev = evaluate(
            root / label, backend=backend, data=data, dataset=dataset,
            data_dir=cfg.data_dir, n_test=n_test, batch_size=cfg.eval_batch_size, dtype=dt,
        )
        preds.append(ev["predictions"])
    lt = np.asarray(results[0]["epochs"][0]["train_losses"])
    lj = np.asarray(results[1]["epochs"][0]["train_losses"])
    loss_rel = np.abs(lt - lj) / np.abs(lt)
    window = max(1, steps // 4)
    window_loss_rel = float(abs(lt[-window:].mean() / lj[-window:].mean() - 1.0))
    w_rel = {
        n: float(np.abs(weights[0][n].astype(np.float64) - weights[1][n]).max() / max(np.abs(weights[0][n]).max(), 1e-30))
        for n in weights[0]
    }
    worst = max(w_rel, key=w_rel.get)
    kind = tolerance or dtype
    tol = trajectory_tolerance(kind, steps)
    report = {
        "steps": steps,
        "dtype": dtype if runs is None else " vs ".join(labels),
        "tolerance_row": kind,
        "runs": labels,
        "batch_size": batch_size,
        "dataset": results[0]["dataset"],
        "losses_torch": lt,
        "losses_jax": lj,
        "loss_rel": loss_rel,
        "max_loss_rel": float(loss_rel.max()),
        "window_loss_rel": window_loss_rel,
        "window": window,
        "weights_rel": float(w_rel[worst]),
        "worst_weight": worst,
        "agreement": float((preds[0] == preds[1]).mean()),
        "accuracy": {label: r["final"]["test_accuracy"] for label, r in zip(labels, results)},
        "tolerances": tol,
        "out": str(root),
    }
    report["ok"] = all(
        bound is None or (report[key] >= bound if key == "agreement" else report[key] <= bound)
        for key, bound in (("max_loss_rel", tol["loss_rel"]), *((k, tol[k]) for k in ("window_loss_rel", "weights_rel", "agreement")))
    )
    return report


def format_trajectory(report: dict, every: int = 10) -> str:
    lt, lj, rel = report["losses_torch"], report["losses_jax"], report["loss_rel"]
    first, second = report.get("runs", ["torch", "jax"])
    lines = [
        f"trajectory parity: {report['steps']} steps, {report['dtype']}, batch {report['batch_size']}, "
        f"data {report['dataset']['name']} ({report['dataset']['n_train']} train / {report['dataset']['n_test']} test)",
        f"{'step':>6} {'loss ' + first:>22} {'loss ' + second:>22} {'rel diff':>10}",
    ]
    for i in range(len(lt)):
        if i % every == 0 or i == len(lt) - 1:
            lines.append(f"{i + 1:>6} {lt[i]:>22.15g} {lj[i]:>22.15g} {rel[i]:>10.2e}")
    tol = report["tolerances"]

    def bound(v):
        return "not bounded at this length" if v is None else f"tol {v:.0e}"

    agreement_bound = "not bounded" if tol["agreement"] is None else f"tol >= {100 * tol['agreement']:.1f}%"

    lines += [
        f"max loss rel diff    {report['max_loss_rel']:.3e}  ({bound(tol['loss_rel'])})",
        f"last {report['window']} steps mean   {report['window_loss_rel']:.3e}  ({bound(tol['window_loss_rel'])})",
        f"final weights rel    {report['weights_rel']:.3e}  ({bound(tol['weights_rel'])}; worst {report['worst_weight']})",
        f"test predictions     {100 * report['agreement']:.2f}% equal ({agreement_bound}); accuracy "
        + ", ".join(f"{k} {100 * v:.2f}%" for k, v in report["accuracy"].items()),
        "OK" if report["ok"] else "FAIL",
    ]
    return "\n".join(lines)
