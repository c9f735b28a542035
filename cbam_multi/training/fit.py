"""The training loop shared by both backends.

The epoch loop, the learning-rate schedule, batching, evaluation, metrics and checkpoints live here
ONCE; a backend only supplies a small `Trainer` (build the model, one optimizer step, logits,
canonical weights and optimizer state). Both backends therefore run the same loop on the same
batches with the same learning rates, and their files are interchangeable:

* ``<out>/checkpoint.safetensors``: the model's canonical weights + spec (`cbam_multi.save_weights`),
  loadable by `cbam_multi.load_weights` and by either backend's evaluation / ``init_from``.
* ``<out>/train_state.safetensors``: everything a resume needs (`cbam_multi.training.state.ResumeState`):
  the model weights, the optimizer slots, the step and epoch, the config and the metrics history. Data
  order needs no RNG state: it is a pure function of (``data_seed``, epoch). A resumed run is
  bit-identical to an uninterrupted one, and because the state is canonical it can even be resumed by
  the other framework.
* ``<out>/metrics.json``: per-epoch metrics, written atomically after every epoch.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from cbam_multi.errors import CheckpointError
from cbam_multi.jsondata import write_json_atomic
from cbam_multi.machine import host_info, versions
from cbam_multi.training.config import ConfigError, TrainConfig
from cbam_multi.training.data import Dataset, batches_per_epoch, iterate_batches
from cbam_multi.training.evaluation import evaluate_arrays, resolve_checkpoint
from cbam_multi.training.inputs import augment_rng, prepare_data, random_shift
from cbam_multi.training.progress import bar as progress_bar
from cbam_multi.training.rundir import check_out_dir, run_lock
from cbam_multi.training.schedule import lr_schedule
from cbam_multi.training.state import CHECKPOINT_FILE, METRICS_FILE, TRAIN_STATE_FILE, ResumeState
from cbam_multi.weights import load_weights, save_weights

__all__ = ["Trainer", "fit", "METRICS_FORMAT_VERSION"]

METRICS_FORMAT_VERSION = 1


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
    if stop_after_epoch is not None and not (isinstance(stop_after_epoch, int) and stop_after_epoch >= 1):
        raise ConfigError(f"--stop-after-epoch must be an int >= 1 (1 = stop after the first epoch), got {stop_after_epoch!r}")
    check_out_dir(out)  # before any work: a file in the way or no permission fails now, not after an epoch
    prepared = prepare_data(config, data)
    _check_labels(config, prepared)
    n = len(prepared.y_train)
    steps_per_epoch = batches_per_epoch(n, config.batch_size)  # drop_last: static shapes, no recompiles
    if steps_per_epoch == 0:
        raise ConfigError(f"batch_size {config.batch_size} is larger than the {n} training examples")

    trainer = make_trainer(config)
    is_main = bool(getattr(trainer, "is_main", True))  # data parallel: only process 0 writes and prints
    with run_lock(out) if is_main else contextlib.nullcontext():  # one run per directory
        return _fit(config, trainer, prepared, steps_per_epoch, is_main, stop_after_epoch)


def _check_labels(config: TrainConfig, prepared) -> None:
    top = int(max(prepared.y_train.max(initial=0), prepared.y_test.max(initial=0)))
    k = config.model.num_classes
    if top >= k:
        raise ConfigError(
            f"model num_classes={k}, but the {prepared.name} labels go up to {top}: set num_classes to at least {top + 1}"
        )


def _fit(config: TrainConfig, trainer: Trainer, prepared, steps_per_epoch: int, is_main: bool, stop_after_epoch) -> dict:
    out = config.out_dir
    n = len(prepared.y_train)
    total_steps = steps_per_epoch * config.epochs
    schedule = lr_schedule(config, steps_per_epoch)
    show = config.progress and is_main
    history: list[dict] = []
    start_epoch, step, started = 0, 0, {"how": "fresh", "seed": config.seed}
    if config.resume:
        state_path = out / TRAIN_STATE_FILE
        if not state_path.is_file():
            raise CheckpointError(f"--resume: no {TRAIN_STATE_FILE} in {out} (nothing to resume; drop --resume)")
        state = ResumeState.load(state_path)
        problems = config.resume_mismatches(state.config)
        if problems:
            raise ConfigError(f"--resume: {state_path} was written with a different config: " + "; ".join(problems))
        _check_same_dataset(state, prepared, state_path)
        if state.step != state.epoch * steps_per_epoch:
            raise CheckpointError(
                f"{state_path}: step {state.step} != epoch {state.epoch} x {steps_per_epoch} steps per epoch "
                f"(different data size?)"
            )
        if state.epoch >= config.epochs and state.history:
            if is_main:
                print(
                    f"note: --resume: {state_path} already finished {state.epoch} of {config.epochs} epochs; nothing "
                    f"trained, nothing written (raise --epochs to train further)",
                    file=sys.stderr,
                )
            return _finished_metrics(out, trainer, prepared, state)
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
    # TensorBoard events: opened before training, so a missing package fails now and not after epoch 1;
    # flushed after every epoch, so an interrupted run keeps what it logged.
    events = None
    if config.tensorboard and is_main:
        from cbam_multi.training.tensorboard import SUBDIR, EventLog

        events = EventLog(out / SUBDIR)
    for epoch in range(start_epoch, config.epochs):
        handles, lrs = [], []
        aug = augment_rng(config, epoch)
        bar = progress_bar(None, show, total=steps_per_epoch, desc=f"{trainer.backend} epoch {epoch + 1}/{config.epochs}")
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
            written = {"cbam_multi.written_by": trainer.backend, "cbam_multi.epoch": str(epoch + 1)}
            save_weights(out / CHECKPOINT_FILE, weights, config.model, extra_metadata=written)
            state = ResumeState(config, weights, opt_state, step, epoch + 1, history, trainer.backend, prepared.info())
            state.save(out / TRAIN_STATE_FILE)
            write_json_atomic(out / METRICS_FILE, metrics)
            if events is not None:
                events.epoch(step - len(losses), record, lrs)
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
    if events is not None:
        events.close()
    if not history:
        raise ConfigError(f"nothing to do: the checkpoint in {out} already finished {start_epoch} epochs")
    return metrics


def _finished_metrics(out, trainer, prepared, state: ResumeState) -> dict:
    """The finished run's metrics (its metrics.json when present), flagged ``already_finished``."""
    try:
        metrics = json.loads((out / METRICS_FILE).read_text())
    except (OSError, ValueError):
        metrics = {"backend": trainer.backend, "dataset": prepared.info(), "epochs": list(state.history),
                   "checkpoint": str(out / CHECKPOINT_FILE)}
    return {**metrics, "already_finished": True}


def _check_same_dataset(state: ResumeState, prepared, state_path) -> None:
    """A resume trains on exactly the data the run started with (name and content digest)."""
    was, now = state.dataset, prepared.info()
    if was is None:  # written before the dataset was recorded: nothing to compare
        print(f"note: {state_path} predates dataset records; the resumed data is not checked against it", file=sys.stderr)
        return
    if (was.get("name"), was.get("sha256")) != (now["name"], now["sha256"]):
        raise ConfigError(
            f"--resume: {state_path} was trained on dataset {was.get('name')} ({was.get('n_train')} train images, sha256 "
            f"{str(was.get('sha256'))[:12]}...), but this run would use {now['name']} ({now['n_train']} train images, sha256 "
            f"{now['sha256'][:12]}...); resume with the same --dataset/--data-dir, or start a new run in another --out"
        )


def _metrics(base: dict, history: list[dict]) -> dict:
    final = None
    if history:
        last = history[-1]
        final = {k: last[k] for k in ("epoch", "step", "train_loss", "test_loss", "test_accuracy")}
        final["mean_epoch_seconds"] = float(np.mean([h["epoch_seconds"] for h in history]))
    return {**base, "epochs": history, "final": final}

