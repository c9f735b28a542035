"""The MNIST training application: config, data, the shared fit loop, evaluation, trajectory parity, plots
and the `cbam-multi` command line. Loaded only when used: ``import cbam_multi`` and the backends' layer
packages do not import it. Backends contribute a `Trainer` and a predict builder (`.backends`)."""

from cbam_multi.machine import host_info, versions
from cbam_multi.training.backends import TRAINERS, evaluate, train_and_evaluate
from cbam_multi.training.config import ConfigError, TrainConfig
from cbam_multi.training.evaluation import cross_entropy, evaluate_arrays, evaluate_checkpoint, resolve_checkpoint
from cbam_multi.training.fit import Trainer, fit
from cbam_multi.training.inputs import PreparedData, prepare_data
from cbam_multi.training.schedule import lr_at, lr_schedule
from cbam_multi.training.state import CHECKPOINT_FILE, METRICS_FILE, TRAIN_STATE_FILE, ResumeState, optimizer_slots
from cbam_multi.training.trajectory import (
    TRAJECTORY_TOLERANCES,
    default_mnist_dir,
    format_trajectory,
    trajectory_parity,
    trajectory_tolerance,
)

__all__ = [
    "CHECKPOINT_FILE",
    "METRICS_FILE",
    "TRAIN_STATE_FILE",
    "TRAINERS",
    "TRAJECTORY_TOLERANCES",
    "ConfigError",
    "PreparedData",
    "ResumeState",
    "TrainConfig",
    "Trainer",
    "cross_entropy",
    "default_mnist_dir",
    "evaluate",
    "evaluate_arrays",
    "evaluate_checkpoint",
    "fit",
    "format_trajectory",
    "host_info",
    "lr_at",
    "lr_schedule",
    "optimizer_slots",
    "prepare_data",
    "resolve_checkpoint",
    "train_and_evaluate",
    "trajectory_parity",
    "trajectory_tolerance",
    "versions",
]
