"""The fused CBAM inference kernel on CPU as an XLA FFI custom call (`csrc/cbam_infer_ffi.cpp`), built on
first use, and when it applies.

XLA fuses CBAM's passes no better than its own loop fusion allows: the block costs ResNet-50 inference 1.14x-1.18x
on this machine's CPU (benchmarks/RESULTS.md), where the same maths in one kernel (`cbam_multi/csrc/infer_core.h`,
the torch backend's kernel too) reads each sample twice from beyond L2 (pools, then maps and product in bands of
rows that stay in cache) and writes the output once. With ``in_affine`` and ``residual`` it also takes a ResNet
block's last BatchNorm (eval) in front and the shortcut add and ReLU behind, so the block's tail is one call.

An inference path: `applies` admits eval-mode calls (no BatchNorm statistics to update) with float32/float64
input, the standard two-gate block with a ReLU MLP and avg/max pools, and JAX's default backend the CPU. The
call is a `jax.custom_jvp` whose derivative is the composed ops' (so ``jax.grad``/``jvp`` through an eval
forward still work, on the composed maths), and ``jax.lax.platform_dependent`` keeps the composed ops on any
other platform the same program is lowered for. Under ``vmap`` the custom call runs once per mapped element;
with the batch split over devices (a sharded ``jit``) each device runs it on its own samples.

Built with the system C++ compiler (``$CXX``, default ``c++``; ~4 s once) against jaxlib's FFI headers, for
``-march=native`` or ``$CBAM_MULTI_CPU_KERNEL_ARCH``, into ``$CBAM_MULTI_CACHE`` (default ``~/.cache/cbam_multi``)
under a name keyed by the sources, flags, CPU and jaxlib. If the build fails, one warning says why and the
composed ops run. ``CBAM_MULTI_CPU_KERNEL=0`` turns the kernel off (both backends), as does ``with disabled():``
for the functions traced inside the block (``jax.jit`` caches a traced function: one traced before keeps
what it traced). ``jax.export`` refuses custom calls without a compatibility guarantee: export an eval
program traced inside ``with disabled():`` (the composed ops; an exported program must run without this
package anyway).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import cbam_multi
from cbam_multi.fastpath import ARCH_ENV_VAR, KERNEL_ENV_VAR, POOL_CODES, BuildOnce, FastPathSwitch, kernel_arch
from cbam_multi.machine import cpu_flags
from cbam_multi.spec import CBAMSpec

__all__ = ["available", "applies", "cbam_infer", "disabled", "ENV_VAR", "ARCH_ENV_VAR"]

ENV_VAR = KERNEL_ENV_VAR  # the same switch as the torch backend's kernel
TARGET = "cbam_multi_cbam_infer_nhwc"
_SOURCE = Path(__file__).with_name("csrc") / "cbam_infer_ffi.cpp"
_CORE = Path(cbam_multi.__file__).with_name("csrc")
_HEADERS = (_CORE / "infer_core.h", _CORE / "infer_simd.h")
_FLOATS = (jnp.float32, jnp.float64)

_built = BuildOnce(lambda: _build(), lambda e: _failure_message(e))
_state = _built.state
_switch = FastPathSwitch(ENV_VAR)
disabled = _switch.disabled  # `with cpu_kernel.disabled():` the composed ops inside the block (this thread)


def _compiler_command(out: Path, arch: str) -> list[str]:
    cxx = os.environ.get("CXX") or shutil.which("c++") or "g++"
    # -fopenmp-simd: the core's `omp simd` reductions vectorise (no OpenMP runtime: XLA's threads run it)
    return [cxx, "-O3", f"-march={arch}", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{_CORE}",
            f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", str(out)]


def _library_path(arch: str) -> Path:
    """Where the library for these sources, flags, CPU and jaxlib lives (built by `_build` when missing)."""
    flags = " ".join(_compiler_command(Path("out"), arch))
    h = hashlib.sha256(f"{platform.machine()} {' '.join(sorted(cpu_flags()))} {flags} {jaxlib.__version__}".encode())
    for src in (_SOURCE, *_HEADERS):
        h.update(src.read_bytes())
    root = Path(os.environ.get("CBAM_MULTI_CACHE") or Path.home() / ".cache" / "cbam_multi")
    return root / "kernels" / f"cbam_infer_ffi_{h.hexdigest()[:12]}.so"


def _build() -> Path:
    arch = kernel_arch()
    lib = _library_path(arch)
    if not lib.is_file():
        lib.parent.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_name(f".{lib.name}.{os.getpid()}.tmp")
        try:
            proc = subprocess.run(_compiler_command(tmp, arch), capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr.strip() or f"compiler exit status {proc.returncode}")
            os.replace(tmp, lib)  # atomic: a concurrent build or load sees no half-written library
        finally:
            tmp.unlink(missing_ok=True)
    handler = ctypes.cdll.LoadLibrary(str(lib)).CbamInferNHWC
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler), platform="cpu")
    return lib


def available() -> bool:
    """Whether the kernel is on and built (builds it on the first call; a failed build warns once)."""
    return _switch.enabled() and _built()


def _failure_message(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if "error" in line.lower()] or [str(e).strip()]
    return (f"cbam_multi: the fused CBAM CPU kernel for JAX could not be built ({type(e).__name__}: {lines[0]}); "
            f"CPU inference uses the composed ops instead (set {ENV_VAR}=0 to skip the build)")


def applies(spec: CBAMSpec, x, train: bool) -> bool:
    """Whether an eval-mode ``cbam(params, x, spec)`` may run the kernel. Static facts only (shapes, dtypes,
    the spec, the default backend), so the answer is the same under ``jit``; `available` (the build) last."""
    return (
        not train
        and not spec.no_spatial
        and spec.variant == "standard"
        and spec.mlp_act == "relu"
        and all(p in POOL_CODES for p in spec.channel_pools)
        and x.ndim == 4
        and x.dtype in _FLOATS
        and jax.default_backend() == "cpu"
        and available()
    )


def cbam_infer(params, x, spec: CBAMSpec, composed, in_affine=None, residual=None):
    """``composed(params, x, in_affine, residual)`` -- the block's output from composed ops -- computed by the
    kernel on CPU (call only where `applies`). ``in_affine``: per-channel (scale, shift) applied to ``x`` first
    (an eval BatchNorm); ``residual``: returns ``relu(block + residual)``. Derivatives are ``composed``'s."""
    if not available():
        raise RuntimeError(f"the fused CBAM CPU kernel is off or not built ({_state['error'] or ENV_VAR}): check applies() first")

    @jax.custom_jvp
    def block(params, x, in_affine, residual):
        kernel = lambda *a: _call(spec, *a)
        return jax.lax.platform_dependent(params, x, in_affine, residual, cpu=kernel, default=composed)

    block.defjvp(lambda primals, tangents: jax.jvp(composed, primals, tangents))
    return block(params, x, in_affine, residual)


