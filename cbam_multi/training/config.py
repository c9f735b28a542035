"""Training configuration: ONE frozen dataclass that both backends read, with a JSON round trip.

Every hyper-parameter is explicit (no framework defaults leak in): optimizer, betas, eps, weight decay,
momentum, nesterov, the learning-rate schedule (computed by ONE framework-free function,
`cbam_multi.training.lr_at`), seeds, dtype and data selection. The defaults are the settings measured
to reach >= 99.3 % test accuracy on full MNIST within 5 epochs on a 2-core CPU (see the README/report).

Optimizer semantics (identical in torch.optim and optax, checked by the trajectory-parity tests):

=========  ====================================================  ==========================================
optimizer  update (g = gradient, t = step count from 1, lr_t = lr_at(step))   torch / optax
=========  ====================================================  ==========================================
adam       g += wd * p  (L2, *coupled*: enters the moments)       torch.optim.Adam(weight_decay=wd) /
           m = b1 m + (1-b1) g ; v = b2 v + (1-b2) g^2            chain(add_decayed_weights(wd), adam)
           p -= lr_t * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)   (eps outside the sqrt, after bias
                                                                   correction; eps_root = 0)
adamw      as adam without the L2 term, then decoupled decay:     torch.optim.AdamW(weight_decay=wd) /
           p -= lr_t * (adam_direction + wd * p)                   optax.adamw(weight_decay=wd)
           (the decay is scaled by lr_t, as in both libraries)
sgd        g += wd * p ; buf = momentum * buf + g (buf_0 = 0,     torch.optim.SGD(dampening=0) /
           so the first buf is g, as torch's) ; d = g + momentum   chain(add_decayed_weights(wd),
           * buf if nesterov else buf ; p -= lr_t * d              sgd(momentum=..., nesterov=...))
=========  ====================================================  ==========================================
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from cbam_multi.errors import CBAMError, SpecError
from cbam_multi.jsondata import JsonData
from cbam_multi.models import MNISTNetSpec, ResNetSpec
from cbam_multi.spec import check_field_types

BACKENDS = ("torch", "jax")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "linear")
DTYPES = ("float32", "float64", "bfloat16")  # bfloat16 = mixed precision: bf16 compute, float32 parameters
DATASETS = ("auto", "mnist", "sample")

CONFIG_FORMAT_VERSION = 1

# Fields that define *what* is trained. A resumed run must agree with its checkpoint on all of them
# (backend may differ: the train state is canonical, so a torch run can be resumed in JAX and back).
RESUME_MUST_MATCH = (
    "model",
    "batch_size",
    "optimizer",
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "momentum",
    "nesterov",
    "schedule",
    "warmup_frac",
    "final_lr_frac",
    "seed",
    "data_seed",
    "dtype",
    "n_train",
    "augment_shift",
)


# the model families a run can train: the JSON "format" tag of a model dict -> its spec class
MODEL_SPECS = {cls.JSON_FORMAT: cls for cls in (MNISTNetSpec, ResNetSpec)}
# CLI presets (``cbam-multi train --model NAME``); ``--width`` overrides a ResNet's width
MODEL_PRESETS = {
    "mnist": MNISTNetSpec(),
    "resnet18": ResNetSpec(18, stem="cifar", in_channels=1, num_classes=10),
}


class ConfigError(CBAMError):
    """A TrainConfig field is invalid, or a checkpoint's config is incompatible with the requested run."""


