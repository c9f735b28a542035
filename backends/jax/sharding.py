"""Data parallelism for the JAX backend with ``jax.sharding`` (single host, many devices; or many hosts).

One 1-D `Mesh` with the axis ``"data"`` over ``jax.devices()`` (every device of every process):

* parameters, BatchNorm statistics and the optimizer state are **replicated**: ``NamedSharding(mesh, P())``;
* each global batch is **split along its first axis**: ``NamedSharding(mesh, P("data"))``; the global
  batch size must be divisible by the number of devices (`ConfigError` otherwise);
* the train step is ONE ``jax.jit`` with these ``in_shardings``/``out_shardings``: XLA's SPMD partitioner
  inserts the gradient all-reduce (and, for CBAM's BatchNorm, the all-reduce of the batch statistics,
  so BN sees the global batch exactly as on one device). Nothing is home-made.

Multi-host: every process runs the same program on the same global batches (the batch order is a pure
function of ``(data_seed, epoch)``) and feeds only ITS rows (`process_rows`) through
``jax.make_array_from_process_local_data``; with one process those rows are the whole batch. Call
`initialize_distributed` (``cbam-multi train --distributed``, automatic when ``JAX_COORDINATOR_ADDRESS``
is set) before anything else touches JAX. Only process 0 writes files.

With a single device the mesh has one device and the compiled step is the one of the unsharded code.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cbam_multi.training.config import ConfigError

DATA_AXIS = "data"

__all__ = [
    "DATA_AXIS",
    "distributed_requested",
    "initialize_distributed",
    "data_mesh",
    "replicated",
    "batch_sharding",
    "check_global_batch",
    "process_rows",
    "shard_batch",
    "replicate",
    "describe",
]

# Our names for the two values jax.distributed.initialize() cannot auto-detect outside SLURM / Open MPI /
# Cloud TPU / Kubernetes (JAX_COORDINATOR_ADDRESS is JAX's own variable).
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def distributed_requested() -> bool:
    """True when the environment asks for multi-process JAX (``JAX_COORDINATOR_ADDRESS`` is set)."""
    return bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """``jax.distributed.initialize`` (idempotent). Arguments default to ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; anything still unset is auto-detected by JAX on SLURM,
    Open MPI, Cloud TPU pods and Kubernetes. Must run before the first JAX computation."""
    if jax.distributed.is_initialized():
        return
    if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if process_id is None and os.environ.get(ENV_PROCESS_ID):
        process_id = int(os.environ[ENV_PROCESS_ID])
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    except ValueError as e:  # nothing set and no cluster environment detected
        raise ConfigError(
            f"multi-process JAX could not start ({e}): set JAX_COORDINATOR_ADDRESS=host:port, {ENV_NUM_PROCESSES} and "
            f"{ENV_PROCESS_ID} on every process (SLURM, Open MPI, Cloud TPU and Kubernetes are detected automatically); "
            "a single process needs no --distributed: it always uses all its local devices"
        ) from None


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The 1-D ``("data",)`` mesh over ``devices`` (default: ``jax.devices()``, all processes' devices)."""
    devs = list(jax.devices() if devices is None else devices)
    if not devs:
        raise ConfigError("data_mesh: no devices")
    return Mesh(np.array(devs, dtype=object), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def check_global_batch(batch_size: int, mesh: Mesh, what: str = "batch_size") -> int:
    """Rows per device; `ConfigError` unless the global batch splits evenly over the mesh's devices."""
    n = mesh.devices.size
    if batch_size % n:
        raise ConfigError(
            f"{what} {batch_size} (the global batch) is not divisible by the {n} devices of the data mesh: "
            f"use a multiple of {n}"
        )
    return batch_size // n


def process_rows(batch_size: int, mesh: Mesh) -> slice:
    """The contiguous rows of a global batch that live on this process's devices (all of them with one
    process). Raises if they are not contiguous (a mesh whose device order interleaves processes)."""
    check_global_batch(batch_size, mesh)
    index_map = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
    if not index_map:
        raise ConfigError(f"process {jax.process_index()} owns no device of the data mesh")
    spans = sorted({(idx[0].start or 0, batch_size if idx[0].stop is None else idx[0].stop) for idx in index_map.values()})
    if any(nxt[0] != prev[1] for prev, nxt in itertools.pairwise(spans)):
        raise ConfigError(f"process {jax.process_index()}: its devices hold non-contiguous rows {spans} of the batch")
    return slice(spans[0][0], spans[-1][1])


def shard_batch(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """The global batch ``x`` (host array, identical on every process) as one ``jax.Array`` sharded over the
    ``data`` axis; this process contributes only its rows (`process_rows`)."""
    x = np.asarray(x)
    rows = process_rows(x.shape[0], mesh)
    return jax.make_array_from_process_local_data(batch_sharding(mesh), x[rows], x.shape)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every array leaf of ``tree`` fully replicated over ``mesh`` (leaves already so are kept)."""
    sharding = replicated(mesh)

    def put(a):
        # Exactly this NamedSharding, not merely an equivalent one: a single-device array is "equivalent"
        # on a 1-device mesh but has a different abstract type (no mesh), and jit would compile the step
        # twice (once for the initial state, once for its own outputs).
        if isinstance(a, jax.Array) and a.sharding == sharding:
            return a
        # host value (identical on every process) -> the same global array everywhere (a fresh buffer)
        return jax.make_array_from_process_local_data(sharding, np.asarray(a))

    return jax.tree.map(put, tree)


def describe(mesh: Mesh) -> dict:
    """What the metrics record about the parallel setup."""
    return {
        "engine": "jax.sharding (jit SPMD)",
        "processes": jax.process_count(),
        "devices": int(mesh.devices.size),
        "mesh": {DATA_AXIS: int(mesh.devices.size)},
        "local_devices": len([d for d in mesh.devices.flat if d.process_index == jax.process_index()]),
    }
