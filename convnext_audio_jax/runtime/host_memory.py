"""Keep freed host memory in the process during CPU training, so that XLA:CPU's temporaries are not mapped afresh on
every step.

XLA:CPU allocates an executable's temporaries on each call (5.2 GB for ConvNeXt-Tiny's training step at batch 8).
glibc serves a block that large with ``mmap`` and unmaps it when it is freed, so every step page-faults and zeroes all
of it again: 1.3 million faults and ~17 % of the step's CPU time on a 2-core Xeon (docs/benchmarks.md). With glibc's
``mmap`` use off and its trim threshold above any block (:data:`TUNABLES`, which glibc reads only when a process
starts) and JAX's CPU dispatch synchronous (the calling thread then allocates the temporaries, in glibc's main
arena), the same memory serves every step.

``python train.py`` calls :func:`keep_freed_memory` first: on Linux with glibc it runs the same command again, once,
with :data:`TUNABLES` added to ``GLIBC_TUNABLES``. ``CONVNEXT_AUDIO_JAX_KEEP_FREED_MEMORY=0`` leaves the allocator and
the dispatch alone. The process then keeps its peak of host memory until it exits, as do the processes it starts
(they inherit ``GLIBC_TUNABLES``).

The input pipeline has the same trouble at a smaller size wherever those tunables are not set (a GPU host): each clip
read allocates and frees a few 640 KB buffers, which glibc trims from the heap top and faults in again on the next
read, ~500 page faults and most of the CPU time of an uncompressed ArrayRecord read. :func:`keep_freed_buffers`
raises the mmap and trim thresholds of the calling process (``mallopt``: at run time, for this process only) and is
called by the loader and its worker processes.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

TUNABLES = ("glibc.malloc.mmap_max=0", "glibc.malloc.trim_threshold=1099511627776")  # no mmap; trim above 1 TiB only
ENV = "CONVNEXT_AUDIO_JAX_KEEP_FREED_MEMORY"


# Accelerator plugins of jaxlib and the device nodes their drivers make: both present, JAX will run on them.
ACCELERATOR_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_rocm7_plugin", "jax_rocm60_plugin", "libtpu")
ACCELERATOR_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/kfd", "/dev/accel0", "/dev/vfio/0")


def cpu_backend_expected() -> bool:
    """Whether JAX will compute on the CPU, decided before JAX starts (a multi-process job must join its cluster
    first): ``JAX_PLATFORMS`` when set, else whether an accelerator plugin is installed and its device exists. On a GPU
    host the allocator setting would only pin host memory, in every process the run starts (grain's workers too)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    import importlib.util

    plugin = any(importlib.util.find_spec(name) is not None for name in ACCELERATOR_PLUGINS)
    return not (plugin and any(os.path.exists(path) for path in ACCELERATOR_DEVICES))


def wanted() -> bool:
    """Linux with glibc, JAX computing on the CPU (:func:`cpu_backend_expected`), and not turned off by
    ``CONVNEXT_AUDIO_JAX_KEEP_FREED_MEMORY=0``."""
    return (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc" and os.environ.get(ENV, "1") != "0"
            and cpu_backend_expected())


def with_tunables(existing: str) -> str:
    """``existing`` (a ``GLIBC_TUNABLES`` value) with each of :data:`TUNABLES` it does not set yet appended: a value
    already there wins."""
    named = {item.split("=", 1)[0] for item in existing.split(":") if item}
    added = [tunable for tunable in TUNABLES if tunable.split("=", 1)[0] not in named]
    return ":".join([existing] * bool(existing) + added)


def keep_freed_memory() -> None:
    """Where :func:`wanted`: run this command again with :data:`TUNABLES` in ``GLIBC_TUNABLES`` unless they are set
    (``os.execv``: same process id, arguments and interpreter options; call it before anything else), then make JAX's
    CPU dispatch synchronous."""
    if not wanted():
        return
    current = os.environ.get("GLIBC_TUNABLES", "")
    updated = with_tunables(current)
    if updated != current:
        os.environ["GLIBC_TUNABLES"] = updated
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)


# mallopt parameters (malloc.h) and values for reading processes: buffers below 32 MiB come from the heap, and up to
# 256 MiB of freed heap is kept for the next read.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
READER_TRIM_BYTES, READER_MMAP_BYTES = 256 << 20, 32 << 20


def keep_freed_buffers() -> bool:
    """Keep clip-sized buffers in this process's heap between reads (see the module docstring); True where it did.

    Nothing is changed without glibc, or where ``GLIBC_TUNABLES`` already sets the trim threshold (a CPU training
    process from :func:`keep_freed_memory`, and the workers it starts, which keep every block already)."""
    if not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"):
        return False
    if "glibc.malloc.trim_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, READER_TRIM_BYTES)) and bool(
        libc.mallopt(_M_MMAP_THRESHOLD, READER_MMAP_BYTES))
