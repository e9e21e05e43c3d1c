"""Per-backend choices: ``jit`` with the XLA compiler options this project's models want on each backend
(and those for programs that run once), whether bfloat16 arithmetic is native where the models run, and
built programs reused within a process (:func:`reused`).

On XLA:CPU (jax 0.10), the default YNNPACK fusions swallow the depthwise shift-sum and the
dense layers' bias broadcasts into one fusion that materialises every shifted slice and a full
broadcast of each bias: the ConvNeXt-Tiny forward ran 1.5–1.7× slower with them than without
(batch 8 of 10 s clips: 1.46 vs 2.15 clips/s on the 2-core CPU). Disabling XNNPACK as well, or
asking for oneDNN (a no-op in these jaxlib wheels: no oneDNN custom calls appear), changed
nothing measurable. Options are passed per compilation, so nothing global is changed; other
backends get none.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import jax

from convnext_audio_jax.runtime.errors import UserError

logger = logging.getLogger(__name__)

CPU_COMPILER_OPTIONS: dict[str, Any] = {"xla_cpu_experimental_ynn_fusion_type": ""}
# For programs that run once, such as the random initialisers (a threefry and a truncated normal per parameter):
# LLVM at -O1 instead of XLA's default -O3 compiles them 1.5-3x faster (demo model 9.4 -> 3.4 s of CPU, CNN14
# 10.2 -> 5.1 s, ConvNeXt-Tiny 11.0 -> 8.1 s) with the same values bit for bit (checked on those models,
# jax 0.10.2).
RUN_ONCE_COMPILER_OPTIONS: dict[str, Any] = {"xla_backend_optimization_level": 1}
# CPU flags of native bfloat16 arithmetic. Without them XLA:CPU compiles a bf16 dot as two converts to fp32 and
# an fp32 dot: on a 2-core AVX-512 Xeon without them the bf16 forward of CNN14 / CNN6 ran 20 % / 29 % slower than
# fp32 (docs/benchmarks.md).
NATIVE_BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def compiler_options(backend: str | None = None) -> dict[str, Any]:
    """The compiler options for ``backend`` (default: jax's default backend)."""
    return dict(CPU_COMPILER_OPTIONS) if (backend or jax.default_backend()) == "cpu" else {}


def jit(fun: Callable | None = None, **jit_kwargs: Any):
    """``jax.jit`` plus :func:`compiler_options`; usable as ``@jit`` or ``@jit(donate_argnums=…)``.

    Explicit ``compiler_options`` in ``jit_kwargs`` override the defaults. (A data-parallel program runs per
    device: ``sharding.per_device``.)"""
    if fun is None:
        return functools.partial(jit, **jit_kwargs)
    options = {**compiler_options(), **jit_kwargs.pop("compiler_options", {})}
    return jax.jit(fun, compiler_options=options or None, **jit_kwargs)


# Programs kept per builder by :func:`reused` (a few settings at a time: a sweep's, or the tests').
PROGRAMS_KEPT = 8


def reused(builder: Callable) -> Callable:
    """``builder(*args)`` (a jitted function, or what one is built on) memoised on its arguments: a process that builds the
    same program again (another run with the same model, optimizer and mesh: a sweep, a resume in the same
    process, the tests) gets the function it already traced and compiled instead of tracing it again (seconds
    per run). Arguments that cannot be hashed build anew."""
    cached = functools.lru_cache(maxsize=PROGRAMS_KEPT)(builder)

    @functools.wraps(builder)
    def build(*args):
        try:
            hash(args)
        except TypeError:
            return builder(*args)
        return cached(*args)

    return build


# Flags to treat as absent (space- or comma-separated), e.g. "amx_tile amx_bf16": the choices made for a CPU
# without them can then be run and measured on one that has them.
CPU_FLAGS_OFF_ENV = "CONVNEXT_AUDIO_JAX_CPU_FLAGS_OFF"


def cpu_flags_off() -> frozenset[str]:
    """The flags named in ``$CONVNEXT_AUDIO_JAX_CPU_FLAGS_OFF``."""
    return frozenset(os.environ.get(CPU_FLAGS_OFF_ENV, "").replace(",", " ").split())


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux: /proc/cpuinfo; empty where that cannot be read), less :func:`cpu_flags_off`."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = frozenset(next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), []))
    except OSError:
        return frozenset()
    return flags - cpu_flags_off()


def native_bfloat16(backend: str | None = None) -> bool:
    """Whether ``backend`` (default: jax's default backend) computes bfloat16 natively: GPUs and TPUs do; a CPU
    does when it has one of ``NATIVE_BFLOAT16_CPU_FLAGS``."""
    if (backend or jax.default_backend()) != "cpu":
        return True
    return any(flag in cpu_flags() for flag in NATIVE_BFLOAT16_CPU_FLAGS)


def resolve_dtype(requested: str, backend: str | None = None) -> str:
    """``requested`` with "auto" resolved: "bfloat16" on a GPU or TPU (what their matrix units are for), "float32"
    on the CPU."""
    if requested != "auto":
        return requested
    return "float32" if (backend or jax.default_backend()) == "cpu" else "bfloat16"


def enable_compilation_cache(setting: str | os.PathLike, cache_root: str | os.PathLike) -> str | None:
    """JAX's persistent compilation cache in the folder ``setting`` names: "auto" is ``cache_root/xla``, "" none, else
    the folder itself. Programs that took over ``jax_persistent_cache_min_compile_time_secs`` (1 s) to compile are
    stored, and a restarted run loads them instead of compiling again. A cache already set
    (``JAX_COMPILATION_CACHE_DIR``, or by the caller) wins. Returns the folder in use."""
    directory = os.path.join(cache_root, "xla") if str(setting) == "auto" else str(setting)
    if directory and not jax.config.jax_compilation_cache_dir:
        os.makedirs(directory, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(directory))
    return jax.config.jax_compilation_cache_dir or None


def compute_dtype(requested: str, policy: str = "fallback", backend: str | None = None) -> str:
    """The dtype the models compute in when ``requested`` ("float32" or "bfloat16") is asked for. ``policy``
    "fallback": bfloat16 on a CPU without native bfloat16 becomes float32 (faster there; logged), "keep":
    bfloat16 wherever it is asked for."""
    if policy not in ("fallback", "keep"):
        raise UserError(f"the bfloat16 policy must be 'fallback' or 'keep', got {policy!r}")
    if requested != "bfloat16" or policy == "keep" or native_bfloat16(backend):
        return requested
    _log_bfloat16_fallback()
    return "float32"


@functools.cache
def _log_bfloat16_fallback() -> None:
    """Once per process: a run resolves its model's dtype several times (probe model, model, artifact config)."""
    logger.warning("bfloat16 asked for on a CPU without native bfloat16 (none of %s): computing in float32, which "
                   "is faster there; model.cpu_bfloat16 = 'keep' computes in bfloat16 anyway",
                   ", ".join(NATIVE_BFLOAT16_CPU_FLAGS))
