"""ConvNeXt for audio tagging (Pellegrini et al., Interspeech 2023) and the ImageNet ConvNeXt.

The audio model follows the authors' released checkpoint (topel/audioset-convnext-inf):
log-mel (1001 time × 224 mel) → BatchNorm over mel bins (bn0) → stem conv 4×4/4 with
4 frames of zero padding on each side of time → 252 × 56 → four stages (3-3-9-3 blocks,
96-192-384-768 channels) → mean over mel → max_t + mean_t → LayerNorm → Dense(527).
Layout is NHWC with time as height and mel as width, as in the reference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from convnext_audio_jax.models.conv import PatchConv
from convnext_audio_jax.models.dense import Dense, MatmulImpl
from convnext_audio_jax.models.frontend import FrontendConfig
from convnext_audio_jax.models.layers import (
    DepthwiseConv,
    DepthwiseImpl,
    DropPath,
    normalised_log_mel,
)
from convnext_audio_jax.models.norm import Dtype, LayerNorm, broadcast_channels
from convnext_audio_jax.runtime.errors import UserError

LN_EPS = 1e-6

# Stems of the authors' code, by the ``after_stem_dim`` name they use: kernel, stride, padding
# (time, mel). '252x56' is the released model's; the others are the paper's Section 5 variants.
STEM_VARIANTS: dict[str, dict[str, tuple]] = {
    "252x56": {"kernel": (4, 4), "stride": (4, 4), "padding": (4, 0)},
    "56": {"kernel": (18, 4), "stride": (18, 4), "padding": (9, 0)},
    "112": {"kernel": (9, 2), "stride": (9, 2), "padding": (4, 0)},
    "504x28": {"kernel": (4, 8), "stride": (2, 8), "padding": (5, 0)},
    "504x56": {"kernel": (4, 4), "stride": (2, 4), "padding": (5, 0)},
}

# An augmentation hook applied to the normalised log-mel (B, T, F) during training, e.g.
# SpecAugment and mixup; it may change the batch size (mixup: 2B rows in, B out).
LogMelHook = Callable[[jax.Array], jax.Array]


def _layer_norm(dtype, param_dtype, name):
    return LayerNorm(epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype, name=name)


def _dense(features, dtype, param_dtype, name, impl: MatmulImpl = "auto", activation: str | None = None):
    return Dense(features, dtype=dtype, param_dtype=param_dtype, impl=impl, activation=activation, name=name)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7×7 → LayerNorm → Dense 4C → exact GELU → Dense C → layer scale → drop path → +x."""

    drop_path_rate: float = 0.0
    layer_scale_init: float = 1e-6
    depthwise_impl: DepthwiseImpl = "auto"
    matmul_impl: MatmulImpl = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        channels = x.shape[-1]
        y = DepthwiseConv((7, 7), impl=self.depthwise_impl, dtype=self.dtype, param_dtype=self.param_dtype, name="dwconv")(x)
        y = _layer_norm(self.dtype, self.param_dtype, "norm")(y)
        y = _dense(4 * channels, self.dtype, self.param_dtype, "pwconv1", self.matmul_impl, "gelu")(y)
        y = _dense(channels, self.dtype, self.param_dtype, "pwconv2", self.matmul_impl)(y)
        if self.layer_scale_init > 0:
            gamma = self.param("gamma", nn.initializers.constant(self.layer_scale_init), (channels,), self.param_dtype)
            y = y * broadcast_channels(gamma.astype(y.dtype), y.shape)
        y = DropPath(self.drop_path_rate, name="drop_path")(y, deterministic=not train)
        return x + y


class ConvNeXtTrunk(nn.Module):
    """Stem conv + LayerNorm, then four stages, each (but the first) opened by LayerNorm + conv 2×2/2."""

    depths: Sequence[int] = (3, 3, 9, 3)
    dims: Sequence[int] = (96, 192, 384, 768)
    stem_kernel: tuple[int, int] = (4, 4)
    stem_stride: tuple[int, int] = (4, 4)
    stem_padding: tuple[int, int] = (0, 0)
    drop_path_rate: float = 0.0
    layer_scale_init: float = 1e-6
    depthwise_impl: DepthwiseImpl = "auto"
    matmul_impl: MatmulImpl = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if len(self.depths) != len(self.dims):
            raise UserError(f"depths {tuple(self.depths)} and dims {tuple(self.dims)} must have the same length")
        pt, pl = self.stem_padding
        x = PatchConv(
            self.dims[0],
            self.stem_kernel,
            self.stem_stride,
            padding=((pt, pt), (pl, pl)),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="stem_conv",
        )(x)
        x = _layer_norm(self.dtype, self.param_dtype, "stem_norm")(x)
        # Stochastic depth grows linearly from 0 to drop_path_rate over all blocks (torch.linspace).
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()
        block_index = 0
        for stage, (depth, dim) in enumerate(zip(self.depths, self.dims)):
            if stage > 0:
                x = _layer_norm(self.dtype, self.param_dtype, f"downsample{stage}_norm")(x)
                x = PatchConv(dim, (2, 2), (2, 2), dtype=self.dtype, param_dtype=self.param_dtype, name=f"downsample{stage}_conv")(x)
            for block in range(depth):
                x = ConvNeXtBlock(
                    drop_path_rate=rates[block_index],
                    layer_scale_init=self.layer_scale_init,
                    depthwise_impl=self.depthwise_impl,
                    matmul_impl=self.matmul_impl,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"stage{stage}_block{block}",
                )(x, train)
                block_index += 1
        return x


