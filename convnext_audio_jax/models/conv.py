"""Dense (all-channel) 2-D convolutions: :class:`Conv`, the stride-1 'same' convolution of the PANN CNNs, and
:class:`PatchConv`, ConvNeXt's strided stem and downsampling layers. Parameters as ``nn.Conv`` (``kernel``
(kh, kw, C_in, C_out)), so checkpoints and converters do not see the difference.

Both exist because of how XLA:CPU runs convolution gradients. It runs a convolution fast (Eigen) only in the
canonical form: batch-major activations (NHWC) and an (h, w, in, out) kernel. Autodiff writes the kernel
gradient as a convolution over the batch (the activations channel-major) and the input gradient with an
(h, w, out, in) kernel; outside loops XLA rewrites both into the canonical form, but not inside a loop body,
and the training step runs the model inside ``lax.scan`` (gradient accumulation). There the generic code ran:
a CNN14 training step on two clips took ~100 s instead of ~3 s (docs/benchmarks.md). Even in canonical form,
XLA:CPU's kernel gradient ran at 15-50 GFLOP/s on CNN14's large layers, half of its training step, and its
float32 convolutions ~1.4× slower than torch's; on the CPU :class:`Conv` runs the compiled kernels of
:mod:`convnext_audio_jax.native` instead (``impl``)."""

from __future__ import annotations

import functools
from typing import Any, Literal, get_args

import flax.linen as nn
import jax
import jax.numpy as jnp

from convnext_audio_jax import native
from convnext_audio_jax.models.layers import default_kernel_init
from convnext_audio_jax.models.norm import Dtype, broadcast_channels
from convnext_audio_jax.runtime.errors import UserError

ConvImpl = Literal["auto", "xla", "native", "direct", "winograd"]
CONV_IMPLS = get_args(ConvImpl)
_NHWC = ("NHWC", "HWIO", "NHWC")
# The compiled kernel gradient pays off from this many input channels (CNN14's 1 → 64 layer ran faster in XLA).
NATIVE_MIN_IN_CHANNELS = 16
# A float32 3 × 3 or 5 × 5 forward runs Winograd's F(2 × 2, 3 × 3) or F(2 × 2, 5 × 5) under 'auto' / 'native' where
# a device has at least this many 2 × 2 output tiles per input channel; with fewer, reading the transformed kernel
# (16/9 or 36/25 of the kernel) for few tiles costs more than the multiplications saved. Per layer, batch 8
# (benchmarks/conv.py, docs/benchmarks.md), Winograd / direct kernel: 3 × 3 (CNN14) 1.1-1.7× (AVX-512) and 1.4-1.8×
# (AVX2) down to 0.5 tiles per channel (62 × 4, 1024 channels), 0.6-0.7× and 1.0× at 0.125 (31 × 2, 1024 and 2048
# channels); 5 × 5 (CNN6's layers, wider ones) 1.5-1.9× and 1.8-2.1×, 1.07× and 1.64× at 0.5, 0.78× and 1.39× at
# 0.125.
WINOGRAD_MIN_TILES_PER_IN_CHANNEL = 0.25


def resolve_conv_impl(impl: ConvImpl, in_channels: int = 64, out_channels: int = 64) -> str:
    """'xla' or 'native' for a convolution of ``in_channels`` → ``out_channels`` (see :func:`conv_same`). 'auto' is
    'native' on the CPU where the compiled kernels load (:func:`native.available`), for ≥ 16 input channels and
    output channels a multiple of 16, else 'xla'; 'native', 'direct' and 'winograd' (the compiled kernels with the
    forward's algorithm fixed, :func:`conv_algorithm`) are an error where the kernels cannot run and fall back to
    'xla' for layers they do not fit."""
    if impl not in CONV_IMPLS:
        raise UserError(f"conv_impl must be one of {', '.join(map(repr, CONV_IMPLS))}, got {impl!r}")
    if native.resolve("native" if impl in ("direct", "winograd") else impl, "conv_impl") == "xla":
        return "xla"
    fits = in_channels >= NATIVE_MIN_IN_CHANNELS and out_channels % 16 == 0
    return "native" if fits else "xla"


