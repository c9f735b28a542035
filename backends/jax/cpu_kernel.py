"""The CBAM CPU kernels as XLA FFI custom calls, built on first use: the fused inference kernel
(`csrc/cbam_infer_ffi.cpp`) and when it applies, and the training passes (`csrc/cbam_train_ffi.cpp`, called by
`fused` through `train_call`), built into the same library.

XLA fuses CBAM's passes no better than its own loop fusion allows: the block costs ResNet-50 inference 1.14x-1.18x
on this machine's CPU (benchmarks/RESULTS.md), where the same maths in one kernel (`cbam_multi/csrc/infer_core.h`,
the torch backend's kernel too) reads each sample twice from beyond L2 (pools, then maps and product in bands of
rows that stay in cache) and writes the output once. With ``in_affine`` and ``residual`` it also takes a ResNet
block's last BatchNorm (eval) in front and the shortcut add and ReLU behind, so the block's tail is one call.

An inference path: `applies` admits eval-mode calls (no BatchNorm statistics to update) with float32/float64
input, the standard two-gate block with a ReLU MLP and avg/max pools, and JAX's default backend the CPU. The
call is a `jax.custom_jvp` whose derivative is the composed ops' (so ``jax.grad``/``jvp`` through an eval
forward still work, on the composed maths), and ``jax.lax.platform_dependent`` keeps the composed ops on any
other platform the same program is lowered for. Under ``vmap`` every custom call here runs once per mapped
element; with the batch split over devices (a sharded ``jit``) each device runs it on its own samples.

Built with the system C++ compiler (``$CXX``, default ``c++``; ~4-8 s once, the two sources side by side) against jaxlib's FFI headers, for
``-march=native`` or ``$CBAM_MULTI_CPU_KERNEL_ARCH``, into ``$CBAM_MULTI_CACHE`` (default ``~/.cache/cbam_multi``)
under a name keyed by the sources, flags, CPU and jaxlib. If the build fails, one warning says why and the
composed ops run. ``CBAM_MULTI_CPU_KERNEL=0`` turns the kernel off (both backends), as does ``with disabled():``
for the functions traced inside the block (``jax.jit`` caches a traced function: one traced before keeps
what it traced). ``jax.export`` refuses custom calls without a compatibility guarantee: export a program
traced inside ``with disabled():`` (the composed ops; an exported program must run without this package anyway).
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

from cbam_multi.fastpath import ARCH_ENV_VAR, CORE_DIR, CORE_HEADERS, KERNEL_ENV_VAR, POOL_CODES, BuildOnce, FastPathSwitch, kernel_arch
from cbam_multi.machine import cpu_flags
from cbam_multi.spec import CBAMSpec

__all__ = ["available", "applies", "cbam_infer", "train_call", "disabled", "ENV_VAR", "ARCH_ENV_VAR"]

ENV_VAR = KERNEL_ENV_VAR  # the same switch as the torch backend's kernel
TARGET = "cbam_multi_cbam_infer_nhwc"
# the training passes (fused.py), handlers CbamTrain<name> in csrc/cbam_train_ffi.cpp
TRAIN_HANDLERS = ("PoolHW", "Maps", "Gate", "GradS", "GradCa", "GradX", "Conv", "ConvGrad")
_CSRC = Path(__file__).with_name("csrc")
_SOURCES = (_CSRC / "cbam_infer_ffi.cpp", _CSRC / "cbam_train_ffi.cpp")
_HEADERS = (_CSRC / "xla_threads.h", *CORE_HEADERS)
_FLOATS = (jnp.float32, jnp.float64)

_built = BuildOnce(lambda: _build(), lambda e: _failure_message(e))
_state = _built.state
_switch = FastPathSwitch(ENV_VAR)
disabled = _switch.disabled  # `with cpu_kernel.disabled():` the composed ops inside the block (this thread)


def _compiler(arch: str) -> list[str]:
    """The compiler and its flags for every source."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or "g++"
    # -fopenmp-simd: the core's `omp simd` reductions vectorise (no OpenMP runtime: XLA's threads run it)
    return [cxx, "-O3", f"-march={arch}", "-fopenmp-simd", "-std=c++17", "-fPIC", "-w", f"-I{CORE_DIR}",
            f"-I{jax.ffi.include_dir()}"]


