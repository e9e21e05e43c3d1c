"""On-device training augmentations of the paper (section 6.1): SpecAugment, mixup and speed perturbation.

Every function is jittable with static shapes and draws its randomness per example (one draw of shape (B, …)
from the given key, so each row gets its own values); run per device (``sharding.per_device``) it takes its
rows of the draw for the whole global batch, so an example's values do not depend on the device holding it. The train step calls them in the paper's order:

    waveform --speed_perturb--> log-mel (+ bn0) --spec_augment--> mixup --> model

:class:`AugmentConfig` switches each one on or off; :func:`augment_waveform` and :func:`logmel_augmentation`
apply an enabled set with one key each (the latter as the model's ``logmel_hook``, with the targets mixed alike).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from convnext_audio_jax.runtime import sharding
from convnext_audio_jax.runtime.errors import UserError


def _stripe_mask(rng: jax.Array, batch: int, size: int, stripes: int, max_width: int) -> jax.Array:
    """(batch, size) bool mask of ``stripes`` stripes per example, as torchlibrosa's ``DropStripes`` draws
    them: width uniform in [0, max_width), start uniform in [0, size - width) (both bounds exclusive, as
    ``torch.randint``'s ``high``), so a stripe may have width 0 and never touches the last position."""
    width_key, start_key = jax.random.split(rng)

    def draw(rows):
        widths = jax.random.randint(width_key, (rows, stripes), 0, max_width)
        return widths, jax.random.randint(start_key, (rows, stripes), 0, size - widths)

    widths, starts = sharding.rows_of_global_draw(draw, batch)
    positions = jnp.arange(size)[None, None, :]
    inside = (positions >= starts[..., None]) & (positions < (starts + widths)[..., None])
    return inside.any(axis=1)


# Jitted (static settings) so eager calls compile once; inside the jitted train step they are simply inlined.
@functools.partial(jax.jit, static_argnames=("time_stripes", "time_max_width", "freq_stripes", "freq_max_width"))
def spec_augment(
    rng: jax.Array,
    x: jax.Array,
    *,
    time_stripes: int = 2,
    time_max_width: int = 64,
    freq_stripes: int = 2,
    freq_max_width: int = 28,
) -> jax.Array:
    """SpecAugment as in PANNs (torchlibrosa ``SpecAugmentation``): zero ``time_stripes`` time stripes and
    then ``freq_stripes`` frequency stripes, drawn independently for every example.

    ``x`` is (B, T, F) or (B, T, F, …) (trailing axes, e.g. a channel axis, share the example's stripes).
    Widths are uniform in [0, max_width) and starts in [0, size - width), as torchlibrosa draws them (paper:
    2 stripes < 64 frames, 2 stripes < 28 mel bins for 224 mels; < 8 for 64-mel CNNs). Dtype is preserved.
    """
    if x.ndim < 3:
        raise ValueError(f"spec_augment expects (batch, time, freq, ...); got shape {x.shape}")
    batch, num_frames, num_bins = x.shape[:3]
    for name, stripes, max_width, size in (
        ("time", time_stripes, time_max_width, num_frames),
        ("freq", freq_stripes, freq_max_width, num_bins),
    ):
        if stripes < 0:
            raise UserError(f"{name}_stripes must be >= 0; got {stripes}")
        if stripes and not 1 <= max_width <= size:
            raise UserError(f"{name}_max_width must be in [1, {size}] (the {name} axis length); got {max_width}")
    time_key, freq_key = jax.random.split(rng)
    dropped = jnp.zeros((batch, num_frames, num_bins), dtype=bool)
    if time_stripes:
        dropped |= _stripe_mask(time_key, batch, num_frames, time_stripes, time_max_width)[:, :, None]
    if freq_stripes:
        dropped |= _stripe_mask(freq_key, batch, num_bins, freq_stripes, freq_max_width)[:, None, :]
    dropped = dropped.reshape(dropped.shape + (1,) * (x.ndim - 3))
    return jnp.where(dropped, jnp.zeros((), x.dtype), x)


@functools.partial(jax.jit, static_argnames=("num_pairs", "alpha"))
def mixup_lambdas(rng: jax.Array, num_pairs: int, alpha: float = 1.0) -> jax.Array:
    """One mixing weight λ ~ Beta(alpha, alpha) per pair, shape (num_pairs,), float32 (paper: alpha 1)."""
    if alpha <= 0:
        raise UserError(f"mixup alpha must be > 0; got {alpha}")
    if alpha == 1.0:
        # Beta(1, 1) is the uniform distribution; drawing it directly avoids the gamma sampler's slow compile.
        return jax.random.uniform(rng, (num_pairs,), jnp.float32)
    return jax.random.beta(rng, alpha, alpha, (num_pairs,), dtype=jnp.float32)


@jax.jit
def mix_pairs(x: jax.Array, lambdas: jax.Array) -> jax.Array:
    """PANNs' ``do_mixup``: rows (0,1), (2,3)… → ``x[0::2]·λ + x[1::2]·(1-λ)``, (2B, …) → (B, …).

    Works on any array whose first axis is the 2B batch (log-mel, targets). The result has ``x``'s dtype when
    that is floating (bf16 stays bf16), float32 otherwise (e.g. bool targets).
    """
    if x.shape[0] % 2:
        raise ValueError(f"mixup needs an even batch of consecutive pairs; got {x.shape[0]} rows")
    if lambdas.shape != (x.shape[0] // 2,):
        raise ValueError(f"need one lambda per pair: shape ({x.shape[0] // 2},) for {x.shape[0]} rows; got {lambdas.shape}")
    out_dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    weights = lambdas.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    first, second = x[0::2].astype(jnp.float32), x[1::2].astype(jnp.float32)
    return (first * weights + second * (1.0 - weights)).astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("min_rate", "max_rate", "p"))
def speed_perturb(
    rng: jax.Array,
    waveform: jax.Array,
    *,
    min_rate: float = 0.5,
    max_rate: float = 1.5,
    p: float = 1.0,
) -> jax.Array:
    """Speed perturbation: per example, resample (B, L) waveforms by a rate uniform in [min_rate, max_rate]
    with probability ``p``, then pad or crop back to L at a random offset.

    Nearest-neighbour resampling: sample k of the stretched signal is ``waveform[floor(k·rate)]``, so rate 2
    keeps every other sample (half the length, pitch and tempo up) and rate 0.5 repeats each sample twice.
    The stretched signal has M = ceil(L / rate) samples. If M > L, a window of L samples starting at an offset
    uniform in [0, M - L] is kept (random crop); if M < L, the signal is placed at an offset uniform in
    [0, L - M] between zeros (random pad). Examples not drawn (probability 1 - p) are returned unchanged.
    Computed as one gather with index arithmetic and a mask, so shapes are static and it jits. Indices are
    computed in float32 (JAX's default), which can move a source index by one sample at rare points of long
    clips with fractional rates; rates such as 2 or 0.5 are exact.
    """
    if waveform.ndim != 2:
        raise ValueError(f"speed_perturb expects (batch, samples) waveforms; got shape {waveform.shape}")
    if not 0 < min_rate <= max_rate:
        raise UserError(f"need 0 < min_rate <= max_rate; got min_rate={min_rate}, max_rate={max_rate}")
    if not 0.0 <= p <= 1.0:
        raise UserError(f"p must be a probability in [0, 1]; got {p}")
    batch, length = waveform.shape
    rate_key, offset_key, apply_key = jax.random.split(rng, 3)

    def draw(rows):
        rates = jax.random.uniform(rate_key, (rows,), jnp.float32, min_rate, max_rate)
        rates = jnp.where(jax.random.uniform(apply_key, (rows,)) < p, rates, 1.0)
        surplus = jnp.ceil(length / rates).astype(jnp.int32) - length  # > 0: crop that many samples, < 0: pad
        return rates, jax.random.randint(offset_key, (rows,), jnp.minimum(surplus, 0), jnp.maximum(surplus, 0) + 1)

    rates, offsets = sharding.rows_of_global_draw(draw, batch)
    stretched_length = jnp.ceil(length / rates).astype(jnp.int32)

    # Output sample i is stretched sample i + offset, i.e. source sample floor((i + offset)·rate).
    stretched_index = jnp.arange(length, dtype=jnp.int32)[None, :] + offsets[:, None]
    source_index = jnp.floor(stretched_index.astype(jnp.float32) * rates[:, None]).astype(jnp.int32)
    inside = (stretched_index >= 0) & (stretched_index < stretched_length[:, None]) & (source_index < length)
    gathered = jnp.take_along_axis(waveform, jnp.clip(source_index, 0, length - 1), axis=1)
    return jnp.where(inside, gathered, jnp.zeros((), waveform.dtype))


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations the train step applies, with the paper's settings as defaults.

    ``speed_perturb_p`` defaults to 0.5, the probability in the authors' code (the paper does not state one).
    With ``mixup`` on, the loader must deliver 2B clips per step; the step then trains on B mixed rows.
    """

    spec_augment: bool = True
    time_stripes: int = 2
    time_max_width: int = 64
    freq_stripes: int = 2
    freq_max_width: int = 28
    mixup: bool = True
    mixup_alpha: float = 1.0
    speed_perturb: bool = True
    speed_min_rate: float = 0.5
    speed_max_rate: float = 1.5
    speed_perturb_p: float = 0.5


def augment_waveform(rng: jax.Array, waveform: jax.Array, config: AugmentConfig) -> jax.Array:
    """The waveform-side augmentation (speed perturbation) when enabled; the waveform unchanged otherwise."""
    if not config.speed_perturb:
        return waveform
    return speed_perturb(
        rng, waveform, min_rate=config.speed_min_rate, max_rate=config.speed_max_rate, p=config.speed_perturb_p
    )


def logmel_augmentation(rng: jax.Array, targets: jax.Array, config: AugmentConfig):
    """The log-mel-side augmentations as the train step applies them: ``(hook, targets)``.

    ``hook(logmel)`` is the model's ``logmel_hook``: SpecAugment, then mixup of consecutive pairs (2B rows →
    B rows), in the paper's order. The hook only sees the log-mel, so λ is drawn here, once per pair, and the
    returned targets are mixed with the same λ. With mixup off the targets are returned unchanged.
    """
    hook, targets, _ = logmel_augmentation_with_lambdas(rng, targets, config)
    return hook, targets


def logmel_augmentation_with_lambdas(rng: jax.Array, targets: jax.Array, config: AugmentConfig):
    """:func:`logmel_augmentation` that also returns the mixup λ it drew: ``(hook, targets, lambdas)``, with
    ``lambdas`` (R/2,) float32, or None with mixup off. Knowledge distillation mixes the teacher's targets
    with them (``distill.mixed_teacher_targets``): the same λ and pairing as the inputs and the labels."""
    spec_key, mixup_key = jax.random.split(rng)
    lambdas = sharding.rows_of_global_draw(lambda pairs: mixup_lambdas(mixup_key, pairs, config.mixup_alpha),
                                           targets.shape[0] // 2) if config.mixup else None

    def hook(logmel):
        if config.spec_augment:
            logmel = spec_augment(spec_key, logmel, time_stripes=config.time_stripes,
                                  time_max_width=config.time_max_width, freq_stripes=config.freq_stripes,
                                  freq_max_width=config.freq_max_width)
        return mix_pairs(logmel, lambdas) if config.mixup else logmel

    return hook, (mix_pairs(targets, lambdas) if config.mixup else targets), lambdas
