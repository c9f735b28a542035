"""The run directory (``--out``): checked before any work, and locked for the duration of a run.

One run per directory: two trainings into the same ``--out`` would otherwise both succeed, the last
writer's files silently replacing the other's. The lock is an advisory ``flock`` on ``<out>/.cbam-multi.lock``
holding the owner's pid and host; the kernel drops it when the owner exits however it exits, so a lock
file left behind by a killed run is stale by construction and is taken over (with a note). The file itself
stays (emptied): removing it would let a third process lock a fresh inode while a second still waits on
the old one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from cbam_multi.training.config import ConfigError

__all__ = ["LOCK_FILE", "RunLockedError", "check_out_dir", "run_lock"]

LOCK_FILE = ".cbam-multi.lock"


class RunLockedError(ConfigError):
    """Another live process holds the run directory."""


def check_out_dir(out: Path) -> None:
    """Create ``out`` if needed and make sure this process can write into it; a `ConfigError` naming the
    problem (a file in the way, permission denied, read-only file system) otherwise, before any training."""
    out = Path(out)
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            raise ConfigError(f"--out {out}: {p} is a file, not a directory; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".cbam-multi-write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except PermissionError:
        raise ConfigError(f"--out {out}: permission denied: this user cannot create or write files there") from None
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write there: {e.strerror or e}") from None


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold ``out``'s lock for the body; `RunLockedError` at once if a live process holds it."""
    import fcntl

    path = Path(out) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            owner = _read(fd) or "another process"
            raise RunLockedError(
                f"--out {out} is in use by pid {owner} (another cbam-multi run); wait for it to finish "
                f"or choose another --out"
            ) from None
        stale = _read(fd)
        if stale:
            print(f"note: {path}: took over a stale lock left by pid {stale} (that run ended without releasing it)", file=sys.stderr)
        _write(fd, f"{os.getpid()} on {socket.gethostname()}\n")
        try:
            yield
        finally:
            _write(fd, "")
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 200).decode(errors="replace").strip()


def _write(fd: int, text: str) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, text.encode())