def _call(spec: CBAMSpec, params, x, in_affine, residual):
    dt = x.dtype
    empty = jnp.zeros((0,), dt)

    def get(name):
        return params[name].astype(dt) if name in params else empty

    k = spec.spatial_kernel
    conv = params["spatial.conv.kernel"].astype(dt).reshape(k, k, 2).transpose(2, 0, 1)  # HWIO (k, k, 2, 1) -> (2, k, k)
    if "spatial.bn.scale" in params:
        bn = jnp.concatenate([get(f"spatial.bn.{n}").reshape(1) for n in ("scale", "bias", "mean", "var")])
    else:
        bn = empty
    scale, shift = (empty, empty) if in_affine is None else (a.astype(dt) for a in in_affine)
    operands = (
        x,
        get("channel.fc1.kernel").T,  # canonical (in, out) -> the core's (out, in)
        get("channel.fc1.bias"),
        get("channel.fc2.kernel").T,
        get("channel.fc2.bias"),
        conv,
        get("spatial.conv.bias"),
        bn,
        scale,
        shift,
        empty if residual is None else residual.astype(dt),
    )
    out = _kernel(spec, tuple(a.ndim for a in operands))(*operands)
    # inside shard_map, x varies over manual mesh axes; the custom call's result carries no such type, and
    # platform_dependent needs both branches' types equal: give it x's
    varying = tuple(jax.typeof(x).manual_axis_type.varying)
    return jax.lax.pcast(out, varying, to="varying") if varying else out


@functools.cache
def _kernel(spec: CBAMSpec, ranks: tuple[int, ...]):
    """The partitioned custom call with a batching rule, once per spec and operand ranks: under ``vmap`` it runs
    once per mapped element (`jax.lax.map`; custom_partitioning has no batching rule of its own)."""
    partitioned = _batch_partitioned(spec, ranks)

    @jax.custom_batching.custom_vmap
    def kernel(*operands):
        return partitioned(*operands)

    @kernel.def_vmap
    def _per_element(axis_size, in_batched, *operands):
        def one(mapped):
            it = iter(mapped)
            return kernel(*(next(it) if b else o for o, b in zip(operands, in_batched)))

        return jax.lax.map(one, tuple(o for o, b in zip(operands, in_batched) if b)), True

    return kernel


def _ffi(spec: CBAMSpec, *operands):
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(operands[0].shape, operands[0].dtype))
    return call(
        *operands,
        pools=np.array([POOL_CODES[p] for p in spec.channel_pools], np.int64),
        mean_channel=np.int64(spec.concat_order.index("mean")),
        hard_sigmoid=spec.gate == "hard_sigmoid",
        eps=np.float64(spec.norm_eps),
    )


def _batch_partitioned(spec: CBAMSpec, ranks: tuple[int, ...]):
    """The custom call for a batch split over devices: each device runs the kernel on its own samples (the
    block is per sample), with the small operands replicated. Without this rule XLA's partitioner gathers the
    whole batch onto every device around an opaque custom call. Operands: x, ..., residual (x's shape or
    empty); the rule names x's, the residual's and the result's batch dimension alike, every other dimension
    unsplittable."""
    n = len(ranks)
    batched = [i == 0 or (i == n - 1 and r == 4) for i, r in enumerate(ranks)]  # x and a given residual
    names = iter(f"f{i}" for i in range(sum(ranks)))
    keep = []

    def dims(rank, is_batched):
        if is_batched:
            return "b h w c"
        ds = [next(names) for _ in range(rank)]
        keep.extend(ds)
        return " ".join(ds)

    rule = ", ".join(dims(r, b) for r, b in zip(ranks, batched)) + " -> b h w c"

    def batch_only(mesh, sharding):  # x's batch split kept, nothing else split
        spec0 = sharding.spec[0] if isinstance(sharding, NamedSharding) and len(sharding.spec) else None
        return NamedSharding(mesh, P(spec0, None, None, None))

    def infer(mesh, arg_shapes, result_shape):
        return batch_only(mesh, arg_shapes[0].sharding)

    def partition(mesh, arg_shapes, result_shape):
        x_sharding = batch_only(mesh, arg_shapes[0].sharding)
        args = tuple(x_sharding if b else NamedSharding(mesh, P()) for b in batched)
        return mesh, functools.partial(_ffi, spec), x_sharding, args

    fn = custom_partitioning(functools.partial(_ffi, spec))
    fn.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                     need_replication_factors=("h", "w", "c", *keep))
    return fn