def _library_path(arch: str) -> Path:
    """Where the library for these sources, flags, CPU and jaxlib lives (built by `_build` when missing)."""
    flags = " ".join(_compiler(arch))
    h = hashlib.sha256(f"{platform.machine()} {' '.join(sorted(cpu_flags()))} {flags} {jaxlib.__version__}".encode())
    for src in (*_SOURCES, *_HEADERS):
        h.update(src.read_bytes())
    root = Path(os.environ.get("CBAM_MULTI_CACHE") or Path.home() / ".cache" / "cbam_multi")
    return root / "kernels" / f"cbam_multi_ffi_{h.hexdigest()[:12]}.so"


def _build() -> Path:
    arch = kernel_arch()
    lib = _library_path(arch)
    if not lib.is_file():
        lib.parent.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_name(f".{lib.name}.{os.getpid()}.tmp")
        objects = [tmp.with_name(f"{tmp.name}.{i}.o") for i in range(len(_SOURCES))]
        try:
            cc = _compiler(arch)
            # the sources compile side by side (~4 s each), then link
            jobs = [subprocess.Popen([*cc, "-c", str(src), "-o", str(obj)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True) for src, obj in zip(_SOURCES, objects)]
            for job, err in [(job, job.communicate()[1]) for job in jobs]:
                if job.returncode != 0:
                    raise RuntimeError(err.strip() or f"compiler exit status {job.returncode}")
            proc = subprocess.run([cc[0], "-shared", *map(str, objects), "-o", str(tmp)], capture_output=True, text=True,
                                  check=False)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr.strip() or f"linker exit status {proc.returncode}")
            os.replace(tmp, lib)  # atomic: a concurrent build or load sees no half-written library
        finally:
            for f in (tmp, *objects):
                f.unlink(missing_ok=True)
    loaded = ctypes.cdll.LoadLibrary(str(lib))
    targets = {TARGET: "CbamInferNHWC", **{train_target(name): f"CbamTrain{name}" for name in TRAIN_HANDLERS}}
    for target, symbol in targets.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(loaded, symbol)), platform="cpu")
    return lib


def train_target(name: str) -> str:
    """The FFI target of the training handler ``CbamTrain<name>``."""
    return f"cbam_multi_train_{name.lower()}"


def available() -> bool:
    """Whether the kernel is on and built (builds it on the first call; a failed build warns once)."""
    return _switch.enabled() and _built()


def _failure_message(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if "error" in line.lower()] or [str(e).strip()]
    return (f"cbam_multi: the fused CBAM CPU kernel for JAX could not be built ({type(e).__name__}: {lines[0]}); "
            f"CPU inference and training use the composed ops instead (set {ENV_VAR}=0 to skip the build)")


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
    ranks = tuple(a.ndim for a in operands)
    batched = tuple(i == 0 or (i == len(ranks) - 1 and r == 4) for i, r in enumerate(ranks))  # x, a given residual
    return _varying_like(x, _split_call(("infer", spec, ranks), functools.partial(_ffi, spec), ranks, batched, 4)(*operands))


def _varying_like(x, out):
    """``out`` (an array or a list of them) typed as varying over the manual mesh axes ``x`` varies over: inside
    shard_map a custom call's results carry no such type, and code mixing them with ``x`` (platform_dependent's
    branches, a custom_jvp's primal and tangent) needs the types equal."""
    varying = tuple(jax.typeof(x).manual_axis_type.varying)
    if not varying:
        return out
    cast = lambda a: jax.lax.pcast(a, varying, to="varying")
    return [cast(a) for a in out] if isinstance(out, (list, tuple)) else cast(out)


def _ffi(spec: CBAMSpec, *operands):
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(operands[0].shape, operands[0].dtype))
    return call(
        *operands,
        pools=np.array([POOL_CODES[p] for p in spec.channel_pools], np.int64),
        mean_channel=np.int64(spec.concat_order.index("mean")),
        hard_sigmoid=spec.gate == "hard_sigmoid",
        eps=np.float64(spec.norm_eps),
    )


def train_call(name: str, *operands, **attrs) -> list:
    """The training handler ``CbamTrain<name>`` (csrc/cbam_train_ffi.cpp, results as listed there) on
    ``operands``: each device runs it on its own samples when the batch is split, once per element under
    ``vmap``. Every operand has the batch first but the conv's weight taps (the last operand of Conv, ConvGrad)."""
    ranks = tuple(a.ndim for a in operands)
    replicated = len(operands) - 1 if name in ("Conv", "ConvGrad") else None
    batched = tuple(i != replicated for i in range(len(operands)))
    out_ranks = tuple(r.ndim for r in _train_results(name, operands))
    key = ("train", name, tuple(sorted(attrs.items())), ranks)
    call = _split_call(key, functools.partial(_train_ffi, name, attrs), ranks, batched, out_ranks)
    return _varying_like(operands[0], list(call(*operands)))


