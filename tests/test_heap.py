"""`cbam_multi.training.heap.keep_heap`: freed large blocks stay in the process, so allocating the same size again
costs no page faults (glibc only). Checked in fresh subprocesses: the setting is process-wide."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")

_SCRIPT = """
import ctypes, json, resource, sys, threading
from cbam_multi.training.heap import keep_heap
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
record = keep_heap() if sys.argv[1] in ("keep", "nopad") else None
if sys.argv[1] == "nopad":  # keep_heap without its top pad (glibc's default pad is 128 KiB)
    libc.mallopt(-2, 128 * 1024)
assert record is None or keep_heap() is record  # applied once, the same record after


def repeat(n, faults):
    for _ in range(4):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(n)
        ctypes.memset(p, 1, n)  # touch every page, as writing a tensor does
        libc.free(p)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)


def worker(faults):  # like an XLA thread-pool thread: its own arena, a large block already live in it
    held = libc.malloc(40 * 2**20)
    repeat(48 * 2**20, faults)
    libc.free(held)


faults, thread_faults = [], []
repeat(64 * 2**20, faults)  # above glibc's largest mmap threshold (32 MiB)
t = threading.Thread(target=worker, args=(thread_faults,))
t.start()
t.join()
print(json.dumps({"record": record, "faults": faults, "thread_faults": thread_faults}))
"""


def _run(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_keep_heap_reuses_freed_blocks_instead_of_faulting_them_in_again():
    pages = 64 * 2**20 // 4096
    default, kept, nopad = _run("default"), _run("keep"), _run("nopad")
    settings = {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 2**30, "M_TOP_PAD": 2**26}
    assert kept["record"] == {"applied": True, "settings": settings}
    # glibc's defaults: every 64 MiB allocation is a fresh mmap, faulted in page by page each time
    assert min(default["faults"][1:]) > pages // 2, default
    # kept heap: the first allocation faults its pages in once; the repeats reuse them
    assert kept["faults"][0] > pages // 2 and max(kept["faults"][1:]) < pages // 20, kept
    # a worker thread's arena grows by an extra heap for the block, which glibc unmaps as soon as it is free
    # (whatever the trim threshold): every repeat faults again unless the top pad keeps it
    thread_pages = 48 * 2**20 // 4096
    assert min(default["thread_faults"][1:]) > thread_pages // 2, default
    assert min(nopad["thread_faults"][1:]) > thread_pages // 2, nopad
    assert max(kept["thread_faults"][1:]) < thread_pages // 20, kept
