"""One training run per workdir: the one file lock (``runtime.files.FileLock``) on ``WORKDIR/.lock``, held for the
whole run, refusing a second run at once with a message naming the holder.

The kernel drops the lock when its process dies, however it dies (SIGKILL, OOM killer, power cut), so a
stale lock file never blocks the next run: only a live process holding it does. In a multi-process job each
process locks its own file (process 0 ``.lock``, process I ``.lock.I``): a second job on the same workdir
finds process 0's lock taken in every case (any process count) and each of its processes refuses at once,
instead of some of them waiting in a collective for a peer that has exited. The files are left in place
(removing a lock file would race with a run that is opening it); their content, the holder's pid and host,
is only for the message.

Where the file system has no ``flock`` (Lustre mounted without ``-o flock``, some NFS setups: ENOSYS, EOPNOTSUPP,
ENOLCK), the lock is a file created with ``O_EXCL`` beside it (``.lock.excl``) holding ``pid PID on HOST``, removed
when the run ends. A run that died leaves it behind: on the same host a holder that no longer runs is recognised
and its file replaced; from another host the message names the file to remove once that run is known to be gone.
"""

from __future__ import annotations

import os
import pathlib

from convnext_audio_jax.runtime import files
from convnext_audio_jax.runtime.errors import UserError


class WorkdirLockedError(UserError, RuntimeError):
    """Another live process holds the workdir's lock; the message names its pid and host (the user picks another
    workdir or stops that run; a RuntimeError still, as it was)."""


def lock_path(workdir: str | os.PathLike, process_index: int = 0) -> pathlib.Path:
    workdir = pathlib.Path(workdir)
    return workdir / (".lock" if process_index == 0 else f".lock.{process_index}")


class WorkdirLock:
    """``with WorkdirLock(workdir): ...`` or ``acquire()`` / ``release()``; raises WorkdirLockedError."""

    def __init__(self, workdir: str | os.PathLike, process_index: int = 0):
        self.path = lock_path(workdir, process_index)
        self._lock = files.FileLock(self.path)

    @property
    def exclusive_path(self) -> pathlib.Path:
        """The fallback lock file, for file systems without ``flock``."""
        return self._lock.exclusive_path

    def acquire(self) -> None:
        try:
            self._lock.acquire(blocking=False)
        except files.LockHeld as held:
            raise self._in_use(held) from None

    def check_free(self) -> None:
        """Raises WorkdirLockedError when a live run holds the lock now (``train.py --check``); creates nothing."""
        held = self._lock.holder()
        if held is not None:
            raise self._in_use(held)

    def _in_use(self, held: files.LockHeld) -> WorkdirLockedError:
        if held.exclusive:
            return WorkdirLockedError(
                f"{self.path.parent} is in use by another training run ({held.holder}, lock {held.path}; this "
                f"file system has no flock); wait for it to finish or stop it, or remove {held.path} once that "
                "run is gone")
        return WorkdirLockedError(
            f"{self.path.parent} is in use by another training run ({held.holder}, lock {held.path}); wait for "
            "it to finish or stop it, or use another --workdir")

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
