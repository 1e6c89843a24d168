"""One process at a time per run directory.

The process that trains a run holds an advisory lock (flock(2)) on `<run_dir>/.lock` until the run is finished or
the process exits. The kernel drops the lock when its holder dies, however it dies (kill -9 included), so a dead
process never leaves a stale lock, and nothing has to guess from a pid whether its holder still lives. The file
also names the holder (host and pid) for the message another invocation prints. It stays in place when released:
unlinking it could let two processes lock two different files of the same name.
"""
from __future__ import annotations

import fcntl
import os
import socket
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".lock"


class RunHeld(Exception):
    """The run directory is locked by another process (`holder`: its host and pid, as it wrote them)."""

    def __init__(self, run_dir: Path, holder: str):
        super().__init__(f"{run_dir} is being run by another process ({holder})")
        self.run_dir, self.holder = run_dir, holder


def _holder(path: Path) -> str:
    try:
        host, pid = path.read_text(encoding="utf-8").split()
        return f"pid {pid} on {host}"
    except (OSError, ValueError):
        return "holder unknown"


@contextmanager
def run_lock(run_dir: Path):
    """Hold run_dir's lock for the block; raises RunHeld at once if another process holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunHeld(run_dir, _holder(path)) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # closing the only descriptor of this open file releases the lock


def held_by(run_dir: Path) -> str | None:
    """Who holds run_dir's lock right now (host and pid), or None when nobody does."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _holder(path)
    finally:
        os.close(fd)
