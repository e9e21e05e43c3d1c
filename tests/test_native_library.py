"""The build of the native kernels (native/library.py): built once and then loaded from the cache, under a name
that follows the sources, the compiler, what it resolves -march=native to, jaxlib and the options; concurrent processes
build once; a jit trace never builds; every failure falls back to the XLA forms with one line saying why; the
builds for CPUs without AVX-512 or AMX."""

import logging
import os
import pathlib
import platform
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from native_marks import require_compiler

from convnext_audio_jax import native
from convnext_audio_jax.models.layers import depthwise_conv, resolve_depthwise_impl

require_compiler()


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """The module as in a new process, building into an empty cache folder, at -O0: these tests are about the
    cache, the lock and the fall-backs, and -O0 halves the build (61 vs 123 s on the loaded 2-core EPYC); the
    session's -O3 build (tests/conftest.py) is the one every kernel test runs."""
    monkeypatch.setattr(native.library, "_state", {})
    monkeypatch.setenv(native.library.EXTRA_FLAGS_ENV, "-O0")
    monkeypatch.delenv("CONVNEXT_AUDIO_JAX_CACHE", raising=False)  # the former variable (one warning line)
    monkeypatch.setenv("CONVNEXT_AUDIO_CACHE", str(tmp_path / "cache"))
    native.library._log_unavailable.cache_clear()
    yield tmp_path / "cache"
    native.library._log_unavailable.cache_clear()


def test_the_library_is_built_once_and_then_loaded_from_the_cache(fresh_native):
    compiler = native.find_compiler()
    path = native.library_path(compiler)
    assert path.parent == fresh_native / "native" and not path.exists()
    native.load()
    assert path.exists()
    built = path.stat().st_mtime_ns
    # No build folder left behind; the lock file stays (removing it would race with a process opening it).
    assert sorted(p.name for p in path.parent.iterdir()) == [path.with_suffix(".lock").name, path.name]
    native.library._state.clear()
    native.load()
    assert path.stat().st_mtime_ns == built
    x = np.ones((1, 4, 4, 16), np.float32)
    np.testing.assert_allclose(native.depthwise_kernel_grad(x, x, (3, 3), ((1, 1), (1, 1)))[1, 1], np.full(16, 16.0))
    np.testing.assert_allclose(native.depthwise_conv(x, np.ones((3, 3, 16), np.float32), ((1, 1), (1, 1)))[0, 1, 1],
                               np.full(16, 9.0))


def test_the_cache_name_changes_with_the_source_the_resolved_target_jaxlib_and_the_options(fresh_native, monkeypatch):
    compiler = native.find_compiler()
    path = native.library_path(compiler)
    version, target = native.library._compiler_identity(compiler, native.library.compiler_flags())
    assert "-march=" in target or "__x86_64__" in target or "__aarch64__" in target  # gcc's -Q, else clang's macros
    for name, value in [("_compiler_identity", lambda *_: (version, target.replace("enabled", "disabled", 1) + "x")),
                        ("_sources", lambda: {"depthwise.cc": b"// another version\n"}),
                        ("_jaxlib_version", lambda: "0.0.0")]:
        monkeypatch.setattr(native.library, name, value)
        assert native.library_path(compiler) != path, name
        monkeypatch.undo()
        monkeypatch.setenv("CONVNEXT_AUDIO_CACHE", str(fresh_native))
    monkeypatch.setenv(native.library.EXTRA_FLAGS_ENV, "-O1")
    assert native.library_path(compiler) != path


@pytest.mark.parametrize(("env", "reason"), [
    ({"CONVNEXT_AUDIO_JAX_NATIVE": "0"}, "disabled by CONVNEXT_AUDIO_JAX_NATIVE=0"),
    ({"CXX": "/bin/false"}, "the C++ compiler '/bin/false' does not run: --version exited 1"),
    ({"CXX": "env /bin/false"}, "the C++ compiler 'env /bin/false' does not run: --version exited 1"),
    ({"HOME": None, "CONVNEXT_AUDIO_CACHE": None, "XDG_CACHE_HOME": None}, "HOME is not set"),
    ({"CXX": "/nonexistent/c++"}, "the C++ compiler '/nonexistent/c++' does not run"),
    ({"CONVNEXT_AUDIO_CACHE": "/proc/convnext-audio-jax-cache"}, "cannot build into /proc/convnext-audio-jax-cache/native"),
])
def test_without_the_kernel_auto_falls_back_to_xla_and_native_says_why(fresh_native, monkeypatch, caplog, env, reason):
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    if "HOME" in env:  # and no passwd entry to fall back on
        monkeypatch.setattr(pathlib.Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("no home"))))
    with caplog.at_level(logging.WARNING, logger="convnext_audio_jax.native"):
        assert not native.available()
        assert resolve_depthwise_impl("auto") == "shift"
    assert [r.getMessage() for r in caplog.records if reason in r.getMessage()], caplog.text
    assert len(caplog.records) == 1  # said once
    with pytest.raises(native.NativeUnavailable, match=re.escape(reason)):
        resolve_depthwise_impl("native")
    # Nothing was left in the cache folder by a failed build.
    assert not any(p.is_file() for p in fresh_native.rglob("*")) if fresh_native.exists() else True
    # The model still trains through the XLA form.
    x = jnp.ones((1, 6, 6, 3))
    grad = jax.grad(lambda k: jnp.sum(depthwise_conv(x, k, ((1, 1), (1, 1)), impl="auto")))(jnp.ones((3, 3, 3)))
    np.testing.assert_allclose(grad[1, 1], np.full(3, 36.0))


