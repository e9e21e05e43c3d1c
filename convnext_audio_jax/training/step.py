"""The train state and the jitted, data-parallel train step.

The step, all on the device: int16 waveform → float → speed perturbation → log-mel → bn0 → SpecAugment →
mixup (2B clips in, B out, targets mixed alike) → model (drop path) → BCE with logits → optimizer update.
With knowledge distillation the batch also carries the teacher's logits of each (clean) clip; they are mixed
with the same λ and pairing as the labels and the loss is ``distill.distillation_loss``.
When devices × ``per_device_batch_size`` is below ``batch_size`` the step scans over micro-batches and
averages their gradients. Randomness: a base key in the state, folded with the step and the micro-batch
index; each augmentation (and drop path) draws per example for the whole batch, so an example gets the same
values whichever device holds it (dropout masks, drawn per element, are drawn per device).

Each device runs the step on its own rows (``sharding.per_device``): the front end's FFT and the CPU kernels
never see another device's rows, bn0/BatchNorm statistics are summed over the devices (a few floats per
channel), and the summed gradients of all micro-batches leave the device in one all-reduce, so the loss, the
statistics and the gradients are those of the whole batch (one device computes the same step: see the tests)
and the only communication of a step is about the size of the gradients, whatever the batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from convnext_audio_jax.data.audio import int16_to_float
from convnext_audio_jax.models import init_variables
from convnext_audio_jax.runtime import sharding, xla
from convnext_audio_jax.runtime.sharding import batch_spec
from convnext_audio_jax.training.augment import (
    AugmentConfig,
    augment_waveform,
    logmel_augmentation_with_lambdas,
)
from convnext_audio_jax.training.distill import Distillation


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. ``rng`` is the raw data of the run's base key (stored as uint32 so
    checkpoints hold a plain array); a step's key is ``fold_in(key, step)``."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array

    def as_dict(self) -> dict:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


def init_train_state(model: nn.Module, tx: optax.GradientTransformation, seed: int, mesh) -> TrainState:
    """Random initial state, created by a jitted function directly in its replicated sharding."""

    def init(key):
        init_key, train_key = jax.random.split(key)
        variables = init_variables(model, init_key)
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
            rng=jax.random.key_data(train_key),
        )

    key = jax.random.key(seed)
    if isinstance(key, jax.core.Tracer):  # inside a caller's jit or eval_shape, which compiles it with its options
        return init(key)
    return xla.jit(init, out_shardings=NamedSharding(mesh, P()), compiler_options=xla.RUN_ONCE_COMPILER_OPTIONS)(key)


def classification_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Binary cross-entropy of the sigmoid outputs, averaged over examples and classes (torch's BCELoss)."""
    return optax.sigmoid_binary_cross_entropy(logits, targets).mean()


