"""What runs record about the machine: package versions and the host, from one probe of /proc/cpuinfo
(stdlib only, so the fused kernel's build key, the trainer's metrics and the benchmarks share it)."""

from __future__ import annotations

import os
import platform
from functools import cache
from importlib import metadata as importlib_metadata
from pathlib import Path

__all__ = ["versions", "host_info", "cpu_model", "cpu_flags"]


@cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none, e.g. macOS)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor's block ends at the first blank line
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_model() -> str:
    """The CPU's model name (``platform.processor()`` where /proc/cpuinfo has none)."""
    return _cpuinfo().get("model name") or platform.processor() or ""


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    return frozenset(_cpuinfo().get("flags", "").split())


def versions() -> dict[str, str | None]:
    """Installed versions (no imports: reading package metadata only)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("cbam-multi", "numpy", "torch", "jax", "jaxlib", "flax", "optax", "safetensors"):
        try:
            out[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            out[pkg] = None
    return out



def host_info() -> dict:
    return {"platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count()}
