"""SpecAugment, mixup and speed perturbation: semantics, per-example randomness and sharded jit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec
from torchlibrosa.augmentation import SpecAugmentation

from convnext_audio_jax.training.augment import (
    AugmentConfig,
    augment_waveform,
    logmel_augmentation,
    mix_pairs,
    mixup_lambdas,
    spec_augment,
    speed_perturb,
)


def dropped_rows_and_columns(augmented_ones: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per example of a SpecAugmented all-ones (B, T, F) batch: which frames and which bins were zeroed."""
    zero = augmented_ones == 0
    return zero.all(axis=2), zero.all(axis=1)


# ---------------------------------------------------------------------------------------------- SpecAugment


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_spec_augment_keeps_shape_and_dtype(dtype):
    x = jnp.ones((3, 50, 20), dtype)
    out = spec_augment(jax.random.key(0), x, time_max_width=10, freq_max_width=5)
    assert out.shape == x.shape and out.dtype == dtype


def test_spec_augment_stripes_within_bounds():
    batch, frames, bins, time_width, freq_width = 256, 120, 40, 16, 6
    out = np.asarray(
        spec_augment(
            jax.random.key(1), jnp.ones((batch, frames, bins)), time_max_width=time_width, freq_max_width=freq_width
        )
    )
    frame_dropped, bin_dropped = dropped_rows_and_columns(out)
    # Everything zeroed lies in a dropped frame or a dropped bin: the mask is a union of whole stripes.
    np.testing.assert_array_equal(out == 0, frame_dropped[:, :, None] | bin_dropped[:, None, :])
    # Two stripes each narrower than the maximum width.
    assert frame_dropped.sum(axis=1).max() <= 2 * (time_width - 1)
    assert bin_dropped.sum(axis=1).max() <= 2 * (freq_width - 1)
    # torchlibrosa draws start < size - width: the last frame and bin are never dropped.
    assert not frame_dropped[:, -1].any() and not bin_dropped[:, -1].any()
    # ... but every other position can be.
    assert frame_dropped[:, :-1].any(axis=0).all() and bin_dropped[:, :-1].any(axis=0).all()


def test_spec_augment_distribution_matches_torchlibrosa():
    batch, frames, bins, time_width, freq_width = 3000, 80, 32, 20, 8
    ours = np.asarray(
        spec_augment(
            jax.random.key(2), jnp.ones((batch, frames, bins)), time_max_width=time_width, freq_max_width=freq_width
        )
    )
    torch.manual_seed(0)
    reference = SpecAugmentation(
        time_drop_width=time_width, time_stripes_num=2, freq_drop_width=freq_width, freq_stripes_num=2
    ).train()
    theirs = reference(torch.ones(batch, 1, frames, bins))[:, 0].numpy()
    for our_mask, their_mask in zip(dropped_rows_and_columns(ours), dropped_rows_and_columns(theirs)):
        our_counts, their_counts = our_mask.sum(axis=1), their_mask.sum(axis=1)
        standard_error = np.sqrt((our_counts.var() + their_counts.var()) / batch)
        assert abs(our_counts.mean() - their_counts.mean()) < 5 * standard_error
        # Where stripes fall along the axis (mean position of dropped frames/bins).
        positions = np.arange(our_mask.shape[1])
        assert abs((our_mask * positions).sum() / our_mask.sum() - (their_mask * positions).sum() / their_mask.sum()) < 1.0


def test_spec_augment_is_deterministic_per_key_and_differs_per_example():
    x = jnp.ones((16, 100, 40))
    first = spec_augment(jax.random.key(3), x)
    np.testing.assert_array_equal(first, spec_augment(jax.random.key(3), x))
    assert not np.array_equal(first, spec_augment(jax.random.key(4), x))
    masks = np.asarray(first == 0).reshape(16, -1)
    assert len({row.tobytes() for row in masks}) == 16


