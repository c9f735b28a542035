"""A fast path's on/off switch, a kernel library built once on first use, and the facts both backends' kernel
builds share (the switches, the -march choice, the pool codes, the framework-free cores in `cbam_multi/csrc`)."""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

__all__ = ["ARCH_ENV_VAR", "CORE_DIR", "CORE_HEADERS", "BuildOnce", "FastPathSwitch", "KERNEL_ENV_VAR", "POOL_CODES",
           "kernel_arch"]

KERNEL_ENV_VAR = "CBAM_MULTI_CPU_KERNEL"  # 0/off: neither backend builds or runs the fused CPU kernels
ARCH_ENV_VAR = "CBAM_MULTI_CPU_KERNEL_ARCH"  # -march value (default native), e.g. x86-64-v3 for AVX2 only
POOL_CODES = {"avg": 0, "max": 1}  # infer_core.h's kPoolAvg, kPoolMax: the channel pools the kernel computes
# the kernels' framework-free cores (cbam_multi/csrc), which both backends' builds compile in
CORE_DIR = Path(__file__).with_name("csrc")
CORE_HEADERS = tuple(CORE_DIR / name for name in ("infer_core.h", "infer_simd.h", "lanes.h", "train_core_nhwc.h",
                                                  "spatial_conv_core.h"))


def kernel_arch() -> str:
    """The ``-march`` target the kernels are built for: ``$CBAM_MULTI_CPU_KERNEL_ARCH``, default ``native``."""
    return os.environ.get(ARCH_ENV_VAR, "native").strip() or "native"


class FastPathSwitch:
    """A fast path's on/off: an environment variable (on unless set to 0/off/false/no) and a per-thread
    ``disabled()`` block (e.g. to compare or benchmark the composed ops)."""

    def __init__(self, env_var: str):
        self.env_var = env_var
        self._local = threading.local()  # per-thread `disabled()` depth

    def env_enabled(self) -> bool:
        return os.environ.get(self.env_var, "1").strip().lower() not in ("0", "off", "false", "no")

    def enabled(self) -> bool:
        return not getattr(self._local, "off", 0) and self.env_enabled()

    @contextlib.contextmanager
    def disabled(self):
        """Run the composed ops inside this block (this thread)."""
        self._local.off = getattr(self._local, "off", 0) + 1
        try:
            yield
        finally:
            self._local.off -= 1


class BuildOnce:
    """``build()`` run on the first call, once per process, under a lock. A failure (no compiler, a failed
    compile) is kept in ``state["error"]`` and warned about once, with ``failure_message(error)``; every call
    then answers False and the caller keeps to the composed ops."""

    def __init__(self, build: Callable[[], object], failure_message: Callable[[Exception], str]):
        self._build, self._failure_message = build, failure_message
        self._lock = threading.Lock()
        self.state: dict = {"loaded": None, "error": None}  # loaded: True/False once tried

    def __call__(self) -> bool:
        if self.state["loaded"] is None:
            with self._lock:
                if self.state["loaded"] is None:
                    try:
                        self._build()
                        self.state["loaded"] = True
                    except Exception as e:  # keep working without the kernel
                        self.state["loaded"], self.state["error"] = False, e
                        warnings.warn(self._failure_message(e), RuntimeWarning, stacklevel=4)
        return bool(self.state["loaded"])