def _train_results(name: str, operands) -> list[jax.ShapeDtypeStruct]:
    """The results of ``CbamTrain<name>`` on operands of these shapes (the whole batch, or one device's part)."""
    x = operands[1] if name.startswith("Grad") or name == "ConvGrad" else operands[0]  # x (B, H, W, C) or the conv's maps
    dt = x.dtype
    b, bc, bhw = x.shape[0], (x.shape[0], x.shape[-1]), x.shape[:3]
    results = {
        "PoolHW": [(bc, dt), (bc, dt), (bc, jnp.int32), (bc, dt)],
        "Maps": [(bhw, dt), (bhw, dt), (bhw, jnp.int32), (bhw, dt)],
        "Gate": [(x.shape, dt)], "GradS": [(bhw, dt)], "GradCa": [(bc, dt)], "GradX": [(x.shape, dt)],
        "Conv": [((b, *x.shape[2:]), dt)],
        "ConvGrad": [(x.shape, dt), ((b, operands[-1].size), dt)],
    }[name]
    return [jax.ShapeDtypeStruct(shape, d) for shape, d in results]


def _train_ffi(name: str, attrs: dict, *operands):
    return tuple(jax.ffi.ffi_call(train_target(name), _train_results(name, operands))(*operands, **attrs))


_CALLS: dict = {}


def _split_call(key, fn, ranks: tuple[int, ...], batched: tuple[bool, ...], out_ranks):
    """``fn`` (a custom call on operands of ``ranks``) partitioned over a split batch and mapped per element under
    ``vmap``, built once per ``key``. ``out_ranks``: an int (one result) or a tuple of them (a tuple of results),
    all with the batch first."""
    if key not in _CALLS:
        partitioned = _batch_partitioned(fn, ranks, batched, out_ranks)

        @jax.custom_batching.custom_vmap
        def kernel(*operands):
            return partitioned(*operands)

        @kernel.def_vmap
        def _per_element(axis_size, in_batched, *operands):  # custom_partitioning has no batching rule of its own
            def one(mapped):
                it = iter(mapped)
                return kernel(*(next(it) if b else o for o, b in zip(operands, in_batched)))

            out = jax.lax.map(one, tuple(o for o, b in zip(operands, in_batched) if b))
            return out, jax.tree.map(lambda _: True, out)

        _CALLS[key] = kernel
    return _CALLS[key]


def _batch_partitioned(fn, ranks: tuple[int, ...], batched: tuple[bool, ...], out_ranks):
    """The custom call for a batch split over devices: each device runs the kernel on its own samples (the
    block is per sample), with the other operands replicated. Without this rule XLA's partitioner gathers the
    whole batch onto every device around an opaque custom call. The rule names every batched operand's and
    every result's first dimension alike, every other dimension unsplittable; the first operand's batch split
    decides."""
    multi = isinstance(out_ranks, tuple)
    names = iter(f"f{i}" for i in range(sum(ranks) + sum(out_ranks if multi else (out_ranks,))))
    keep = []

    def dims(rank, is_batched):
        ds = [next(names) for _ in range(rank - is_batched)]
        keep.extend(ds)
        return " ".join((["b"] if is_batched else []) + ds)

    operands = ", ".join(dims(r, b) for r, b in zip(ranks, batched))  # factors named in order of appearance
    rule = operands + " -> " + ", ".join(dims(r, True) for r in (out_ranks if multi else (out_ranks,)))

    def batch_only(mesh, sharding, rank):  # the batch split kept, nothing else split
        spec0 = sharding.spec[0] if isinstance(sharding, NamedSharding) and len(sharding.spec) else None
        return NamedSharding(mesh, P(spec0, *([None] * (rank - 1))))

    def out_shardings(mesh, sharding):
        if multi:
            return tuple(batch_only(mesh, sharding, r) for r in out_ranks)
        return batch_only(mesh, sharding, out_ranks)

    def infer(mesh, arg_shapes, result_shape):
        return out_shardings(mesh, arg_shapes[0].sharding)

    def partition(mesh, arg_shapes, result_shape):
        first = arg_shapes[0].sharding
        args = tuple(batch_only(mesh, first, r) if b else NamedSharding(mesh, P()) for r, b in zip(ranks, batched))
        return mesh, fn, out_shardings(mesh, first), args

    partitioned = custom_partitioning(fn)
    partitioned.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                              need_replication_factors=tuple(keep))
    return partitioned
