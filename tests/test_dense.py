"""Dense: flax's parameters and values; its product by XLA's dot, by the compiled float32 kernel and by the bfloat16
kernels (AMX tiles, AVX512-BF16 dot products) give the same numbers (values and gradients), equal to torch's linear
layer in float64; the choice of implementation."""
import functools


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from convnext_audio_jax import native
from convnext_audio_jax.models import create_model, init_variables
from convnext_audio_jax.models.dense import Dense, matmul, matmul_native, matmul_xla, resolve_matmul_impl
from convnext_audio_jax.runtime import xla
from flax_parity import outputs_and_gradients_against
from native_marks import NEEDS_AMX, NEEDS_BF16_DOT, NEEDS_COMPILER

BF16_UNITS = [pytest.param("tiles", marks=NEEDS_AMX), pytest.param("dots", marks=NEEDS_BF16_DOT)]


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_dense_equals_flax_values_and_gradients(dtype):
    """Same parameters as nn.Dense; float32 outputs bit-identical, bfloat16 within one rounding (ours adds the bias
    before rounding, flax after); gradients within float32 summation order."""
    # numpy's normals: an eager jax.random draw of a new shape compiles a threefry program (1-2 s of CPU).
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 7, 32)), jnp.float32)
    got, expected = outputs_and_gradients_against(Dense(64, dtype=dtype, impl="xla"), nn.Dense(64, dtype=dtype), x, dtype)
    if dtype is None:
        np.testing.assert_array_equal(got, expected)
    else:
        np.testing.assert_allclose(got, expected, rtol=2 ** -7, atol=0.05)


def test_fused_gelu_is_gelu_of_the_float32_sum():
    """float32: bit-identical to GELU applied after nn.Dense; bfloat16: one rounding of the float32 value."""
    from convnext_audio_jax.models.layers import gelu

    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 64)), jnp.float32)
    variables = nn.Dense(96).init(jax.random.key(1), x)
    np.testing.assert_array_equal(Dense(96, activation="gelu", impl="xla").apply(variables, x),
                                  gelu(nn.Dense(96).apply(variables, x)))
    got = Dense(96, activation="gelu", dtype=jnp.bfloat16, impl="xla").apply(variables, x)
    bf16 = jax.tree.map(lambda v: v.astype(jnp.bfloat16).astype(jnp.float32), variables)
    expected = gelu(nn.Dense(96).apply(bf16, x.astype(jnp.bfloat16).astype(jnp.float32)))
    np.testing.assert_allclose(np.asarray(got, np.float32), expected, rtol=2 ** -8, atol=1e-6)
    with pytest.raises(ValueError, match="activation must be one of \\(None, 'gelu'\\), got 'relu'"):
        Dense(96, activation="relu").apply(variables, x)


def torch_reference(x, w, bias, activation):
    """torch's linear layer (and exact GELU) on the same values, in float64."""
    with torch.no_grad():
        out = torch.nn.functional.linear(*(torch.from_numpy(np.asarray(a, np.float64)) for a in (x, np.asarray(w, np.float32).T, bias)))
        return (torch.nn.functional.gelu(out) if activation == "gelu" else out).numpy()


@NEEDS_COMPILER
@pytest.mark.parametrize("activation", [None, "gelu"])
# Row tails (37, 35 rows: not multiples of the 6-row register block), a partial column panel (48, 80
# features), 4-D, K = 1 and odd, and K = 2048 (one 64-column panel per task group) with 384 features.
@pytest.mark.parametrize("shape,features", [((3, 37, 96), 384), ((1, 5, 64), 48), ((2, 5, 7, 192), 80),
                                            ((35, 1), 16), ((4, 9, 7), 32), ((2, 19, 2048), 384)])
def test_float32_kernel_equals_torch_and_xla_values_and_gradients(shape, features, activation):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal((shape[-1], features)) / np.sqrt(shape[-1]), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(features), jnp.float32)
    ours = np.asarray(jax.jit(matmul_native, static_argnums=3)(x, w, bias, activation))
    exact = torch_reference(x, w, bias, activation)
    # float32 summation of K products: within K float32 steps of the sum of magnitudes (the GELU's slope is < 1.13).
    magnitude = np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(w, np.float64)) + np.abs(np.asarray(bias))
    assert np.all(np.abs(ours - exact) <= 1.13 * shape[-1] * 2 ** -24 * magnitude + 1e-6)
    xla_form = np.asarray(jax.jit(matmul_xla, static_argnums=3)(x, w, bias, activation))
    np.testing.assert_allclose(ours, xla_form, rtol=1e-5, atol=1e-5 * np.abs(xla_form).max())
    # Gradients: the XLA form's pullback, at the kernel's own product before the GELU.
    dy = jnp.asarray(rng.standard_normal((*shape[:-1], features)), jnp.float32)
    native_vjp = jax.vjp(lambda *a: matmul_native(*a, activation), x, w, bias)[1](dy)
    xla_vjp = jax.vjp(lambda *a: matmul_xla(*a, activation), x, w, bias)[1](dy)
    for got, expected in zip(native_vjp, xla_vjp):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(np.asarray(expected)).max())