def test_spec_augment_shares_stripes_across_a_trailing_channel_axis():
    x = jnp.ones((4, 60, 24, 3))
    out = np.asarray(spec_augment(jax.random.key(5), x, time_max_width=10, freq_max_width=6))
    assert out.shape == x.shape
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    np.testing.assert_array_equal(out[..., 0], spec_augment(jax.random.key(5), x[..., 0], time_max_width=10, freq_max_width=6))


def test_spec_augment_rejects_stripes_wider_than_the_axis():
    with pytest.raises(ValueError, match=r"freq_max_width must be in \[1, 20\]"):
        spec_augment(jax.random.key(0), jnp.ones((2, 100, 20)), freq_max_width=28)


# ---------------------------------------------------------------------------------------------------- mixup


def test_mixup_lambdas_are_uniform_for_beta_one_one():
    lambdas = np.asarray(mixup_lambdas(jax.random.key(0), 20000))
    assert lambdas.shape == (20000,) and lambdas.min() >= 0 and lambdas.max() <= 1
    for quantile in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert np.mean(lambdas < quantile) == pytest.approx(quantile, abs=0.015)


def test_mixup_pairs_consecutive_rows_and_mixes_targets_alike():
    """The train step's path: the hook mixes the log-mel, the returned targets are mixed with the same λ."""
    num_pairs = 6
    # Pair i: row 2i is all ones with target class 0, row 2i+1 all zeros with target class 1.
    x = jnp.tile(jnp.array([[1.0], [0.0]]), (num_pairs, 8))[:, :, None]
    targets = jnp.tile(jnp.array([[True, False], [False, True]]), (num_pairs, 1))
    config = AugmentConfig(spec_augment=False, speed_perturb=False)
    hook, mixed_targets = logmel_augmentation(jax.random.key(7), targets, config)
    mixed_x = hook(x)[:, :, 0]
    assert mixed_x.shape == (num_pairs, 8) and mixed_targets.shape == (num_pairs, 2)
    recovered = np.asarray(mixed_x[:, 0])  # x[0::2]·λ + x[1::2]·(1-λ) = λ
    np.testing.assert_allclose(mixed_x, np.repeat(recovered[:, None], 8, axis=1))
    np.testing.assert_allclose(mixed_targets[:, 0], recovered, atol=1e-7)
    np.testing.assert_allclose(mixed_targets[:, 1], 1 - recovered, atol=1e-7)
    assert len(np.unique(recovered)) == num_pairs  # one λ per pair
    _, mixup_key = jax.random.split(jax.random.key(7))
    np.testing.assert_allclose(recovered, mixup_lambdas(mixup_key, num_pairs))


def test_mixup_with_given_lambdas_follows_the_pann_formula():
    x = jax.random.normal(jax.random.key(0), (8, 5, 3))
    lambdas = jnp.array([0.0, 0.25, 0.5, 1.0])
    expected = x[0::2] * lambdas[:, None, None] + x[1::2] * (1 - lambdas[:, None, None])
    np.testing.assert_allclose(mix_pairs(x, lambdas), expected, rtol=1e-6)


def test_mixup_dtypes():
    lambdas = jnp.array([0.3])
    mixed_x, mixed_targets = mix_pairs(jnp.ones((2, 4), jnp.bfloat16), lambdas), mix_pairs(jnp.array([[True], [False]]), lambdas)
    assert mixed_x.dtype == jnp.bfloat16 and mixed_targets.dtype == jnp.float32
    assert float(mixed_targets[0, 0]) == pytest.approx(0.3)


def test_mixup_rejects_odd_batches_and_mismatched_lambdas():
    with pytest.raises(ValueError, match="even batch"):
        mix_pairs(jnp.ones((5, 2)), jnp.ones((2,)))
    with pytest.raises(ValueError, match="one lambda per pair"):
        mix_pairs(jnp.ones((6, 2)), jnp.ones((2,)))


# -------------------------------------------------------------------------------------- speed perturbation


