"""Evaluation, written once: cross-entropy and accuracy of any ``predict`` (NHWC batch -> logits) over a
split, and the evaluation of a checkpoint with the predict function a backend builds for it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from cbam_multi.errors import CheckpointError
from cbam_multi.models import MNISTNetSpec, ResNetSpec
from cbam_multi.training.config import DTYPES, MODEL_SPECS, ConfigError
from cbam_multi.training.data import Dataset, normalize, subset
from cbam_multi.training.inputs import load_dataset, pad_to_model
from cbam_multi.training.progress import bar
from cbam_multi.training.state import CHECKPOINT_FILE
from cbam_multi.weights import load_weights, read_checkpoint

__all__ = ["cross_entropy", "evaluate_arrays", "resolve_checkpoint", "load_model", "evaluate_checkpoint"]

# (canonical weights, model spec, dtype name, batch size) -> predict (NHWC batch -> logits, NumPy)
BuildPredict = Callable[[dict, MNISTNetSpec | ResNetSpec, str, int], Callable[[np.ndarray], np.ndarray]]


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
    for start in bar(starts, progress, desc=desc, total=len(starts)):
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


def resolve_checkpoint(path) -> Path:
    """A run directory means its ``checkpoint.safetensors``; a file is taken as is. A path this user may
    not search is reported as a permission problem, not as a missing file."""
    p = Path(path)
    if _stat(p, path) and p.is_dir():
        p = p / CHECKPOINT_FILE
    if not _stat(p, path) or not p.is_file():
        raise CheckpointError(f"{path}: no such checkpoint (give a .safetensors file or a run directory)")
    return p


def _stat(p: Path, given) -> bool:
    try:
        p.stat()
    except PermissionError:
        raise CheckpointError(
            f"{given}: permission denied: this user may not search a directory on that path (or read {p.name})"
        ) from None
    except OSError:
        return False
    return True


def load_model(path: Path) -> tuple[dict, object, str]:
    """(weights, model spec, written_by) from a model checkpoint or a run's train state (its model part)."""
    from cbam_multi.training.state import TRAIN_STATE_FORMAT, ResumeState

    meta = read_checkpoint(path)[1]
    if meta.get("format") == TRAIN_STATE_FORMAT:
        state = ResumeState.load(path)
        return state.weights, state.config.model, state.written_by or "unknown"
    weights, spec = load_weights(path)
    return weights, spec, meta.get("cbam_multi.written_by", "unknown")


def evaluate_checkpoint(
    checkpoint,
    build_predict: BuildPredict,
    backend: str,
    *,
    dataset: str = "auto",
    data_dir=None,
    n_test: int | None = None,
    batch_size: int = 1000,
    dtype: str = "float32",
    data: Dataset | None = None,
    progress: bool = False,
) -> dict:
    """Evaluate a model checkpoint (file or run directory) on the test split with the predict function that
    ``build_predict(weights, spec, dtype, batch_size)`` of ``backend`` builds; ``dtype`` is float32, float64 or
    bfloat16 (float32 weights, bf16 compute).

    Returns ``{"accuracy", "loss", "predictions", "logits", "correct", "n", ...}``; the tail batch is kept.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    for name, value in (("batch_size", batch_size), ("n_test", n_test)):
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
    path = resolve_checkpoint(checkpoint)
    weights, spec, written_by = load_model(path)
    if not isinstance(spec, tuple(MODEL_SPECS.values())):
        kinds = ", ".join(c.__name__ for c in MODEL_SPECS.values())
        raise CheckpointError(f"{path}: holds a {type(spec).__name__}, not a trainable model ({kinds})")
    ds = subset(load_dataset(dataset, data_dir, data), None, n_test)
    top = int(ds.test_labels.max(initial=0))
    if top >= spec.num_classes:
        raise ConfigError(f"{path}: the model has num_classes={spec.num_classes}, but the {ds.name} labels go up to {top}")
    x = normalize(ds.test_images, np.dtype("float32" if dtype == "bfloat16" else dtype))  # bf16: cast on the device
    x = pad_to_model(x, spec)
    predict = build_predict(weights, spec, dtype, batch_size)
    result = evaluate_arrays(predict, x, ds.test_labels, batch_size, progress, desc=f"{backend} eval")
    result.update(
        {
            "backend": backend,
            "checkpoint": str(path),
            "written_by": written_by,
            "dataset": {"name": ds.name, "source": ds.source, "n_test": ds.n_test},
            "dtype": dtype,
        }
    )
    return result

