"""The learning-rate schedule both backends follow: one Python-float function of the step."""

from __future__ import annotations

import math
from collections.abc import Callable

from cbam_multi.training.config import TrainConfig

__all__ = ["lr_at", "lr_schedule"]


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
    warmup = round(config.warmup_frac * total)
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

