"""One training run per workdir: an exclusive ``fcntl.flock`` on ``WORKDIR/.lock`` held for the whole run.

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

import errno
import fcntl
import os
import pathlib
import socket

from convnext_audio_jax.runtime.errors import UserError

# flock not supported by the file system.
NO_FLOCK_ERRNOS = frozenset({errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK})


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
        self._descriptor: int | None = None
        self._exclusive = False

    def acquire(self) -> None:
        # O_CLOEXEC (Python's default): a program exec'd by the run does not keep the lock alive.
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(descriptor)
            os.close(descriptor)
            raise WorkdirLockedError(self._in_use(holder)) from None
        except OSError as error:
            os.close(descriptor)
            if error.errno not in NO_FLOCK_ERRNOS:
                raise
            self._acquire_exclusive_file()
            return
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._descriptor = descriptor

    def _in_use(self, holder: str) -> str:
        return (f"{self.path.parent} is in use by another training run ({holder}, lock {self.path}); wait for "
                "it to finish or stop it, or use another --workdir")

    def check_free(self) -> None:
        """Raises WorkdirLockedError when a live run holds the lock now (``train.py --check``); creates nothing.
        Probing takes a shared lock for an instant, opened read-only."""
        if self.path.is_file():
            descriptor = os.open(self.path, os.O_RDONLY)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise WorkdirLockedError(self._in_use(_read_holder(descriptor))) from None
            except OSError as error:
                if error.errno not in NO_FLOCK_ERRNOS:
                    raise
            finally:
                os.close(descriptor)
        if self.exclusive_path.is_file():
            holder = self.exclusive_path.read_text(errors="replace").strip()
            if not _dead_on_this_host(holder):
                raise WorkdirLockedError(f"{self.path.parent} is in use by another training run "
                                         f"({holder or 'pid unknown'}, lock {self.exclusive_path}; no flock here)")

    @property
    def exclusive_path(self) -> pathlib.Path:
        """The fallback lock file, for file systems without ``flock``."""
        return self.path.with_name(self.path.name + ".excl")

    def _acquire_exclusive_file(self) -> None:
        me = f"pid {os.getpid()} on {socket.gethostname()}\n"
        for _ in range(2):  # a second try after replacing a dead holder's file
            try:
                descriptor = os.open(self.exclusive_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self.exclusive_path.read_text(errors="replace").strip()
                if not _dead_on_this_host(holder):
                    raise WorkdirLockedError(
                        f"{self.path.parent} is in use by another training run ({holder or 'pid unknown'}, lock "
                        f"{self.exclusive_path}; this file system has no flock); wait for it to finish or stop it, "
                        f"or remove {self.exclusive_path} once that run is gone") from None
                self.exclusive_path.unlink(missing_ok=True)  # our own format, written by a run that died here
                continue
            os.write(descriptor, me.encode())
            os.fsync(descriptor)
            os.close(descriptor)
            self._exclusive = True
            return
        raise WorkdirLockedError(f"{self.path.parent}: could not create {self.exclusive_path}; another run took it")

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)  # closing the last descriptor of the open file drops the flock
            self._descriptor = None
        if self._exclusive:
            self.exclusive_path.unlink(missing_ok=True)
            self._exclusive = False

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(descriptor: int) -> str:
    text = os.pread(descriptor, 200, 0).decode(errors="replace").strip()
    return text or "pid unknown"


def _dead_on_this_host(holder: str) -> bool:
    """Whether ``holder`` ("pid PID on HOST") names a process of this host that no longer runs."""
    parts = holder.split()
    if len(parts) != 4 or parts[0] != "pid" or parts[2] != "on" or parts[3] != socket.gethostname():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False
