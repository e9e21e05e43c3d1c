"""The native kernels built with AddressSanitizer and UBSan (-Og) over the seeded shape corpus of
tests/native_corpus.py, each build in a process of its own: for this CPU, the AVX2 build where this CPU has AVX-512
(elsewhere it is this CPU's), and the generic path of vec.h (the x86 vector instruction sets named off). Every result
equals float64 numpy and the sanitizers report nothing. Python is not instrumented, so the sanitizers' runtime is
preloaded (with libstdc++, whose exceptions ASan intercepts); the sanitized libraries are cached in a folder of their
own."""

import os
import pathlib
import platform
import subprocess
import sys

import pytest

from convnext_audio_jax import native
from convnext_audio_jax.runtime import files, xla

COMPILER = native.find_compiler()
# -Og, not -O1: the same sanitizer instrumentation in about half the
# compile time, which is most of this test's (three sanitized builds of six sources each).
SANITIZE = "-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -Og"
AVX512_AND_AMX = "avx512f avx512_bf16 avx512_fp16 avx512_vnni amx_tile amx_bf16 amx_int8"
# The builds and the CPU flags each names off ($CONVNEXT_AUDIO_JAX_CPU_FLAGS_OFF).
BUILDS = {"native": "", "avx2": AVX512_AND_AMX, "generic": f"avx avx2 fma avx_vnni {AVX512_AND_AMX}"}
RANDOM_SHAPES = 8  # per kernel, after the fixed ones: ~130 cases per build


def _runtime(library: str) -> str | None:
    """The path of a runtime library as the compiler links it (gcc), else None."""
    try:
        path = subprocess.run([*COMPILER, f"-print-file-name={library}"], capture_output=True, text=True,
                              timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return path if os.path.isabs(path) and os.path.exists(path) else None


PRELOAD = [_runtime("libasan.so"), _runtime("libstdc++.so")] if COMPILER else [None]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                       reason="needs x86-64: the builds name x86 instruction sets off"),
]


def test_the_shape_corpus_under_the_sanitizers_in_each_build():
    from convnext_audio_jax.native import library

    # gcc's ASan runtime comes with g++ (Debian's libasan): missing, the proof fails rather than skips.
    assert None not in PRELOAD, "gcc and its ASan runtime are needed (apt-get install g++; .ci/run does)"

    builds = {name: off for name, off in BUILDS.items() if name != "avx2" or "avx512f" in xla.cpu_flags()}
    base = {key: value for key, value in os.environ.items()
            if key not in ("XLA_FLAGS", xla.CPU_FLAGS_OFF_ENV, files.OLD_CACHE_ENV)}
    common = {**base, "JAX_PLATFORMS": "cpu", files.CACHE_ENV: str(files.cache_root() / "sanitized"),
              library.EXTRA_FLAGS_ENV: SANITIZE, "LD_PRELOAD": " ".join(PRELOAD),
              "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0", "UBSAN_OPTIONS": "print_stacktrace=1"}
    repository = pathlib.Path(__file__).resolve().parents[1]
    # All builds at once: each compiles and runs in its own process.
    processes = {name: subprocess.Popen(
        [sys.executable, "tests/native_corpus.py", "--random", str(RANDOM_SHAPES)], cwd=repository,
        env={**common, xla.CPU_FLAGS_OFF_ENV: off}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, off in builds.items()}
    for name, process in processes.items():
        out, err = process.communicate(timeout=900)
        reports = [line for line in err.splitlines() if "AddressSanitizer" in line or "runtime error:" in line]
        assert process.returncode == 0 and not reports, f"{name} build: exit {process.returncode}\n{err[-4000:]}"
        assert out.count("cases, largest relative error") == 8, f"{name} build:\n{out}"
