"""Building and loading the compiled kernels of this folder. They are compiled on first use with the machine's C++
compiler (``$CXX``, else ``c++``, ``g++`` or ``clang++``) for this CPU (``-march=native``, less the instruction sets of
flags named in ``$CONVNEXT_AUDIO_JAX_CPU_FLAGS_OFF``) against the FFI headers
jaxlib ships, into one library kept in a cache folder (``$CONVNEXT_AUDIO_JAX_CACHE``, else
``$XDG_CACHE_HOME/convnext_audio_jax``, else ``~/.cache/convnext_audio_jax``) under a name that hashes the sources,
jaxlib's version, the compiler and the CPU's flags, so a later process, or another CPU kind sharing the folder, loads
or builds its own. Where no compiler is found, or ``CONVNEXT_AUDIO_JAX_NATIVE=0`` is set, :func:`available` is False
and the models use the XLA forms.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import importlib.resources
import logging
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading

import jax

from convnext_audio_jax import xla

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


def cache_dir() -> pathlib.Path:
    """Where built libraries are kept (see the module docstring)."""
    if os.environ.get("CONVNEXT_AUDIO_JAX_CACHE"):
        return pathlib.Path(os.environ["CONVNEXT_AUDIO_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "convnext_audio_jax"


def find_compiler() -> str | None:
    """``$CXX`` (as given), else the first of c++, g++, clang++ on the PATH."""
    if os.environ.get("CXX"):
        return os.environ["CXX"]
    return next((path for name in ("c++", "g++", "clang++") if (path := shutil.which(name))), None)


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


def library_path(compiler: str) -> pathlib.Path:
    """The cached library for this source, jaxlib, compiler and CPU."""
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise NativeUnavailable(f"the C++ compiler {compiler!r} does not run: {error}") from None
    key = hashlib.sha256()
    for part in (*_sources().values(), importlib.metadata.version("jaxlib").encode(), version.encode(), " ".join(compiler_flags()).encode(),
                 platform.machine().encode(), " ".join(sorted(xla.cpu_flags())).encode()):
        key.update(part + b"\0")
    return cache_dir() / "native" / f"kernels-{key.hexdigest()[:16]}.so"


def build(compiler: str, destination: pathlib.Path) -> None:
    """Compiles the kernels into ``destination`` (written under a temporary name, then renamed: a concurrent build
    or a reader never sees a partial file)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=".build-") as scratch:
        for name, text in _sources().items():
            (pathlib.Path(scratch) / name).write_bytes(text)
        output = pathlib.Path(scratch) / destination.name
        command = [compiler, *compiler_flags(), "-I", jax.ffi.include_dir(), *(str(pathlib.Path(scratch) / name) for name in SOURCES),
                   "-o", str(output)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as error:
            raise NativeUnavailable(f"building {', '.join(SOURCES)} with {compiler!r} failed: {error}") from None
        if result.returncode != 0:
            errors = [line for line in result.stderr.splitlines() if "error" in line] or result.stderr.splitlines()
            raise NativeUnavailable(f"building {', '.join(SOURCES)} with {compiler!r} failed (exit {result.returncode}): "
                                    f"{errors[0].strip() if errors else 'no message'}")
        os.replace(output, destination)


_lock = threading.Lock()
_state: dict = {}
_registered: list = []  # the library whose handler XLA holds, kept loaded


def load() -> None:
    """Builds (if needed), loads and registers the kernel once per process; raises :class:`NativeUnavailable`
    with the reason when it cannot (the reason is remembered: a process tries once)."""
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
                logger.info("building the native CPU kernels into %s", path)
                try:
                    build(compiler, path)
                except OSError as error:  # the cache folder cannot be created or written
                    raise NativeUnavailable(f"cannot build into {path.parent} ({error}); set "
                                            "CONVNEXT_AUDIO_JAX_CACHE to a writable folder") from None
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
            _state["library"] = library
        except NativeUnavailable as error:
            _state["error"] = str(error)
            raise


def available() -> bool:
    """Whether the kernel is loaded or can be (building it on the first call); logs why not, once."""
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
