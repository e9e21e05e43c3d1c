"""Timing, memory and machine-description helpers shared by the benchmark scripts."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import re
import signal
import statistics
import threading
import time
from collections.abc import Callable

import jax

from convnext_audio_jax.runtime import xla


def timed_runs(run: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``run`` after ``warmup`` untimed ones (caches, allocator)."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


class TimeLimitExceeded(Exception):
    """A part of a benchmark ran past its time limit."""


class _SignalStack(ctypes.Structure):  # stack_t of <signal.h> on Linux
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


SIGNAL_STACK_BYTES = 256 * 1024
_signal_stacks: list = []  # every stack installed, kept for the process's life: a signal may land on it any time


def signal_stack(install: ctypes.Array | None = None) -> _SignalStack | None:
    """The calling thread's signal stack (``sigaltstack``) as it was, after installing the buffer ``install`` if given;
    None where the call fails or is not Linux's."""
    if platform.system() != "Linux":
        return None
    new = None if install is None else ctypes.byref(_SignalStack(ctypes.addressof(install), 0, ctypes.sizeof(install)))
    old = _SignalStack()
    return old if ctypes.CDLL(None, use_errno=True).sigaltstack(new, ctypes.byref(old)) == 0 else None


def roomy_signal_stack() -> int:
    """Gives the calling thread a signal stack of SIGNAL_STACK_BYTES unless it has one that large; returns the size it
    has after. Linux only (elsewhere 0, nothing done).

    Python runs its signal handlers on the thread's signal stack, and OpenVINO's CPU plugin replaces the main
    thread's (faulthandler's 58 KiB) with a 20 KiB one. On a CPU with AMX a signal frame carries 11 KiB of register
    state, and this limit's SIGALRM then killed the process (the kernel: "overflowed sigaltstack")."""
    current = signal_stack()
    if current is None:
        return 0
    if current.ss_flags & 1 or (current.ss_sp and current.ss_size >= SIGNAL_STACK_BYTES):  # 1: SS_ONSTACK
        return current.ss_size
    stack = ctypes.create_string_buffer(SIGNAL_STACK_BYTES)
    if signal_stack(install=stack) is None:
        return current.ss_size
    _signal_stacks.append(stack)
    return SIGNAL_STACK_BYTES


@contextlib.contextmanager
def time_limit(seconds: float | None, message: str):
    """Raises TimeLimitExceeded(``message``) in the main thread after ``seconds``, where Python regains control (a
    compile cannot be cancelled otherwise); None, another thread or no SIGALRM: no limit.

    A timer thread signals the main thread alone (``pthread_kill``): a process-wide alarm (``setitimer``) goes to
    any thread, and interrupting a native thread pool's system call (XLA's, grain's) can abort the process."""
    if not seconds or not hasattr(signal, "pthread_kill") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TimeLimitExceeded(message)

    roomy_signal_stack()
    main = threading.get_ident()
    done = threading.Event()
    sending = threading.Lock()

    def fire():
        if not done.wait(seconds):
            with sending:
                if not done.is_set():
                    signal.pthread_kill(main, signal.SIGALRM)

    previous = signal.signal(signal.SIGALRM, expire)
    timer = threading.Thread(target=fire, name="time-limit", daemon=True)
    timer.start()
    try:
        yield
    finally:
        with sending:  # after this no signal is sent; one sent before is handled by now or in the join below
            done.set()
        timer.join()
        signal.signal(signal.SIGALRM, previous)


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    return statistics.median(timed_runs(run, repeats))


class RssPeak:
    """Peak resident-set-size increase over the RSS at entry, sampled by a background thread.

    ``resource.getrusage``'s ``ru_maxrss`` is a process-lifetime high-water mark, useless for the
    second model in one process; sampling the current RSS gives a per-measurement peak (to within
    the sampling interval). XLA and torch run their kernels without the GIL, so the sampler runs.
    Memory freed by an earlier measurement and reused without growing the RSS is not counted, so
    glibc's free heap is handed back to the system first.
    """

    def __init__(self, interval_s: float = 0.01):
        import psutil

        self._process = psutil.Process()
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.peak_delta_bytes = 0

    def _sample(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.peak_delta_bytes = max(self.peak_delta_bytes, self._process.memory_info().rss - self._baseline)

    def __enter__(self) -> RssPeak:
        release_free_heap()
        self._baseline = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_delta_bytes = max(self.peak_delta_bytes, self._process.memory_info().rss - self._baseline)


def release_free_heap() -> None:
    """glibc ``malloc_trim(0)``: returns freed heap pages to the system (a no-op elsewhere)."""
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name) if libc_name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The CPU features that decide how fast fp32 and bf16 run: XLA:CPU has no native bf16 dot without
# AVX512_BF16 / AMX (it converts the operands to fp32), and torch's oneDNN picks its kernels by them.
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def cpu_speed_flags() -> list[str]:
    """Which of ``SPEED_FLAGS`` the CPU has (Linux /proc/cpuinfo; empty elsewhere)."""
    flags = xla.cpu_flags()
    return [flag for flag in SPEED_FLAGS if flag in flags]


def machine_slug() -> str:
    """``cpu-2core-xeon-avx512``, ``gpu-h100``, …: the accelerator, or on CPU the core count, the CPU family and
    its widest vector instructions (one CPU name covers hosts with and without AVX-512, and speed ratios
    differ between them)."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        name = cpu_model_name().lower()
        family = next((f for f in ("epyc", "xeon", "ryzen", "core", "graviton", "neoverse", "apple") if f in name), None)
        if family is None:
            family = re.sub(r"[^a-z0-9]+", "-", name).strip("-").split("-")[0] or platform.machine().lower()
        flags = cpu_speed_flags()
        isa = next((label for flag, label in (("avx512_bf16", "avx512bf16"), ("avx512f", "avx512"), ("avx2", "avx2"))
                    if flag in flags), None)
        return f"cpu-{os.cpu_count()}core-{family}" + (f"-{isa}" if isa else "")
    kind = device.device_kind.lower()
    model = re.search(r"\b([a-z]{1,2}\d{2,4}[a-z]?)\b", kind)
    count = len(jax.devices())
    name = model.group(1) if model else re.sub(r"[^a-z0-9]+", "-", kind).strip("-")
    return f"{device.platform}-{name}" + (f"x{count}" if count > 1 else "")


def machine_description() -> dict:
    import jaxlib

    device = jax.devices()[0]
    return {
        "slug": machine_slug(),
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": len(jax.devices()),
        "cpu": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_speed_flags(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
    }
