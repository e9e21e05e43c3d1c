"""Files every layer writes the same way: a durable replace, one inter-process lock, one cache folder.

Durable write (``write_bytes``, ``write_text``; ``replacing`` and ``publish`` for a file or folder another library
writes): the content goes to a temporary name beside the target (same folder, so the rename is atomic), is flushed
and fsynced, renamed over the target with ``os.replace``, and the folder is fsynced (the rename itself is on disk).
A crash or a power cut leaves the old content or the new, never a torn file; a failure removes the temporary file
it made and nothing else. Files are created 0666 and folders 0777 less the umask, as ``open`` and ``mkdir`` do, so
that colleagues read what the umask lets them; a caller that wants a private file passes ``mode=0o600``.

Lock (``FileLock``, ``locked``): an exclusive ``fcntl.flock`` on a lock file holding ``pid PID on HOST`` (only for
messages). The kernel drops it when its process dies, however it dies, so a stale file blocks nothing; lock files
are left in place (removing one races with a process opening it). Where the file system has no ``flock`` (Lustre
without ``-o flock``, some NFS: ENOSYS, EOPNOTSUPP, ENOLCK) the lock is a file created with ``O_EXCL`` beside it
(``NAME.excl``), removed on release; one left by a dead process of this host is taken over, one from another host
is named in the error (or, for a waiting caller, in the line that says what it waits for).

Cache folder (``cache_root``): ``$CONVNEXT_AUDIO_CACHE``, else ``$XDG_CACHE_HOME/convnext-audio-jax``, else
``~/.cache/convnext-audio-jax``; weights, converted models, the XLA compilation cache and the native build
(``native/``) all live under it. ``$CONVNEXT_AUDIO_JAX_CACHE`` (the native build's former variable) still works,
with one warning line.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import pathlib
import secrets
import socket
import time
from collections.abc import Callable, Iterator

logger = logging.getLogger(__name__)

CACHE_ENV = "CONVNEXT_AUDIO_CACHE"
OLD_CACHE_ENV = "CONVNEXT_AUDIO_JAX_CACHE"
CACHE_NAME = "convnext-audio-jax"
# flock not supported by the file system.
NO_FLOCK_ERRNOS = frozenset({errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK})
_POLL_S = 0.2  # how often a waiter without flock looks at the O_EXCL file again

PathLike = str | os.PathLike


# ------------------------------------------------------------------------------------------ durable writes


def fsync_path(path: PathLike) -> None:
    """Flushes a file, or a folder (its entries: a rename in it), to disk."""
    descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def sync_file(file) -> None:
    """Flushes an open file object to disk (an appended log: the records written so far survive a power cut)."""
    file.flush()
    os.fsync(file.fileno())


def fsync_tree(root: PathLike) -> None:
    """Every file and folder under ``root`` (and ``root``) on disk, before a rename publishes it."""
    for folder, _, names in os.walk(root):
        for name in names:
            fsync_path(os.path.join(folder, name))
        fsync_path(folder)


def temporary_path(target: PathLike, suffix: str = ".tmp") -> pathlib.Path:
    """A fresh name beside ``target`` for its next content: hidden, carrying the pid (whose leftover it is) and a
    random part (two writers of one target never share it)."""
    target = pathlib.Path(target)
    return target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def make_temporary_dir(target: PathLike) -> pathlib.Path:
    """A new empty folder beside ``target`` (0777 less the umask, unlike ``tempfile.mkdtemp``'s 0700)."""
    path = temporary_path(target)
    path.mkdir(0o777)
    return path


def publish(temporary: PathLike, target: PathLike) -> pathlib.Path:
    """Puts a finished ``temporary`` (a file, or a folder replacing none or an empty one) in place of ``target``:
    its content on disk, the rename, then the folder holding both on disk."""
    temporary, target = pathlib.Path(temporary), pathlib.Path(target)
    if temporary.is_dir():
        fsync_tree(temporary)
    else:
        fsync_path(temporary)
    temporary.replace(target)
    fsync_path(target.parent)
    return target


@contextlib.contextmanager
def replacing(target: PathLike, temporary: PathLike | None = None) -> Iterator[pathlib.Path]:
    """``with replacing(target) as temporary:`` write ``temporary`` (it does not exist yet; a library may create it);
    when the block ends it is published over ``target``, and if the block fails it is removed. ``temporary``
    names it where the caller's own clean-up knows the name."""
    temporary = pathlib.Path(temporary) if temporary is not None else temporary_path(target)
    try:
        yield temporary
        publish(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            temporary.unlink()  # ours: made in the block for this write
        raise


def write_bytes(target: PathLike, data: bytes, *, mode: int = 0o666, temporary: PathLike | None = None) -> pathlib.Path:
    """Replaces ``target``'s content with ``data`` durably (see the module doc); returns ``target``."""
    path = pathlib.Path(temporary) if temporary is not None else temporary_path(target)
    # O_EXCL for a name of our own making: it never clobbers (nor, on failure, removes) a file that is not ours. A
    # caller's fixed name may be its own leftover. Opened before `replacing`, which removes the temporary on failure.
    exclusive = os.O_EXCL if temporary is None else os.O_TRUNC
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | exclusive, mode)
    with replacing(target, path), os.fdopen(descriptor, "wb") as file:
        file.write(data)
    return pathlib.Path(target)


def write_text(target: PathLike, text: str, *, encoding: str = "utf-8", mode: int = 0o666,
               temporary: PathLike | None = None) -> pathlib.Path:
    """``write_bytes`` of ``text`` encoded."""
    return write_bytes(target, text.encode(encoding), mode=mode, temporary=temporary)


# ------------------------------------------------------------------------------------------ lock


def holder_text() -> str:
    """What a lock file says about its holder: ``pid PID on HOST``."""
    return f"pid {os.getpid()} on {socket.gethostname()}"


class LockHeld(Exception):
    """Another process holds the lock (a non-blocking ``acquire``): ``path`` (the flock file, or without flock the
    ``O_EXCL`` file to remove once its holder is known to be gone), ``holder`` ("pid PID on HOST"), ``exclusive``
    (whether it is the ``O_EXCL`` file)."""

    def __init__(self, path: pathlib.Path, holder: str, exclusive: bool):
        super().__init__(f"{path} is held by {holder}")
        self.path, self.holder, self.exclusive = path, holder, exclusive


class FileLock:
    """An exclusive lock between processes on ``path`` (see the module doc): ``with FileLock(path):`` waits for it,
    ``acquire(blocking=False)`` raises LockHeld instead; ``on_wait(holder)`` is called once before waiting."""

    def __init__(self, path: PathLike):
        self.path = pathlib.Path(path)
        self._descriptor: int | None = None
        self._exclusive = False

    @property
    def exclusive_path(self) -> pathlib.Path:
        """The fallback lock file, for file systems without ``flock``."""
        return self.path.with_name(self.path.name + ".excl")

    def acquire(self, blocking: bool = True, on_wait: Callable[[str], None] | None = None) -> FileLock:
        # O_CLOEXEC: a program exec'd by the holder does not keep the lock alive.
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(descriptor)
                if not blocking:
                    raise LockHeld(self.path, holder, exclusive=False) from None
                if on_wait is not None:
                    on_wait(holder)
                fcntl.flock(descriptor, fcntl.LOCK_EX)
        except OSError as error:
            os.close(descriptor)
            if error.errno not in NO_FLOCK_ERRNOS:
                raise
            self._acquire_exclusive_file(blocking, on_wait)
            return self
        except BaseException:
            os.close(descriptor)
            raise
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{holder_text()}\n".encode(), 0)
        self._descriptor = descriptor
        return self

    def holder(self) -> LockHeld | None:
        """Who holds the lock now (a LockHeld to raise or read), None when it is free; creates nothing. Probing
        takes a shared flock for an instant, so a process acquiring at that very moment may be refused once."""
        if self.path.is_file():
            descriptor = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return LockHeld(self.path, _read_holder(descriptor), exclusive=False)
            except OSError as error:
                if error.errno not in NO_FLOCK_ERRNOS:
                    raise
            finally:
                os.close(descriptor)
        if self.exclusive_path.is_file():
            holder = self.exclusive_path.read_text(errors="replace").strip() or "pid unknown"
            if not _dead_on_this_host(holder):
                return LockHeld(self.exclusive_path, holder, exclusive=True)
        return None

    def _acquire_exclusive_file(self, blocking: bool, on_wait: Callable[[str], None] | None) -> None:
        tries, waited = 0, False
        while blocking or tries < 2:  # without waiting: a second try after replacing a dead holder's file
            tries += 1
            try:
                descriptor = os.open(self.exclusive_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            except FileExistsError:
                try:
                    holder = self.exclusive_path.read_text(errors="replace").strip() or "pid unknown"
                except FileNotFoundError:
                    continue  # released meanwhile
                if _dead_on_this_host(holder):
                    self.exclusive_path.unlink(missing_ok=True)  # our own format, written by a process that died here
                    continue
                if not blocking:
                    raise LockHeld(self.exclusive_path, holder, exclusive=True) from None
                if not waited and on_wait is not None:
                    on_wait(f"{holder}; this file system has no flock: remove {self.exclusive_path} once it is gone")
                waited = True
                time.sleep(_POLL_S)
                continue
            try:
                os.write(descriptor, f"{holder_text()}\n".encode())
                os.fsync(descriptor)  # the holder's name survives a crash of the machine, for the message
            finally:
                os.close(descriptor)
            self._exclusive = True
            return
        raise LockHeld(self.exclusive_path, "another process that took it meanwhile", exclusive=True)

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)  # closing the last descriptor of the open file drops the flock
            self._descriptor = None
        if self._exclusive:
            self.exclusive_path.unlink(missing_ok=True)  # ours: created above with O_EXCL
            self._exclusive = False

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def locked(path: PathLike, blocking: bool = True, on_wait: Callable[[str], None] | None = None) -> Iterator[FileLock]:
    """``FileLock(path)`` held for the block."""
    lock = FileLock(path).acquire(blocking, on_wait)
    try:
        yield lock
    finally:
        lock.release()


def _read_holder(descriptor: int) -> str:
    return os.pread(descriptor, 200, 0).decode(errors="replace").strip() or "pid unknown"


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


# ------------------------------------------------------------------------------------------ cache folder


class NoCacheFolder(RuntimeError):
    """No cache folder can be named (no HOME and no variable set); the message says which variable to set."""


def cache_root() -> pathlib.Path:
    """The one cache folder (see the module doc)."""
    explicit = os.environ.get(CACHE_ENV)
    if os.environ.get(OLD_CACHE_ENV):
        _warn_old_variable()
        explicit = explicit or os.environ[OLD_CACHE_ENV]
    if explicit:
        return pathlib.Path(explicit).expanduser().absolute()
    if os.environ.get("XDG_CACHE_HOME"):
        return pathlib.Path(os.environ["XDG_CACHE_HOME"]).expanduser().absolute() / CACHE_NAME
    try:
        home = pathlib.Path.home()
    except (RuntimeError, KeyError):  # no HOME and no passwd entry
        raise NoCacheFolder(f"no cache folder: HOME is not set; set {CACHE_ENV}") from None
    return home / ".cache" / CACHE_NAME


@functools.cache  # once per process
def _warn_old_variable() -> None:
    if os.environ.get(CACHE_ENV):
        logger.warning("%s is ignored: %s is set and names the cache folder", OLD_CACHE_ENV, CACHE_ENV)
    else:
        logger.warning("%s is deprecated: set %s instead (the one cache folder; the native build is in its native/)",
                       OLD_CACHE_ENV, CACHE_ENV)
