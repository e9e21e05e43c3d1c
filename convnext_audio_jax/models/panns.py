"""PANN CNNs (Kong et al., 2020) and the paper's depthwise variants CNN14Sep and CNN6Next.

All take a raw 32 kHz waveform, compute the 64-mel log-mel front end, normalise each mel bin with
bn0 and run NHWC (time as height, mel as width, as PANNs) convolution blocks, then PANNs' head:
mean over mel → max_t + mean_t → dropout 0.5 → ReLU(fc1) → fc_audioset. The classifier reads the
un-dropped ReLU(fc1) output, which is also the ``scene_embedding``. Dropout 0.2 follows every block.
Flax names mirror PANNs' state-dict keys (``conv_block{i}/conv{j}``, ``bn{j}``, ``fc1``, ``fc_audioset``).

- **CNN14** (80,753,615 params): six blocks of [Conv 3×3 (no bias, pad 1) → BN → ReLU] × 2 →
  avg-pool 2×2 (block 6: 1×1), 64-128-256-512-1024-2048 channels; fc1 2048.
- **CNN6** (4,837,455): four blocks of Conv 5×5 (no bias, pad 2) → BN → ReLU → avg-pool 2×2,
  64-128-256-512 channels; fc1 512.
- **CNN14Sep** (30,470,543; paper: 30.5M): CNN14 with each block's second conv a 3×3 depthwise conv
  (no bias), paper Section 4.1.
- **CNN6Next** (3,373,135; paper: 3.3M), Table 2 of the paper, ConvNeXt-like blocks without residual:
  block 1: Conv 7×7 1→64 (with bias; on one input channel a depthwise conv with K=64 is the same
  layer) → LayerNorm → 1×1 → 256 → GELU → 1×1 → 64; blocks 2-4: depthwise 7×7 with multiplier K=2
  (64→128, 128→256, 256→512, with bias) → LayerNorm → 1×1 → 4C → GELU → 1×1 → C. Every block ends
  in avg-pool 2×2 (Table 2 writes "Global Pooling" after the last block; pooling it first as CNN6's
  code does leaves the parameter count unchanged). LayerNorm eps 1e-6 and exact GELU as in
  ConvNeXt; 1×1 convs are Dense layers over channels. Head as CNN6 (fc1 512, ReLU, fc 527); the
  paper built it on PANNs' scripts, so CNN6's dropouts are kept. Count: blocks 36,416 + 138,368 +
  538,880 + 2,126,336, bn0 128, fc1 262,656, fc_audioset 270,351.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from convnext_audio_jax.models.conv import Conv, ConvImpl
from convnext_audio_jax.models.convnext import LogMelHook, _dense, _layer_norm
from convnext_audio_jax.models.dense import MatmulImpl
from convnext_audio_jax.models.frontend import FrontendConfig
from convnext_audio_jax.models.layers import (
    DepthwiseConv,
    DepthwiseImpl,
    normalised_log_mel,
)
from convnext_audio_jax.models.norm import Dtype, batch_norm
from convnext_audio_jax.runtime.errors import UserError

# PANNs initialise convolutions and dense layers with Xavier-uniform, biases with zeros.
pann_kernel_init = nn.initializers.xavier_uniform()

def _avg_pool(x: jax.Array, pool: tuple[int, int]) -> jax.Array:
    """Average pooling with stride = window and floor, as torch's ``avg_pool2d(x, pool)``: the window's strided
    slices summed in row-major order, then divided. XLA:CPU ran ``nn.avg_pool``'s windowed reduction, and its
    gradient's, ~10× slower than these slices (whose gradient is a padding)."""
    ph, pw = pool
    if (ph, pw) == (1, 1):
        return x
    out_h, out_w = x.shape[1] // ph, x.shape[2] // pw
    x = x[:, : out_h * ph, : out_w * pw]
    total = sum(x[:, i::ph, j::pw].astype(jnp.float32) for i in range(ph) for j in range(pw))
    return (total / (ph * pw)).astype(x.dtype)


class PannConvBlock(nn.Module):
    """[Conv k×k (no bias, 'same') → BN → ReLU] × ``num_convs`` → avg-pool. With ``depthwise_second``
    the second conv is a depthwise k×k conv (CNN14Sep)."""

    features: int
    kernel_size: int = 3
    num_convs: int = 2
    pool: tuple[int, int] = (2, 2)
    depthwise_second: bool = False
    depthwise_impl: DepthwiseImpl = "auto"
    conv_impl: ConvImpl = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        k = self.kernel_size
        for i in range(1, self.num_convs + 1):
            if i == 2 and self.depthwise_second:
                conv = DepthwiseConv(
                    (k, k),
                    use_bias=False,
                    impl=self.depthwise_impl,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    kernel_init=pann_kernel_init,
                    name=f"conv{i}",
                )
            else:
                conv = Conv(
                    self.features,
                    (k, k),
                    impl=self.conv_impl,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    kernel_init=pann_kernel_init,
                    name=f"conv{i}",
                )
            x = nn.relu(batch_norm(train, self.dtype, self.param_dtype, f"bn{i}")(conv(x)))
        return _avg_pool(x, self.pool)