def conv_algorithm(impl: ConvImpl, x_shape: tuple[int, ...], kernel_shape: tuple[int, ...]) -> str:
    """How the compiled kernels compute a float32 forward of NHWC ``x_shape`` with ``kernel_shape`` (a layer
    :func:`resolve_conv_impl` made 'native'): 'winograd' (:func:`native.conv_winograd`) or 'direct'
    (:func:`native.conv_forward`). 'direct' and 'winograd' choose so (Winograd for 3 × 3 and 5 × 5 kernels only);
    'auto' and 'native' choose Winograd for such a kernel where a device has ≥ ``WINOGRAD_MIN_TILES_PER_IN_CHANNEL``
    2 × 2 output tiles per input channel."""
    kh, kw, in_channels = kernel_shape[:3]
    if kh != kw or kh not in (3, 5) or impl == "direct":
        return "direct"
    if impl == "winograd":
        return "winograd"
    batch, height, width = x_shape[:3]
    tiles = native.rows_per_device(batch) * -(-height // 2) * -(-width // 2)
    return "winograd" if tiles >= WINOGRAD_MIN_TILES_PER_IN_CHANNEL * in_channels else "direct"


def _forward_f32(x: jax.Array, kernel: jax.Array, padding, impl: ConvImpl) -> jax.Array:
    """A float32 'same' convolution on the compiled kernels, by :func:`conv_algorithm`'s choice."""
    if conv_algorithm(impl, x.shape, kernel.shape) == "winograd":
        return native.conv_winograd(x, kernel, padding)
    return native.conv_forward(x, kernel, padding)


def _same_padding(kernel: jax.Array) -> tuple[tuple[int, int], tuple[int, int]]:
    kh, kw = kernel.shape[:2]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"a 'same' convolution needs an odd kernel, got {kh}×{kw}")
    return (kh // 2, kh // 2), (kw // 2, kw // 2)


def _conv(x: jax.Array, kernel: jax.Array, padding) -> jax.Array:
    # As nn.Conv: default precision, output in the operands' dtype.
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=_NHWC)


def _forward(x: jax.Array, kernel: jax.Array, impl: ConvImpl) -> jax.Array:
    """The convolution in ``x``'s dtype (the kernel cast to it). A bfloat16 one runs on the AMX tile unit or with
    AVX512-BF16's dot products where the CPU has them, is not an AVX512-FP16 core (where they run at half rate) and
    the channels fit (:func:`native.bf16_unit`; on a
    2-core AMX Xeon the tile kernel took CNN14's convolutions from 1.9 s to 0.6 s per batch of 8 clips,
    benchmarks/conv.py), else as the compiled float32 convolution between conversions, which is what XLA:CPU's
    bfloat16 convolution computes too (the same numbers up to summation order)."""
    padding = _same_padding(kernel)
    if resolve_conv_impl(impl, *kernel.shape[2:]) != "native" or x.dtype not in (jnp.float32, jnp.bfloat16):
        return _conv(x, kernel.astype(x.dtype), padding)
    if x.dtype == jnp.float32:
        return _forward_f32(x, kernel, padding, impl)
    unit = native.bf16_unit(*kernel.shape[2:])
    if unit is None:
        return _forward_f32(x.astype(jnp.float32), kernel.astype(jnp.bfloat16).astype(jnp.float32), padding,
                            impl).astype(jnp.bfloat16)
    return native.conv_forward(x, kernel, padding, bf16_unit=unit)  # rounds a float32 kernel itself


