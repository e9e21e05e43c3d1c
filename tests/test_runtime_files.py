"""runtime/files.py: a durable write leaves the old content or the new (never a torn file, no temporary left), with
the file and then its folder fsynced around the rename; modes follow the umask; the one lock excludes another
process, and works without flock through its O_EXCL file; the one cache folder, and its former variable with one
warning."""

import errno
import logging
import os
import pathlib
import stat
import subprocess
import sys
import threading

import pytest

from convnext_audio_jax.runtime import files

REPO = pathlib.Path(__file__).resolve().parents[1]


def names(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def test_write_replaces_the_content_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    files.write_text(target, "old\n")
    assert files.write_bytes(target, b"new\n") == target
    assert target.read_bytes() == b"new\n" and names(tmp_path) == ["out.json"]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failure_mid_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch, failing):
    target = tmp_path / "out.json"
    target.write_text("old\n")

    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, failing, full_disk)
    with pytest.raises(OSError, match="No space left"):
        files.write_text(target, "new\n")
    monkeypatch.undo()
    assert target.read_text() == "old\n" and names(tmp_path) == ["out.json"]


def test_replacing_removes_what_the_block_left_and_only_that(tmp_path):
    target, other = tmp_path / "out.h5", tmp_path / "keep.txt"
    target.write_text("old")
    other.write_text("not ours")
    with pytest.raises(RuntimeError, match="writer died"), files.replacing(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("writer died")
    assert target.read_text() == "old" and names(tmp_path) == ["keep.txt", "out.h5"]
    with files.replacing(target, tmp_path / "out.h5.partial") as temporary:
        temporary.write_text("whole")
    assert target.read_text() == "whole" and names(tmp_path) == ["keep.txt", "out.h5"]


def test_the_file_is_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", str(a), str(b))), real_replace(a, b))[1])
    target = tmp_path / "out.bin"
    files.write_bytes(target, b"data")
    (_, synced), (_, temporary, renamed), folder = events
    assert synced == temporary and pathlib.Path(temporary).parent == tmp_path and renamed == str(target)
    assert folder == ("fsync", str(tmp_path))

    # A finished folder: every file and folder in it before the rename, the parent after it.
    events.clear()
    staging = files.make_temporary_dir(tmp_path / "model")
    (staging / "sub").mkdir()
    (staging / "sub" / "a.bin").write_bytes(b"a")
    files.publish(staging, tmp_path / "model")
    rename = next(i for i, e in enumerate(events) if e[0] == "rename")
    assert {e[1] for e in events[:rename]} == {str(staging), str(staging / "sub"), str(staging / "sub" / "a.bin")}
    assert events[rename + 1:] == [("fsync", str(tmp_path))]
    assert (tmp_path / "model" / "sub" / "a.bin").read_bytes() == b"a"


def test_modes_follow_the_umask_unless_private(tmp_path, umask_027):
    public = files.write_bytes(tmp_path / "public", b"x")
    private = files.write_bytes(tmp_path / "private", b"x", mode=0o600)
    folder = files.make_temporary_dir(tmp_path / "model")
    assert stat.S_IMODE(public.stat().st_mode) == 0o640
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750


HOLD = """
import sys, time
from convnext_audio_jax.runtime import files
lock = files.FileLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_the_lock_excludes_another_process_until_it_ends(tmp_path):
    path = tmp_path / "x.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(files.LockHeld, match=rf"{path} is held by pid {holder.pid} on ") as error:
            files.FileLock(path).acquire(blocking=False)
        assert not error.value.exclusive
    finally:
        holder.kill()
        holder.wait()
    with files.locked(path, blocking=False) as lock:  # the kernel dropped the dead holder's lock
        assert path.read_text() == f"{files.holder_text()}\n"
    assert lock.exclusive_path.exists() is False and path.is_file()  # the lock file stays; nothing else was made


def test_without_flock_the_o_excl_file_locks_and_a_waiter_gets_it_on_release(tmp_path, monkeypatch):
    def no_flock(descriptor, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(files.fcntl, "flock", no_flock)
    monkeypatch.setattr(files, "_POLL_S", 0.01)
    path = tmp_path / "x.lock"
    first = files.FileLock(path).acquire()
    assert first.exclusive_path.read_text() == f"{files.holder_text()}\n"
    with pytest.raises(files.LockHeld, match=f"{first.exclusive_path} is held by pid {os.getpid()} ") as error:
        files.FileLock(path).acquire(blocking=False)
    assert error.value.exclusive

    waiting, got = threading.Event(), threading.Event()

    def waiter():
        with files.locked(path, on_wait=lambda holder: waiting.set()):
            got.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    assert waiting.wait(10) and not got.is_set()
    first.release()
    thread.join(10)
    assert got.is_set() and not first.exclusive_path.exists()  # the waiter released it in turn

    first.exclusive_path.write_text("pid 1 on another-host\n")  # not ours: refused and left alone
    with pytest.raises(files.LockHeld, match="another-host"):
        files.FileLock(path).acquire(blocking=False)
    assert first.exclusive_path.read_text() == "pid 1 on another-host\n"


@pytest.fixture
def cache_env(monkeypatch):
    for name in (files.CACHE_ENV, files.OLD_CACHE_ENV, "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    files._warn_old_variable.cache_clear()
    yield monkeypatch
    files._warn_old_variable.cache_clear()


def test_the_cache_root(cache_env, tmp_path):
    cache_env.setenv("HOME", str(tmp_path / "home"))
    assert files.cache_root() == tmp_path / "home" / ".cache" / "convnext-audio-jax"
    cache_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert files.cache_root() == tmp_path / "xdg" / "convnext-audio-jax"
    cache_env.setenv(files.CACHE_ENV, str(tmp_path / "mine"))
    assert files.cache_root() == tmp_path / "mine"
    cache_env.delenv("HOME")
    cache_env.delenv(files.CACHE_ENV)
    cache_env.delenv("XDG_CACHE_HOME")
    cache_env.setattr(pathlib.Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("no home"))))
    with pytest.raises(files.NoCacheFolder, match=f"HOME is not set; set {files.CACHE_ENV}$"):
        files.cache_root()


def test_the_former_variable_works_with_one_warning(cache_env, tmp_path, caplog):
    cache_env.setenv(files.OLD_CACHE_ENV, str(tmp_path / "old"))
    with caplog.at_level(logging.WARNING, logger=files.__name__):
        assert files.cache_root() == tmp_path / "old"
        assert files.cache_root() == tmp_path / "old"
    assert len(caplog.records) == 1 and "\n" not in caplog.records[0].getMessage()
    assert f"{files.OLD_CACHE_ENV} is deprecated: set {files.CACHE_ENV}" in caplog.records[0].getMessage()
    cache_env.setenv(files.CACHE_ENV, str(tmp_path / "new"))  # the new one wins
    assert files.cache_root() == tmp_path / "new"
