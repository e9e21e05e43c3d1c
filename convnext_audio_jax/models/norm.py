"""Normalisation layers and the per-channel sums and broadcasts they (and the models' biases) are built from,
written for XLA:CPU: reductions over the leading axes of an NHWC activation by the compiled kernel
(:func:`convnext_audio_jax.native.channel_sums`) or as products with ones."""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from convnext_audio_jax import native
from convnext_audio_jax.runtime import sharding

Dtype = Any
SumsImpl = Literal["auto", "xla", "native"]


def resolve_sums_impl(impl: SumsImpl, dtype: Any) -> str:
    """'native' or 'xla' for per-channel sums of a ``dtype`` array: 'auto' is 'native' for float32 on the CPU where
    the compiled kernels load (:func:`native.available`), else 'xla'; 'native' is an error where they cannot run
    and falls back to 'xla' for other dtypes."""
    if native.resolve(impl, "sums_impl") == "xla":
        return "xla"
    return "native" if jnp.dtype(dtype) == jnp.float32 else "xla"


def channel_sum(x: jax.Array, impl: SumsImpl = "auto") -> jax.Array:
    """Σ of ``x`` over every axis but the last, in float32: by the compiled kernel (:func:`resolve_sums_impl`) or
    as a vector-matrix product with ones. XLA:CPU lowers a reduction over the leading axes of an NHWC activation
    to windowed reductions inside the training step (~60 ms for one sum over CNN6's first activation, 131 MB); the
    product with ones took ~26 ms, the compiled kernel ~6 (docs/benchmarks.md)."""
    if resolve_sums_impl(impl, x.dtype) == "native":
        return native.channel_sums(x)[0]
    flat = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # not -1: C may be 0
    ones = jnp.ones((flat.shape[0],), flat.dtype)
    return jax.lax.dot_general(ones, flat, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def channel_mean(x: jax.Array) -> jax.Array:
    """Mean of float ``x`` over its last axis, keeping it as size 1, computed as a product with a column of ones.
    XLA:CPU does not fuse a producer into a product, so an expensive producer (a depthwise convolution before a
    LayerNorm) is written once and read by the statistics and the normalisation; as a reduction, XLA recomputed
    the convolution's 49 taps inside each of its three consumers (docs/benchmarks.md). The gradient is a
    broadcast, as for a reduction."""
    return _channel_mean(x, x.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _channel_mean(x: jax.Array, channels: int) -> jax.Array:
    ones = jnp.ones((channels, 1), x.dtype)
    total = jnp.dot(x.reshape(-1, channels), ones, preferred_element_type=x.dtype)
    return total.reshape(*x.shape[:-1], 1) / channels


def _channel_mean_fwd(x, channels):
    return _channel_mean(x, channels), None


def _channel_mean_bwd(channels, _, g):
    return (jnp.broadcast_to(g / channels, (*g.shape[:-1], channels)),)


_channel_mean.defvjp(_channel_mean_fwd, _channel_mean_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def broadcast_channels(v: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``jnp.broadcast_to`` of a per-channel vector (a bias, a scale) to ``shape``, whose gradient is
    :func:`channel_sum` rather than autodiff's reduction: the parameter gradients of every bias, LayerNorm
    and layer scale are these sums."""
    return jnp.broadcast_to(v, shape)


def _broadcast_channels_fwd(v, shape):
    return jnp.broadcast_to(v, shape), None


def _broadcast_channels_bwd(shape, _, g):
    return (channel_sum(g).astype(g.dtype),)


broadcast_channels.defvjp(_broadcast_channels_fwd, _broadcast_channels_bwd)


class LayerNorm(nn.Module):
    """``nn.LayerNorm`` over the last axis with ``use_fast_variance=False`` (same parameters, two-pass statistics in
    at least float32) with its statistics by :func:`channel_mean` and its scale and bias gradients by
    :func:`channel_sum`; outputs equal flax's within float32 summation order."""

    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
        stats = x.astype(jnp.promote_types(self.dtype or x.dtype, jnp.float32))
        mean = channel_mean(stats)
        var = channel_mean(jnp.square(stats - mean))
        mul = jax.lax.rsqrt(var + self.epsilon) * broadcast_channels(scale, x.shape)
        y = (x - mean) * mul + broadcast_channels(bias, x.shape)
        return y.astype(self.dtype or jnp.result_type(x, scale, bias))


# BatchNorm as torch's defaults (eps 1e-5, momentum 0.1 = Flax momentum 0.9), two-pass variance.
BN_EPS = 1e-5
BN_MOMENTUM = 0.9


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, stats_dtype: Any,
                     out_dtype: Any, impl: SumsImpl = "auto") -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode batch normalisation over every axis but the last: (y, batch mean, batch variance), statistics
    in ``stats_dtype`` (two-pass variance), y in ``out_dtype``. Its gradient is the closed form
    dx = s·(g − Σg/N − x̂·Σ(g·x̂)/N) (+ the terms of the mean's and variance's own cotangents), two channel sums
    where autodiff of the forward took four, and the scale and bias gradients are those same two sums. With the
    compiled sums (``impl``, :func:`resolve_sums_impl`) each pair of sums is one pass that writes no product."""
    return _batch_norm_train(x, scale, bias, epsilon, stats_dtype, out_dtype, impl)[0]


def _batch_norm_train(x, scale, bias, epsilon, stats_dtype, out_dtype, impl):
    stats = x.astype(stats_dtype)
    count = x.size // x.shape[-1] * sharding.device_count()
    compiled = resolve_sums_impl(impl, stats_dtype) == "native"
    mean = sharding.global_sum(channel_sum(stats, impl)) / count
    centred = stats - mean
    if compiled:  # Σ (x − mean)², the square not written out
        var = sharding.global_sum(native.channel_sums(stats, None, mean, mean)[1]) / count
    else:
        var = sharding.global_sum(channel_sum(jnp.square(centred), impl)) / count
    inv = jax.lax.rsqrt(var + epsilon)
    mul = inv * scale.astype(stats_dtype)
    y = (centred * mul + bias.astype(stats_dtype)).astype(out_dtype)
    return (y, mean, var), (x, mean, inv, scale, bias)


def _batch_norm_train_bwd(epsilon, stats_dtype, out_dtype, impl, residuals, cotangents):
    x, mean, inv, scale, bias = residuals
    gy, gmean, gvar = cotangents
    count = x.size // x.shape[-1] * sharding.device_count()
    g = gy.astype(stats_dtype)
    centred = x.astype(stats_dtype) - mean
    if resolve_sums_impl(impl, stats_dtype) == "native":  # Σg and Σ g·(x − mean) in one pass
        dbias, cross = native.channel_sums(g, x.astype(stats_dtype), None, mean)
        dscale = cross * inv
    else:
        dbias = channel_sum(g, impl)
        dscale = channel_sum(g * (centred * inv), impl)
    # Per device (sharding.per_device) the input's gradient needs the sums over the whole batch; the scale's and
    # bias's gradients stay this device's part, summed over the devices with all the other gradients.
    total_dbias, total_dscale = sharding.global_sum((dbias, dscale))
    mul = inv * scale.astype(stats_dtype)
    dx = (mul * (g - total_dbias / count - centred * (inv * total_dscale / count)) + gmean / count
          + centred * (2 * gvar / count))
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


batch_norm_train.defvjp(_batch_norm_train, _batch_norm_train_bwd)


class BatchNorm(nn.Module):
    """``nn.BatchNorm(use_fast_variance=False)`` over the last axis (same parameters, batch statistics, running
    averages and dtype rules; statistics in at least float32), with the statistics over the other axes by the
    compiled sums or as products with ones (``sums_impl``, :func:`resolve_sums_impl`) and, in training, the gradient
    in closed form (:func:`batch_norm_train`). XLA:CPU
    lowered flax's reductions over the leading axes, and autodiff's for its gradients, to windowed reductions: 2.7 s
    of a 7.6 s CNN14 training step (batch 8, 10 s clips; docs/benchmarks.md). Outputs and gradients equal flax's
    within float32 summation order. Per device (``sharding.per_device``) the statistics cover the global batch."""

    use_running_average: bool
    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPS
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    sums_impl: SumsImpl = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(channels, jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones(channels, jnp.float32))
        scale = self.param("scale", nn.initializers.ones, channels, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, channels, self.param_dtype)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            stats_dtype = jnp.promote_types(self.dtype or x.dtype, jnp.float32)
            out_dtype = self.dtype or jnp.result_type(x, scale, bias)
            y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, stats_dtype, out_dtype, self.sums_impl)
            if not self.is_initializing():
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
            return y
        mul = jax.lax.rsqrt(var + self.epsilon) * scale
        y = (x - broadcast_channels(mean, x.shape)) * broadcast_channels(mul, x.shape) + broadcast_channels(bias, x.shape)
        return y.astype(self.dtype or jnp.result_type(x, scale, bias))


def batch_norm(train: bool, dtype: Dtype | None, param_dtype: Dtype, name: str) -> BatchNorm:
    return BatchNorm(use_running_average=not train, dtype=dtype, param_dtype=param_dtype, name=name)
