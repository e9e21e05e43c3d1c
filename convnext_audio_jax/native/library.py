"""Building and loading the compiled kernels of this folder.

The library is compiled with the machine's C++ compiler (``$CXX``, which may carry arguments, e.g. ``ccache g++``;
else ``c++``, ``g++`` or ``clang++``) for this CPU (``-march=native``, less the instruction sets of flags named in
``$CONVNEXT_AUDIO_JAX_CPU_FLAGS_OFF``, then the options in ``$CONVNEXT_AUDIO_JAX_CXXFLAGS``) against the FFI headers
jaxlib ships, each source in its own compiler process, into one library kept in ``native/`` of the cache folder
(``runtime.files.cache_root``: ``$CONVNEXT_AUDIO_CACHE``, else ``$XDG_CACHE_HOME/convnext-audio-jax``, else
``~/.cache/convnext-audio-jax``; the former ``$CONVNEXT_AUDIO_JAX_CACHE`` still works, with a warning) under a name
that hashes the sources, jaxlib's version, the compiler's version, what it resolves ``-march=native`` to (``-Q
--help=target``, or its predefined macros where it has no such option) and the options: a later process loads it,
another CPU or compiler sharing the folder builds its own.

It is built by ``convnext-audio build-native``, when a model is created (``models.create_model``), or when a kernel
is first asked for outside a jit trace; one WARNING line says what was built and how long it took. Concurrent
processes build it once (the file lock of ``runtime.files`` on its lock file, which dies with its holder as the
training run's lock does). A trace never builds it: the build's time would be hidden in the trace's, so there the
models use the XLA forms for that trace and say why. Wherever it cannot be built or loaded (no compiler, a failed
build, no cache folder, ``CONVNEXT_AUDIO_JAX_NATIVE=0``), :func:`available` is False, the models use the XLA forms
and one WARNING line says why.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import hashlib
import importlib.metadata
import importlib.resources
import logging
import os
import pathlib
import platform
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time

import jax

from convnext_audio_jax.runtime import files, xla

logger = logging.getLogger("convnext_audio_jax.native")

SOURCES = ("depthwise.cc", "conv.cc", "winograd.cc", "matmul.cc", "conv_bf16.cc", "reduce.cc")
HEADERS = ("parallel.h", "bf16.h", "vec.h", "conv_micro.h")
CONV_TARGET = "convnext_audio_jax_depthwise_conv"
KERNEL_GRAD_TARGET = "convnext_audio_jax_depthwise_kernel_grad"
MATMUL_TARGET = "convnext_audio_jax_bf16_matmul"
BF16_DOT_MATMUL_TARGET = "convnext_audio_jax_bf16_dot_matmul"
F32_MATMUL_TARGET = "convnext_audio_jax_f32_matmul"
CONV_KERNEL_GRAD_TARGET = "convnext_audio_jax_conv_kernel_grad"
CONV_KERNEL_FLIP_TARGET = "convnext_audio_jax_conv_kernel_flip"
CONV_FORWARD_TARGET = "convnext_audio_jax_conv_forward"
CONV_WINOGRAD_TARGET = "convnext_audio_jax_conv_winograd"
CONV_WINOGRAD_KERNEL_TARGET = "convnext_audio_jax_conv_winograd_kernel"
BF16_CONV_FORWARD_TARGET = "convnext_audio_jax_bf16_conv_forward"
BF16_DOT_CONV_FORWARD_TARGET = "convnext_audio_jax_bf16_dot_conv_forward"
CHANNEL_SUMS_TARGET = "convnext_audio_jax_channel_sums"
# FFI target name -> the handler's symbol in the library.
HANDLERS = {CONV_TARGET: "DepthwiseConv", KERNEL_GRAD_TARGET: "DepthwiseKernelGrad", MATMUL_TARGET: "Bf16Matmul",
            BF16_DOT_MATMUL_TARGET: "Bf16DotMatmul", F32_MATMUL_TARGET: "F32Matmul",
            CONV_KERNEL_GRAD_TARGET: "ConvKernelGrad", CONV_KERNEL_FLIP_TARGET: "ConvKernelFlip",
            CONV_FORWARD_TARGET: "ConvForward", CONV_WINOGRAD_TARGET: "ConvWinogradForward",
            CONV_WINOGRAD_KERNEL_TARGET: "ConvWinogradKernel", BF16_CONV_FORWARD_TARGET: "Bf16ConvForward",
            BF16_DOT_CONV_FORWARD_TARGET: "Bf16DotConvForward", CHANNEL_SUMS_TARGET: "ChannelSums"}
CXX_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-Wno-psabi")
# The compiler options (gcc and clang) that keep an instruction set out of the -march=native build, for the CPU flags
# named in $CONVNEXT_AUDIO_JAX_CPU_FLAGS_OFF (xla.cpu_flags_off): the library is then the one a CPU without them
# would build. Other flags named there change only the choices made from xla.cpu_flags.
WITHOUT_FLAG_OPTIONS = {"avx": "-mno-avx", "avx2": "-mno-avx2", "fma": "-mno-fma", "avx512f": "-mno-avx512f",
                        "avx512_bf16": "-mno-avx512bf16", "avx512_fp16": "-mno-avx512fp16",
                        "avx512_vnni": "-mno-avx512vnni", "avx_vnni": "-mno-avxvnni", "amx_tile": "-mno-amx-tile",
                        "amx_bf16": "-mno-amx-bf16", "amx_int8": "-mno-amx-int8"}
BUILD_TIMEOUT_S = 600
EXTRA_FLAGS_ENV = "CONVNEXT_AUDIO_JAX_CXXFLAGS"


class NativeUnavailable(RuntimeError):
    """The compiled kernel cannot be used here (no compiler, a failed build, disabled, not a CPU)."""


def build_dir() -> pathlib.Path:
    """Where built libraries are kept: ``native/`` in the cache folder (see the module docstring)."""
    try:
        return files.cache_root() / "native"
    except files.NoCacheFolder as error:
        raise NativeUnavailable(str(error)) from None


def find_compiler() -> tuple[str, ...] | None:
    """The compiler's command: ``$CXX`` split as a shell would (``ccache g++`` is two words), else the first of
    c++, g++, clang++ on the PATH."""
    if os.environ.get("CXX", "").strip():
        return tuple(shlex.split(os.environ["CXX"]))
    path = next((path for name in ("c++", "g++", "clang++") if (path := shutil.which(name))), None)
    return None if path is None else (path,)


def compiler_flags() -> tuple[str, ...]:
    """``CXX_FLAGS``, for each CPU flag named off (:func:`xla.cpu_flags_off`) its ``WITHOUT_FLAG_OPTIONS``, then
    the options in ``$CONVNEXT_AUDIO_JAX_CXXFLAGS`` (split as a shell would; later options win, e.g.
    ``-fsanitize=address,undefined -O1`` for a sanitizer build)."""
    off = xla.cpu_flags_off()
    return (*CXX_FLAGS, *(option for flag, option in WITHOUT_FLAG_OPTIONS.items() if flag in off),
            *shlex.split(os.environ.get(EXTRA_FLAGS_ENV, "")))


def _sources() -> dict[str, bytes]:
    files = importlib.resources.files(__package__)
    return {name: files.joinpath(name).read_bytes() for name in (*SOURCES, *HEADERS)}


def _shown(compiler: tuple[str, ...]) -> str:
    return repr(" ".join(compiler))


def _run(command: list[str], what: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as error:
        raise NativeUnavailable(f"{what}: {error}") from None


@functools.cache
def _compiler_identity(compiler: tuple[str, ...], flags: tuple[str, ...]) -> tuple[str, str]:
    """(the compiler's version line, what it resolves the target options of ``flags`` to): gcc's ``-Q
    --help=target`` (the -march it picked and every instruction set on or off), else the predefined macros (clang)."""
    version = _run([*compiler, "--version"], f"the C++ compiler {_shown(compiler)} does not run")
    if version.returncode != 0:
        raise NativeUnavailable(f"the C++ compiler {_shown(compiler)} does not run: --version exited "
                                f"{version.returncode}")
    target = [flag for flag in flags if flag.startswith("-m")]
    resolved = _run([*compiler, *target, "-Q", "--help=target"], f"asking {_shown(compiler)} for its target")
    if resolved.returncode != 0 or "-march=" not in resolved.stdout:
        resolved = _run([*compiler, *target, "-dM", "-E", "-x", "c++", os.devnull],
                        f"asking {_shown(compiler)} for its target")
    return version.stdout.strip(), resolved.stdout


def _jaxlib_version() -> str:
    try:
        from jaxlib import version
        return version.__version__
    except (ImportError, AttributeError):
        try:
            return importlib.metadata.version("jaxlib")
        except importlib.metadata.PackageNotFoundError:
            raise NativeUnavailable("cannot tell jaxlib's version (no jaxlib.version, no package metadata)") from None


def library_path(compiler: tuple[str, ...]) -> pathlib.Path:
    """The cached library for these sources, jaxlib, compiler, resolved target and options."""
    flags = compiler_flags()
    version, target = _compiler_identity(tuple(compiler), flags)
    key = hashlib.sha256()
    for part in (*_sources().values(), _jaxlib_version().encode(), version.encode(), target.encode(),
                 " ".join(flags).encode(), platform.machine().encode()):
        key.update(part + b"\0")
    return build_dir() / f"kernels-{key.hexdigest()[:16]}.so"


def target_name(compiler: tuple[str, ...]) -> str:
    """The CPU the compiler resolves ``-march=native`` to (gcc: e.g. 'znver3'), else 'native'."""
    match = re.search(r"-march=\s+(\S+)", _compiler_identity(tuple(compiler), compiler_flags())[1])
    return match.group(1) if match else "native"


def build(compiler: tuple[str, ...], destination: pathlib.Path) -> None:
    """Compiles the kernels into ``destination``: each source to an object in its own compiler process (as many at
    once as there are CPUs), then one link; written under a temporary name, then renamed, so that a reader never
    sees a partial file."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    flags = compiler_flags()
    compile_flags = [flag for flag in flags if flag != "-shared"]
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=".build-") as scratch:
        folder = pathlib.Path(scratch)
        for name, text in _sources().items():
            (folder / name).write_bytes(text)

        def compile_one(name: str) -> subprocess.CompletedProcess:
            return _run([*compiler, *compile_flags, "-c", "-I", jax.ffi.include_dir(), str(folder / name), "-o",
                         str(folder / f"{name}.o")], f"building {name} with {_shown(compiler)} failed")

        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(len(SOURCES), os.cpu_count() or 1))) as pool:
            results = list(pool.map(compile_one, SOURCES))
        output = folder / destination.name
        results.append(_run([*compiler, *flags, *(str(folder / f"{name}.o") for name in SOURCES), "-o", str(output)],
                            f"linking the kernels with {_shown(compiler)} failed"))
        for result in results:
            if result.returncode != 0:
                errors = [line for line in result.stderr.splitlines() if "error" in line] or result.stderr.splitlines()
                raise NativeUnavailable(f"building {', '.join(SOURCES)} with {_shown(compiler)} failed (exit "
                                        f"{result.returncode}): {errors[0].strip() if errors else 'no message'}")
        files.publish(output, destination)


