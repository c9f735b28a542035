"""The backend registry: backend name -> the module with its `Trainer` class and its ``build_predict``.

Training and evaluation are written once (`cbam_multi.training.fit`, `cbam_multi.training.evaluation`);
a backend contributes only these two things, and is imported when first used.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from cbam_multi._optional import require
from cbam_multi.training.config import ConfigError, TrainConfig
from cbam_multi.training.data import Dataset
from cbam_multi.training.evaluation import evaluate_checkpoint
from cbam_multi.training.fit import fit

__all__ = ["TRAINERS", "backend_module", "train_and_evaluate", "evaluate"]

# name -> (module, its Trainer class); the module also defines ``build_predict(weights, spec, dtype, batch_size)``
TRAINERS: dict[str, tuple[str, str]] = {
    "torch": ("cbam_multi.torch.train", "TorchTrainer"),
    "jax": ("cbam_multi.jax.train", "JaxTrainer"),
}
# the frameworks each backend's trainer imports: a missing one is named with the extra that installs it
FRAMEWORKS: dict[str, tuple[str, ...]] = {"torch": ("torch",), "jax": ("jax", "flax", "optax")}


def backend_module(name: str) -> ModuleType:
    """The training module of backend ``name`` (imports the framework)."""
    if name not in TRAINERS:
        raise ConfigError(f"backend must be one of {sorted(TRAINERS)}, got {name!r}")
    for framework in FRAMEWORKS[name]:
        require(framework, f"the {name} backend")
    return importlib.import_module(TRAINERS[name][0])


def train_and_evaluate(config: TrainConfig, *, data: Dataset | None = None, stop_after_epoch: int | None = None) -> dict:
    """Train and evaluate ``config`` with ``config.backend``'s trainer; see `cbam_multi.training.fit.fit`.

    Writes ``<out>/metrics.json``, ``<out>/checkpoint.safetensors`` and ``<out>/train_state.safetensors``
    after every epoch; ``data`` overrides loading (a preloaded `cbam_multi.training.data.Dataset`).
    """
    trainer = getattr(backend_module(config.backend), TRAINERS[config.backend][1])
    return fit(config, trainer, data=data, stop_after_epoch=stop_after_epoch)


def evaluate(checkpoint, backend: str = "torch", **kwargs) -> dict:
    """Evaluate a model checkpoint written by either backend (file or run directory) on the test split with
    ``backend``; keyword arguments as `cbam_multi.training.evaluation.evaluate_checkpoint`."""
    return evaluate_checkpoint(checkpoint, backend_module(backend).build_predict, backend, **kwargs)