def _input_grad_by_taps(dy: jax.Array, kernel: jax.Array) -> jax.Array:
    """The input gradient of a 'same' convolution with few input channels (a model's first layer, 1 → 64): one
    product z = dy · kernelᵀ per position for all taps at once, then the sum of the taps' shifted slices of z.
    XLA:CPU ran it as a convolution with one output channel at ~15 GFLOP/s: 132 → 46 ms for CNN6's first layer,
    batch 8 (docs/benchmarks.md)."""
    kh, kw, cin, cout = kernel.shape
    (top, bottom), (left, right) = _same_padding(kernel)
    batch, height, width = dy.shape[:3]
    z = jnp.dot(dy.reshape(-1, cout), kernel.reshape(kh * kw * cin, cout).astype(dy.dtype).T,
                preferred_element_type=jnp.float32).reshape(batch, height, width, kh, kw, cin)
    z = jnp.pad(z, ((0, 0), (top, bottom), (left, right), (0, 0), (0, 0), (0, 0)))
    # dx[h, w] = Σ_{i,j} z[h - i + top, w - j + left, i, j]: tap (i, j)'s slice starts at line kh - 1 - i.
    dx = sum(z[:, kh - 1 - i:kh - 1 - i + height, kw - 1 - j:kw - 1 - j + width, i, j]
             for i in range(kh) for j in range(kw))
    return dx.astype(dy.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_same(x: jax.Array, kernel: jax.Array, impl: ConvImpl = "auto") -> jax.Array:
    """The stride-1 convolution of ``x`` (B, H, W, C_in) with ``kernel`` (kh, kw, C_in, C_out), odd sizes,
    zero padding that keeps H × W (torch's ``padding=k // 2``), in ``x``'s dtype (the kernel cast to it; its
    gradient in the kernel's dtype); the numbers of ``nn.Conv(padding=k // 2)`` up to float32 rounding (summation
    order; Winograd's transforms). Its gradients are autodiff's, written as canonical convolutions (see the module
    docstring). Where ``impl`` resolves to 'native' (:func:`resolve_conv_impl`) the compiled kernels compute the
    float32 convolutions (forward and input gradient; direct or, for 3 × 3 and 5 × 5 kernels, Winograd's:
    :func:`conv_algorithm`), the bfloat16 ones (on the AMX tile unit or with AVX512-BF16 dot products where the CPU
    has them; products summed in float32, one rounding), and the kernel gradient (summed in float32, also for
    bfloat16). On the CPU, unless ``impl`` is 'xla', a layer with fewer than 16 input channels gets its input
    gradient as one product and shifted sums (:func:`_input_grad_by_taps`, summed in float32)."""
    return _forward(x, kernel, impl)


def _conv_same_fwd(x, kernel, impl):
    return _forward(x, kernel, impl), (x, kernel)


def _conv_same_bwd(impl, residuals, dy):
    x, kernel = residuals
    padding = _same_padding(kernel)
    native_layer = resolve_conv_impl(impl, *kernel.shape[2:]) == "native"
    # Input gradient: dy convolved with the kernel turned by 180° and its in/out swapped; with odd kernels
    # the 'same' padding is its own mirror.
    if impl != "xla" and jax.default_backend() == "cpu" and kernel.shape[2] < NATIVE_MIN_IN_CHANNELS:
        dx = _input_grad_by_taps(dy, kernel)
    elif native_layer and kernel.dtype == jnp.float32:
        dx = _forward(dy, native.conv_kernel_flip(kernel), impl)  # XLA's transpose: 0.3 s for 3×3×2048×2048
    else:
        dx = _forward(dy, jnp.flip(kernel, (0, 1)).swapaxes(2, 3), impl)
    if native_layer:
        return dx, native.conv_kernel_grad(x, dy, kernel.shape[:2], padding).astype(kernel.dtype)
    # Kernel gradient: a convolution in which C_in is the batch, the batch is the channel being summed and
    # dy is the kernel: (C_in, H, W, B) * (H, W, B, C_out) → (C_in, kh, kw, C_out).
    dk = _conv(x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), padding)
    return dx, dk.transpose(1, 2, 0, 3).astype(kernel.dtype)


conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)


class Conv(nn.Module):
    """``nn.Conv(features, kernel_size, padding=k // 2, use_bias=False)`` (same parameter and dtype rules) by
    :func:`conv_same`; ``impl``: XLA's convolutions or the compiled kernels (:func:`resolve_conv_impl`)."""

    features: int
    kernel_size: tuple[int, int]
    impl: ConvImpl = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = default_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features), self.param_dtype)
        dtype = self.dtype or jnp.result_type(x, kernel)
        return conv_same(x.astype(dtype), kernel, self.impl)  # the kernel cast inside (see _forward)


class PatchConv(nn.Module):
    """A strided 2-D convolution with explicit zero padding, parameters as ``nn.Conv`` (``kernel``
    (kh, kw, C_in, C_out), ``bias``). When the stride equals the kernel (ConvNeXt's stem and
    downsampling layers) it is computed as non-overlapping patches times a matrix: the same sums,
    but XLA:CPU's backward of a strided convolution took ~10 s of a 17 s ConvNeXt-Tiny training
    step (batch 4, 10 s clips) where the patch matmul's takes a fraction of a second.
    Other strides fall back to ``lax.conv_general_dilated``."""

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = default_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        in_channels = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (kh, kw, in_channels, self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        dtype = self.dtype or x.dtype
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        if tuple(self.strides) == (kh, kw):
            x = jnp.pad(x, ((0, 0), *self.padding, (0, 0)))
            batch, height, width, _ = x.shape
            out_h, out_w = height // kh, width // kw  # floor, as a VALID convolution drops the remainder
            patches = x[:, : out_h * kh, : out_w * kw].reshape(batch, out_h, kh, out_w, kw, in_channels)
            # A 2-D product, as in Dense: with a 4-D operand XLA:CPU writes the output gradient transposed.
            patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch * out_h * out_w, kh * kw * in_channels)
            y = jnp.dot(patches, kernel.reshape(kh * kw * in_channels, self.features), preferred_element_type=jnp.float32)
            y = y.reshape(batch, out_h, out_w, self.features)
        else:
            y = jax.lax.conv_general_dilated(
                x, kernel, self.strides, self.padding, dimension_numbers=_NHWC,
                preferred_element_type=jnp.float32,
            )
        return (y + broadcast_channels(bias.astype(jnp.float32), y.shape)).astype(dtype)
