"""The optimizer: AdamW with decay on multi-axis parameters only and a torch-OneCycleLR learning rate (and
optionally β1) schedule, plus the same learning rate computed on the host for logging (no device call)."""

from __future__ import annotations

import math
import types
from typing import Any

import jax
import jax.numpy as jnp
import optax

from convnext_audio_jax.runtime import xla
from convnext_audio_jax.training.config import ConfigError


def _one_cycle_points(total_steps: int, warmup_fraction: float) -> tuple[float, float]:
    peak_step = float(warmup_fraction * total_steps) - 1.0
    last_step = float(total_steps - 1)
    if peak_step <= 0 or last_step <= peak_step:
        raise ConfigError(f"total_steps {total_steps} is too short for a one-cycle schedule peaking at {warmup_fraction:.0%}")
    return peak_step, last_step


def one_cycle(start: float, peak: float, end: float, total_steps: int, warmup_fraction: float = 0.3) -> optax.Schedule:
    """torch ``OneCycleLR``'s two-phase cosine curve (``anneal_strategy='cos'``) as an optax schedule.

    Step 0 is ``start``, step ``warmup_fraction·total_steps - 1`` is ``peak`` and step ``total_steps - 1`` is
    ``end``; each phase is a half cosine between its ends, and steps past the last keep extrapolating the
    second phase, as torch does. Used for the learning rate and for β1 (0.95 → 0.85 → 0.95).
    """
    peak_step, last_step = _one_cycle_points(total_steps, warmup_fraction)

    def cosine(a, b, fraction):
        # torch's b + (a - b)/2·(cos(π·f) + 1) as a weighted mean with weight cos²(π·f/2): the same value,
        # but exact at both ends and without float32 cancellation near f = 1.
        weight = jnp.cos(jnp.pi / 2.0 * fraction) ** 2
        return a * weight + b * (1.0 - weight)

    def schedule(count):
        step = jnp.asarray(count, jnp.float32)
        rising = cosine(start, peak, step / peak_step)
        falling = cosine(peak, end, (step - peak_step) / (last_step - peak_step))
        return jnp.where(step <= peak_step, rising, falling)

    return schedule


def _one_cycle_endpoints(optimizer_config) -> tuple[float, float, float]:
    start = optimizer_config.peak_learning_rate / optimizer_config.initial_div_factor
    return start, optimizer_config.peak_learning_rate, start / optimizer_config.final_div_factor


def learning_rate_schedule(optimizer_config, total_steps: int) -> optax.Schedule:
    """The device-side learning rate schedule the optimizer uses."""
    if optimizer_config.schedule == "constant":
        return optax.constant_schedule(optimizer_config.peak_learning_rate)
    start, peak, end = _one_cycle_endpoints(optimizer_config)
    return one_cycle(start, peak, end, total_steps, optimizer_config.warmup_fraction)


def host_learning_rate(optimizer_config, total_steps: int, step: int) -> float:
    """``learning_rate_schedule(...)(step)`` computed in Python floats on the host, for logging."""
    if optimizer_config.schedule == "constant":
        return float(optimizer_config.peak_learning_rate)
    start, peak, end = _one_cycle_endpoints(optimizer_config)
    peak_step, last_step = _one_cycle_points(total_steps, optimizer_config.warmup_fraction)
    if step <= peak_step:
        a, b, fraction = start, peak, step / peak_step
    else:
        a, b, fraction = peak, end, (step - peak_step) / (last_step - peak_step)
    weight = math.cos(math.pi / 2.0 * fraction) ** 2
    return a * weight + b * (1.0 - weight)


def weight_decay_mask(params) -> Any:
    """True for the parameters weight decay applies to: every one with more than one axis (conv and dense
    kernels); biases, norm scales/offsets, layer-scale γ and bn0 (all 1-D) are left alone."""
    return jax.tree.map(lambda p: len(p.shape) > 1, params)


def make_optimizer(optimizer_config, total_steps: int) -> optax.GradientTransformation:
    """AdamW with the one-cycle learning rate (and β1 when ``cycle_beta1``), masked decay, optional clipping.
    The decay mask is a function of the parameters (optax calls it on them), so no parameter shapes are needed
    to build it: a model's shapes cost a trace of its initialisation."""
    return _optimizer(tuple(sorted(optimizer_config.items())), total_steps)


@xla.reused  # the same settings give the same optimizer, so the programs built on it are reused too
def _optimizer(settings: tuple, total_steps: int) -> optax.GradientTransformation:
    optimizer_config = types.SimpleNamespace(**dict(settings))
    b1 = optimizer_config.b1
    if optimizer_config.cycle_beta1:
        b1 = one_cycle(optimizer_config.beta1_high, optimizer_config.beta1_low, optimizer_config.beta1_high,
                       total_steps, optimizer_config.warmup_fraction)
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=learning_rate_schedule(optimizer_config, total_steps),
        b1=b1,
        b2=optimizer_config.b2,
        eps=optimizer_config.eps,
        weight_decay=optimizer_config.weight_decay,
        mask=weight_decay_mask,
    )
    if optimizer_config.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optimizer_config.grad_clip_norm), adamw)
    return adamw
