"""The named outputs every tool takes from a model (one table), and where a model's time steps lie.

A model's ``apply`` returns ``logits``, ``probs``, ``scene_embedding`` and ``frame_embeddings`` (the last stage's
(T, F, C) grid); the table adds ``sequence_embeddings`` (that grid averaged over the mel axis: T time steps of C)
and, for the audio ConvNeXt, ``frame_probs`` (a score per time step). Export, tagging, embeddings, HEAR and
teacher predictions all pick their outputs from `OUTPUTS` by name through `output_selector`.

Time steps (docs/glossary.md, *step*): step t of the last stage covers the STFT frames [t·S − P, (t+1)·S − P) of
its window, S = the time stride in STFT frames and P = the frames the stem pads in front (`step_grid`).
The score of step t (ConvNeXt) is the clip head applied to a window whose every step equals s_t: the head reads
LayerNorm(max_t + mean_t), so that is ``sigmoid(Dense(LayerNorm(2 · s_t)))``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from convnext_audio_jax.models.convnext import LN_EPS, STEM_VARIANTS, AudioConvNeXt
from convnext_audio_jax.models.dense import Dense
from convnext_audio_jax.models.norm import LayerNorm
from convnext_audio_jax.models.panns import PannCNN
from convnext_audio_jax.runtime.errors import UserError
from convnext_audio_jax.runtime.forward import OutputSelector

# `convnext-audio embed --kind` → the output that holds it.
EMBEDDING_KINDS = {"scene": "scene_embedding", "frames": "frame_embeddings", "sequence": "sequence_embeddings",
                   "logits": "logits"}
# What an export holds (``frame_probs`` too where the model has frame scores).
EXPORTED_OUTPUTS = ("probs", "scene_embedding", "sequence_embeddings")


def step_grid(model: nn.Module) -> tuple[int, int] | None:
    """(S, P) of the model's last-stage time steps in STFT frames (see the module doc): the audio ConvNeXt and
    the PANN CNNs; None for a model without a known grid."""
    if isinstance(model, AudioConvNeXt):
        stem = STEM_VARIANTS[model.stem]
        return stem["stride"][0] * 2 ** (len(model.depths) - 1), stem["padding"][0]
    if isinstance(model, PannCNN):
        return int(np.prod([pool[0] for pool in model.pools])), 0
    return None


def has_frame_scores(model: nn.Module) -> bool:
    """Whether ``frame_probs`` exists: the audio ConvNeXt's head can score one time step."""
    return isinstance(model, AudioConvNeXt)


def step_bounds(model: nn.Module, num_steps: int) -> np.ndarray:
    """(num_steps, 2) start/end seconds of each last-stage time step within a window, clipped to the window."""
    grid = step_grid(model)
    if grid is None:
        raise UserError(f"{type(model).__name__} has no known time-step grid")
    stride, padding = grid
    seconds_per_frame = model.frontend.hop_length / model.frontend.sample_rate
    steps = np.arange(num_steps)
    bounds = np.stack([steps * stride - padding, (steps + 1) * stride - padding], axis=1) * seconds_per_frame
    return np.clip(bounds, 0.0, model.frontend.clip_seconds)


def frame_logits(model: AudioConvNeXt, params: Mapping[str, Any], sequence: jax.Array) -> jax.Array:
    """(B, T, C) per-step logits Dense(LayerNorm(2·s_t)) of a (B, T, D) sequence (see the module doc)."""
    norm = LayerNorm(epsilon=LN_EPS, dtype=model.dtype)
    dense = Dense(model.num_classes, dtype=model.dtype, impl=model.matmul_impl)
    normalised = norm.apply({"params": params["head_norm"]}, 2.0 * sequence)
    return dense.apply({"params": params["head"]}, normalised).astype(jnp.float32)


def sequence_of(outputs: Mapping[str, jax.Array]) -> jax.Array:
    """(B, T, C) time sequence: the last stage's output averaged over the mel axis (any model)."""
    if "sequence_embeddings" in outputs:
        return outputs["sequence_embeddings"]
    return jnp.mean(outputs["frame_embeddings"], axis=2)


def _frame_probs(model, variables, outputs):
    sequence = sequence_of(outputs).astype(jnp.float32)
    return jax.nn.sigmoid(frame_logits(model, variables["params"], sequence))


# name → (model, variables, outputs) → array
OUTPUTS: dict[str, Callable[[nn.Module, Mapping[str, Any], Mapping[str, jax.Array]], jax.Array]] = {
    "logits": lambda model, variables, outputs: outputs["logits"],
    "probs": lambda model, variables, outputs: outputs["probs"],
    "scene_embedding": lambda model, variables, outputs: outputs["scene_embedding"],
    "frame_embeddings": lambda model, variables, outputs: outputs["frame_embeddings"],
    "sequence_embeddings": lambda model, variables, outputs: sequence_of(outputs),
    "frame_probs": _frame_probs,
}


def available_outputs(model: nn.Module) -> tuple[str, ...]:
    return tuple(name for name in OUTPUTS if name != "frame_probs" or has_frame_scores(model))


def exported_outputs(model: nn.Module) -> tuple[str, ...]:
    """The outputs an export of ``model`` holds, in order."""
    return EXPORTED_OUTPUTS + (("frame_probs",) if has_frame_scores(model) else ())


def output_selector(model: nn.Module, names: Sequence[str], aliases: Mapping[str, str] | None = None) -> OutputSelector:
    """The `OutputSelector` that returns ``names`` (float32), each under ``aliases.get(name, name)``."""
    unknown = [name for name in names if name not in available_outputs(model)]
    if unknown:
        raise UserError(f"{type(model).__name__} has no output(s) {unknown}; it has {list(available_outputs(model))}")
    aliases = dict(aliases or {})

    def select(variables, outputs):
        return {aliases.get(name, name): OUTPUTS[name](model, variables, outputs).astype(jnp.float32) for name in names}

    return select
