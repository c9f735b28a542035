"""When a fast path may replace the composed ops: checks shared by the functional ops, the modules and the
fused CPU kernel (one home, so `modules` and `cpu_kernel` need not import each other). The on/off switch
itself is framework-free: `cbam_multi.fastpath`."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _nn_module

__all__ = ["functorch_wrapped", "has_hooks"]


def functorch_wrapped(t: torch.Tensor) -> bool:
    """True inside a functorch transform (vmap, torch.func.grad): such tensors need the composed ops."""
    fn = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    return bool(fn(t)) if fn is not None else False


def has_hooks(module: nn.Module) -> bool:
    """True if a hook (on ``module`` or global) could observe a call a fused path would skip."""
    m = _nn_module
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        or module._backward_pre_hooks or m._global_forward_hooks or m._global_forward_pre_hooks
        or m._global_backward_hooks or m._global_backward_pre_hooks
    )
