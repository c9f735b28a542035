"""Training (MNISTNet or ResNet: `cbam_multi.torch.models.MODELS`) with PyTorch (eager, CPU or CUDA): `TorchTrainer`.

The epoch loop, schedule, batches, evaluation, metrics and checkpoint formats are shared with the JAX
backend (`cbam_multi.training`, which finds this module through its backend registry). Optimizers are torch.optim's
own Adam / AdamW / SGD with every hyper-parameter taken from the `TrainConfig` (see `cbam_multi.training.config`
for the update formulas, identical to the optax chains of `cbam_multi.jax.train`).

Scale-out and precision (see docs/SCALE_OUT.md):

* data parallel: when a ``torch.distributed`` process group with several processes is initialized
  (``torchrun ... --distributed``, `cbam_multi.torch.distributed`), the model is wrapped in
  ``DistributedDataParallel``, each rank trains on its contiguous slice of every global batch, the
  reported loss is the all-reduced mean and only rank 0 writes files;
* ``dtype="bfloat16"``: mixed precision with ``torch.autocast(device, torch.bfloat16)`` around the
  forward pass; parameters, gradients, optimizer state and checkpoints stay float32, the cross-entropy
  runs on float32 logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cbam_multi.models import build_network
from cbam_multi.training.config import TrainConfig
from cbam_multi.training.state import optimizer_slots

from . import distributed
from .models import MODELS, export_model_weights, import_model_weights
from .weights import to_numpy

__all__ = ["TorchTrainer", "build_predict", "make_optimizer"]

# canonical slot name -> torch optimizer state key
_SLOT_KEYS = {"mu": "exp_avg", "nu": "exp_avg_sq", "momentum": "momentum_buffer"}


def make_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    """torch.optim optimizer with every hyper-parameter explicit (lr is overwritten every step)."""
    common = dict(lr=config.lr, weight_decay=config.weight_decay, foreach=False, maximize=False)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, betas=config.betas, eps=config.eps, amsgrad=False, **common)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, betas=config.betas, eps=config.eps, amsgrad=False, **common)
    return torch.optim.SGD(params, momentum=config.momentum, dampening=0.0, nesterov=config.nesterov, **common)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TorchTrainer:
    """`cbam_multi.training.fit.Trainer` for torch: NCHW model, torch.optim, canonical state in and out.

    ``self.net`` is the plain network of ``config.model``'s family (weights in/out, prediction); ``self.model`` is what a train step
    calls: ``self.net`` itself, or its ``DistributedDataParallel`` wrapper when a multi-process group is
    initialized. ``self.dtype`` is the parameter dtype; ``self.autocast`` the mixed-precision compute dtype.
    """

    backend = "torch"

    def __init__(self, config: TrainConfig):
        self.config = config
        self.dtype = getattr(torch, config.param_dtype)
        self.autocast = torch.bfloat16 if config.mixed_precision else None
        self.distributed = distributed.is_distributed()
        self.rank, self.world = distributed.rank(), distributed.world_size()
        if self.distributed:
            distributed.check_global_batch(config.batch_size, self.world)
            self.dev = distributed.device()
        else:
            self.dev = _device()
        self.is_main = self.rank == 0
        self.net = build_network(MODELS, config.model, dtype=self.dtype, seed=config.seed).to(self.dev)
        self.model = distributed.wrap_ddp(self.net, self.dev) if self.distributed else self.net
        self.parallel = {
            "engine": "torch.distributed DDP" if self.distributed else "none",
            "processes": self.world,
            "devices": self.world,
            "backend": distributed.dist.get_backend() if self.distributed else None,
        }
        self.layouts = self.net.layouts()
        named = dict(self.net.named_parameters())
        # canonical trainable name -> its torch parameter, in spec order (the optimizer's param order)
        self.params = {n: named[lay.torch_name] for n, lay in self.layouts.items() if lay.trainable}
        self.optimizer = make_optimizer(config, list(self.params.values()))
        self.slots = optimizer_slots(config)
        self.step = 0

    # ---------------------------------------------------------------- weights / optimizer state
    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        import_model_weights(self.net, weights)

    def get_weights(self) -> dict[str, np.ndarray]:
        return export_model_weights(self.net)

    def set_opt_state(self, slots: Mapping[str, Mapping[str, np.ndarray]], step: int) -> None:
        """Install canonical optimizer slots (converted to torch layouts) as if ``step`` steps were taken."""
        self.optimizer.state.clear()
        for name, p in self.params.items():
            lay = self.layouts[name]
            state: dict[str, torch.Tensor] = {}
            if self.config.optimizer in ("adam", "adamw"):
                # torch keeps the Adam step as a float tensor of the default scalar dtype (exact for ints < 2**24)
                state["step"] = torch.tensor(float(step), dtype=_scalar_dtype())
            for slot in self.slots:
                arr = np.array(lay.to_torch(np.asarray(slots[slot][name])), order="C", copy=True)
                state[_SLOT_KEYS[slot]] = torch.from_numpy(arr).to(device=p.device, dtype=p.dtype)
            if state:
                self.optimizer.state[p] = state
        self.step = int(step)

    def get_opt_state(self) -> dict[str, dict[str, np.ndarray]]:
        out: dict[str, dict[str, np.ndarray]] = {slot: {} for slot in self.slots}
        for name, p in self.params.items():
            lay = self.layouts[name]
            state = self.optimizer.state.get(p, {})
            for slot in self.slots:
                value = state.get(_SLOT_KEYS[slot])
                arr = np.zeros(tuple(p.shape), to_numpy(p.detach()).dtype) if value is None else to_numpy(value)
                out[slot][name] = np.array(lay.to_canonical(arr), order="C", copy=True)
        return out

    # ---------------------------------------------------------------- steps
    def _batch(self, x: np.ndarray) -> torch.Tensor:
        # NHWC -> NCHW; with one channel this is a free view of the same memory
        return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).to(self.dev)

    def warmup(self, x: np.ndarray, y: np.ndarray) -> float:
        return 0.0  # eager: nothing to compile

    def _forward(self, model, xt: torch.Tensor) -> torch.Tensor:
        """Logits; under ``torch.autocast(bfloat16)`` for mixed precision (returned as float32)."""
        if self.autocast is None:
            return model(xt)
        with torch.autocast(self.dev.type, dtype=self.autocast):
            logits = model(xt)
        return logits.float()  # loss / softmax in float32

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float):
        """One optimizer step on the GLOBAL batch ``(x, y)``: with DDP this rank uses its contiguous slice
        and DDP averages the gradients. Returns a loss handle (see `losses`)."""
        if self.distributed:
            rows = distributed.rank_rows(len(y), self.rank, self.world)
            x, y = x[rows], y[rows]
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        logits = self._forward(self.model, self._batch(x))
        loss = F.cross_entropy(logits, torch.from_numpy(np.asarray(y)).to(self.dev), reduction="mean")
        loss.backward()
        self.optimizer.step()
        self.step += 1
        if self.distributed:
            return distributed.start_loss_allreduce(loss)
        return loss.detach()

    def losses(self, handles: Sequence) -> np.ndarray:
        """The global-batch mean loss of each step (waits for the device / the all-reduces)."""
        if self.distributed:
            handles = [distributed.finish_loss_allreduce(h, self.world) for h in handles]
        return torch.stack(list(handles)).double().cpu().numpy()

    @torch.inference_mode()
    def predict(self, x: np.ndarray) -> np.ndarray:
        # the plain module on every rank (no DDP collectives): the full eval batch, identical weights
        model = self.net if self.distributed else self.model
        model.eval()
        return self._forward(model, self._batch(x)).cpu().numpy()

    def device(self) -> str:
        if self.dev.type == "cuda":
            desc = f"torch cuda: {torch.cuda.get_device_name(self.dev)}"
        else:
            desc = f"torch cpu ({torch.get_num_threads()} threads)"
        if self.distributed:
            desc += f" x {self.world} processes (DDP, {self.parallel['backend']})"
        if self.autocast is not None:
            desc += ", autocast bfloat16"
        return desc


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def build_predict(weights, spec, dtype: str, batch_size: int):
    """The eval-mode predict function (NHWC NumPy batch -> logits) of a model with canonical ``weights``;
    ``dtype="bfloat16"``: float32 weights, bf16 autocast compute. For `cbam_multi.training.evaluate`."""
    mixed = dtype == "bfloat16"
    dev = _device()
    model = build_network(MODELS, spec, dtype=torch.float32 if mixed else getattr(torch, dtype)).to(dev)
    import_model_weights(model, weights)
    model.eval()

    @torch.inference_mode()
    def predict(x: np.ndarray) -> np.ndarray:
        xt = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).to(dev)
        if not mixed:
            return model(xt).cpu().numpy()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            logits = model(xt)
        return logits.float().cpu().numpy()

    return predict
