"""One run per workdir: the lock refuses a second holder, names the first, and dies with its process; two
``train.py`` on one workdir (the second refused in one line; SIGKILL of the first frees the workdir)."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from training_helpers import TINY_CONFIG

from convnext_audio_jax.artifacts import lock as lock_lib
from convnext_audio_jax.runtime import files

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_second_holder_is_refused_with_the_pid_and_can_take_it_after_release(tmp_path):
    first = lock_lib.WorkdirLock(tmp_path)
    first.acquire()
    with pytest.raises(lock_lib.WorkdirLockedError) as error:
        lock_lib.WorkdirLock(tmp_path).acquire()  # a second open file: flock conflicts even in one process
    assert str(error.value).startswith(f"{tmp_path} is in use by another training run (pid {os.getpid()} on ")
    assert f"lock {tmp_path / '.lock'})" in str(error.value)
    # Another process index locks its own file.
    with lock_lib.WorkdirLock(tmp_path, process_index=1) as other:
        assert other.path == tmp_path / ".lock.1"
    first.release()
    with lock_lib.WorkdirLock(tmp_path):
        pass
    assert (tmp_path / ".lock").is_file()  # left in place: its presence alone blocks nothing


def test_without_flock_an_exclusive_file_locks_and_a_dead_holder_is_replaced(tmp_path, monkeypatch):
    """On a file system without flock (Lustre without -o flock: ENOSYS) the lock is an O_EXCL file: a second run is
    refused naming the holder, release removes the file, and a file left by a process of this host that no
    longer runs is taken over; one from another host is not."""
    import errno
    import socket

    def no_flock(descriptor, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(files.fcntl, "flock", no_flock)
    first = lock_lib.WorkdirLock(tmp_path)
    first.acquire()
    assert first.exclusive_path.read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
    with pytest.raises(lock_lib.WorkdirLockedError, match=rf"\(pid {os.getpid()} on .*no flock.*remove "):
        lock_lib.WorkdirLock(tmp_path).acquire()
    first.release()
    assert not first.exclusive_path.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    first.exclusive_path.write_text(f"pid {dead.stdout.strip()} on {socket.gethostname()}\n")
    with lock_lib.WorkdirLock(tmp_path) as taken:
        assert taken.exclusive_path.read_text().startswith(f"pid {os.getpid()} ")
    first.exclusive_path.write_text("pid 1 on another-host\n")
    with pytest.raises(lock_lib.WorkdirLockedError, match="another-host"):
        lock_lib.WorkdirLock(tmp_path).acquire()
    assert first.exclusive_path.read_text() == "pid 1 on another-host\n"  # not ours to remove


def test_lock_dies_with_its_process(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from convnext_audio_jax.artifacts.lock import WorkdirLock; "
         "WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)", str(tmp_path)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(lock_lib.WorkdirLockedError, match=rf"\(pid {holder.pid} on "):
            lock_lib.WorkdirLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with lock_lib.WorkdirLock(tmp_path):
        pass


def test_second_train_py_on_one_workdir_is_refused_until_the_first_is_killed(tmp_path):
    config_file = tmp_path / "tiny.py"
    config_file.write_text(TINY_CONFIG)
    workdir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def train_py(*flags, **kwargs):
        command = [sys.executable, str(REPO / "train.py"), f"--config={config_file}", f"--workdir={workdir}", *flags]
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, **kwargs)

    # A run far longer than the test: it is killed below.
    first = train_py("--config.total_steps=100000", "--config.eval_every=100000", "--config.checkpoint_every=100000")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None:
            if (workdir / ".lock").is_file() and f"pid {first.pid} " in (workdir / ".lock").read_text():
                break
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()[-2000:]
        second = train_py()
        _, stderr = second.communicate(timeout=120)
        assert second.returncode == 1
        lines = stderr.strip().splitlines()
        assert len(lines) == 1, stderr
        assert lines[0].startswith(f"train.py: error: {workdir} is in use by another training run (pid {first.pid} on ")
        assert first.poll() is None  # the refused run left the first alone
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert first.returncode == -signal.SIGKILL
    # The lock died with the first run: a third run gets past it (and stops at its own bad config).
    third = train_py("--config.total_steps=0")
    _, stderr = third.communicate(timeout=120)
    assert third.returncode == 1 and stderr.strip() == "train.py: error: total_steps must be >= 1; got 0", stderr