class NextBlock(nn.Module):
    """CNN6Next block: 7×7 conv (depthwise with multiplier K, or a plain conv on one input channel)
    → LayerNorm → Dense 4C → GELU → Dense C → avg-pool 2×2; no residual (C changes)."""

    features: int
    pool: tuple[int, int] = (2, 2)
    depthwise_impl: DepthwiseImpl = "auto"
    matmul_impl: MatmulImpl = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        in_channels = x.shape[-1]
        if self.features % in_channels:
            raise UserError(f"a depthwise conv cannot map {in_channels} to {self.features} channels")
        x = DepthwiseConv(
            (7, 7),
            multiplier=self.features // in_channels,
            impl=self.depthwise_impl,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="dwconv",
        )(x)
        x = _layer_norm(self.dtype, self.param_dtype, "norm")(x)
        x = _dense(4 * self.features, self.dtype, self.param_dtype, "pwconv1", self.matmul_impl, "gelu")(x)
        x = _dense(self.features, self.dtype, self.param_dtype, "pwconv2", self.matmul_impl)(x)
        return _avg_pool(x, self.pool)

class PannCNN(nn.Module):
    """A PANN-style CNN: waveform (B, samples) → dict of outputs.

    ``block`` picks the block type: 'conv3x3' (CNN14), 'sep3x3' (CNN14Sep), 'conv5x5' (CNN6),
    'next' (CNN6Next). Outputs: ``logits``, ``probs`` (B, classes, float32), ``scene_embedding``
    (B, C) = ReLU(fc1), the classifier's input, and ``frame_embeddings`` (B, T', F', C), the last
    block's output (31 × 2 × 2048 for CNN14 at 10 s).
    """

    channels: Sequence[int] = (64, 128, 256, 512, 1024, 2048)
    pools: Sequence[tuple[int, int]] = ((2, 2),) * 5 + ((1, 1),)
    block: str = "conv3x3"
    num_classes: int = 527
    block_dropout: float = 0.2
    head_dropout: float = 0.5
    frontend: FrontendConfig = FrontendConfig(n_mels=64)
    depthwise_impl: DepthwiseImpl = "auto"
    matmul_impl: MatmulImpl = "auto"  # the 'next' block's Dense layers
    conv_impl: ConvImpl = "auto"  # the dense convolutions (CNN14, CNN6): XLA's or the compiled kernels (direct, Winograd)
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def _block(self, index: int, features: int, pool: tuple[int, int]) -> nn.Module:
        common = dict(depthwise_impl=self.depthwise_impl, dtype=self.dtype, param_dtype=self.param_dtype)
        name = f"conv_block{index}"
        if self.block == "next":
            return NextBlock(features, tuple(pool), matmul_impl=self.matmul_impl, name=name, **common)
        kernel, num_convs, separable = {"conv3x3": (3, 2, False), "sep3x3": (3, 2, True), "conv5x5": (5, 1, False)}[self.block]
        return PannConvBlock(features, kernel, num_convs, tuple(pool), separable, conv_impl=self.conv_impl, name=name,
                             **common)

    @nn.compact
    def __call__(self, waveform: jax.Array, train: bool = False, logmel_hook: LogMelHook | None = None) -> dict[str, Any]:
        if self.block not in ("conv3x3", "sep3x3", "conv5x5", "next"):
            raise UserError(f"unknown block {self.block!r}; expected 'conv3x3', 'sep3x3', 'conv5x5' or 'next'")
        if len(self.channels) != len(self.pools):
            raise UserError(f"channels {tuple(self.channels)} and pools {tuple(self.pools)} must have the same length")
        x = normalised_log_mel(waveform, self.frontend, train, logmel_hook, self.dtype, self.param_dtype)
        for index, (features, pool) in enumerate(zip(self.channels, self.pools), start=1):
            x = self._block(index, features, pool)(x, train)
            x = nn.Dropout(self.block_dropout, deterministic=not train)(x)
        frames = x
        sequence = jnp.mean(frames, axis=2)
        pooled = jnp.max(sequence, axis=1) + jnp.mean(sequence, axis=1)
        pooled = nn.Dropout(self.head_dropout, deterministic=not train)(pooled)
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=pann_kernel_init)
        embedding = nn.relu(nn.Dense(self.channels[-1], name="fc1", **dense)(pooled))
        logits = nn.Dense(self.num_classes, name="fc_audioset", **dense)(embedding).astype(jnp.float32)
        return {
            "logits": logits,
            "probs": jax.nn.sigmoid(logits),
            "scene_embedding": embedding.astype(jnp.float32),
            "frame_embeddings": frames,
        }

CNN14 = dict(channels=(64, 128, 256, 512, 1024, 2048), pools=((2, 2),) * 5 + ((1, 1),), block="conv3x3")
CNN14_SEP = {**CNN14, "block": "sep3x3"}
CNN6 = dict(channels=(64, 128, 256, 512), pools=((2, 2),) * 4, block="conv5x5")
CNN6_NEXT = {**CNN6, "block": "next"}
