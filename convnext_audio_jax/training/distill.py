"""Knowledge distillation loss (Schmid et al., ICASSP 2023): labels and a teacher's soft targets.

    loss = λ · BCE(σ(s), y) + (1 − λ) · BCE(σ(s / T), σ(t / T))

with s the student's logits, y the (mixed) labels, t the teacher's logits, λ = ``label_weight`` (Schmid et
al.: 0.1) and T = ``temperature`` (Schmid et al.: 1). Both BCE terms are the mean over examples and classes
in the with-logits form (``optax.sigmoid_binary_cross_entropy``: log-sigmoid, no overflow for large
logits). The distillation term is *not* multiplied by T², as in Schmid et al.'s code (at T = 1 the factor
is 1 anyway). Their code divides only the teacher's logits by T (BCE(σ(s), σ(t/T))); this module divides
both, as written above; the two agree at their T = 1.

Mixup: the teacher's targets are mixed like the labels, with the same λ per pair and the same pairing
(rows (2k, 2k + 1) → row k, :func:`convnext_audio_jax.training.augment.mix_pairs`), and it is the *probabilities*
σ(t/T) that are mixed, not the logits: BCE is linear in its target, so BCE(s, λ·p₁ + (1 − λ)·p₂) =
λ·BCE(s, p₁) + (1 − λ)·BCE(s, p₂), exactly the mixed loss of Schmid et al.'s code, and the same rule the
labels follow. Mixing logits would give σ(λ·t₁ + (1 − λ)·t₂), which is neither clip's belief nor their
mixture. With speed perturbation and SpecAugment the teacher row is the clean clip's: the teacher file
holds one prediction per clip, made without augmentation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from convnext_audio_jax.runtime.errors import UserError
from convnext_audio_jax.training.augment import mix_pairs


def teacher_targets(teacher_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """σ(t / T) in float32: the teacher's soft targets (teacher files store float16 logits)."""
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0; got {temperature}")
    return jax.nn.sigmoid(jnp.asarray(teacher_logits).astype(jnp.float32) / temperature)


def mixed_teacher_targets(teacher_logits: jax.Array, lambdas: jax.Array | None, temperature: float = 1.0) -> jax.Array:
    """The teacher's soft targets of a mixup batch: σ(t / T) of the 2B rows, mixed pairwise with the λ that
    mixed the inputs and labels → (B, C). ``lambdas=None`` (mixup off): the (R, C) targets unmixed."""
    probabilities = teacher_targets(teacher_logits, temperature)
    return probabilities if lambdas is None else mix_pairs(probabilities, lambdas)


def distillation_loss(student_logits: jax.Array, labels: jax.Array, teacher_probabilities: jax.Array,
                      label_weight: float = 0.1, temperature: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(loss, {"label_loss", "distillation_loss"})`` for a batch (see the module docstring).

    ``student_logits`` (B, C); ``labels`` (B, C) in [0, 1] (mixed when mixup is on); ``teacher_probabilities``
    (B, C) = :func:`mixed_teacher_targets`. The two parts are returned unweighted (each a mean BCE, for
    logging); ``loss = label_weight · label_loss + (1 − label_weight) · distillation_loss``. All float32."""
    if not 0.0 <= label_weight <= 1.0:
        raise ValueError(f"label_weight must be in [0, 1]; got {label_weight}")
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0; got {temperature}")
    if not student_logits.shape == labels.shape == teacher_probabilities.shape:
        raise ValueError(f"student logits {student_logits.shape}, labels {labels.shape} and teacher targets "
                         f"{teacher_probabilities.shape} must have the same (batch, classes) shape")
    student = student_logits.astype(jnp.float32)
    label_loss = optax.sigmoid_binary_cross_entropy(student, labels.astype(jnp.float32)).mean()
    kd_loss = optax.sigmoid_binary_cross_entropy(student / temperature,
                                                 teacher_probabilities.astype(jnp.float32)).mean()
    loss = label_weight * label_loss + (1.0 - label_weight) * kd_loss
    return loss, {"label_loss": label_loss, "distillation_loss": kd_loss}


@dataclasses.dataclass(frozen=True)
class Distillation:
    """The train step's distillation settings (``config.distill`` without the file): ``label_weight`` λ and
    ``temperature`` T, validated on construction."""

    label_weight: float = 0.1
    temperature: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.label_weight <= 1.0:
            raise UserError(f"distill.label_weight must be in [0, 1]; got {self.label_weight}")
        if not self.temperature > 0:
            raise UserError(f"distill.temperature must be > 0; got {self.temperature}")

    def loss(self, student_logits: jax.Array, labels: jax.Array, teacher_logits: jax.Array,
             lambdas: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """:func:`distillation_loss` of a batch whose labels are already mixed with ``lambdas`` (None: no
        mixup); ``teacher_logits`` are the (R, C) rows of the clean clips, mixed here alike."""
        teacher = mixed_teacher_targets(teacher_logits, lambdas, self.temperature)
        return distillation_loss(student_logits, labels, teacher, self.label_weight, self.temperature)