@NEEDS_COMPILER
def test_float32_kernel_rejects_columns_off_the_vector_width():
    with pytest.raises(ValueError, match=r"x \(4, 48\), w \(48, 527\) and bias None do not fit: .*multiple of 16"):
        native.f32_matmul(jnp.zeros((4, 48)), jnp.zeros((48, 527)))


@pytest.mark.parametrize("unit", BF16_UNITS)
@pytest.mark.parametrize("activation", [None, "gelu"])
# Row tails (of 32-row tile blocks and 6-row register blocks), one full block, 4-D; K = 2048 splits 384 columns into
# panels of 256 and 128 (a panel's packed w ≤ 1 MiB) and, for the dot products, 384 into six 64-column panels, and
# 32 features are a partial panel there.
@pytest.mark.parametrize("shape", [(3, 37, 96), (1, 32, 64), (2, 5, 7, 192), (2, 19, 2048)])
@pytest.mark.parametrize("features", [32, 384])
def test_bfloat16_kernels_equal_xla_and_torch_values_and_gradients(shape, features, activation, unit, monkeypatch):
    # matmul_native takes the unit native.bf16_matmul chooses: the tiles where AMX runs, else the dot products.
    monkeypatch.setattr(native, "bf16_matmul", functools.partial(native.bf16_matmul, bf16_unit=unit))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((shape[-1], features)) / np.sqrt(shape[-1]), jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal(features), jnp.bfloat16)
    product = jax.jit(lambda *operands: matmul_native(*operands, activation))  # traced here, not from a cache
    ours = np.asarray(product(x, w, bias), np.float32)
    text = product.lower(x, w, bias).as_text()
    assert f"@{native.MATMUL_TARGET if unit == 'tiles' else native.BF16_DOT_MATMUL_TARGET}(" in text
    xla_form = np.asarray(jax.jit(matmul_xla, static_argnums=3)(x, w, bias, activation), np.float32)
    # Both sum in float32 and round once: at most one bfloat16 step apart, almost always equal.
    np.testing.assert_allclose(ours, xla_form, rtol=2 ** -7, atol=1e-6)
    assert np.mean(ours == xla_form) > 0.99
    exact = torch_reference(x, w, bias, activation)
    assert np.abs(ours - exact).max() <= 2 ** -8 * np.abs(exact).max()
    # Gradients: the XLA form's pullback.
    dy = jnp.asarray(rng.standard_normal((*shape[:-1], features)), jnp.bfloat16)
    native_vjp = jax.vjp(lambda *a: matmul_native(*a, activation), x, w, bias)[1](dy)
    xla_vjp = jax.vjp(lambda *a: matmul_xla(*a, activation), x, w, bias)[1](dy)
    for got, expected in zip(native_vjp, xla_vjp):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(expected, np.float32))


@NEEDS_AMX
def test_tile_kernel_rejects_sizes_it_cannot_tile():
    with pytest.raises(ValueError, match=r"on 'tiles': x \(4, 48\), w \(48, 64\) and bias None needs inputs a positive "
                                         "multiple of 32 and outputs a multiple of 32"):
        native.bf16_matmul(jnp.zeros((4, 48), jnp.bfloat16), jnp.zeros((48, 64), jnp.bfloat16), bf16_unit="tiles")


