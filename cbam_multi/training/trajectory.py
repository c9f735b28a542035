"""Cross-framework trajectory parity: two training runs from the same init on the same batches, compared
step by step, with THE tolerance table of training parity (measurements: benchmarks/RESULTS.md)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cbam_multi.training.backends import evaluate, train_and_evaluate
from cbam_multi.training.config import ConfigError, TrainConfig
from cbam_multi.training.data import Dataset
from cbam_multi.training.state import CHECKPOINT_FILE
from cbam_multi.weights import load_weights

__all__ = ["TRAJECTORY_TOLERANCES", "trajectory_tolerance", "default_mnist_dir", "trajectory_parity", "format_trajectory"]


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
# Bounds = measured worst case with >= 4x margin (sharded/ddp float64: the 1e-10 scale-out criterion); the
# measurements are in benchmarks/RESULTS.md, "Training trajectory tolerances".
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
    longest = rows[-1][0] if rows else None
    raise ConfigError(
        f"no trajectory tolerance stated for {steps} steps in {dtype}: the longest measured horizon is {longest} steps; "
        f"use --steps {longest} or fewer" if rows else f"no trajectory tolerance stated for kind {dtype!r}"
    )


def default_mnist_dir() -> Path | None:
    """The full-MNIST folder the library would use: `cbam_multi.training.data.find_mnist_dir`'s search
    ($CBAM_MNIST_DIR, the cache, torchvision-style folders), or None. The one policy of the library, the
    CLI and the tests; CI points $CBAM_MNIST_DIR at its copy."""
    from cbam_multi.training.data import find_mnist_dir

    return find_mnist_dir()


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
    cache: dict | None = None,
) -> dict:
    """Train ``steps`` optimizer steps twice from the same init on the same batches and compare the
    per-step losses, the final weights and the final models' test predictions.

    By default the two runs are torch and JAX in ``dtype``; ``runs`` names any two ``(backend, dtype)``
    runs instead, e.g. ``[("torch", "float32"), ("torch", "bfloat16")]`` for mixed precision against
    float32. ``tolerance`` is the `TRAJECTORY_TOLERANCES` row kind (default ``dtype``). Both runs are
    ordinary `train_and_evaluate` calls (one epoch of ``steps * batch_size`` examples), so everything
    the real runs use is exercised. Returns a report dict (see `format_trajectory`); ``losses_torch`` /
    ``losses_jax`` hold the first / second run's losses. ``cache``: a dict shared by several calls on the
    same ``data``; a run whose config (all but ``out``) an earlier call trained is taken from it, not retrained
    (e.g. the bf16 run compared both with the other backend and with float32).
    """
    import tempfile

    if not (isinstance(steps, int) and steps >= 1):
        raise ConfigError(f"steps must be an int >= 1, got {steps!r}")
    trajectory_tolerance(tolerance or dtype, steps)  # no tolerance for this length: say so before training
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
    cache = {} if cache is None else cache
    done = []
    for (backend, dt), label in zip(pair, labels):
        c = cfg.replace(backend=backend, dtype=dt, out=str(root / label))
        key = (c.replace(out="").to_json(), id(data))
        if key not in cache:
            run = {"result": train_and_evaluate(c, data=data), "weights": load_weights(c.out_dir / CHECKPOINT_FILE)[0]}
            run["preds"] = evaluate(
                c.out_dir, backend=backend, data=data, dataset=dataset,
                data_dir=cfg.data_dir, n_test=n_test, batch_size=cfg.eval_batch_size, dtype=dt,
            )["predictions"]
            cache[key] = run
        done.append(cache[key])
    results, weights, preds = ([r[k] for r in done] for k in ("result", "weights", "preds"))
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
