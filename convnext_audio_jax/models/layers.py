"""Layers shared by the models: depthwise convolution (fast on every backend), GELU, the log-mel input stage,
drop path, init (Dense: :mod:`convnext_audio_jax.models.dense`; dense convolutions: :mod:`~.conv`; LayerNorm,
BatchNorm: :mod:`~.norm`)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from convnext_audio_jax import native
from convnext_audio_jax.models.frontend import FrontendConfig, log_mel_spectrogram
from convnext_audio_jax.models.norm import (
    Dtype,
    batch_norm,
    broadcast_channels,
    channel_sum,
)
from convnext_audio_jax.native.xla_forms import gelu  # noqa: F401  (the models' GELU; re-exported for dense.py)
from convnext_audio_jax.runtime import sharding
from convnext_audio_jax.runtime.errors import UserError

DepthwiseImpl = Literal["auto", "xla", "shift", "native", "platform"]

# The reference initialises conv and dense weights with timm's trunc_normal_(std=0.02), whose
# truncation bounds are ±2 in absolute value (100 std): effectively a plain normal.
default_kernel_init = nn.initializers.normal(stddev=0.02)


def resolve_depthwise_impl(impl: DepthwiseImpl) -> str:
    """'auto' picks, by the default backend at trace time, XLA's grouped convolution on GPU/TPU (cuDNN / TPU handle
    it natively) and on CPU, where XLA's is ~10× slower than torch, the compiled kernels of
    :mod:`convnext_audio_jax.native` ('native': forward, input and kernel gradients), or the shifted multiply-add in
    XLA ops ('shift') where they cannot be built (logged once). 'native' asked for where it cannot run is an error.
    'platform' makes the choice at lowering time (``lax.platform_dependent``: 'shift' on CPU, 'xla' elsewhere), so
    one exported artifact lowered for several platforms carries both and runs the right one where it is compiled."""
    if impl == "auto":
        if jax.default_backend() != "cpu":
            return "xla"
        return "native" if native.available() else "shift"
    if impl not in ("xla", "shift", "native", "platform"):
        raise UserError(f"depthwise_impl must be 'auto', 'xla', 'shift', 'native' or 'platform', got {impl!r}")
    if impl == "native":
        if jax.default_backend() != "cpu":
            raise UserError(f"depthwise_impl 'native' runs on the CPU only; the default backend is {jax.default_backend()!r}")
        native.load()
    return impl


def _shift_sum(xp: jax.Array, kernel: jax.Array, out_h: int, out_w: int, bias: jax.Array | None = None) -> jax.Array:
    """Σ_ij xp[:, i:i+out_h, j:j+out_w, :] · kernel[i, j] (+ bias): a stride-1 depthwise correlation of an
    already padded NHWC input with a (kh, kw, C) kernel, accumulated in float32.

    The bias comes first and the last tap is added on (rows × C) operands, so that the result is that add: a
    LayerNorm's :func:`channel_mean` product then reads it directly, and XLA:CPU writes the convolution once
    instead of recomputing it in every consumer."""
    kh, kw = kernel.shape[:2]
    terms = [xp[:, i : i + out_h, j : j + out_w, :].astype(jnp.float32) * kernel[i, j].astype(jnp.float32)
             for i in range(kh) for j in range(kw)]
    acc = terms[0] if bias is None else terms[0] + bias.astype(jnp.float32)
    if len(terms) == 1:
        return acc
    for term in terms[1:-1]:
        acc = acc + term
    channels = acc.shape[-1]
    rows = math.prod(acc.shape[:-1])  # not -1: C may be 0
    return (acc.reshape(rows, channels) + terms[-1].reshape(rows, channels)).reshape(acc.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_conv_shift(x: jax.Array, kernel: jax.Array, padding: tuple[tuple[int, int], tuple[int, int]],
                         bias: jax.Array | None = None):
    """Stride-1 depthwise convolution (cross-correlation, as torch and lax) of NHWC ``x`` with a
    (kh, kw, C) kernel and an optional (C,) bias, written as kh·kw shifted multiply-adds that XLA fuses into
    one loop.

    The custom VJP keeps the backward pass just as cheap: the input gradient is the same
    shift-sum of the output gradient with the flipped kernel, the kernel gradient
    :func:`_depthwise_kernel_grad` (channel-batched products), the bias gradient a :func:`channel_sum`;
    autodiff would instead emit one pad/slice gradient per tap.
    """
    return _depthwise_shift_fwd(x, kernel, padding, bias)[0]


def _depthwise_shift_fwd(x, kernel, padding, bias):
    kh, kw = kernel.shape[:2]
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    out_h = xp.shape[1] - kh + 1
    out_w = xp.shape[2] - kw + 1
    y = _shift_sum(xp, kernel, out_h, out_w, bias).astype(x.dtype)
    return y, (x, kernel, bias)


def _input_grad_padding(kernel_size, padding):
    """The padding of the output gradient whose correlation with the flipped kernel is the input gradient."""
    (kh, kw), ((pt, pb), (pl, pr)) = kernel_size, padding
    return (kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr)


def _depthwise_shift_bwd(padding, residuals, dy):
    x, kernel, bias = residuals
    h, w = x.shape[1], x.shape[2]
    # Input gradient: a full correlation of dy with the flipped kernel, cropped to x's extent.
    dyp = jnp.pad(dy, ((0, 0), *_input_grad_padding(kernel.shape[:2], padding), (0, 0)))
    dx = _shift_sum(dyp, kernel[::-1, ::-1], h, w).astype(x.dtype)
    dkernel = _depthwise_kernel_grad(x, dy, kernel.shape[:2], padding).astype(kernel.dtype)
    dbias = None if bias is None else channel_sum(dy).astype(bias.dtype)
    return dx, dkernel, dbias


def _channels_first(x: jax.Array) -> jax.Array:
    """(B, H, W, C) → (C, B, H, W), exactly, as a product with the identity. As a transpose, XLA:CPU fuses the
    producers of ``x`` (the LayerNorm backward, a recomputed depthwise forward) into a loop that writes
    transposed and does not vectorise: ~0.7 s for one (8, 252, 56, 96) gradient, against 39 ms for this
    product (whose operand is materialised first) and 20 ms for the bare transpose."""
    channels = x.shape[-1]
    eye = jnp.eye(channels, dtype=x.dtype)
    flat = jax.lax.dot_general(eye, x.reshape(math.prod(x.shape[:-1]), channels), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return flat.astype(x.dtype).reshape(channels, *x.shape[:-1])


def _depthwise_kernel_grad(x, dy, kernel_size, padding) -> jax.Array:
    """dK[i, j, c] = Σ_{b,h,w} xpad[b, h+i, w+j, c] · dy[b, h, w, c], as (kh, kw, C) float32.

    One channel-batched matmul contracts (batch, height) for every kernel row i at once and yields
    every (input column, output column) pair; tap (i, j) is then the j-th diagonal of row i's
    block, read by one gather. This wastes multiplies (Wp × W products for kw diagonals) but runs
    on the matmul engine: 2.5× faster on XLA:CPU than kh·kw separate reductions, which each re-read
    both tensors from memory, and faster than the band-limited forms measured in
    docs/benchmarks.md. One dot and one gather (rather than one dot per row and kh·kw diagonal
    gathers) cut XLA:CPU's compile time of this gradient ~6× at the same speed.
    """
    kh, kw = kernel_size
    batch, out_h, out_w, channels = dy.shape
    # Channels first so each channel is one contiguous matmul batch.
    xt = jnp.pad(_channels_first(x), ((0, 0), (0, 0), padding[0], padding[1]))
    padded_w = xt.shape[-1]
    dyt = _channels_first(dy).reshape(channels, batch * out_h, out_w)
    rows = jnp.stack([xt[:, :, i : i + out_h, :] for i in range(kh)], axis=1).reshape(channels, kh, batch * out_h, padded_w)
    pairs = jax.lax.dot_general(
        rows, dyt, (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32
    )  # (C, kh, padded_w, out_w)
    cols = jnp.arange(out_w)
    taps = jnp.arange(kw)
    diagonals = pairs[:, :, cols[None, :] + taps[:, None], cols[None, :]]  # (C, kh, kw, out_w)
    return jnp.transpose(diagonals.sum(-1), (1, 2, 0))  # (kh, kw, C)


depthwise_conv_shift.defvjp(_depthwise_shift_fwd, _depthwise_shift_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_conv_native(x: jax.Array, kernel: jax.Array, padding: tuple[tuple[int, int], tuple[int, int]],
                          bias: jax.Array | None = None):
    """The same convolution by the compiled CPU kernels (:mod:`convnext_audio_jax.native`): the forward, the input
    gradient (the forward of the output gradient with the flipped kernel) and the kernel gradient, in float32."""
    return _depthwise_native_fwd(x, kernel, padding, bias)[0]


def _depthwise_native_fwd(x, kernel, padding, bias):
    return native.depthwise_conv(x, kernel, padding, bias).astype(x.dtype), (x, kernel, bias)


def _depthwise_native_bwd(padding, residuals, dy):
    x, kernel, bias = residuals
    kernel_size = kernel.shape[:2]
    dx = native.depthwise_conv(dy, kernel[::-1, ::-1], _input_grad_padding(kernel_size, padding)).astype(x.dtype)
    dkernel = native.depthwise_kernel_grad(x, dy, kernel_size, padding).astype(kernel.dtype)
    dbias = None if bias is None else channel_sum(dy).astype(bias.dtype)
    return dx, dkernel, dbias


depthwise_conv_native.defvjp(_depthwise_native_fwd, _depthwise_native_bwd)


def depthwise_conv_xla(x: jax.Array, kernel: jax.Array, padding, bias: jax.Array | None = None) -> jax.Array:
    """The same convolution as XLA's grouped convolution (``feature_group_count = C``; for no channels, whose group
    count XLA refuses, the empty result by the shifted sums)."""
    channels = kernel.shape[-1]
    if channels == 0:
        return depthwise_conv_shift(x, kernel, padding, bias)
    y = jax.lax.conv_general_dilated(
        x,
        kernel.reshape(kernel.shape[0], kernel.shape[1], 1, channels),
        window_strides=(1, 1),
        padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=channels,
        preferred_element_type=jnp.float32,
    ).astype(x.dtype)
    return y if bias is None else y + broadcast_channels(bias.astype(y.dtype), y.shape)


def depthwise_conv(x: jax.Array, kernel: jax.Array, padding, impl: DepthwiseImpl = "auto",
                   bias: jax.Array | None = None) -> jax.Array:
    """Depthwise conv of NHWC ``x`` with a (kh, kw, C) kernel (and a (C,) bias) by the chosen implementation."""
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    resolved = resolve_depthwise_impl(impl)
    if resolved == "platform":
        return jax.lax.platform_dependent(
            x, kernel, bias, cpu=lambda x, k, b: depthwise_conv_shift(x, k, padding, b),
            default=lambda x, k, b: depthwise_conv_xla(x, k, padding, b))
    if resolved == "native":
        return depthwise_conv_native(x, kernel, padding, bias)
    if resolved == "shift":
        return depthwise_conv_shift(x, kernel, padding, bias)
    return depthwise_conv_xla(x, kernel, padding, bias)


class DepthwiseConv(nn.Module):
    """Depthwise (grouped, ``groups = in_channels``) 2-D convolution with a depth multiplier.

    Parameters use Flax's grouped-conv layout: ``kernel`` (kh, kw, 1, C·multiplier) — torch's
    (C·multiplier, 1, kh, kw) transposed — so checkpoints convert with a plain transpose.
    Output channel ``c·multiplier + m`` reads input channel ``c``, as in torch.
    """

    kernel_size: tuple[int, int] = (7, 7)
    multiplier: int = 1
    use_bias: bool = True
    padding: tuple[tuple[int, int], tuple[int, int]] | None = None  # None: 'same' for odd kernels
    impl: DepthwiseImpl = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = default_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_channels = x.shape[-1]
        out_channels = in_channels * self.multiplier
        kh, kw = self.kernel_size
        padding = self.padding or ((kh // 2, kh // 2), (kw // 2, kw // 2))
        kernel = self.param("kernel", self.kernel_init, (kh, kw, 1, out_channels), self.param_dtype)
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        if self.multiplier > 1:
            x = jnp.repeat(x, self.multiplier, axis=-1)
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (out_channels,), self.param_dtype).astype(dtype)
        return depthwise_conv(x, kernel[:, :, 0, :].astype(dtype), padding, self.impl, bias)


def normalised_log_mel(
    waveform: jax.Array,
    frontend: FrontendConfig,
    train: bool,
    logmel_hook: Callable[[jax.Array], jax.Array] | None,
    dtype: Dtype | None,
    param_dtype: Dtype,
) -> jax.Array:
    """The audio models' input stage, called inside their ``compact`` ``__call__``: log-mel,
    then ``bn0`` over the mel bins (statistics over batch and time, in float32: under a
    data-sharded jit the batch mean is global, so they are synchronised across devices), then in
    training the augmentation hook (SpecAugment, mixup). Returns (B, T, F, 1) in ``dtype``."""
    x = log_mel_spectrogram(waveform, frontend)
    x = batch_norm(train, jnp.float32, param_dtype, "bn0")(x)
    if train and logmel_hook is not None:
        x = logmel_hook(x)
    return x[..., None].astype(dtype or jnp.float32)


class DropPath(nn.Module):
    """Stochastic depth: zeroes the whole residual branch of a sample with probability ``rate``
    and scales the kept ones by 1/(1-rate). Uses the 'drop_path' RNG stream."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        key = self.make_rng("drop_path")
        mask = sharding.rows_of_global_draw(lambda rows: jax.random.bernoulli(key, keep, (rows,)), x.shape[0])
        mask = mask.reshape((x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros_like(x)).astype(x.dtype)
