import dataclasses
import json

import grain
import numpy as np
import pytest

from convnext_audio_jax.data import audio, pipeline, sources
from data_helpers import random_waveforms, write_packed_hdf5

NUM_CLIPS = 24
CORRUPT = (5, 17)


@pytest.fixture(scope="module")
def packed_source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("packed")
    waveforms = random_waveforms(NUM_CLIPS)
    waveforms[list(CORRUPT)] = 0
    targets = np.zeros((NUM_CLIPS, 4), bool)
    targets[:18, 0] = True  # skewed: class 0 dominates
    targets[18:22, 1] = True
    targets[22:, 2] = True
    targets[::5, 3] = True
    write_packed_hdf5(folder / "a.h5", waveforms, targets, [f"Y{i:02d}" for i in range(NUM_CLIPS)])
    return sources.PackedHdf5Source.from_files([folder / "a.h5"])


SINGLE = grain.sharding.ShardOptions(shard_index=0, shard_count=1)


def ids_of(loader, steps):
    return [next(loader)["id"].tolist() for _ in range(steps)]


def test_batches_have_the_documented_layout(packed_source):
    loader = pipeline.make_loader(packed_source, pipeline.LoaderConfig(batch_size=4, seed=0), SINGLE)
    batch = next(loader)
    assert set(batch) == {"waveform", "target", "id"}
    assert batch["waveform"].shape == (4, audio.CLIP_SAMPLES) and batch["waveform"].dtype == np.int16
    assert batch["target"].shape == (4, 4) and batch["target"].dtype == np.float32
    row = int(batch["id"][0][1:])
    np.testing.assert_array_equal(batch["target"][0], packed_source.targets[row])
    as_float = pipeline.make_loader(
        packed_source, pipeline.LoaderConfig(batch_size=4, seed=0, waveform_dtype="float32"), SINGLE)
    float_batch = next(as_float)
    assert float_batch["waveform"].dtype == np.float32
    np.testing.assert_allclose(float_batch["waveform"], batch["waveform"] / 32767.0, rtol=1e-6)


def test_corrupt_clips_are_skipped_counted_and_batches_stay_full(packed_source):
    config = pipeline.LoaderConfig(batch_size=5, sampling="sequential", num_epochs=1, drop_remainder=False)
    loader = pipeline.make_loader(packed_source, config, SINGLE)
    seen = [clip_id for batch in loader for clip_id in batch["id"].tolist()]
    assert seen == [f"Y{i:02d}" for i in range(NUM_CLIPS) if i not in CORRUPT]
    assert loader.skipped == {audio.EMPTY: 2} and loader.num_skipped == 2
    assert [s[0] for s in loader.skipped_ids] == ["Y05", "Y17"]


def test_same_seed_same_order_other_seed_other_order(packed_source):
    def run(seed):
        return ids_of(pipeline.make_loader(packed_source, pipeline.LoaderConfig(batch_size=4, seed=seed), SINGLE), 8)

    first = run(1)
    assert run(1) == first
    assert run(2) != first
    # Each epoch (22 valid clips) is a permutation; epoch 2 is shuffled differently.
    flat = [i for batch in first for i in batch]
    epoch_1, epoch_2 = flat[:22], flat[22:32]
    assert sorted(epoch_1) == sorted(f"Y{i:02d}" for i in range(NUM_CLIPS) if i not in CORRUPT)
    assert epoch_2 != epoch_1[:10]


@pytest.mark.parametrize("sampling", ["shuffle", "balanced"])
def test_resume_from_saved_state_reproduces_the_rest_exactly(packed_source, sampling):
    config = pipeline.LoaderConfig(batch_size=3, seed=5, sampling=sampling)
    loader = pipeline.make_loader(packed_source, config, SINGLE)
    ids_of(loader, 7)
    state = json.loads(json.dumps(loader.get_state()))  # what a checkpoint stores
    expected = ids_of(loader, 12)
    skipped_after = dict(loader.skipped)

    resumed = pipeline.make_loader(packed_source, config, SINGLE)
    resumed.set_state(state)
    assert ids_of(resumed, 12) == expected
    assert dict(resumed.skipped) == skipped_after


def test_resume_with_worker_processes(packed_source):
    config = pipeline.LoaderConfig(batch_size=4, seed=2, sampling="balanced", worker_count=2)
    loader = pipeline.make_loader(packed_source, config, SINGLE)
    try:
        ids_of(loader, 3)
        state = json.loads(json.dumps(loader.get_state()))
        expected = ids_of(loader, 4)
    finally:
        loader.close()
    resumed = pipeline.make_loader(packed_source, config, SINGLE)
    try:
        resumed.set_state(state)
        assert ids_of(resumed, 4) == expected
    finally:
        resumed.close()


def test_balanced_loader_draws_classes_evenly_from_a_skewed_set(packed_source):
    config = pipeline.LoaderConfig(batch_size=8, seed=0, sampling="balanced")
    loader = pipeline.make_loader(packed_source, config, SINGLE)
    targets = np.concatenate([next(loader)["target"] for _ in range(30)])
    counts = targets.sum(axis=0)
    # 240 draws over 4 classes: ≈60 each (class 3 co-occurs with others), versus 18:4:2:5 in the data.
    assert counts[1] >= 55 and counts[2] >= 55 and counts[3] >= 55
    assert counts[0] <= 120