@NEEDS_BF16_DOT
def test_dot_product_kernel_rejects_sizes_it_cannot_take_and_takes_what_tiles_cannot():
    for k, n in ((47, 64), (48, 40)):
        with pytest.raises(ValueError, match=rf"on 'dots': x \(4, {k}\), w \({k}, {n}\) and bias None needs an "
                                             "even, positive number of inputs and outputs a multiple of 16"):
            native.bf16_matmul(jnp.zeros((4, k), jnp.bfloat16), jnp.zeros((k, n), jnp.bfloat16), bf16_unit="dots")
    with pytest.raises(ValueError, match=r"x \(4, 48\), w \(40, 64\) and bias None do not fit: expected"):
        native.bf16_matmul(jnp.zeros((4, 48), jnp.bfloat16), jnp.zeros((40, 64), jnp.bfloat16))
    with pytest.raises(ValueError, match="bf16_unit must be 'tiles' or 'dots', got 'amx'"):
        native.bf16_matmul(jnp.zeros((4, 48), jnp.bfloat16), jnp.zeros((48, 64), jnp.bfloat16), bf16_unit="amx")
    # K = 50, N = 80 (a partial 64-column panel), which the tiles do not take: equal to XLA's dot within one
    # bfloat16 rounding.
    assert native.bf16_unit(50, 80) == ("dots" if native.bf16_dot_preferred() else None)
    rng = np.random.default_rng(2)
    x, w, bias = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for shape in ((3, 13, 50), (50, 80), (80,)))
    ours = np.asarray(native.bf16_matmul(x, w, bias, gelu=True, bf16_unit="dots"), np.float32)
    np.testing.assert_allclose(ours, np.asarray(matmul_xla(x, w, bias, "gelu"), np.float32), rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("dtype,unit", [pytest.param(jnp.float32, None, marks=NEEDS_COMPILER),
                                        pytest.param(jnp.bfloat16, "tiles", marks=NEEDS_AMX),
                                        pytest.param(jnp.bfloat16, "dots", marks=NEEDS_BF16_DOT)])
def test_kernels_under_a_mesh_multiply_each_devices_rows_without_gathering(dtype, unit):
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = NamedSharding(mesh, P("data"))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((16, 9, 64)), dtype)
    w = jnp.asarray(rng.standard_normal((64, 96)), dtype)
    product = native.f32_matmul if dtype == jnp.float32 else functools.partial(native.bf16_matmul, bf16_unit=unit)

    def under_mesh(x, w):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return product(x, w)

    step = jax.jit(under_mesh, in_shardings=(rows, None))
    out = step(x, w)
    assert out.sharding.spec == P("data")
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(jax.jit(product)(x, w), np.float32))
    compiled = step.lower(x, w).compile().as_text()
    assert not any(op in compiled for op in ("all-gather", "all-reduce", "all-to-all"))


@pytest.mark.parametrize("dtype,unit", [pytest.param(jnp.float32, None, marks=NEEDS_COMPILER),
                                        pytest.param(jnp.bfloat16, "tiles", marks=NEEDS_AMX),
                                        pytest.param(jnp.bfloat16, "dots", marks=NEEDS_BF16_DOT)])
def test_a_convnext_gives_the_same_numbers_with_either_product(dtype, unit, monkeypatch):
    """A small ConvNeXt: outputs and parameter gradients with the compiled kernel ('auto' here; for the dot products
    as on a CPU without the tile unit) and with XLA's dot."""
    if unit == "dots":  # as on a Zen 4
        monkeypatch.setattr(native, "amx_available", lambda: False)
        monkeypatch.setattr(native, "bf16_dot_preferred", native.bf16_dot_available)
    tiny = dict(depths=(1, 1, 1, 1), dims=(32, 64, 96, 128), num_classes=5, dtype=dtype)
    waveform = (0.1 * np.random.default_rng(3).standard_normal((2, 16_000))).astype(np.float32)
    variables = init_variables(create_model("convnext_tiny", **{**tiny, "dtype": None}), jax.random.key(0))
    results = {}
    for impl in ("auto", "xla"):
        model = create_model("convnext_tiny", matmul_impl=impl, **tiny)

        def loss(params, model=model):
            return jnp.sum(model.apply({**variables, "params": params}, waveform)["probs"])

        # Run once: LLVM -O1 compiles it faster; the kernels' numbers are their own.
        results[impl] = xla.jit(jax.value_and_grad(loss), compiler_options=xla.RUN_ONCE_COMPILER_OPTIONS)(variables["params"])
    assert resolve_matmul_impl("auto", dtype, 32, 128) == "native"
    tolerance = 1e-5 if dtype == jnp.float32 else 5e-2
    np.testing.assert_allclose(results["auto"][0], results["xla"][0], rtol=tolerance / 50)
    for (path, ours), theirs in zip(jax.tree_util.tree_leaves_with_path(results["auto"][1]), jax.tree.leaves(results["xla"][1])):
        scale = float(np.abs(np.asarray(theirs, np.float32)).max()) or 1.0
        np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(theirs, np.float32), atol=tolerance * scale,
                                   err_msg=jax.tree_util.keystr(path))


