"""One training run per workdir: an exclusive ``fcntl.flock`` on ``WORKDIR/.lock`` held for the whole run.

The kernel drops the lock when its process dies, however it dies (SIGKILL, OOM killer, power cut), so a
stale lock file never blocks the next run: only a live process holding it does. In a multi-process job each
process locks its own file (process 0 ``.lock``, process I ``.lock.I``): a second job on the same workdir
finds process 0's lock taken in every case (any process count) and each of its processes refuses at once,
instead of some of them waiting in a collective for a peer that has exited. The files are left in place
(removing a lock file would race with a run that is opening it); their content, the holder's pid and host,
is only for the message.
"""

from __future__ import annotations

import fcntl
import os
import pathlib
import socket


class WorkdirLockedError(RuntimeError):
    """Another live process holds the workdir's lock; the message names its pid and host."""


def lock_path(workdir: str | os.PathLike, process_index: int = 0) -> pathlib.Path:
    workdir = pathlib.Path(workdir)
    return workdir / (".lock" if process_index == 0 else f".lock.{process_index}")


class WorkdirLock:
    """``with WorkdirLock(workdir): ...`` or ``acquire()`` / ``release()``; raises WorkdirLockedError."""

    def __init__(self, workdir: str | os.PathLike, process_index: int = 0):
        self.path = lock_path(workdir, process_index)
        self._descriptor: int | None = None

    def acquire(self) -> None:
        # O_CLOEXEC (Python's default): a program exec'd by the run does not keep the lock alive.
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(descriptor)
            os.close(descriptor)
            raise WorkdirLockedError(
                f"{self.path.parent} is in use by another training run ({holder}, lock {self.path}); wait for "
                "it to finish or stop it, or use another --workdir") from None
        except OSError:
            os.close(descriptor)
            raise
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._descriptor = descriptor

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)  # closing the last descriptor of the open file drops the flock
            self._descriptor = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(descriptor: int) -> str:
    text = os.pread(descriptor, 200, 0).decode(errors="replace").strip()
    return text or "pid unknown"
