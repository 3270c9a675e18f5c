"""`W/.lock`: one run per local workdir. An flock on a file kept open for the run; the OS drops it when the
process ends, crashes included, so a stale lock file never blocks a rerun.

A `gs://` workdir has no flock, and a lock object cannot tell a live run from one whose VM was preempted (which
is the usual reason to rerun into the same workdir), so it does not refuse: the run writes `W/.lock` (pid, host,
time) for as long as it runs and removes it at the end; a rerun that finds one warns, naming its holder."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from jaxsft import fs
from jaxsft.errors import UserError

log = logging.getLogger("jaxsft")


class WorkdirLock:
    def __init__(self, workdir: Path):
        self.workdir = fs.path(workdir)
        self.path = self.workdir / ".lock"
        self.fd: int | None = None
        self.remote = fs.is_remote(self.workdir)
        self.holder: str | None = None  # remote: what this run wrote into the lock object

    def _refuse(self, fd: int) -> None:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise UserError(f"--workdir {self.workdir} is in use by another run (pid {holder}, lock {self.path}); "
                        "wait for it to end or use another workdir")

    def check(self) -> None:
        """Refuses early if another run holds the lock; creates nothing (bad input must leave the workdir as is)."""
        if self.remote:
            if self.path.exists():
                held = self.path.read_text().strip() or "?"
                log.warning("warning: --workdir %s has a lock object (%s: %s): another run may be writing into it. "
                            "An object store has no file locks, so this cannot be checked: if that run is still "
                            "going, stop this one (a run that was killed or preempted leaves the object behind)",
                            self.workdir, self.path, held)
            return
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
        if self.remote:
            self.holder = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
            self.path.write_text(self.holder + "\n")
            return
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
        if self.holder is not None:
            try:
                if self.path.exists() and self.path.read_text().strip() == self.holder:
                    self.path.unlink()
            except Exception as e:  # noqa: BLE001 - a lock object left behind only warns the next run
                log.warning("warning: could not remove %s (%s: %s)", self.path, type(e).__name__, e)
            self.holder = None
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
