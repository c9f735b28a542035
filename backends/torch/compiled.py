"""CBAM's CPU kernels under torch.compile: the block, and a ResNet block's last BatchNorm with it, call the
kernels eager code uses.

Without them the compiled graph traces the composed ops and inductor writes its own fused code: on
ResNet-50 that code costs more than the eager kernels, and compiling it takes minutes (benchmarks/RESULTS.md).

Training (and any call the inference kernel does not cover) is traced code around the kernel passes
(`compiled_train`): inductor compiles the small maps, and each full-size pass is a functional custom op.
Inference is the C++ op ``cbam_multi::cbam_infer`` with a fake (shape) implementation. All the kernel ops are
tagged ``flexible_layout``: inductor may hand them channels_last buffers even where the traced model is NCHW
(its layout optimisation runs convolutions channels_last), and copying those back to the traced strides cost
more than CBAM itself; they read either layout and return what their fake implementations promise.

`applies` holds under torch.compile where the eager fast paths would: CPU, float32/float64, NCHW or
channels_last, the standard two-gate variant with avg/max pools, no hooks, no
autocast, a built kernel library, no ``disabled()`` block or off switch, and not `torch.export` (an exported
program keeps standard ops, to run where this library is not loaded). Anything else traces the composed ops.
Module settings, shapes and dtypes are guarded by dynamo; the hooks, the switches and the BatchNorms'
momentum and eps are read when a graph is traced (change them, and call ``torch._dynamo.reset()``).
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor, nn

from . import compiled_train, cpu_kernel, fused
from .guards import has_hooks

__all__ = ["applies", "bn_cbam", "infers", "register"]

_FLOATS = (torch.float32, torch.float64)
_lock = threading.Lock()
_registered: list = []


def applies(bn: nn.Module | None, cbam, h: Tensor) -> bool:
    """Whether ``cbam(bn(h))`` (``cbam(h)`` for ``bn=None``) being traced by torch.compile may call the ops.
    Module settings, shapes and dtypes are read in traced code (dynamo guards them); the hooks, the kernel
    library and the switches (`fused.disabled`, the environment variables) once per trace."""
    if not torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False  # an exported program keeps standard ops: it must run where this library is not loaded
    spec = cbam.spec
    if spec.no_spatial or spec.variant != "standard" or not set(spec.channel_pools) <= {"avg", "max"}:
        return False
    if not (h.device.type == "cpu" and h.dtype in _FLOATS and h.dim() == 4 and not torch.is_autocast_enabled("cpu")):
        return False
    if not (h.is_contiguous() or h.is_contiguous(memory_format=torch.channels_last)):
        return False
    if h.numel() == 0 or (bn is not None and not (type(bn) is nn.BatchNorm2d and bn.affine and bn.weight.dtype == h.dtype)):
        return False
    if bn is not None and (bn.training or bn.running_mean is None) and h.numel() == h.shape[1]:
        return False  # one value per channel: the composed BN raises torch's error
    if cbam.channel.fc1.weight.dtype != h.dtype:
        return False
    return infers(bn, cbam, h) or _switches_on(bn, cbam, False)


def _records(bn, cbam, h: Tensor) -> bool:
    return torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in _params(bn, cbam)))


def _infers(bn, cbam, h: Tensor) -> bool:
    """The inference kernel computes this call: nothing recorded, a ReLU MLP, BatchNorms in eval mode with
    running statistics (else `compiled_train` runs it, forward only)."""
    norms = [n for n in (bn, cbam.spatial.bn) if n is not None]
    return (not _records(bn, cbam, h) and cbam.spec.mlp_act == "relu"
            and all(not n.training and n.running_mean is not None for n in norms))


@torch.compiler.assume_constant_result
def _switches_on(bn, cbam, infer: bool) -> bool:
    # read once while tracing: dynamo cannot trace the build's lock or the switches' thread-locals
    modules = [*cbam.modules(), *([] if bn is None else [bn])]
    if any(has_hooks(m) for m in modules) or not register():
        return False
    return cpu_kernel._switch.enabled() if infer else fused._switch.enabled() and fused._kernel_switch_on()


def infers(bn, cbam, h: Tensor) -> bool:
    """Where `applies` holds: whether `bn_cbam` calls the inference kernel (which can also take a residual,
    `cpu_kernel.bn_then_cbam_infer`)."""
    return _infers(bn, cbam, h) and _switches_on(bn, cbam, True)


def _params(bn, cbam) -> list:
    return [*([] if bn is None else [bn.weight, bn.bias]), *cbam.parameters()]


def bn_cbam(bn: nn.BatchNorm2d | None, cbam, h: Tensor) -> Tensor:
    """``cbam(bn(h))`` (``cbam(h)`` for ``bn=None``) through the kernels (call only where `applies`)."""
    if infers(bn, cbam, h):
        return cpu_kernel.cbam_infer(cbam, h) if bn is None else cpu_kernel.bn_then_cbam_infer(bn, cbam, h)
    return compiled_train.bn_cbam_traced(bn, cbam, h)


def register() -> bool:
    """Load the kernel library and give its ops what tracing needs (fake implementations; the training passes as
    layout-flexible custom ops, `compiled_train`), once."""
    if _registered:
        return _registered[0]
    with _lock:
        if not _registered:
            ok = cpu_kernel.available()
            if ok:
                torch.library.register_fake("cbam_multi::cbam_infer")(lambda x, *args: torch.empty_like(x))
                torch.library.register_fake("cbam_multi::cbam_infer_")(lambda x, *args: None)
                compiled_train.register_ops()
            _registered.append(ok)
    return _registered[0]