def test_implementation_choice(monkeypatch):
    with pytest.raises(ValueError, match="matmul_impl must be 'auto', 'xla' or 'native', got 'fast'"):
        resolve_matmul_impl("fast")
    assert resolve_matmul_impl("xla", jnp.bfloat16, 64, 64) == "xla"
    assert resolve_matmul_impl("xla", jnp.float32, 64, 64) == "xla"
    for library in (True, False):
        monkeypatch.setattr(native, "available", lambda library=library: library)
        for amx, dots in ((True, True), (False, True), (False, False)):
            monkeypatch.setattr(native, "amx_available", lambda amx=amx: amx)
            monkeypatch.setattr(native, "bf16_dot_available", lambda dots=dots: dots)
            monkeypatch.setattr(native, "bf16_dot_preferred", lambda dots=dots: dots)
            assert resolve_matmul_impl("auto", jnp.bfloat16, 96, 384) == ("native" if dots else "xla")
            expected = "tiles" if amx else "dots" if dots else None
            assert native.bf16_unit(96, 384) == expected
            # 48 → 80: the dot products take it, the tiles do not.
            assert native.bf16_unit(48, 80) == ("dots" if dots else None)
            assert resolve_matmul_impl("auto", jnp.float32, 96, 384) == ("native" if library else "xla")
            # Sizes the kernels do not divide (a 527-class head) and float16 stay with XLA's dot.
            assert resolve_matmul_impl("auto", jnp.bfloat16, 768, 527) == "xla"
            assert resolve_matmul_impl("auto", jnp.float32, 768, 527) == "xla"
            assert resolve_matmul_impl("auto", jnp.float16, 96, 384) == "xla"
    with pytest.raises(native.NativeUnavailable, match=r"matmul_impl 'native' needs a CPU with AMX-BF16 \(amx_tile, "
                                                       r"amx_bf16, avx512_bf16\) or AVX512-BF16 \(avx512_bf16\)"):
        resolve_matmul_impl("native", jnp.bfloat16, 96, 384)
    with pytest.raises(native.NativeUnavailable, match="matmul_impl 'native' needs the native library"):
        resolve_matmul_impl("native", jnp.float32, 96, 384)
    assert resolve_matmul_impl("native", jnp.float32, 768, 527) == "xla"
    # Without the kernels a Dense still computes (XLA's dot).
    for dtype in (jnp.bfloat16, jnp.float32):
        x = jnp.ones((2, 64), dtype)
        np.testing.assert_array_equal(np.asarray(matmul(x, jnp.ones((64, 32), dtype), jnp.ones(32, dtype)), np.float32),
                                      np.full((2, 32), 65.0))


@NEEDS_BF16_DOT
def test_dot_products_are_a_default_only_off_cores_that_run_them_at_half_rate(monkeypatch):
    """Without the tile unit: on an AVX512-FP16 core (a Sapphire Rapids with AMX hidden) bfloat16 products stay with
    XLA's dot; without AVX512-FP16 (Zen 4) they take the dot products."""
    flags = native.xla.cpu_flags() - {"amx_tile", "amx_bf16"}
    monkeypatch.setattr(native.xla, "cpu_flags", lambda: flags | {native.BF16_DOT_SLOW_CPU_FLAG})
    assert not native.bf16_dot_preferred() and native.bf16_unit(96, 384) is None
    assert resolve_matmul_impl("auto", jnp.bfloat16, 96, 384) == "xla"
    assert resolve_matmul_impl("native", jnp.bfloat16, 96, 384) == "native"  # asked for: they run
    assert native.bf16_unit(96, 384, default=False) == "dots"
    monkeypatch.setattr(native.xla, "cpu_flags", lambda: flags - {native.BF16_DOT_SLOW_CPU_FLAG})
    assert native.bf16_dot_preferred() and native.bf16_unit(96, 384) == "dots"
    assert resolve_matmul_impl("auto", jnp.bfloat16, 96, 384) == "native"


def test_exports_and_flop_counts_use_xla_dot():
    """An exported artifact carries no native custom call."""
    from convnext_audio_jax.export import export_model_for

    model = create_model("convnext_tiny", dtype=jnp.bfloat16)
    for fmt in ("stablehlo", "onnx"):
        assert export_model_for(model, fmt).matmul_impl == "xla"