@dataclass(frozen=True)
class TrainConfig(JsonData, json_format="cbam_multi.TrainConfig", json_version=CONFIG_FORMAT_VERSION, json_error=ConfigError):
    """Everything `train_and_evaluate` needs, in one place. ``out`` may contain ``{backend}``."""

    backend: str = "torch"
    model: MNISTNetSpec | ResNetSpec = field(default_factory=MNISTNetSpec)
    # ------------------------------------------------------------------ schedule of the run
    epochs: int = 5
    batch_size: int = 64
    # ------------------------------------------------------------------ optimizer (all explicit)
    optimizer: str = "adamw"
    lr: float = 3e-3  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.999)  # adam/adamw
    eps: float = 1e-8  # adam/adamw, added to sqrt(v_hat)
    weight_decay: float = 1e-4  # adam/sgd: coupled L2; adamw: decoupled
    momentum: float = 0.9  # sgd only (0 = plain SGD)
    nesterov: bool = False  # sgd only
    # ------------------------------------------------------------------ learning-rate schedule
    schedule: str = "cosine"  # "constant" | "cosine" | "linear" (decay after the warmup)
    warmup_frac: float = 0.1  # fraction of all steps with a linear warmup (0 = none)
    final_lr_frac: float = 0.0  # lr at the end of the decay, as a fraction of ``lr``
    # ------------------------------------------------------------------ reproducibility / numerics
    seed: int = 0  # model init: cbam_multi.weights.init_weights(spec, seed)
    data_seed: int = 0  # batch order: cbam_multi.training.data.iterate_batches(seed=data_seed, epoch=e)
    dtype: str = "float32"  # "bfloat16": bf16 compute, float32 parameters/optimizer state/checkpoints (`param_dtype`)
    # ------------------------------------------------------------------ augmentation (framework-free, seeded NumPy)
    augment_shift: int = 1  # random translation of every training image by up to this many pixels (0 = off)
    # ------------------------------------------------------------------ data
    dataset: str = "auto"  # "auto" (full MNIST, else the bundled sample) | "mnist" | "sample"
    data_dir: str | None = None
    n_train: int | None = None  # first n of each split (None = all)
    n_test: int | None = None
    eval_batch_size: int = 1000  # the tail batch is evaluated too (never dropped)
    # ------------------------------------------------------------------ files
    out: str = "runs/mnist-{backend}"
    resume: bool = False  # continue from <out>/train_state.safetensors (bit-identically)
    init_from: str | None = None  # model checkpoint (either framework) to start from; fresh optimizer
    progress: bool = True  # tqdm bars
    tensorboard: bool = False  # also log to <out>/tensorboard/ (TensorBoard event files; the `tensorboard` extra)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", _spec_from_dict(self.model))
        check_field_types(self, ConfigError)  # a string for a number etc.: ConfigError naming the field
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        for name in ("lr", "eps", "weight_decay", "momentum", "warmup_frac", "final_lr_frac"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))
        self._validate()

    def _validate(self) -> None:
        problems = []

        def need(ok, msg):
            if not ok:
                problems.append(msg)

        need(self.backend in BACKENDS, f"backend must be one of {BACKENDS}, got {self.backend!r}")
        kinds = tuple(c.__name__ for c in MODEL_SPECS.values())
        need(isinstance(self.model, tuple(MODEL_SPECS.values())), f"model must be one of {kinds}, got {type(self.model).__name__}")
        need(_pos_int(self.epochs), f"epochs must be an int >= 1, got {self.epochs!r}")
        need(_pos_int(self.batch_size), f"batch_size must be an int >= 1, got {self.batch_size!r}")
        need(_pos_int(self.eval_batch_size), f"eval_batch_size must be an int >= 1, got {self.eval_batch_size!r}")
        need(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        need(_finite(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        need(
            len(self.betas) == 2 and all(_finite(b) and 0.0 <= b < 1.0 for b in self.betas),
            f"betas must be two floats in [0, 1), got {self.betas!r}",
        )
        need(_finite(self.eps) and self.eps >= 0, f"eps must be >= 0, got {self.eps!r}")
        need(_finite(self.weight_decay) and self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        need(_finite(self.momentum) and 0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum!r}")
        need(isinstance(self.nesterov, bool), f"nesterov must be a bool, got {self.nesterov!r}")
        need(
            not (self.optimizer == "sgd" and self.nesterov and self.momentum == 0),
            "nesterov needs momentum > 0 (as in torch.optim.SGD)",
        )
        need(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        need(_finite(self.warmup_frac) and 0 <= self.warmup_frac < 1, f"warmup_frac must be in [0, 1), got {self.warmup_frac!r}")
        need(_finite(self.final_lr_frac) and 0 <= self.final_lr_frac <= 1, f"final_lr_frac must be in [0, 1], got {self.final_lr_frac!r}")
        for name in ("seed", "data_seed"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"{name} must be an int >= 0, got {v!r}")
        need(
            isinstance(self.augment_shift, int) and not isinstance(self.augment_shift, bool) and 0 <= self.augment_shift < 14,
            f"augment_shift must be an int in [0, 14), got {self.augment_shift!r}",
        )
        need(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        need(self.dataset in DATASETS, f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        for name in ("n_train", "n_test"):
            v = getattr(self, name)
            need(v is None or _pos_int(v), f"{name} must be None or an int >= 1, got {v!r}")
        need(isinstance(self.resume, bool) and isinstance(self.progress, bool), "resume and progress must be bools")
        need(isinstance(self.tensorboard, bool), "tensorboard must be a bool")
        need(not (self.resume and self.init_from), "resume and init_from are exclusive (resume restores the weights too)")
        if problems:
            raise ConfigError("invalid TrainConfig: " + "; ".join(problems))

    # ------------------------------------------------------------------ derived
    @property
    def param_dtype(self) -> str:
        """Storage dtype of parameters, optimizer state, checkpoints and the prepared data: ``dtype``,
        except for mixed precision (``bfloat16``), whose master copy is float32."""
        return "float32" if self.dtype == "bfloat16" else self.dtype

    @property
    def mixed_precision(self) -> bool:
        """True when compute runs in a lower precision than `param_dtype` (``dtype="bfloat16"``)."""
        return self.dtype != self.param_dtype

    @property
    def out_dir(self) -> Path:
        return Path(self.out.format(backend=self.backend))

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def resume_mismatches(self, other: TrainConfig) -> list[str]:
        """Fields in `RESUME_MUST_MATCH` on which ``self`` and ``other`` differ, as readable strings."""
        return [
            f"{name}: checkpoint {getattr(other, name)!r}, requested {getattr(self, name)!r}"
            for name in RESUME_MUST_MATCH
            if getattr(self, name) != getattr(other, name)
        ]

    # ------------------------------------------------------------------ JSON (`cbam_multi.jsondata.JsonData`)
    @classmethod
    def _from_fields(cls, fields: dict) -> TrainConfig:
        if "model" in fields:
            fields["model"] = _spec_from_dict(fields["model"])
        return cls(**fields)


def _spec_from_dict(d) -> MNISTNetSpec | ResNetSpec:
    """A model spec from its ``to_dict()``: the ``"format"`` tag names the family (MNISTNetSpec when absent,
    for hand-written JSON; the version key is optional too)."""
    if isinstance(d, tuple(MODEL_SPECS.values())):
        return d
    if not isinstance(d, dict):
        raise ConfigError(f"model must be a model spec or its dict, got {type(d).__name__}")
    cls = MODEL_SPECS.get(d.get("format", MNISTNetSpec.JSON_FORMAT))
    if cls is None:
        raise ConfigError(f"model format {d['format']!r} is not trainable: use one of {sorted(MODEL_SPECS)}")
    try:
        return cls.from_dict(d)
    except (SpecError, TypeError) as e:
        raise ConfigError(f"invalid model spec in TrainConfig: {e}") from None


def _pos_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