def ramps(batch: int, length: int) -> jax.Array:
    """Rows 1, 2, …, length: positive, so zeros in the output can only be padding."""
    return jnp.tile(jnp.arange(1, length + 1, dtype=jnp.float32), (batch, 1))


def test_speed_perturb_keeps_length_and_dtype():
    waveform = jnp.ones((4, 1000), jnp.int16)
    out = speed_perturb(jax.random.key(0), waveform)
    assert out.shape == waveform.shape and out.dtype == jnp.int16


def test_rate_one_and_probability_zero_are_the_identity():
    waveform = jax.random.normal(jax.random.key(0), (8, 999))
    np.testing.assert_array_equal(speed_perturb(jax.random.key(1), waveform, min_rate=1.0, max_rate=1.0), waveform)
    np.testing.assert_array_equal(speed_perturb(jax.random.key(1), waveform, p=0.0), waveform)


def test_rate_two_keeps_every_other_sample_padded_at_random_offsets():
    length = 1000
    out = np.asarray(speed_perturb(jax.random.key(2), ramps(16, length), min_rate=2.0, max_rate=2.0))
    starts = []
    for row in out:
        content = np.flatnonzero(row)
        assert len(content) == length // 2
        assert content[-1] - content[0] == length // 2 - 1  # one contiguous block between zeros
        np.testing.assert_array_equal(row[content], np.arange(1, length + 1)[0::2])
        starts.append(content[0])
    assert 0 <= min(starts) and max(starts) <= length // 2
    assert len(set(starts)) > 8  # the pad offset is drawn per example


def test_rate_half_repeats_each_sample_cropped_at_random_offsets():
    length = 1000
    out = np.asarray(speed_perturb(jax.random.key(3), ramps(16, length), min_rate=0.5, max_rate=0.5))
    stretched = np.repeat(np.arange(1, length + 1, dtype=np.float32), 2)
    offsets = []
    for row in out:
        offset = 2 * (int(row[0]) - 1) + int(row[1] != row[0])  # where in the stretched signal the row starts
        np.testing.assert_array_equal(row, stretched[offset : offset + length])
        offsets.append(offset)
    assert len(set(offsets)) > 8


def test_rate_two_doubles_a_tone_frequency():
    length, cycles = 4000, 50
    tone = jnp.sin(2 * jnp.pi * cycles * jnp.arange(length) / length)[None] + 2.0  # offset keeps it nonzero
    out = np.asarray(speed_perturb(jax.random.key(4), tone, min_rate=2.0, max_rate=2.0))[0]
    content = out[np.flatnonzero(out)] - 2.0
    assert len(content) == length // 2
    assert np.argmax(np.abs(np.fft.rfft(content))) == cycles  # 50 cycles in half the samples: twice the frequency


def test_random_rates_stay_in_range_and_p_selects_examples():
    length = 600
    out = np.asarray(speed_perturb(jax.random.key(5), ramps(400, length), p=0.5))
    content_lengths = (out != 0).sum(axis=1)
    unchanged = (out == np.arange(1, length + 1)).all(axis=1)
    assert 0.38 < unchanged.mean() < 0.62
    # Rates in [0.5, 1.5]: content of ceil(L / rate) samples, cropped to L.
    assert content_lengths.min() >= np.floor(length / 1.5) and content_lengths.max() == length
    assert np.mean(content_lengths < length) > 0.15  # some were sped up (rate > 1)


# ---------------------------------------------------------------------------------- config and sharded jit


