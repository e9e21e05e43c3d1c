"""Launching N real JAX processes on localhost for multi-process tests.

Each process gets ``--xla_force_host_platform_device_count=K`` simulated CPU devices and the coordinator of a
free local port; outputs go to files (no pipe can fill up and stall a process). When one process fails, or the
time limit passes, every process of the group is killed (SIGKILL to its session), so a test never waits on a
peer stuck in a collective.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass
class ProcessResult:
    returncode: int | None  # None: killed by the harness
    stdout: str
    stderr: str


class ProcessGroupError(AssertionError):
    """A process of the group failed or the group ran past its time limit; the message holds every output."""


def process_env(devices: int, extra: dict | None = None) -> dict:
    """This environment with ``devices`` simulated CPU devices, the repository importable, nothing of an
    outer cluster (SLURM, Open MPI, JAX_*) left in to confuse the child, and no persistent compilation cache (the
    test run's, tests/conftest.py): JAX writes it from process 0 only, so a later group would find process 0's
    programs compiled and process 1's not, and process 0 would wait at the first collective for a peer still
    compiling, past gloo's timeout on a loaded machine."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("SLURM_", "OMPI_", "PMI_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_",
                                  "JAX_LOCAL_DEVICE_IDS", "JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_"))}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(extra or {})
    return env


def run_group(commands: Sequence[Sequence[str]], envs: Sequence[dict], timeout: float,
              cwd: str | os.PathLike = REPO, check: bool = True,
              kill_when: Callable[[], bool] | None = None) -> list[ProcessResult]:
    """Run ``commands[i]`` with ``envs[i]`` together; wait at most ``timeout`` seconds for all of them.

    ``kill_when``: polled while they run; once it returns True every process still running is killed
    (SIGKILL), as a crash of the machine would (their results have returncode None).
    With ``check``, raises ProcessGroupError (every process's output in the message) when a process exits
    non-zero or the time runs out; either way, nothing of the group is left running."""
    with tempfile.TemporaryDirectory(prefix="multiprocess-") as logs:
        processes, files = [], []
        try:
            for index, (command, env) in enumerate(zip(commands, envs, strict=True)):
                out = open(os.path.join(logs, f"{index}.out"), "w+", encoding="utf-8")
                err = open(os.path.join(logs, f"{index}.err"), "w+", encoding="utf-8")
                files.append((out, err))
                processes.append(subprocess.Popen(list(command), cwd=cwd, env=env, stdout=out, stderr=err,
                                                  start_new_session=True))
            deadline = time.monotonic() + timeout
            failed = timed_out = False
            while None in [p.poll() for p in processes]:  # a list: poll every process, not just the first
                if any(p.returncode not in (None, 0) for p in processes):
                    failed = True
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                if kill_when is not None and kill_when():
                    break
                time.sleep(0.05)
            failed = failed or any(p.returncode not in (None, 0) for p in processes)
        finally:
            killed = set()
            for index, process in enumerate(processes):
                if process.poll() is None:
                    _kill(process)
                    killed.add(index)
        results = []
        for index, (out, err) in enumerate(files):
            out.seek(0), err.seek(0)
            results.append(ProcessResult(None if index in killed else processes[index].returncode, out.read(), err.read()))
            out.close(), err.close()
    if check and (failed or timed_out):
        reason = f"timed out after {timeout:.0f} s" if timed_out else "a process failed"
        report = "\n".join(f"--- process {i}: exit {r.returncode}\n[stdout]\n{r.stdout[-3000:]}\n[stderr]\n{r.stderr[-6000:]}"
                           for i, r in enumerate(results))
        raise ProcessGroupError(f"{reason}\n{report}")
    return results


def _kill(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the process and anything it started (grain workers)
    except ProcessLookupError:
        pass
    process.wait()


def run_jax_processes(args: Sequence[str], num_processes: int, devices_per_process: int, timeout: float,
                      extra_env: dict | None = None, use_flags: bool = False, check: bool = True,
                      kill_when: Callable[[], bool] | None = None) -> list[ProcessResult]:
    """``python ARGS`` as ``num_processes`` processes of one JAX job on localhost, each with
    ``devices_per_process`` CPU devices. The job is described by JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID, or with ``use_flags`` by ``--coordinator --num_processes --process_id`` after ARGS."""
    coordinator = f"127.0.0.1:{free_port()}"
    commands, envs = [], []
    for index in range(num_processes):
        job = {"coordinator": coordinator, "num_processes": str(num_processes), "process_id": str(index)}
        if use_flags:
            commands.append([sys.executable, *args, *(f"--{key}={value}" for key, value in job.items())])
            envs.append(process_env(devices_per_process, extra_env))
        else:
            commands.append([sys.executable, *args])
            envs.append(process_env(devices_per_process, {**(extra_env or {}), "JAX_COORDINATOR_ADDRESS": coordinator,
                                                          "JAX_NUM_PROCESSES": str(num_processes),
                                                          "JAX_PROCESS_ID": str(index)}))
    return run_group(commands, envs, timeout, check=check, kill_when=kill_when)


def spawned_children() -> set[int]:
    """Live multiprocessing "spawn" children of this process (its workers; not its resource tracker)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                parent = int(file.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as file:
                command = file.read()
        except (OSError, ValueError, IndexError):
            continue
        if parent == os.getpid() and b"spawn_main" in command:
            pids.add(int(entry))
    return pids
