"""Fused CPU kernel for CBAM inference (`csrc/cbam_infer.cpp`), built on first use, and when it applies.

Eager torch ops cannot fuse: the composed block streams the full tensor through memory ~8 times, where
the kernel (`cbam_multi/csrc/infer_core.h`) reads ``x`` twice from beyond L2 and writes the output once
(64x64x28x28 float32 on 2 cores: ~2.1 -> ~0.7-0.9 ms, see benchmarks/RESULTS.md). It is an inference
path, like ``nn.MultiheadAttention``'s fast path: `CBAM.forward` takes it only when autograd records
nothing (``torch.no_grad()``, ``torch.inference_mode()`` or frozen weights), on CPU, for float32/float64
NCHW or channels_last input, the standard variant with both gates and a ReLU MLP, pools avg/max, BatchNorm
absent or in eval mode, no hooks and no autocast;
everything else runs the composed ops, which stay the reference the kernel is tested against.

The kernel is compiled with ``torch.utils.cpp_extension`` (a C++ compiler and ninja; ~15 s once, then
cached in ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``, shared by every checkout of the same
sources) for ``-march=native``, or the
target in ``CBAM_MULTI_CPU_KERNEL_ARCH`` (e.g. ``x86-64-v3``: AVX2 code without the AVX-512 paths). If the
build fails, one warning says why and the composed ops are used. ``CBAM_MULTI_CPU_KERNEL=0`` turns the
kernel off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from pathlib import Path

import torch

from cbam_multi.fastpath import ARCH_ENV_VAR, CORE_HEADERS, KERNEL_ENV_VAR, POOL_CODES, BuildOnce, FastPathSwitch, kernel_arch
from cbam_multi.machine import cpu_flags

from .guards import functorch_wrapped, has_hooks

__all__ = ["available", "applies", "cbam_infer", "disabled", "ENV_VAR", "ARCH_ENV_VAR"]

ENV_VAR = KERNEL_ENV_VAR
_SOURCE = Path(__file__).with_name("csrc") / "cbam_infer.cpp"
# the training Function's full-size passes (fused.py), built into the same library
_CSRC = Path(__file__).with_name("csrc")
# the training Function's kernels: one unit that includes cbam_train.cpp, cbam_train_cl.cpp, cbam_bn_train.cpp and
# cbam_bn_train_cl.cpp
_SOURCES = (_SOURCE, _CSRC / "cbam_train_all.cpp")
# and the framework-free cores (inference; lane helpers, channels_last training passes, spatial conv), shared with
# the JAX backend's XLA FFI handlers
_INCLUDED = (_CSRC / "cbam_train.cpp", _CSRC / "cbam_train_cl.cpp", _CSRC / "cbam_bn_train.cpp",
             _CSRC / "cbam_bn_train_cl.cpp", _CSRC / "input_of.h", *CORE_HEADERS)
_FLOATS = (torch.float32, torch.float64)
_log = logging.getLogger(__name__)


def _build_key(arch: str) -> str:
    """-march=native compiles for this CPU: key the cached library to its instruction-set flags (and arch)."""
    flags = " ".join(sorted(cpu_flags())) or platform.processor()
    # the torch install (version, location, C++ ABI) and Python's version too: the build folder is shared by every
    # checkout, and a library built against one torch must not be loaded (or rebuilt in place) by another
    abi = getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", None)
    where = os.path.dirname(torch.__file__)
    h = hashlib.sha256(f"{platform.machine()} {flags} {arch} {torch.__version__} {where} {abi} {platform.python_version()}".encode())
    for src in (*_SOURCES, *_INCLUDED):  # the sources too: checkouts with other kernel versions keep separate cached builds
        h.update(src.read_bytes())
    return h.hexdigest()[:10]


def _build_dir(name: str) -> Path:
    """Where the library ``name`` builds: torch's extensions folder (``TORCH_EXTENSIONS_DIR``, default
    ``~/.cache/torch_extensions``) / name, with the sources copied into its ``src/``. The copy gives every
    checkout of the same sources the same paths, so ninja finds the objects up to date (a build named after the
    sources' hash would otherwise be redone for each new clone or venv: ninja keys on the source paths)."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    build, src = root / name, root / name / "src"
    src.mkdir(parents=True, exist_ok=True)
    for f in (*_SOURCES, *_INCLUDED):
        dest = src / f.name
        data = f.read_bytes()
        if not dest.is_file() or dest.read_bytes() != data:
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, dest)  # atomic: a concurrent build sees the old file or the new one
    return build


