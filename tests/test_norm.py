"""Normalisation layers and per-channel sums (models/norm.py): LayerNorm and BatchNorm equal flax's in values,
statistics and gradients, with no windowed reduction left for XLA:CPU."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.sharding import Mesh, NamedSharding, PartitionSpec

from convnext_audio_jax import native
from convnext_audio_jax.models.norm import (BatchNorm, LayerNorm, broadcast_channels, channel_mean, channel_sum,
                                            resolve_sums_impl)
from flax_parity import outputs_and_gradients_against
from native_marks import NEEDS_COMPILER

SUMS_IMPLS = ["xla", pytest.param("native", marks=NEEDS_COMPILER)]


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_layer_norm_equals_flax_values_and_gradients(dtype):
    """Our LayerNorm (statistics as products, parameter gradients as channel sums) against flax's on a 4-D
    activation: the same parameters; outputs and all gradients equal within float32 summation order (bfloat16: our
    statistics and bias gradients are summed in float32, flax's bias gradient in bfloat16; an output may then round
    to the neighbouring bfloat16). Dense: tests/test_dense.py."""
    x = jax.random.normal(jax.random.key(0), (2, 9, 7, 16))
    got, expected = outputs_and_gradients_against(
        LayerNorm(1e-6, dtype=dtype), nn.LayerNorm(1e-6, use_fast_variance=False, dtype=dtype), x, dtype)
    np.testing.assert_allclose(got, expected, rtol=1e-5 if dtype is None else 1e-2, atol=1e-5 if dtype is None else 1e-2)


@pytest.mark.parametrize("sums_impl", SUMS_IMPLS)
@pytest.mark.parametrize("shape", [(4, 9, 7, 16), (3, 20, 64)])  # a conv activation; bn0's (B, T, mels)
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_batch_norm_in_training_equals_flax(dtype, shape, sums_impl):
    """Outputs, the updated running statistics and the gradients of parameters and input against
    ``nn.BatchNorm(use_fast_variance=False)`` with the models' momentum and epsilon, with the statistics by either
    implementation of the channel sums; then evaluation with the running statistics."""
    ours = BatchNorm(use_running_average=False, dtype=dtype, sums_impl=sums_impl)
    reference = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5, use_fast_variance=False, dtype=dtype)
    x = jax.random.normal(jax.random.key(0), shape) * 3.0 + 1.5
    variables = reference.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, variables)
    variables = jax.tree.map(lambda v: v + 0.1 * jax.random.normal(jax.random.key(2), v.shape), variables)
    tolerance = 1e-5 if dtype is None else 2e-2
    weights = jax.random.normal(jax.random.key(3), shape)  # a loss whose input gradient does not cancel

    def loss(module, params, x):
        y, updates = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return (y.astype(jnp.float32) * weights).sum(), (y, updates)

    (_, (y, stats)), grads = jax.value_and_grad(loss, argnums=(1, 2), has_aux=True)(ours, variables["params"], x)
    (_, (y_ref, stats_ref)), grads_ref = jax.value_and_grad(loss, argnums=(1, 2), has_aux=True)(
        reference, variables["params"], x)
    assert y.dtype == y_ref.dtype
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), rtol=tolerance, atol=tolerance)
    for a, b in zip(jax.tree.leaves((stats, grads)), jax.tree.leaves((stats_ref, grads_ref))):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance * np.abs(b).max())
    evaluated = {**variables, **stats}
    got = BatchNorm(use_running_average=True, dtype=dtype).apply(evaluated, x)
    expected = nn.BatchNorm(use_running_average=True, epsilon=1e-5, dtype=dtype).apply(evaluated, x)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32), rtol=tolerance, atol=tolerance)


def test_batch_norm_training_gradient_has_no_reduction():
    """Statistics and all gradients are compiled sums or products with ones: the compiled XLA:CPU program of a
    training-mode BatchNorm's gradient, inside a scan as in the training step, has no reduce or reduce-window (flax's has
    reductions, which XLA:CPU turned into windowed ones in the CNN14 training step: the check sees the difference)."""
    x = jnp.ones((2, 40, 16, 32))

    def reductions(module):
        variables = module.init(jax.random.key(0), x)

        def loss(params, x):
            y, _ = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
            return (y ** 2).sum()

        def scanned(params, x):
            return jax.lax.scan(lambda c, xs: (c, jax.grad(loss, argnums=(0, 1))(params, xs)), 0.0, x[None])

        hlo = jax.jit(scanned).lower(variables["params"], x).compile().as_text()
        return len(re.findall(r" reduce(-window)?\(", hlo))

    assert reductions(BatchNorm(use_running_average=False)) == 0
    assert reductions(BatchNorm(use_running_average=False, sums_impl="xla")) == 0
    assert reductions(nn.BatchNorm(use_running_average=False, use_fast_variance=False)) > 0


def test_channel_mean_and_its_gradient_equal_float64():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(4, 33, 17, 12)).astype(np.float32)
    got, pullback = jax.vjp(channel_mean, jnp.asarray(x))
    assert got.shape == (4, 33, 17, 1)
    np.testing.assert_allclose(got, x.astype(np.float64).mean(-1, keepdims=True), rtol=1e-6, atol=1e-6)
    g = np.random.default_rng(1).normal(size=got.shape).astype(np.float32)
    np.testing.assert_allclose(pullback(jnp.asarray(g))[0], np.broadcast_to(g / 12, x.shape), rtol=1e-6)


def test_broadcast_channels_gradient_is_the_channel_sum():
    g = np.random.default_rng(0).normal(size=(4, 33, 17, 12)).astype(np.float32)
    v = jnp.ones(12)
    _, pullback = jax.vjp(lambda v: broadcast_channels(v, g.shape), v)
    np.testing.assert_allclose(pullback(jnp.asarray(g))[0], g.astype(np.float64).sum((0, 1, 2)), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(channel_sum(jnp.asarray(g)), g.astype(np.float64).sum((0, 1, 2)), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(broadcast_channels(v, g.shape), np.ones(g.shape, np.float32))


def test_batch_norm_train_gradient_includes_the_statistics_cotangents():
    """The closed-form gradient against autodiff of the plain formula, for a loss that also reads the batch mean and
    variance outputs (their cotangents are zero in the models, where they only feed the running averages)."""
    from convnext_audio_jax.models.norm import batch_norm_train

    x = jax.random.normal(jax.random.key(0), (3, 7, 5, 6)) * 2.0 + 0.5
    scale, bias = jax.random.normal(jax.random.key(1), (6,)), jax.random.normal(jax.random.key(2), (6,))
    weights = jax.random.normal(jax.random.key(3), x.shape)

    def plain(x, scale, bias):
        mean = x.mean((0, 1, 2))
        var = jnp.square(x - mean).mean((0, 1, 2))
        return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias, mean, var

    def loss(fn, x, scale, bias):
        y, mean, var = fn(x, scale, bias)
        return (y * weights).sum() + (mean * jnp.arange(6.0)).sum() + (var ** 2).sum()

    ours = jax.grad(lambda *a: loss(lambda x, s, b: batch_norm_train(x, s, b, 1e-5, jnp.float32, jnp.float32), *a),
                    argnums=(0, 1, 2))(x, scale, bias)
    expected = jax.grad(lambda *a: loss(plain, *a), argnums=(0, 1, 2))(x, scale, bias)
    for a, b in zip(ours, expected):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))


@NEEDS_COMPILER
@pytest.mark.parametrize("shape", [(4, 33, 17, 48), (3, 20, 37), (5, 300), (2, 3, 4, 200)])
def test_compiled_channel_sums_equal_float64(shape):
    """Σa and Σ(a − ma)(b − mb) over every axis but the last against numpy in float64: whole vectors of channels,
    a tail past the last vector (37), more channels than one register group (200), a 2-D array."""
    rng = np.random.default_rng(5)
    a = rng.normal(2.0, 1.5, size=shape).astype(np.float32)
    b = rng.normal(-1.0, 3.0, size=shape).astype(np.float32)
    ma, mb = (rng.normal(size=shape[-1]).astype(np.float32) for _ in range(2))
    s1, s2 = jax.jit(native.channel_sums)(a, b, ma, mb)
    axes = tuple(range(len(shape) - 1))
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    expected1, expected2 = a64.sum(axes), ((a64 - ma) * (b64 - mb)).sum(axes)
    np.testing.assert_allclose(s1, expected1, rtol=1e-6, atol=1e-6 * np.abs(expected1).max())
    np.testing.assert_allclose(s2, expected2, rtol=1e-6, atol=1e-6 * np.abs(expected2).max())
    # b and the means default to a and zeros: Σa and Σa²; channel_sum gives the same Σa either way.
    s1, s2 = native.channel_sums(jnp.asarray(a))
    np.testing.assert_allclose(s2, (a64 ** 2).sum(axes), rtol=1e-6)
    np.testing.assert_allclose(channel_sum(jnp.asarray(a), "native"), channel_sum(jnp.asarray(a), "xla"),
                               rtol=1e-5, atol=1e-5 * np.abs(expected1).max())


@NEEDS_COMPILER
def test_compiled_channel_sums_under_a_mesh_sum_each_devices_rows_then_all_reduce():
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    rng = np.random.default_rng(6)
    a, b = (rng.standard_normal((8, 10, 6, 32)).astype(np.float32) for _ in range(2))
    mean = rng.standard_normal(32).astype(np.float32)

    def sums(a, b):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return native.channel_sums(a, b, None, mean)

    step = jax.jit(sums, in_shardings=(rows, rows))
    for got, want in zip(step(jax.device_put(a, rows), jax.device_put(b, rows)), jax.jit(native.channel_sums)(a, b, None, mean)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    compiled = step.lower(a, b).compile().as_text()
    assert "all-gather" not in compiled and "all-reduce" in compiled


def test_channel_sums_reject_what_does_not_fit_and_resolve_per_dtype():
    with pytest.raises(ValueError, match=r"channel sums: a \(4, 8\), b \(4, 9\) .* expected b shaped as a and means \(8,\)"):
        native.channel_sums(jnp.zeros((4, 8)), jnp.zeros((4, 9)))
    with pytest.raises(ValueError, match="sums_impl must be 'auto', 'xla' or 'native', got 'fast'"):
        resolve_sums_impl("fast", jnp.float32)
    assert resolve_sums_impl("xla", jnp.float32) == "xla"
    assert resolve_sums_impl("auto", jnp.bfloat16) == "xla"  # the compiled sums read float32 only
    assert resolve_sums_impl("auto", jnp.float32) == ("native" if native.available() else "xla")
