"""Worker processes reading into shared memory (data/parallel_read.py): the same batches, skip records and loader
state as the reader threads on a packed HDF5 with damaged and silent clips and the balanced sampler, a resume
from that state with another worker count, no label matrix sent to the workers, and no shared memory left."""

import os
import pathlib
import pickle

import grain
import numpy as np

from convnext_audio_jax.data import pipeline, sources
from data_helpers import damage_hdf5_clips, random_waveforms, write_packed_hdf5

CLIPS = 40
DAMAGED = (3, 17)  # gzip chunks overwritten: unreadable
SILENT = (9,)  # all zero: skipped as empty


def _damaged_hdf5(path: pathlib.Path) -> pathlib.Path:
    waveforms = (random_waveforms(CLIPS, seed=5) // 8).astype(np.int16)
    waveforms[list(SILENT)] = 0
    targets = np.zeros((CLIPS, 4), bool)
    targets[np.arange(CLIPS), np.arange(CLIPS) % 4] = True
    write_packed_hdf5(path, waveforms, targets, [f"Y{i:02d}" for i in range(CLIPS)], compression="gzip")
    return damage_hdf5_clips(path, DAMAGED)


def _batches(source, workers: int, count: int, state=None):
    config = pipeline.LoaderConfig(batch_size=6, sampling="balanced", seed=1, worker_count=workers, read_threads=3,
                                   draws_per_example=2)
    loader = pipeline.make_loader(source, config, grain.sharding.ShardOptions(0, 1))
    try:
        if state is not None:
            loader.set_state(state)
        return [next(loader) for _ in range(count)], loader.get_state()
    finally:
        loader.close()


def _shared_blocks() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("convnext-audio-")} if os.path.isdir(
        "/dev/shm") else set()


def test_workers_read_the_same_batches_and_resume_across_worker_counts(tmp_path):
    source = sources.PackedHdf5Source.from_files([_damaged_hdf5(tmp_path / "packed.h5")])
    before = _shared_blocks()
    threads, thread_state = _batches(source, 0, 8)
    workers, worker_state = _batches(source, 2, 8)
    assert worker_state == thread_state and thread_state["skipped"]  # the damaged clips were met and counted
    for a, b in zip(threads, workers):
        assert (a["id"] == b["id"]).all()
        np.testing.assert_array_equal(a["waveform"], b["waveform"])
        np.testing.assert_array_equal(a["target"], b["target"])
        assert b["waveform"].dtype == np.int16 and b["target"].dtype == np.float32
    # A run checkpointed with threads resumes with one worker (worker_count is result-neutral), and the reverse.
    _, middle = _batches(source, 0, 3)
    resumed, _ = _batches(source, 1, 5, middle)
    assert [list(b["id"]) for b in resumed] == [list(b["id"]) for b in threads[3:]]
    _, middle = _batches(source, 2, 5)
    resumed, _ = _batches(source, 0, 3, middle)
    assert [list(b["id"]) for b in resumed] == [list(b["id"]) for b in threads[5:]]
    assert not _shared_blocks() - before  # every ring this test made was unlinked at close


def test_workers_are_sent_no_label_matrix(tmp_path):
    waveforms = random_waveforms(4)
    targets = np.zeros((4, 20_000), bool)  # a wide label matrix: 80 kB
    source = sources.PackedHdf5Source.from_files([write_packed_hdf5(tmp_path / "p.h5", waveforms, targets,
                                                                    ["a", "b", "c", "d"])])
    reader = sources.without_labels(source)
    assert len(pickle.dumps(reader)) < 10_000 < len(pickle.dumps(source))
    np.testing.assert_array_equal(sources.read_waveform(reader, 2), waveforms[2])
    assert source.targets.shape == (4, 20_000)  # the loader's own copy keeps its labels
