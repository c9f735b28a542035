"""`cbam_multi.heap.keep_heap`: freed large blocks stay in the process, so allocating the same size again
costs no page faults (glibc only). Checked in fresh subprocesses: the setting is process-wide."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")

_SCRIPT = """
import ctypes, json, resource, sys
from cbam_multi.heap import keep_heap
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
record = keep_heap() if sys.argv[1] == "keep" else None
assert record is None or keep_heap() is record  # applied once, the same record after
faults = []
for _ in range(4):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    n = 64 * 2**20  # above glibc's largest mmap threshold (32 MiB)
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)  # touch every page, as writing a tensor does
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({"record": record, "faults": faults}))
"""


def _run(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_keep_heap_reuses_freed_blocks_instead_of_faulting_them_in_again():
    pages = 64 * 2**20 // 4096
    default, kept = _run("default"), _run("keep")
    assert kept["record"] == {"applied": True, "settings": {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 2**30}}
    # glibc's defaults: every 64 MiB allocation is a fresh mmap, faulted in page by page each time
    assert min(default["faults"][1:]) > pages // 2, default
    # kept heap: the first allocation faults its pages in once; the repeats reuse them
    assert kept["faults"][0] > pages // 2 and max(kept["faults"][1:]) < pages // 20, kept
