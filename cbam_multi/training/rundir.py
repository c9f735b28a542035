"""The run directory (``--out``): checked before any work, and locked for the duration of a run.

One run per directory: two trainings into the same ``--out`` would otherwise both succeed, the last
writer's files silently replacing the other's. The lock is an advisory ``flock`` on ``<out>/.cbam-multi.lock``
holding the owner's pid and host; the kernel drops it when the owner exits however it exits, so a lock
file left behind by a killed run is stale by construction and is taken over (with a note). The owner
removes the file when it is done; a process that locked the file just as it was removed notices (the path
no longer names its inode) and tries again, so two runs never both hold the directory.
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
    """A `ConfigError` naming the problem if ``out`` cannot become this run's directory (a file in the way,
    permission denied, read-only file system), before any training. Creates nothing: in a data-parallel
    run only the main process creates and writes it."""
    out = Path(out)
    try:
        for p in (out, *out.parents):
            if p.exists():
                if not p.is_dir():
                    raise ConfigError(f"--out {out}: {p} is a file, not a directory; choose another --out")
                if not os.access(p, os.W_OK | os.X_OK):
                    raise ConfigError(f"--out {out}: permission denied: this user cannot create or write files in {p}")
                return
    except PermissionError:
        raise ConfigError(f"--out {out}: permission denied: this user cannot search a directory on that path") from None


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold ``out``'s lock for the body; `RunLockedError` at once if a live process holds it."""
    import fcntl

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    fd = _locked_fd(path, out)
    try:
        stale = _read(fd)
        if stale:
            print(f"note: {path}: took over a stale lock left by pid {stale} (that run ended without releasing it)", file=sys.stderr)
        _write(fd, f"{os.getpid()} on {socket.gethostname()}\n")
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # while still locked: see the module docstring
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _locked_fd(path: Path, out: Path) -> int:
    """An fd of ``path``, exclusively locked, whose inode ``path`` still names."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            owner = _read(fd) or "another process"
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunLockedError(
                f"--out {out} is in use by pid {owner} (another cbam-multi run); wait for it to finish "
                f"or choose another --out"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the owner removed the file as we locked it: lock the current one


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 200).decode(errors="replace").strip()


def _write(fd: int, text: str) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, text.encode())
