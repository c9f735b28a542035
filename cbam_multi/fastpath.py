"""A fast path's on/off switch, shared by both backends' kernels (framework-free)."""

from __future__ import annotations

import contextlib
import os
import threading

__all__ = ["FastPathSwitch"]


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