def test_augment_config_switches():
    logmel, targets = jnp.ones((8, 100, 40)), jnp.eye(8, 4)
    waveform = ramps(8, 500)
    off = AugmentConfig(spec_augment=False, mixup=False, speed_perturb=False)
    key = jax.random.key(0)
    np.testing.assert_array_equal(augment_waveform(key, waveform, off), waveform)
    hook, same_targets = logmel_augmentation(key, targets, off)
    np.testing.assert_array_equal(hook(logmel), logmel)
    np.testing.assert_array_equal(same_targets, targets)

    on = AugmentConfig(speed_perturb_p=1.0)

    @jax.jit
    def augment(key, logmel, targets):
        hook, mixed = logmel_augmentation(key, targets, on)
        return hook(logmel), mixed

    mixed_logmel, mixed_targets = augment(key, logmel, targets)
    assert mixed_logmel.shape == (4, 100, 40) and mixed_targets.shape == (4, 4)
    assert (mixed_logmel == 0).any()  # stripes survive mixing of two clips with ones everywhere else
    assert not np.array_equal(augment_waveform(key, waveform, on), waveform)


@pytest.fixture(scope="module")
def data_sharding():
    assert jax.device_count() == 8, "tests/conftest.py sets 8 simulated CPU devices"
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    return NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())


def shards_all_differ(array: jax.Array) -> bool:
    shard_bytes = [np.asarray(shard.data).tobytes() for shard in array.addressable_shards]
    return len(shard_bytes) == 8 and len(set(shard_bytes)) == 8


@pytest.mark.parametrize(
    "name, augmentation, batch",
    [
        ("spec_augment", functools.partial(spec_augment, time_max_width=20, freq_max_width=8), jnp.ones((16, 100, 40))),
        ("speed_perturb", speed_perturb, ramps(16, 800)),
    ],
)
def test_sharded_jit_matches_unsharded_and_differs_per_device(data_sharding, name, augmentation, batch):
    sharded, replicated = data_sharding
    key = jax.device_put(jax.random.key(11), replicated)
    out = jax.jit(augmentation, out_shardings=sharded)(key, jax.device_put(batch, sharded))
    assert out.sharding.is_equivalent_to(sharded, out.ndim)
    np.testing.assert_array_equal(out, augmentation(jax.random.key(11), batch))
    # Identical input rows: each device's shard, and the two halves of the batch, still come out different.
    assert shards_all_differ(out), name
    assert not np.array_equal(out[:8], out[8:])


def test_sharded_jit_mixup(data_sharding):
    sharded, replicated = data_sharding
    x = jnp.tile(jnp.array([[1.0], [0.0]]), (16, 4))[:, :, None]  # 32 rows: 16 pairs, 2 per device after mixing
    targets = jnp.tile(jnp.array([[1.0, 0.0], [0.0, 1.0]]), (16, 1))
    config = AugmentConfig(spec_augment=False, speed_perturb=False)

    def augment(key, x, targets):
        hook, mixed = logmel_augmentation(key, targets, config)
        return hook(x), mixed

    key = jax.device_put(jax.random.key(12), replicated)
    mixed_x, mixed_targets = jax.jit(augment, out_shardings=(sharded, sharded))(
        key, jax.device_put(x, sharded), jax.device_put(targets, sharded)
    )
    expected_x, expected_targets = augment(jax.random.key(12), x, targets)
    np.testing.assert_allclose(mixed_x, expected_x, rtol=1e-6)
    np.testing.assert_allclose(mixed_targets, expected_targets, rtol=1e-6)
    np.testing.assert_allclose(mixed_targets[:, 0], mixed_x[:, 0, 0], rtol=1e-6)
    assert shards_all_differ(mixed_x)


def test_mixup_lambdas_for_other_alphas_follow_the_beta_distribution():
    lambdas = np.asarray(mixup_lambdas(jax.random.key(1), 20000, alpha=0.4))
    # Beta(0.4, 0.4): mean 1/2, variance 1 / (4·(2·0.4 + 1)) = 0.1389 (uniform would give 1/12).
    assert lambdas.mean() == pytest.approx(0.5, abs=0.01)
    assert lambdas.var() == pytest.approx(1 / 7.2, abs=0.005)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        mixup_lambdas(jax.random.key(1), 4, alpha=0.0)
