"""host_memory: the GLIBC_TUNABLES value, the one re-execution, that glibc then keeps freed memory (page faults of a
second large allocation), the opt-out, and JAX's CPU dispatch."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from convnext_audio_jax.runtime import host_memory

ROOT = pathlib.Path(__file__).resolve().parents[1]
GLIBC_LINUX = sys.platform.startswith("linux") and __import__("platform").libc_ver()[0] == "glibc"

# Prints a line per run of the script, then the minor page faults of touching a freshly malloc'ed 256 MiB block a
# second time (glibc maps such a block with mmap and unmaps it on free unless told otherwise), the tunables and the
# dispatch setting.
SCRIPT = r"""
import ctypes, os, resource
print("run", flush=True)
from convnext_audio_jax.runtime import host_memory
host_memory.keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 256 << 20
def touch():
    block = libc.malloc(size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(block, 1, size)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc.free(block)
    return faults
touch()
print("faults", touch())
print("tunables", os.environ.get("GLIBC_TUNABLES", ""))
import jax
print("async", jax.config.values["jax_cpu_enable_async_dispatch"])
"""


def run_script(**env_changes) -> dict[str, list[str]]:
    env = {key: value for key, value in os.environ.items() if key not in ("GLIBC_TUNABLES", host_memory.ENV)}
    env.update(env_changes)
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines: dict[str, list[str]] = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition(" ")
        lines.setdefault(key, []).append(value)
    return lines


def test_with_tunables_appends_ours_and_keeps_a_value_already_set():
    assert host_memory.with_tunables("") == ":".join(host_memory.TUNABLES)
    mine = "glibc.malloc.mmap_max=8:glibc.malloc.arena_max=2"
    assert host_memory.with_tunables(mine) == mine + ":glibc.malloc.trim_threshold=1099511627776"
    assert host_memory.with_tunables(host_memory.with_tunables(mine)) == host_memory.with_tunables(mine)


@pytest.mark.skipif(not GLIBC_LINUX, reason="GLIBC_TUNABLES is glibc's, on Linux")
def test_runs_again_once_and_glibc_then_keeps_freed_memory():
    kept = run_script()
    assert len(kept["run"]) == 2  # the script ran again, once
    assert kept["tunables"] == [":".join(host_memory.TUNABLES)]
    assert int(kept["faults"][0]) < 1000  # 256 MiB reused: 65 536 pages would fault if it were mapped afresh
    assert kept["async"] == ["False"]


@pytest.mark.skipif(not GLIBC_LINUX, reason="GLIBC_TUNABLES is glibc's, on Linux")
def test_turned_off_leaves_allocator_and_dispatch_alone():
    default = run_script(**{host_memory.ENV: "0"})
    assert len(default["run"]) == 1 and default["tunables"] == [""]
    assert int(default["faults"][0]) > 60_000  # glibc's default: mapped afresh, every page faults again
    assert default["async"] == ["True"]


# The faults of 200 clip reads' worth of buffers (three 700 KB blocks allocated, touched and freed per read), after
# keep_freed_buffers() when argv[1] is "keep".
READS = r"""
import ctypes, resource, sys
from convnext_audio_jax.runtime import host_memory
if sys.argv[1] == "keep":
    assert host_memory.keep_freed_buffers()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 700 << 10
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    blocks = [libc.malloc(size) for _ in range(3)]
    for block in blocks:
        ctypes.memset(block, 1, size)
    for block in blocks:
        libc.free(block)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not GLIBC_LINUX, reason="mallopt is glibc's")
def test_reader_buffers_stay_in_the_heap():
    env = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
    faults = {mode: int(subprocess.run([sys.executable, "-c", READS, mode], env=env, cwd=ROOT, capture_output=True,
                                       text=True, timeout=60, check=True).stdout) for mode in ("keep", "default")}
    assert faults["default"] > 50_000  # glibc trims the freed blocks off the heap top and faults them in again
    assert faults["keep"] < 2_000  # ~530 pages, touched once
    # Where the tunables of keep_freed_memory are set, they already keep everything and are left as they are.
    env["GLIBC_TUNABLES"] = ":".join(host_memory.TUNABLES)
    assert subprocess.run([sys.executable, "-c", "from convnext_audio_jax.runtime import host_memory as h; "
                           "print(h.keep_freed_buffers())"], env=env, capture_output=True, text=True,
                          cwd=ROOT, check=True).stdout.strip() == "False"