def waveform_to_float(waveform: jax.Array) -> jax.Array:
    """Loader batches carry int16 samples (half the transfer); the model takes float32 in [-1, 1]."""
    if waveform.dtype == jnp.int16:
        return int16_to_float(waveform)
    return waveform.astype(jnp.float32)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, augment: AugmentConfig,
                    accumulation_steps: int, mesh,
                    loss_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
                    distillation: Distillation | None = None,
                    skip_nonfinite: bool = False,
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The jitted step ``(state, batch) -> (state, {"loss", "grad_norm"})``; the state is donated.

    ``batch`` is {"waveform": (R, L) int16|float32, "target": (R, C)} sharded on 'data', with R = 2B rows when
    mixup is on. With accumulation the rows are split into micro-batches device by device (each device's
    rows stay on it and mixup pairs stay together), and the gradients of the micro-batches are averaged;
    BatchNorm statistics are updated micro-batch after micro-batch. ``loss_fn(logits, targets)`` defaults
    to :func:`classification_loss`.

    With ``distillation`` the batch also holds "teacher": (R, C) teacher logits (float16/float32) of the same
    rows, split and sharded like "target"; the loss is ``distillation.loss`` and the metrics gain its two parts,
    "label_loss" and "distillation_loss" (means over the micro-batches, like "loss").

    ``skip_nonfinite`` (``config.on_nonfinite = "skip_batch"``): a step whose loss or gradient norm is NaN/Inf
    keeps params, batch_stats and opt_state (so also the schedule's count) as they were and only advances
    ``step``; selected on the device, so no host sync is added. The host sees the same non-finite metrics.
    """
    if distillation is not None and loss_fn is not None:
        raise ValueError("make_train_step takes loss_fn or distillation, not both")
    loss_fn = loss_fn or classification_loss
    replicated = NamedSharding(mesh, P())
    rows = batch_spec(mesh)

    def local_gradients(params, batch_stats, rng, step_number, waveform, target, teacher):
        """Per device, on its rows: the micro-batches' summed gradients of their local mean losses, then one
        all-reduce of everything the host or the update needs."""
        step_key = jax.random.fold_in(jax.random.wrap_key_data(rng), step_number)

        def split(x):  # this device's rows → (K, rows / K, ...): micro-batch k is its k-th block
            return x.reshape((accumulation_steps, x.shape[0] // accumulation_steps) + x.shape[1:])

        def micro_step(carry, inputs):
            grad_sum, batch_stats = carry
            waveform, target, teacher, index = inputs
            speed_key, logmel_key, drop_path_key, dropout_key = jax.random.split(jax.random.fold_in(step_key, index), 4)
            waveform = augment_waveform(speed_key, waveform, augment)
            hook, target, lambdas = logmel_augmentation_with_lambdas(logmel_key, target, augment)

            def objective(params):
                outputs, updates = model.apply(
                    {"params": params, "batch_stats": batch_stats}, waveform, train=True, logmel_hook=hook,
                    mutable=["batch_stats"],
                    rngs={"drop_path": drop_path_key, "dropout": sharding.fold_in_device(dropout_key)},
                )
                if distillation is None:
                    loss, parts = loss_fn(outputs["logits"], target), {}
                else:
                    loss, parts = distillation.loss(outputs["logits"], target, teacher, lambdas)
                return loss, (updates.get("batch_stats", {}), parts)

            (loss, (batch_stats, parts)), grads = jax.value_and_grad(objective, has_aux=True)(params)
            return (jax.tree.map(jnp.add, grad_sum, grads), batch_stats), {"loss": loss, **parts}

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grad_sum, batch_stats), losses = jax.lax.scan(
            micro_step, (zeros, batch_stats),
            (split(waveform_to_float(waveform)), split(target.astype(jnp.float32)), split(teacher),
             jnp.arange(accumulation_steps)))
        # Every device's rows are as many, so the global mean is the mean of the devices' means.
        scale = 1.0 / (accumulation_steps * sharding.device_count())
        grad_sum, losses = sharding.global_sum((grad_sum, jax.tree.map(jnp.sum, losses)))
        return jax.tree.map(lambda g: g * scale, grad_sum), batch_stats, jax.tree.map(lambda v: v * scale, losses)

    per_device_gradients = sharding.per_device(local_gradients, mesh, (P(), P(), P(), P(), rows, rows, rows),
                                               (P(), P(), P()))

    def step(state: TrainState, batch: dict):
        # Without distillation a placeholder of one value per row keeps the scan's inputs uniform.
        teacher = batch["teacher"] if distillation is not None else jnp.zeros(batch["target"].shape[:1], jnp.float32)
        grads, batch_stats, metrics = per_device_gradients(state.params, state.batch_stats, state.rng, state.step,
                                                           batch["waveform"], batch["target"], teacher)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        grad_norm = optax.global_norm(grads)
        updated = {"params": optax.apply_updates(state.params, updates), "batch_stats": batch_stats,
                   "opt_state": opt_state}
        if skip_nonfinite:
            finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
            previous = {"params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state}
            updated = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, previous)
        return state.replace(step=state.step + 1, **updated), {**metrics, "grad_norm": grad_norm}

    batch_sharding = NamedSharding(mesh, rows)
    return xla.jit(step, in_shardings=(replicated, batch_sharding), out_shardings=(replicated, replicated),
                   donate_argnums=(0,))


def global_batch(local_batch: dict, mesh, keys=("waveform", "target", "teacher")) -> dict:
    """This host's rows of each array among ``keys`` (those it has) → one global array sharded on 'data'."""
    batch_sharding = NamedSharding(mesh, batch_spec(mesh))
    return {key: jax.make_array_from_process_local_data(batch_sharding, np.asarray(local_batch[key]))
            for key in keys if key in local_batch}
