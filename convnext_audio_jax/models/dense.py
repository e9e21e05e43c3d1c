"""The Dense layer and the implementations of its product: XLA's dot everywhere, and on the CPU the compiled
kernels of :mod:`convnext_audio_jax.native` — float32 products, and bfloat16 ones on a CPU with AMX-BF16 (the tile
kernel) or AVX512-BF16 (dot products) — with the bias and GELU in their epilogue.

All sum the products and the bias in float32 and round once to the layer's dtype, so they give the same numbers
up to float32 summation order. On a 2-core AMX Xeon the bfloat16 ConvNeXt-Tiny forward was ~0.4× torch autocast
with XLA's dot; XLA's float32 dot (Eigen) ran ConvNeXt-Tiny's pointwise products at 90–330 GFLOP/s, the compiled
one at 110–390 with the GELU pass saved (docs/benchmarks.md). The pointwise layers are most of the model's FLOPs."""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from convnext_audio_jax import native
from convnext_audio_jax.models.layers import default_kernel_init, gelu
from convnext_audio_jax.models.norm import Dtype, broadcast_channels
from convnext_audio_jax.runtime.errors import UserError

MatmulImpl = Literal["auto", "xla", "native"]
ACTIVATIONS = (None, "gelu")


def resolve_matmul_impl(impl: MatmulImpl, dtype: Any = jnp.bfloat16, in_features: int = 32, features: int = 32) -> str:
    """'xla' or 'native' for a Dense product of ``dtype`` with ``in_features`` → ``features``. 'auto' is 'native'
    on the CPU where a compiled kernel takes the product — float32 with ``in_features`` positive and ``features`` a
    multiple of 16 (the library loads: :func:`native.available`), bfloat16 where one of the CPU's bfloat16 units runs and fits the sizes
    (:func:`native.bf16_unit`: the AMX tile unit, both multiples of 32; else AVX512-BF16's dot products off
    AVX512-FP16 cores, ``in_features`` even and ``features`` a multiple of 16) — else 'xla'. 'native' asks for the
    compiled kernel where one takes the product (for bfloat16 also the dot products where they are not a default)
    and is an error where none can run; other products (a 527-class head, float16) use XLA's dot under either."""
    if impl not in ("auto", "xla", "native"):
        raise UserError(f"matmul_impl must be 'auto', 'xla' or 'native', got {impl!r}")
    if impl == "xla":
        return "xla"
    dtype = jnp.dtype(dtype)
    bf16 = dtype == jnp.bfloat16
    on_cpu = jax.default_backend() == "cpu"
    if impl == "native":
        if not on_cpu:
            raise UserError(f"matmul_impl 'native' runs on the CPU only; the default backend is {jax.default_backend()!r}")
        if bf16 and not (native.amx_available() or native.bf16_dot_available()):
            raise native.NativeUnavailable(
                f"matmul_impl 'native' needs a CPU with AMX-BF16 ({', '.join(native.AMX_CPU_FLAGS)}) or AVX512-BF16 "
                f"({native.BF16_DOT_CPU_FLAG}) and the native library built for it for a bfloat16 product")
    if bf16:  # 'native': also a unit that runs here but is not a default (the dot products on an AVX512-FP16 core)
        return "native" if on_cpu and native.bf16_unit(in_features, features, default=impl == "auto") else "xla"
    fits = dtype == jnp.float32 and in_features > 0 and features % 16 == 0
    if impl == "native" and fits and not native.available():
        raise native.NativeUnavailable("matmul_impl 'native' needs the native library (a C++ compiler; "
                                       "CONVNEXT_AUDIO_JAX_NATIVE not 0)")
    return "native" if fits and on_cpu and native.available() else "xla"


def matmul_xla(x: jax.Array, kernel: jax.Array, bias: jax.Array, activation: str | None = None) -> jax.Array:
    """``bias + x @ kernel`` over the last axis of ``x`` by XLA's dot, summed in float32, then ``activation``
    ("gelu": exact GELU) in float32, in ``x``'s dtype.

    As a 2-D product: for a 4-D activation, autodiff's kernel gradient contracts three axes, and XLA:CPU then
    writes the output gradient transposed (channel-major) before the dot."""
    flat = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # not -1: K may be 0
    y = jnp.dot(flat, kernel, preferred_element_type=jnp.float32).reshape(*x.shape[:-1], kernel.shape[1])
    y = y + broadcast_channels(bias.astype(jnp.float32), y.shape)
    return (gelu(y) if activation == "gelu" else y).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def matmul_native(x: jax.Array, kernel: jax.Array, bias: jax.Array, activation: str | None = None) -> jax.Array:
    """The same by the compiled kernel of x's dtype (float32, or bfloat16 on the CPU's bfloat16 unit), GELU in its
    epilogue; its gradients are those of :func:`matmul_xla`."""
    return _native_product(x, kernel, bias, activation == "gelu")


def _native_product(x, kernel, bias, gelu):
    product = native.f32_matmul if x.dtype == jnp.float32 else native.bf16_matmul
    return product(x, kernel, bias, gelu=gelu)


def _matmul_native_fwd(x, kernel, bias, activation):
    if activation == "gelu" and x.dtype == jnp.float32:
        # The product before the GELU is the pullback's residual, as in XLA's form (not recomputed).
        pre = _native_product(x, kernel, bias, False)
        return gelu(pre), (x, kernel, bias, pre)
    return _native_product(x, kernel, bias, activation == "gelu"), (x, kernel, bias, None)


def _matmul_native_bwd(activation, residuals, dy):
    x, kernel, bias, pre = residuals
    if pre is not None:
        dy, activation = jax.vjp(gelu, pre)[1](dy)[0], None
    # The XLA form's pullback; its forward product is removed by XLA where the pullback does not need it (for a
    # bfloat16 GELU it is recomputed).
    return jax.vjp(functools.partial(matmul_xla, activation=activation), x, kernel, bias)[1](dy)


matmul_native.defvjp(_matmul_native_fwd, _matmul_native_bwd)


def matmul(x: jax.Array, kernel: jax.Array, bias: jax.Array, impl: MatmulImpl = "auto",
           activation: str | None = None) -> jax.Array:
    """``activation(bias + x @ kernel)`` (x (..., K), kernel (K, N), bias (N,), all of one dtype; ``activation``
    None or "gelu") by the chosen implementation."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if resolve_matmul_impl(impl, x.dtype, *kernel.shape) == "native":
        return matmul_native(x, kernel, bias, activation)
    return matmul_xla(x, kernel, bias, activation)


class Dense(nn.Module):
    """``nn.Dense`` (same parameters, initialisers and dtype rules) by :func:`matmul`: the product and bias summed
    in float32 and rounded once (``nn.Dense`` rounds a bfloat16 product before adding the bias), the bias gradient
    by :func:`~convnext_audio_jax.models.norm.channel_sum`. ``activation="gelu"`` applies the exact GELU before
    that rounding (one pass, and in the tile kernel's epilogue)."""

    features: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = default_kernel_init
    impl: MatmulImpl = "auto"
    activation: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        dtype = self.dtype or jnp.result_type(x, kernel, bias)
        return matmul(x.astype(dtype), kernel.astype(dtype), bias.astype(dtype), self.impl, self.activation)
