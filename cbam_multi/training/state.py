"""The resumable train state: weights, optimizer slots, step, epoch, config and history in one atomic
safetensors file, in canonical names (so either framework can resume it).

Named ``ResumeState`` (not ``TrainState``) so it does not read as Flax's ``flax.training.train_state.TrainState``;
the file format keeps its original tag, so files written before the rename still load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cbam_multi.errors import CheckpointError
from cbam_multi.training.config import TrainConfig
from cbam_multi.weights import atomic_write_bytes, encode_checkpoint, read_checkpoint, validate_weights

__all__ = ["CHECKPOINT_FILE", "TRAIN_STATE_FILE", "METRICS_FILE", "ResumeState", "optimizer_slots"]

CHECKPOINT_FILE = "checkpoint.safetensors"
TRAIN_STATE_FILE = "train_state.safetensors"
METRICS_FILE = "metrics.json"
TRAIN_STATE_FORMAT = "cbam_multi.TrainState"
TRAIN_STATE_VERSION = 1


def optimizer_slots(config: TrainConfig) -> tuple[str, ...]:
    """Names of the per-parameter optimizer state slots, in canonical train-state files."""
    if config.optimizer in ("adam", "adamw"):
        return ("mu", "nu")  # first and second moments (torch exp_avg / exp_avg_sq)
    return ("momentum",) if config.momentum > 0 else ()  # torch momentum_buffer / optax trace


@dataclass(eq=False)
class ResumeState:
    """Everything a bit-identical resume needs, framework-free and in canonical names."""

    config: TrainConfig
    weights: dict[str, np.ndarray]
    opt: dict[str, dict[str, np.ndarray]]  # slot -> canonical name -> array
    step: int  # optimizer steps taken
    epoch: int  # completed epochs
    history: list[dict]  # per-epoch metrics so far
    written_by: str = ""
    dataset: dict | None = None  # {"name", "source", "n_train", "n_test", "sha256"}: what the run trained on

    def save(self, path) -> Path:
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
        if self.dataset is not None:
            meta["dataset"] = json.dumps(self.dataset, sort_keys=True)
        return atomic_write_bytes(path, encode_checkpoint(tensors, meta))

    @classmethod
    def load(cls, path) -> ResumeState:
        tensors, meta = read_checkpoint(path)
        if meta.get("format") != TRAIN_STATE_FORMAT or meta.get("version") != str(TRAIN_STATE_VERSION):
            raise CheckpointError(f"{path}: not a {TRAIN_STATE_FORMAT} v{TRAIN_STATE_VERSION} file (metadata {sorted(meta)})")
        try:
            config = TrainConfig.from_json(meta["config"])
            step, epoch, history = int(meta["step"]), int(meta["epoch"]), json.loads(meta["history"])
            dataset = json.loads(meta["dataset"]) if "dataset" in meta else None  # absent in older files
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
        return cls(config, weights, opt, step, epoch, history, meta.get("written_by", ""), dataset)

