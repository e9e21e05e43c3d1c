"""The Dense layer and the implementations of its product: XLA's dot everywhere, and on a CPU with AMX-BF16 the
tile kernel of :mod:`convnext_audio_jax.native` for bfloat16 layers.

Both sum the products and the bias in float32 and round once to the layer's dtype, so they give the same numbers
up to float32 summation order. On a 2-core AMX Xeon the bfloat16 ConvNeXt-Tiny forward was ~0.4× torch autocast
with XLA's dot (docs/benchmarks.md); the pointwise layers are most of its FLOPs."""

from __future__ import annotations

import functools
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from convnext_audio_jax import native
from convnext_audio_jax.models.layers import default_kernel_init, gelu
from convnext_audio_jax.models.norm import Dtype, broadcast_channels

MatmulImpl = Literal["auto", "xla", "native"]
ACTIVATIONS = (None, "gelu")


def resolve_matmul_impl(impl: MatmulImpl, dtype: Any = jnp.bfloat16, in_features: int = 32, features: int = 32) -> str:
    """'xla' or 'native' for a Dense product of ``dtype`` with ``in_features`` → ``features``. 'auto' is 'native'
    on a CPU whose tile kernel runs (:func:`native.amx_available`) for a bfloat16 product with both sizes multiples
    of 32, else 'xla'. 'native' asks for the tile kernel where it applies (bfloat16, those sizes) and is an error
    where it cannot run; other products (float32, a 527-class head) use XLA's dot under either."""
    if impl not in ("auto", "xla", "native"):
        raise ValueError(f"matmul_impl must be 'auto', 'xla' or 'native', got {impl!r}")
    if impl == "xla":
        return "xla"
    if impl == "native":
        if jax.default_backend() != "cpu":
            raise ValueError(f"matmul_impl 'native' runs on the CPU only; the default backend is {jax.default_backend()!r}")
        if not native.amx_available():
            raise native.NativeUnavailable("matmul_impl 'native' needs a CPU with " + ", ".join(native.AMX_CPU_FLAGS)
                                           + " and the native library built for it")
    elif jax.default_backend() != "cpu" or not native.amx_available():
        return "xla"
    fits = jnp.dtype(dtype) == jnp.bfloat16 and in_features % 32 == 0 and features % 32 == 0
    return "native" if fits else "xla"


def matmul_xla(x: jax.Array, kernel: jax.Array, bias: jax.Array, activation: str | None = None) -> jax.Array:
    """``bias + x @ kernel`` over the last axis of ``x`` by XLA's dot, summed in float32, then ``activation``
    ("gelu": exact GELU) in float32, in ``x``'s dtype.

    As a 2-D product: for a 4-D activation, autodiff's kernel gradient contracts three axes, and XLA:CPU then
    writes the output gradient transposed (channel-major) before the dot."""
    flat = x.reshape(-1, x.shape[-1])
    y = jnp.dot(flat, kernel, preferred_element_type=jnp.float32).reshape(*x.shape[:-1], kernel.shape[1])
    y = y + broadcast_channels(bias.astype(jnp.float32), y.shape)
    return (gelu(y) if activation == "gelu" else y).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def matmul_native(x: jax.Array, kernel: jax.Array, bias: jax.Array, activation: str | None = None) -> jax.Array:
    """The same in bfloat16 by the AMX tile kernel (GELU in its epilogue); its gradients are those of
    :func:`matmul_xla` (whose pullback recomputes the product when the activation needs it)."""
    return native.bf16_matmul(x, kernel, bias, gelu=activation == "gelu")


def _matmul_native_fwd(x, kernel, bias, activation):
    return native.bf16_matmul(x, kernel, bias, gelu=activation == "gelu"), (x, kernel, bias)


def _matmul_native_bwd(activation, residuals, dy):
    # The XLA form's pullback; its forward product is removed by XLA where the pullback does not need it.
    return jax.vjp(functools.partial(matmul_xla, activation=activation), *residuals)[1](dy)


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
