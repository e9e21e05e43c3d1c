"""xla.jit: same results as plain jax.jit, its CPU options in effect in the compiled program and only on the CPU
backend; the compilation cache setting."""

import jax
import numpy as np

from convnext_audio_jax.models import create_model, init_variables
from convnext_audio_jax.runtime import xla


def test_cpu_options_reach_the_compiled_program_and_only_on_cpu():
    """The option is in effect, not only passed: XLA:CPU's default puts a dense layer's dot in a YNNPACK fusion
    (the fusions that made ConvNeXt 1.5x slower, runtime/xla.py), xla.jit's compile of the same function has none.
    Other backends get no options (XLA:GPU/TPU reject CPU-only ones)."""
    def dense(x, w, b):
        return x @ w + b

    args = (np.ones((64, 128), np.float32), np.ones((128, 256), np.float32), np.ones((256,), np.float32))
    assert "__ynn_fusion" in jax.jit(dense).lower(*args).compile().as_text()
    assert "__ynn_fusion" not in xla.jit(dense).lower(*args).compile().as_text()
    assert xla.compiler_options("gpu") == {} and xla.compiler_options("tpu") == {}


def test_model_forward_and_gradient_match_plain_jit():
    model = create_model("convnext_tiny", depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), frontend=create_model("cnn6").frontend)
    variables = init_variables(model, jax.random.key(0))
    waveform = (0.1 * np.random.default_rng(0).standard_normal((2, 16_000))).astype(np.float32)

    def loss(params):
        out = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, waveform)
        return (out["logits"] ** 2).mean(), out["probs"]

    # The forward's probs and the gradient from one program per jit (two compiles, not four).
    (ours, ours_probs), (plain, plain_probs) = (
        compile_(jax.grad(loss, has_aux=True))(variables["params"]) for compile_ in (xla.jit, jax.jit))
    np.testing.assert_allclose(ours_probs, plain_probs, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_decorator_forms_and_override():
    @xla.jit
    def double(x):
        return 2 * x

    @xla.jit(static_argnums=1, compiler_options={"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"})
    def scale(x, factor):
        return factor * x

    assert float(double(1.5)) == 3.0 and float(scale(1.5, 3)) == 4.5


def test_cpu_flags_named_off_are_treated_as_absent(monkeypatch):
    """$CONVNEXT_AUDIO_JAX_CPU_FLAGS_OFF (spaces or commas) removes flags from what the per-CPU choices see."""
    import pathlib

    real = set(next((line.split(":", 1)[1].split() for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags")), []))
    try:
        xla.cpu_flags.cache_clear()
        assert xla.cpu_flags() == real
        present = sorted(real)[:2]
        monkeypatch.setenv(xla.CPU_FLAGS_OFF_ENV, ",".join(present) + " made_up_flag")
        xla.cpu_flags.cache_clear()
        assert xla.cpu_flags() == real - set(present)
        if "avx512_bf16" in real:
            monkeypatch.setenv(xla.CPU_FLAGS_OFF_ENV, "avx512_bf16 amx_bf16")
            xla.cpu_flags.cache_clear()
            assert not xla.native_bfloat16()
    finally:
        monkeypatch.delenv(xla.CPU_FLAGS_OFF_ENV, raising=False)
        xla.cpu_flags.cache_clear()


def test_compilation_cache_setting(tmp_path):
    """"auto" is <cache root>/xla, "" leaves no cache, a folder is used as it is, and a cache already set wins."""
    saved = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert xla.enable_compilation_cache("", tmp_path) is None
        assert xla.enable_compilation_cache("auto", tmp_path) == str(tmp_path / "xla") and (tmp_path / "xla").is_dir()
        assert xla.enable_compilation_cache(tmp_path / "other", tmp_path) == str(tmp_path / "xla")
        jax.config.update("jax_compilation_cache_dir", None)
        assert xla.enable_compilation_cache(tmp_path / "other", tmp_path) == str(tmp_path / "other")
    finally:
        jax.config.update("jax_compilation_cache_dir", saved)


def test_reused_builds_once_per_settings_and_anew_for_unhashable_ones():
    built = []

    @xla.reused
    def program(scale, table):
        built.append((scale, table))
        return jax.jit(lambda x: x * scale)

    assert program(2.0, ("a",)) is program(2.0, ("a",))  # the same jitted function: no second trace
    assert program(3.0, ("a",)) is not program(2.0, ("a",))
    assert program(2.0, ["a"]) is not program(2.0, ["a"])  # a list cannot be a key: built each time
    assert len(built) == 4
    assert float(program(3.0, ("a",))(2.0)) == 6.0
