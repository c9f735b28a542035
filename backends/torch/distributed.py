"""Data-parallel training for the torch backend with ``torch.distributed`` and DDP (no home-made engine).

Launch one process per device with ``torchrun``; every process runs the same `cbam_multi.training.fit`
loop on the same global batches (`cbam_multi.training.data.iterate_batches` is a pure function of
``(data_seed, epoch)``), and `cbam_multi.torch.train.TorchTrainer` then:

* feeds its model the rank's **contiguous slice** of each global batch (rank r of W gets rows
  ``[r * B/W, (r + 1) * B/W)``; ``B`` must be divisible by ``W``: `ConfigError` otherwise);
* wraps the model in ``torch.nn.parallel.DistributedDataParallel``, which all-reduces and averages the
  gradients, so each optimizer step equals the single-process step on the whole global batch (the mean
  loss over equal slices is the mean over the batch);
* reports the loss of the global batch (an all-reduce of the local means, issued asynchronously in the
  step and awaited with the other losses: no extra host sync per step);
* writes checkpoints, train state and metrics on rank 0 only (atomically, as in one process).

Process group: ``gloo`` on CPU, ``nccl`` on CUDA (``cuda:LOCAL_RANK``). BatchNorm inside CBAM (presets
``official``/``timm``): on CUDA the BN layers become ``SyncBatchNorm`` (global batch statistics, as one
process); torch has no CPU SyncBatchNorm, so on CPU each rank normalises with its own slice's statistics
(a warning says so; the default ``seed`` preset has no BN).

    torchrun --nproc_per_node 2 -m cbam_multi.training.cli train --backend torch --distributed
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.distributed as dist

from cbam_multi.training.config import ConfigError

__all__ = [
    "launched_by_torchrun",
    "init_distributed",
    "shutdown",
    "is_distributed",
    "rank",
    "world_size",
    "local_rank",
    "device",
    "rank_rows",
    "check_global_batch",
    "wrap_ddp",
    "start_loss_allreduce",
    "finish_loss_allreduce",
]


def launched_by_torchrun() -> bool:
    """True inside a ``torchrun`` (or any ``torch.distributed`` env://) launch with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_distributed(backend: str | None = None) -> bool:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``). Idempotent. ``backend`` defaults to ``nccl``
    when CUDA is available, else ``gloo``. Returns True when a process group is (now) initialized."""
    if not dist.is_available():
        raise ConfigError("torch.distributed is not available in this torch build")
    if dist.is_initialized():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ConfigError(
            "--distributed needs torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): launch with "
            "`torchrun --nproc_per_node N -m cbam_multi.training.cli train --backend torch --distributed ...`"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    return True


def shutdown() -> None:
    """Leave the process group (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True when a process group with more than one process is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` with CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def check_global_batch(batch_size: int, world: int, what: str = "batch_size") -> int:
    """Rows per rank; `ConfigError` unless the global batch splits evenly over the ``world`` processes."""
    if batch_size % world:
        raise ConfigError(
            f"{what} {batch_size} (the global batch) is not divisible by the {world} data-parallel processes: "
            f"use a multiple of {world}"
        )
    return batch_size // world


def rank_rows(batch_size: int, r: int, world: int) -> slice:
    """Rank ``r``'s contiguous rows of a global batch of ``batch_size``."""
    per = check_global_batch(batch_size, world)
    return slice(r * per, (r + 1) * per)


def wrap_ddp(model: torch.nn.Module, dev: torch.device) -> torch.nn.Module:
    """``DistributedDataParallel(model)``; BatchNorm layers become SyncBatchNorm on CUDA (see module doc)."""
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_bn:
        if dev.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif rank() == 0:
            warnings.warn(
                "DDP on CPU: torch has no CPU SyncBatchNorm, so the CBAM BatchNorm layers use each rank's own "
                "batch-slice statistics (losses differ from a single-process run; running statistics follow rank 0)",
                stacklevel=2,
            )
    # buffers (BN running statistics) are synced from rank 0 before each forward (DDP's default)
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)


def start_loss_allreduce(loss: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Start summing the local mean losses over all ranks (async): ``(buffer, work)``."""
    buf = loss.detach().clone()
    return buf, dist.all_reduce(buf, op=dist.ReduceOp.SUM, async_op=True)


def finish_loss_allreduce(handle: tuple[torch.Tensor, Any], world: int) -> torch.Tensor:
    """Wait for `start_loss_allreduce` and return the mean over ranks = the global batch's mean loss
    (gloo has no AVG reduction, hence SUM / world)."""
    buf, work = handle
    work.wait()
    return buf / world