def test_the_source_ships_with_the_package():
    """pyproject's package data lists the C++ files (a wheel without them could not build the kernels)."""
    pyproject = (pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"convnext_audio_jax.native" = ["*.cc", "*.h"]' in pyproject
    for name in (*native.SOURCES, *native.HEADERS):
        assert os.path.exists(pathlib.Path(native.__file__).with_name(name)), name


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the instruction sets below are x86-64 ones")
def test_the_library_builds_for_cpus_without_avx512_or_amx(monkeypatch, tmp_path):
    """The kernels are compiled for the machine they run on; the AVX-512 and AMX code must stay out of builds for
    other CPUs (AVX2 here: this CPU less the flags named off), whose library reports those kernels as absent."""
    import ctypes

    from convnext_audio_jax.runtime import xla

    monkeypatch.setenv(xla.CPU_FLAGS_OFF_ENV, "avx512f, amx_tile amx_bf16 amx_int8 sse4_2")
    flags = native.library.compiler_flags()
    assert flags[:len(native.CXX_FLAGS)] == native.CXX_FLAGS
    assert set(flags[len(native.CXX_FLAGS):]) == {"-mno-avx512f", "-mno-amx-tile", "-mno-amx-bf16", "-mno-amx-int8"}
    # Built at -O0 (half the time): the instruction sets, hence the code kept out, are the same at any -O.
    monkeypatch.setenv(native.library.EXTRA_FLAGS_ENV, "-O0")
    path = tmp_path / "kernels-avx2.so"
    native.build(native.find_compiler(), path)
    library = ctypes.cdll.LoadLibrary(str(path))
    assert library.ConvnextAudioJaxAmxReady() == 0 and library.ConvnextAudioJaxBf16DotReady() == 0
    for symbol in native.HANDLERS.values():
        assert getattr(library, symbol)
    # The cached library's name changes with what was named off: another build, not this CPU's.
    compiler = native.find_compiler()
    named_off = native.library_path(compiler)
    monkeypatch.delenv(xla.CPU_FLAGS_OFF_ENV)
    assert native.library_path(compiler) != named_off


def test_cxx_may_carry_arguments(monkeypatch):
    """``CXX="ccache g++"`` is a command of two words, not a file named so."""
    compiler = native.find_compiler()
    monkeypatch.setenv("CXX", f"env {compiler[0]}")
    assert native.find_compiler() == ("env", compiler[0])
    assert native.library_path(native.find_compiler()).name.startswith("kernels-")  # --version and the target ran


def test_jaxlib_without_package_metadata_still_has_a_version(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    from jaxlib import version

    assert native.library._jaxlib_version() == version.__version__


def test_a_jit_trace_never_builds_the_library(fresh_native, caplog):
    with caplog.at_level(logging.WARNING, logger="convnext_audio_jax.native"):
        out = jax.jit(lambda x: depthwise_conv(x, jnp.ones((3, 3, 4)), ((1, 1), (1, 1)), impl="auto"))(jnp.ones((1, 5, 5, 4)))
    assert not any(fresh_native.rglob("*.so"))
    assert "a jit trace does not build them" in caplog.text and "convnext-audio build-native" in caplog.text
    np.testing.assert_allclose(out[0, 2, 2], np.full(4, 9.0))  # by the XLA form
    with pytest.raises(native.NativeUnavailable, match="inside a jit trace"):
        jax.jit(lambda x: native.prepare() and x)(1.0)


# Two processes asking for the library at once into an empty cache: one builds, the other waits for it and loads it.
PREPARE_SCRIPT = """
from convnext_audio_jax import native
path, seconds = native.prepare()
print("built" if seconds is not None else "loaded", path)
"""


def test_concurrent_processes_build_once(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if k != "CONVNEXT_AUDIO_JAX_CACHE"},
           "CONVNEXT_AUDIO_CACHE": str(tmp_path), "JAX_PLATFORMS": "cpu",
           native.library.EXTRA_FLAGS_ENV: "-O0"}  # a quick build: this test is about the lock
    processes = [subprocess.Popen([sys.executable, "-c", PREPARE_SCRIPT], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=pathlib.Path(__file__).resolve().parents[1])
                 for _ in range(2)]
    outputs = [process.communicate(timeout=600) for process in processes]
    assert all(process.returncode == 0 for process in processes), [err[-2000:] for _, err in outputs]
    words = sorted(out.split()[0] for out, _ in outputs)
    assert words == ["built", "loaded"], outputs
    assert len({out.split()[1] for out, _ in outputs}) == 1 and len(list(tmp_path.rglob("*.so"))) == 1
    # The one WARNING line of the build: what was built, for which target, how long it took.
    built = next(err for out, err in outputs if out.startswith("built"))
    assert re.search(r"built the native CPU kernels \(depthwise\.cc.*\) in \d+\.\d s: ", built), built


def test_jax_trace_state_is_where_the_library_reads_it():
    """library._tracing (a jit trace never builds the library) asks JAX whether a trace is under way, which has no
    public API: jax._src.core.trace_state_clean(), no arguments, True outside a trace. Were it gone, _tracing would
    take every call as outside a trace (a build could then run inside one): a JAX upgrade that moves it fails here."""
    import inspect

    from jax._src import core

    assert list(inspect.signature(core.trace_state_clean).parameters) == []
    assert core.trace_state_clean() is True and native.library._tracing() is False
    seen = []
    jax.jit(lambda x: seen.append(native.library._tracing()) or x)(1.0)
    assert seen == [True]
