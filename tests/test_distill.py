"""Distillation loss and teacher-target mixup against a direct float64 numpy computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convnext_audio_jax.data import pipeline
from convnext_audio_jax.training import augment, distill


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_bce(probabilities, targets):
    """torch's BCELoss on probabilities, in float64 (elementwise)."""
    return -(targets * np.log(probabilities) + (1 - targets) * np.log(1 - probabilities))


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    pairs, classes = 6, 7
    return {
        "student": rng.normal(0, 3, (pairs, classes)).astype(np.float32),
        "teacher": rng.normal(0, 3, (2 * pairs, classes)).astype(np.float32),
        "labels": (rng.random((2 * pairs, classes)) < 0.3).astype(np.float32),
        "lambdas": rng.random(pairs).astype(np.float32),
        "id": np.array([f"clip{i}" for i in range(2 * pairs)]),
        "waveform": rng.normal(size=(2 * pairs, 5)).astype(np.float32),
    }


@pytest.mark.parametrize("label_weight,temperature", [(0.1, 1.0), (0.3, 2.5), (0.0, 1.0), (1.0, 0.5)])
def test_loss_with_mixup_equals_numpy(batch, label_weight, temperature):
    # The pairing the loader promises: rows (2k, 2k+1) are pair k (pipeline.mixup_pairs).
    first, second = pipeline.mixup_pairs({k: batch[k] for k in ("waveform", "id", "teacher", "labels")})
    lam = batch["lambdas"].astype(np.float64)[:, None]
    t1, t2 = first["teacher"].astype(np.float64), second["teacher"].astype(np.float64)
    p_teacher = lam * np_sigmoid(t1 / temperature) + (1 - lam) * np_sigmoid(t2 / temperature)
    mixed_labels = lam * first["labels"] + (1 - lam) * second["labels"]
    s = batch["student"].astype(np.float64)
    label_loss = np_bce(np_sigmoid(s), mixed_labels).mean()
    kd_loss = np_bce(np_sigmoid(s / temperature), p_teacher).mean()
    # Schmid et al.'s form: the loss against each pair member's targets, mixed with λ — the same number.
    schmid = (lam * np_bce(np_sigmoid(s / temperature), np_sigmoid(t1 / temperature))
              + (1 - lam) * np_bce(np_sigmoid(s / temperature), np_sigmoid(t2 / temperature))).mean()
    np.testing.assert_allclose(kd_loss, schmid, rtol=1e-12)

    lambdas = jnp.asarray(batch["lambdas"])
    teacher = distill.mixed_teacher_targets(jnp.asarray(batch["teacher"], jnp.float16), lambdas, temperature)
    np.testing.assert_allclose(np.asarray(teacher), p_teacher, atol=2e-3)  # float16 teacher logits
    teacher = distill.mixed_teacher_targets(jnp.asarray(batch["teacher"]), lambdas, temperature)
    np.testing.assert_allclose(np.asarray(teacher), p_teacher, atol=1e-6)
    labels = augment.mix_pairs(jnp.asarray(batch["labels"]), lambdas)
    loss, parts = jax.jit(distill.distillation_loss, static_argnums=(3, 4))(
        jnp.asarray(batch["student"]), labels, teacher, label_weight, temperature)
    np.testing.assert_allclose(float(parts["label_loss"]), label_loss, rtol=1e-5)
    np.testing.assert_allclose(float(parts["distillation_loss"]), kd_loss, rtol=1e-5)
    np.testing.assert_allclose(float(loss), label_weight * label_loss + (1 - label_weight) * kd_loss, rtol=1e-5)


def test_same_lambdas_as_the_train_steps_mixup(batch):
    """The λ that logmel_augmentation_with_lambdas returns are the ones that mixed the labels (and, through
    the hook, the log-mel): the λ the teacher targets are mixed with."""
    key = jax.random.key(3)
    config = augment.AugmentConfig(spec_augment=False, speed_perturb=False)
    hook, labels, lambdas = augment.logmel_augmentation_with_lambdas(key, jnp.asarray(batch["labels"]), config)
    lam = np.asarray(lambdas, np.float64)[:, None]
    np.testing.assert_allclose(np.asarray(labels), lam * batch["labels"][0::2] + (1 - lam) * batch["labels"][1::2],
                               atol=1e-6)
    logmel = jnp.asarray(np.random.default_rng(1).normal(size=(12, 4, 3)), jnp.float32)
    np.testing.assert_allclose(np.asarray(hook(logmel)), np.asarray(augment.mix_pairs(logmel, lambdas)), atol=1e-6)
    _, same_labels = augment.logmel_augmentation(key, jnp.asarray(batch["labels"]), config)
    np.testing.assert_array_equal(np.asarray(same_labels), np.asarray(labels))
    teacher = distill.mixed_teacher_targets(jnp.asarray(batch["teacher"]), lambdas)
    p = np_sigmoid(batch["teacher"].astype(np.float64))
    np.testing.assert_allclose(np.asarray(teacher), lam * p[0::2] + (1 - lam) * p[1::2], atol=1e-6)


def test_without_mixup_and_mixing_probabilities_not_logits(batch):
    t = jnp.asarray(batch["teacher"])
    np.testing.assert_allclose(np.asarray(distill.mixed_teacher_targets(t, None, 2.0)),
                               np_sigmoid(batch["teacher"].astype(np.float64) / 2.0), atol=1e-6)
    lambdas = jnp.full((6,), 0.5)
    mixed = np.asarray(distill.mixed_teacher_targets(t, lambdas))
    of_mixed_logits = np_sigmoid(0.5 * batch["teacher"][0::2] + 0.5 * batch["teacher"][1::2])
    assert np.abs(mixed - of_mixed_logits).max() > 0.05  # the two rules differ; we mix probabilities


def test_gradient_and_stability():
    s = jnp.array([[-200.0, -3.0, 0.0, 4.0, 300.0]])
    labels = jnp.array([[0.0, 1.0, 0.5, 0.0, 1.0]])
    teacher = distill.teacher_targets(jnp.array([[-50.0, -1.0, 2.0, 3.0, 60.0]]), 2.0)
    grad = jax.grad(lambda s: distill.distillation_loss(s, labels, teacher, 0.25, 2.0)[0])(s)
    loss, parts = distill.distillation_loss(s, labels, teacher, 0.25, 2.0)
    assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in parts.values())
    s64 = np.asarray(s, np.float64)
    expected = (0.25 * (np_sigmoid(s64) - np.asarray(labels)) + 0.75 * (np_sigmoid(s64 / 2) - np.asarray(teacher)) / 2)
    np.testing.assert_allclose(np.asarray(grad), expected / s.size, atol=1e-7)


def test_bad_arguments(batch):
    s = jnp.asarray(batch["student"])
    with pytest.raises(ValueError, match="label_weight"):
        distill.distillation_loss(s, s, s, 1.5)
    with pytest.raises(ValueError, match="temperature"):
        distill.teacher_targets(s, 0.0)
    with pytest.raises(ValueError, match="same"):
        distill.distillation_loss(s, s[:2], s)
    with pytest.raises(ValueError, match="label_weight"):
        distill.Distillation(label_weight=-0.1)
    with pytest.raises(ValueError, match="temperature"):
        distill.Distillation(temperature=0.0)