def _build_once(compiler: tuple[str, ...], path: pathlib.Path) -> float | None:
    """Builds ``path`` unless it exists or another process built it while this one waited for the lock; the
    seconds the build took, or None."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with files.locked(path.with_suffix(".lock"), on_wait=lambda holder: logger.warning(
                "waiting for another process building the native CPU kernels (%s): %s", holder, path)):
            if path.exists():
                return None
            start = time.perf_counter()
            build(compiler, path)
    except OSError as error:  # the cache folder cannot be created or written
        raise NativeUnavailable(f"cannot build into {path.parent} ({error}); set {files.CACHE_ENV} to a "
                                "writable folder") from None
    seconds = time.perf_counter() - start
    logger.warning("built the native CPU kernels (%s; %s for %s; %s) in %.1f s: %s", ", ".join(SOURCES),
                   _compiler_identity(tuple(compiler), compiler_flags())[0].splitlines()[0], target_name(compiler),
                   " ".join(compiler_flags()), seconds, path)
    return seconds


def _tracing() -> bool:
    try:
        from jax._src import core
        return not core.trace_state_clean()
    except (ImportError, AttributeError):  # another jax: take it as not tracing (a build may then be traced)
        return False


_lock = threading.Lock()
_state: dict = {}
_registered: list = []  # the library whose handler XLA holds, kept loaded


def load() -> None:
    """Builds (if needed, and not inside a jit trace), loads and registers the kernels once per process; raises
    :class:`NativeUnavailable` with the reason when it cannot (remembered, so a process tries once; a refused
    build inside a trace is tried again outside one)."""
    with _lock:
        if "error" in _state:
            raise NativeUnavailable(_state["error"])
        if "library" in _state:
            return
        try:
            if os.environ.get("CONVNEXT_AUDIO_JAX_NATIVE", "1") == "0":
                raise NativeUnavailable("disabled by CONVNEXT_AUDIO_JAX_NATIVE=0")
            compiler = find_compiler()
            if compiler is None:
                raise NativeUnavailable("no C++ compiler found ($CXX, c++, g++, clang++)")
            path = library_path(compiler)
            if not path.exists():
                if _tracing():
                    raise _NotBuilt(f"the native CPU kernels are not built yet and a jit trace does not build them "
                                    f"(it would hide the build's time): run `convnext-audio build-native`, or "
                                    f"create the model with create_model, before tracing ({path})")
                _state["built_s"] = _build_once(compiler, path)
            try:
                library = ctypes.cdll.LoadLibrary(str(path))
                handlers = {target: getattr(library, symbol) for target, symbol in HANDLERS.items()}
                library.ConvnextAudioJaxBf16ConvRows.restype = ctypes.c_int64
                library.ConvnextAudioJaxWinogradCoBlock.restype = ctypes.c_int64
            except (OSError, AttributeError) as error:
                raise NativeUnavailable(f"cannot load {path}: {error}") from None
            if not _registered:  # XLA keeps one handler per name for the life of the process
                for target, handler in handlers.items():
                    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
                _registered.append(library)
            _state["library"], _state["path"] = library, path
        except _NotBuilt:
            raise
        except NativeUnavailable as error:
            _state["error"] = str(error)
            raise


class _NotBuilt(NativeUnavailable):
    """Not built, and asked for inside a trace (not remembered: a later call outside one builds it)."""


def prepare() -> tuple[pathlib.Path, float | None]:
    """Builds (if needed) and loads the kernels now, outside any trace: (the library's path, the seconds this
    call's build took, or None where it was already built). Raises :class:`NativeUnavailable` with the reason."""
    if _tracing():
        raise NativeUnavailable("native.prepare() inside a jit trace: call it before tracing")
    load()
    return _state["path"], _state.get("built_s")


def available() -> bool:
    """Whether the kernel is loaded or can be (building it on the first call outside a trace); logs why not,
    once per reason."""
    try:
        load()
        return True
    except NativeUnavailable as error:
        _log_unavailable(str(error))
        return False


@functools.cache
def _log_unavailable(reason: str) -> None:
    logger.warning("native CPU kernels unavailable (%s): the models use the XLA forms, slower on the CPU "
                   "(ConvNeXt-Tiny training ~1.2x)", reason)


def loaded() -> ctypes.CDLL:
    """The loaded library (:func:`load` first)."""
    load()
    return _state["library"]
