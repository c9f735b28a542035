"""Keep freed memory in the process heap, so a training loop's large buffers are reused, not re-faulted.

glibc serves allocations above its mmap threshold (128 KiB, adapting up to at most 32 MiB) with fresh
``mmap`` pages, and hands freed memory at the top of the heap back to the OS. A loop that allocates
and frees the same large buffers every step then pays a page fault per 4 KiB page on every step; XLA:CPU
allocates each execution's temporaries as one block larger than 32 MiB, so every JAX train step re-faulted
all of them.

`keep_heap` sets ``M_MMAP_MAX = 0`` (every allocation from the heap), a 1 GiB trim threshold (freed
memory stays with the process until more than that is free at the heap top) and a 64 MiB top pad. The
pad is for threads: XLA's worker threads allocate from per-thread arenas, which grow by extra 64 MiB
heaps that glibc unmaps as soon as one is entirely free, whatever the trim threshold - unless the pad
asks it to keep that much in reserve. (``M_ARENA_MAX = 1`` would also stop the faults, but serializes
every thread on one arena lock.) It changes the whole process's allocator, so only entry points that
own their process call it: ``cbam-multi train`` and the benchmarks (each with a switch to leave glibc's
defaults). The price: resident memory stays at its peak instead of shrinking after a large temporary is
freed. Measurements (fault counts and costs, step times with and without): benchmarks/RESULTS.md,
"Heap settings (keep_heap)".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_heap"]

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h> mallopt parameters
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20  # = glibc's HEAP_MAX_SIZE on 64-bit: the size of one per-thread heap

_applied: dict | None = None


def keep_heap() -> dict:
    """Apply the settings above once per process (glibc only). Returns what was done, for the record:
    ``{"applied": bool, "settings": {...}}`` or ``{"applied": False, "reason": ...}``."""
    global _applied
    if _applied is not None:
        return _applied
    if not sys.platform.startswith("linux"):
        _applied = {"applied": False, "reason": f"not glibc ({sys.platform})"}
        return _applied
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as e:  # musl and others have no mallopt
        _applied = {"applied": False, "reason": f"no glibc mallopt: {e}"}
        return _applied
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = (
        mallopt(_M_MMAP_MAX, 0) == 1
        and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        and mallopt(_M_TOP_PAD, TOP_PAD) == 1
    )
    _applied = (
        {"applied": True, "settings": {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": TRIM_THRESHOLD, "M_TOP_PAD": TOP_PAD}}
        if ok else {"applied": False, "reason": "mallopt refused the settings"}
    )
    return _applied