def _build() -> None:
    from torch.utils.cpp_extension import load

    arch = kernel_arch()
    name = f"cbam_multi_cpu_{_build_key(arch)}"
    build = _build_dir(name)
    _log.info("cbam_multi: building the fused CBAM CPU kernel (once per machine, ~15 s)")
    load(
        name=name,
        sources=[str(build / "src" / src.name) for src in _SOURCES],
        build_directory=str(build),
        extra_cflags=["-O3", f"-march={arch}", "-fopenmp"],  # -fopenmp: at::parallel_for's OpenMP pragmas
        extra_ldflags=["-fopenmp"],
        is_python_module=False,  # the library registers torch.ops.cbam_multi.cbam_infer when loaded
        verbose=False,
    )


_built = BuildOnce(lambda: _build(), lambda e: (
    f"cbam_multi: the fused CBAM CPU kernel could not be built ({_reason(e)}); eager CPU inference uses composed "
    f"torch ops instead (set {ENV_VAR}=0 to skip the build)"))
_state = _built.state
_switch = FastPathSwitch(ENV_VAR)
_env_enabled = _switch.env_enabled
disabled = _switch.disabled  # `with cpu_kernel.disabled():` composed ops inside the block (this thread)


def available() -> bool:
    """Whether the kernel is on and built (builds it on the first call; a failed build warns once)."""
    return _switch.enabled() and _built()