class AudioConvNeXt(nn.Module):
    """The audio ConvNeXt: raw 32 kHz waveform (B, samples) → dict of outputs.

    Outputs: ``logits`` and ``probs`` (B, classes, float32), ``scene_embedding`` (B, C) — the
    LayerNorm of max_t + mean_t, the classifier's input —, ``frame_embeddings`` (B, T', F', C),
    the last stage's output (31 × 7 × 768 for 10 s), and ``sequence_embeddings`` (B, T', C),
    its mean over mel (the 31 × 768 sequence used for captioning).
    """

    num_classes: int = 527
    depths: Sequence[int] = (3, 3, 9, 3)
    dims: Sequence[int] = (96, 192, 384, 768)
    stem: str = "252x56"
    drop_path_rate: float = 0.0
    layer_scale_init: float = 1e-6
    frontend: FrontendConfig = FrontendConfig(n_mels=224)
    depthwise_impl: DepthwiseImpl = "auto"
    matmul_impl: MatmulImpl = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, waveform: jax.Array, train: bool = False, logmel_hook: LogMelHook | None = None) -> dict[str, Any]:
        if self.stem not in STEM_VARIANTS:
            raise UserError(f"unknown stem {self.stem!r}; expected one of {sorted(STEM_VARIANTS)}")
        x = normalised_log_mel(waveform, self.frontend, train, logmel_hook, self.dtype, self.param_dtype)
        stem = STEM_VARIANTS[self.stem]
        frames = ConvNeXtTrunk(
            depths=self.depths,
            dims=self.dims,
            stem_kernel=stem["kernel"],
            stem_stride=stem["stride"],
            stem_padding=stem["padding"],
            drop_path_rate=self.drop_path_rate,
            layer_scale_init=self.layer_scale_init,
            depthwise_impl=self.depthwise_impl,
            matmul_impl=self.matmul_impl,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="trunk",
        )(x, train)
        sequence = jnp.mean(frames, axis=2)
        pooled = jnp.max(sequence, axis=1) + jnp.mean(sequence, axis=1)
        scene = _layer_norm(self.dtype, self.param_dtype, "head_norm")(pooled)
        logits = _dense(self.num_classes, self.dtype, self.param_dtype, "head", self.matmul_impl)(scene).astype(jnp.float32)
        return {
            "logits": logits,
            "probs": jax.nn.sigmoid(logits),
            "scene_embedding": scene.astype(jnp.float32),
            "frame_embeddings": frames,
            "sequence_embeddings": sequence,
        }


class ImageNetConvNeXt(nn.Module):
    """The plain ImageNet ConvNeXt (NHWC images → 1000 logits): the converter's parity target and
    the source of the audio model's ImageNet initialisation."""

    num_classes: int = 1000
    depths: Sequence[int] = (3, 3, 9, 3)
    dims: Sequence[int] = (96, 192, 384, 768)
    drop_path_rate: float = 0.0
    layer_scale_init: float = 1e-6
    depthwise_impl: DepthwiseImpl = "auto"
    matmul_impl: MatmulImpl = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> dict[str, Any]:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must have shape (batch, height, width, 3), got {tuple(images.shape)}")
        features = ConvNeXtTrunk(
            depths=self.depths,
            dims=self.dims,
            drop_path_rate=self.drop_path_rate,
            layer_scale_init=self.layer_scale_init,
            depthwise_impl=self.depthwise_impl,
            matmul_impl=self.matmul_impl,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="trunk",
        )(images.astype(self.dtype or jnp.float32), train)
        pooled = _layer_norm(self.dtype, self.param_dtype, "head_norm")(jnp.mean(features, axis=(1, 2)))
        logits = _dense(self.num_classes, self.dtype, self.param_dtype, "head", self.matmul_impl)(pooled).astype(jnp.float32)
        return {"logits": logits, "probs": jax.nn.softmax(logits), "scene_embedding": pooled.astype(jnp.float32)}