@pytest.mark.parametrize("shard_count", [2, 3, 5])
def test_sharding_over_processes_covers_every_clip_once_per_epoch(packed_source, shard_count):
    config = pipeline.LoaderConfig(batch_size=1, seed=4, num_epochs=2, drop_remainder=False)
    per_epoch = {0: [], 1: []}
    for shard_index in range(shard_count):
        shard = grain.sharding.ShardOptions(shard_index=shard_index, shard_count=shard_count)
        loader = pipeline.make_loader(packed_source, config, shard)
        # One row per batch: this host's i-th draw is global position i·shard_count + shard_index.
        for local_position, _ in enumerate(iter(pipeline.index_stream(NUM_CLIPS, None, config, shard))):
            global_position = local_position * shard_count + shard_index
            per_epoch[global_position // NUM_CLIPS].append(global_position)
        read = [clip_id for batch in loader for clip_id in batch["id"].tolist()]
        assert len(read) + loader.num_skipped == len(range(shard_index, 2 * NUM_CLIPS, shard_count))
    for epoch, positions in per_epoch.items():
        assert sorted(positions) == list(range(epoch * NUM_CLIPS, (epoch + 1) * NUM_CLIPS))
    # And the clips: the union over hosts of epoch 1 is every clip exactly once.
    clips = []
    for shard_index in range(shard_count):
        shard = grain.sharding.ShardOptions(shard_index=shard_index, shard_count=shard_count)
        stream = pipeline.index_stream(NUM_CLIPS, None, config, shard)
        clips += [stream[i] for i in range(len(stream)) if i * shard_count + shard_index < NUM_CLIPS]
    assert sorted(clips) == list(range(NUM_CLIPS))


@pytest.mark.parametrize("sampling", ["shuffle", "balanced"])
@pytest.mark.parametrize("shard_count", [2, 3])
def test_process_batches_stacked_in_process_order_are_the_single_process_batches(packed_source, sampling, shard_count):
    """Each process reads its contiguous block of every global batch (mixup pairs included), so stacking the
    processes' batches in process order gives the one-process batch, row for row."""
    single = pipeline.LoaderConfig(batch_size=3 * shard_count, seed=2, sampling=sampling, draws_per_example=2)
    per_process = dataclasses.replace(single, batch_size=3)
    rows, steps = per_process.rows_per_batch, 5
    expected = pipeline.index_stream(NUM_CLIPS, packed_source.targets, single, SINGLE)
    shares = [pipeline.index_stream(NUM_CLIPS, packed_source.targets, per_process,
                                    grain.sharding.ShardOptions(shard_index=p, shard_count=shard_count))
              for p in range(shard_count)]
    for step in range(steps):
        stacked = [share[i] for share in shares for i in range(step * rows, (step + 1) * rows)]
        assert stacked == [expected[i] for i in range(step * rows * shard_count, (step + 1) * rows * shard_count)]


@pytest.mark.parametrize("rows", [1, 4, 7])
def test_process_blocks_of_a_finite_stream_cover_it_once(rows):
    stream = grain.MapDataset.range(NUM_CLIPS)
    for count in (2, 3):
        blocks = [pipeline.ProcessBlocks(stream, rows, index, count) for index in range(count)]
        items = [[block[i] for i in range(len(block))] for block in blocks]
        assert sorted(sum(items, [])) == list(range(NUM_CLIPS))
        assert all(len(block) == len(list(block)) for block in blocks)
        # Process 0 holds the most: as many batches as ceil(N / (rows · count)).
        assert -(-len(blocks[0]) // rows) == -(-NUM_CLIPS // (rows * count))
    with pytest.raises(ValueError, match="shard index 2 in 0..1"):
        pipeline.ProcessBlocks(stream, rows, 2, 2)


def test_default_shard_is_this_jax_process():
    shard = pipeline.jax_shard_options()
    assert (shard.shard_index, shard.shard_count) == (0, 1)


def test_mixup_draws_two_clips_per_example(packed_source):
    config = pipeline.LoaderConfig(batch_size=3, seed=0, draws_per_example=2)
    batch = next(pipeline.make_loader(packed_source, config, SINGLE))
    assert batch["waveform"].shape == (6, audio.CLIP_SAMPLES)
    first, second = pipeline.mixup_pairs(batch)
    assert first["waveform"].shape == (3, audio.CLIP_SAMPLES) == second["waveform"].shape
    np.testing.assert_array_equal(second["id"], batch["id"][1::2])
    assert all(a != b for a, b in zip(first["id"], second["id"]))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="sampling 'random'"):
        pipeline.LoaderConfig(batch_size=2, sampling="random")
    with pytest.raises(ValueError, match="waveform_dtype 'int8'"):
        pipeline.LoaderConfig(batch_size=2, waveform_dtype="int8")


def test_a_source_whose_every_clip_fails_stops_the_loader_naming_it(tmp_path):
    """An infinite stream over unreadable clips (all-zero: "empty") ends with an error, not a busy loop."""
    waveforms = np.zeros((6, audio.CLIP_SAMPLES), np.int16)
    targets = np.eye(6, 2, dtype=bool) | np.eye(6, 2, k=-1, dtype=bool)
    path = write_packed_hdf5(tmp_path / "broken.h5", waveforms, targets, [f"bad{i}" for i in range(6)])
    source = sources.PackedHdf5Source.from_files([path])
    for sampling in ("shuffle", "balanced"):
        loader = pipeline.make_loader(source, pipeline.LoaderConfig(batch_size=2, sampling=sampling, read_threads=1),
                                      SINGLE)
        with pytest.raises(pipeline.UnreadableSourceError,
                           match=rf"{pipeline.MAX_CONSECUTIVE_FAILURES} clips in a row could not be read from "
                                 rf"packed HDF5 .*broken.h5; first failures: bad\d \(empty"):
            next(loader)
        loader.close()