def _reason(e: Exception) -> str:
    """The line of a build failure worth reading: the compiler's first error, else the message's last line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and not line.startswith("Error building")]
    return f"{type(e).__name__}: {(errors or lines or [''])[0 if errors else -1]}"


def applies(cbam, x: torch.Tensor) -> bool:
    """Whether ``cbam(x)`` may run the fused kernel. Cheap checks first; `available` (the build) last."""
    spec = cbam.spec
    if spec.no_spatial or spec.variant != "standard" or spec.mlp_act != "relu":
        return False  # the kernel computes the standard two-gate block with a ReLU MLP; the rest is composed
    fc1 = cbam.channel.fc1
    bn = cbam.spatial.bn
    return (
        not torch.compiler.is_compiling()  # first: under torch.compile, `compiled` calls this kernel as a custom op
        and not torch.jit.is_tracing()  # a trace (and ONNX export) should record standard ops
        and type(x) is torch.Tensor
        and not functorch_wrapped(x)  # vmap / torch.func transforms run the composed ops
        and x.layout == torch.strided  # not sparse
        and x.device.type == "cpu"
        and x.dtype in _FLOATS
        and fc1.weight.dtype == x.dtype
        and fc1.weight.device.type == "cpu"
        and x.dim() == 4
        and not _autograd_records(cbam, x)
        and not torch.is_autocast_enabled("cpu")
        and all(p in POOL_CODES for p in spec.channel_pools)
        and (bn is None or not bn.training)
        and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
        and not _any_hooks(cbam)
        and available()
    )


def cbam_infer(cbam, x: torch.Tensor, in_affine: tuple[torch.Tensor, torch.Tensor] | None = None,
               residual: torch.Tensor | None = None,
               residual_affine: tuple[torch.Tensor, torch.Tensor] | None = None, *,
               overwrite: bool = False) -> torch.Tensor:
    """The fused forward of a `CBAM` module (call only where `applies`). ``in_affine``: per-channel (scale,
    shift) of an eval-mode BatchNorm in front of the block; ``x`` is then the BN's input, and the BN's
    output is formed sample by sample in cache instead of written to memory (see `bn_then_cbam_infer`).
    ``residual`` (x's shape and dtype): returns ``relu(cbam(x) + residual)``, a ResNet block's tail, so the
    block's output is not written and read back for the add; ``residual_affine``: the (scale, shift) of an
    eval-mode BatchNorm on the residual (a downsample's), applied as the kernel reads it. ``overwrite``: the
    output is written over ``x`` and returned (for an ``x`` nothing else reads: a ResNet block's last conv output;
    no new buffer, and each output line is one the kernel has just read)."""
    spec = cbam.spec
    ch, sp = cbam.channel, cbam.spatial
    c = spec.channels
    bn = sp.bn
    # contiguous(): a no-op unless the module was moved with .to(memory_format=torch.channels_last),
    # which restrides the 4-D conv weights; the kernel reads them densely (a few hundred values)
    op = torch.ops.cbam_multi.cbam_infer_ if overwrite else torch.ops.cbam_multi.cbam_infer
    out = op(
        x,
        ch.fc1.weight.reshape(spec.hidden, c).contiguous(),  # nn.Linear (out, in) or 1x1 nn.Conv2d (out, in, 1, 1)
        ch.fc1.bias,
        ch.fc2.weight.reshape(c, spec.hidden).contiguous(),
        ch.fc2.bias,
        [POOL_CODES[p] for p in spec.channel_pools],
        sp.conv.weight.contiguous(),
        sp.conv.bias,
        None if bn is None else bn.weight,
        None if bn is None else bn.bias,
        None if bn is None else bn.running_mean,
        None if bn is None else bn.running_var,
        spec.norm_eps,
        spec.concat_order.index("mean"),
        spec.gate == "hard_sigmoid",
        *(in_affine or (None, None)),
        residual,  # the kernel takes it in x's memory format (converting one in another)
        *(residual_affine or (None, None)),
    )
    return x if overwrite else out


def eval_bn_folds(bn, x: torch.Tensor) -> bool:
    """Whether ``bn`` is a plain eval-mode ``nn.BatchNorm2d`` (running statistics, affine, no hooks, nothing
    recorded) that a kernel may apply to ``x`` as the per-channel affine map `eval_bn_affine`."""
    return (
        type(bn) is torch.nn.BatchNorm2d
        and not bn.training
        and bn.track_running_stats
        and bn.affine
        and bn.weight.dtype == x.dtype
        and not has_hooks(bn)
        and not (torch.is_grad_enabled() and (bn.weight.requires_grad or bn.bias.requires_grad))
    )


def eval_bn_affine(bn) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with ``bn(h) = h * scale + shift`` per channel, from torch's eval-mode constants."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    return scale.contiguous(), shift.contiguous()


def bn_then_cbam_applies(bn, cbam, h: torch.Tensor) -> bool:
    """Whether ``cbam(bn(h))`` may run the kernel with the BatchNorm folded in: `eval_bn_folds` for ``bn`` and
    `applies` for the block."""
    return eval_bn_folds(bn, h) and applies(cbam, h)


def bn_then_cbam_infer(bn, cbam, h: torch.Tensor, residual: torch.Tensor | None = None,
                       residual_bn=None, *, overwrite: bool = False) -> torch.Tensor:
    """``cbam(bn(h))`` in one kernel call (call only where `bn_then_cbam_applies`): x = h * scale + shift
    per channel with torch's eval-mode constants, the block's passes on it in cache. With ``residual``:
    ``relu(cbam(bn(h)) + residual)``, or ``relu(cbam(bn(h)) + residual_bn(residual))`` (where `eval_bn_folds`
    holds for ``residual_bn``: its output is never stored). ``overwrite``: the output is written over ``h``."""
    res_affine = None if residual_bn is None else eval_bn_affine(residual_bn)
    return cbam_infer(cbam, h, eval_bn_affine(bn), residual, res_affine, overwrite=overwrite)


def _autograd_records(cbam, x: torch.Tensor) -> bool:
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(p.requires_grad for p in cbam.parameters())


def _any_hooks(cbam) -> bool:
    # the composed path would run these hooks; the kernel cannot
    return any(has_hooks(m) for m in cbam.modules())

