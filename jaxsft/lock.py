"""`W/.lock`: one run per local workdir. An flock on a file kept open for the run; the OS drops it when the
process ends, crashes included, so a stale lock file never blocks a rerun."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from jaxsft.errors import UserError


class WorkdirLock:
    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.path = self.workdir / ".lock"
        self.fd: int | None = None

    def _refuse(self, fd: int) -> None:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise UserError(f"--workdir {self.workdir} is in use by another run (pid {holder}, lock {self.path}); "
                        "wait for it to end or use another workdir")

    def check(self) -> None:
        """Refuses early if another run holds the lock; creates nothing (bad input must leave the workdir as is)."""
        if not self.path.is_file():
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._refuse(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def acquire(self) -> None:
        """Takes the lock (creating the workdir) and records this process's pid in it."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._refuse(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
