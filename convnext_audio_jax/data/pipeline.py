"""The grain loader: sharded, shuffled or balanced index streams → clip reads → batches of valid clips.

Each host reads its block of every global batch of one global index stream (`ProcessBlocks`: with R rows per
host per batch, host p takes items p·R … p·R + R − 1 of each run of P·R), so the hosts together follow exactly
the single-host sequence, in the single-host row order once the blocks are stacked in process order: with
shuffling, every clip is read once per epoch across the hosts; with balanced sampling, the global draws are
PANNs' sequence. A clip that fails to read is left out of its
batch (the batch is filled with the next clips) and reported: `ClipLoader.skipped` counts skips per reason, and
every skip is logged with the clip id and what was wrong.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Iterator

import grain
import numpy as np

from convnext_audio_jax.data import audio
from convnext_audio_jax.data.sampler import BalancedIndices
from convnext_audio_jax.data.sources import ClipSource
from convnext_audio_jax.runtime import host_memory
from convnext_audio_jax.runtime.errors import UserError

logger = logging.getLogger(__name__)

SAMPLING_MODES = ("shuffle", "balanced", "sequential")
WAVEFORM_DTYPES = ("int16", "float32")
# How many skipped clip ids the loader state keeps (the counts are always complete).
SKIPPED_IDS_KEPT = 1000
# This many failed reads in a row with no readable clip between them stop the loader (a wrong audio folder,
# a damaged file system) instead of looping forever over an infinite stream.
MAX_CONSECUTIVE_FAILURES = 256


class UnreadableSourceError(UserError, RuntimeError):
    """Too many clips in a row could not be read; the message names the source and the first failures (a wrong
    audio folder, a damaged disk: for the user to fix; a RuntimeError still, as it was)."""


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """How to read a source.

    batch_size: examples per host per step. draws_per_example: clips drawn per example; 2 for mixup, then a
      batch has 2·batch_size rows and rows (2k, 2k+1) are pair k (see `mixup_pairs`).
    sampling: "shuffle" (a new permutation each epoch), "balanced" (PANNs' sampler; infinite) or "sequential".
    num_epochs: None repeats forever; ignored by "balanced".
    worker_count: grain worker processes (0: read in this process with `read_threads` threads).
    """

    batch_size: int
    sampling: str = "shuffle"
    seed: int = 0
    num_epochs: int | None = None
    draws_per_example: int = 1
    waveform_dtype: str = "int16"
    drop_remainder: bool = True
    worker_count: int = 0
    worker_buffer_size: int = 2
    read_threads: int = 4
    prefetch_buffer_size: int = 16

    def __post_init__(self):
        if self.batch_size < 1 or self.draws_per_example < 1:
            raise ValueError(f"batch_size and draws_per_example must be ≥ 1, got {self.batch_size}, "
                             f"{self.draws_per_example}")
        if self.sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling {self.sampling!r}: expected one of {SAMPLING_MODES}")
        if self.waveform_dtype not in WAVEFORM_DTYPES:
            raise ValueError(f"waveform_dtype {self.waveform_dtype!r}: expected one of {WAVEFORM_DTYPES}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be None or ≥ 1, got {self.num_epochs}")

    @property
    def rows_per_batch(self) -> int:
        return self.batch_size * self.draws_per_example


def jax_shard_options() -> grain.sharding.ShardOptions:
    """This process's shard: index jax.process_index() of jax.process_count()."""
    import jax

    return grain.sharding.ShardOptions(shard_index=jax.process_index(), shard_count=jax.process_count())


class ProcessBlocks(grain.MapDataset):
    """Process ``index``'s share of ``parent`` cut into global batches of ``count`` × ``block`` items: its
    item i is the parent's item (i // block)·block·count + index·block + i % block. Stacking the processes'
    batches in process order gives the parent's order back (`make_array_from_process_local_data` does so on a
    mesh listing devices in process order), so a global batch holds the same rows in the same order for any
    number of processes."""

    def __init__(self, parent: grain.MapDataset, block: int, index: int, count: int):
        super().__init__(parent)
        if block < 1 or not 0 <= index < count:
            raise ValueError(f"block {block} must be >= 1 and shard index {index} in 0..{count - 1}")
        self._block, self._index, self._count = block, index, count
        full, rest = divmod(len(parent), block * count)
        self._length = full * block + min(max(rest - index * block, 0), block)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range for {self._length} items")
        batch, row = divmod(int(index), self._block)
        return self._parent[(batch * self._count + self._index) * self._block + row]

    def __str__(self) -> str:
        return f"ProcessBlocks(block={self._block}, index={self._index}, count={self._count})"


def index_stream(num_clips: int, targets: np.ndarray, config: LoaderConfig,
                 shard_options: grain.sharding.ShardOptions) -> grain.MapDataset:
    """This host's clip indices: its block of each global batch (`ProcessBlocks`, blocks of
    ``config.rows_per_batch``) of the global stream."""
    if config.sampling == "balanced":
        stream = BalancedIndices(targets, config.seed)
    else:
        if num_clips == 0:
            raise UserError("the source has no clips")
        stream = grain.MapDataset.range(num_clips)
        if config.sampling == "shuffle":
            stream = stream.shuffle(seed=config.seed)
        stream = stream.repeat(config.num_epochs)
    if shard_options.shard_count == 1:
        return stream
    return ProcessBlocks(stream, config.rows_per_batch, shard_options.shard_index, shard_options.shard_count)


class ReadClip(grain.transforms.Map):
    """Index → clip dict, or an {"error", "id", "detail"} dict when the clip cannot be used."""

    def __init__(self, source: ClipSource):
        self._source = source

    def map(self, index):
        try:
            return self._source[index]
        except audio.ClipError as error:
            return {"error": error.reason, "id": error.clip_id, "detail": error.detail}


class ValidClipBatches(grain.IterDataset):
    """Batches of `rows` valid clips; failed reads are dropped and listed in the batch's "skipped" field."""

    def __init__(self, parent: grain.IterDataset, rows: int, waveform_dtype: str, drop_remainder: bool,
                 description: str = "the source"):
        super().__init__(parent)
        self._rows = rows
        self._waveform_dtype = waveform_dtype
        self._drop_remainder = drop_remainder
        self._description = description

    def __iter__(self):
        return _ValidClipBatchIterator(self._parent.__iter__(), self._rows, self._waveform_dtype, self._drop_remainder,
                                       self._description)

    def __str__(self) -> str:
        return f"ValidClipBatches(rows={self._rows}, waveform_dtype={self._waveform_dtype})"


class _ValidClipBatchIterator(grain.DatasetIterator):
    def __init__(self, parent, rows: int, waveform_dtype: str, drop_remainder: bool, description: str):
        super().__init__(parent)
        self._rows = rows
        self._waveform_dtype = waveform_dtype
        self._drop_remainder = drop_remainder
        self._description = description
        self._failures_in_a_row = 0

    def __next__(self) -> dict:
        # Each clip is written into the batch's arrays as it comes (no list of clips stacked afterwards: that
        # was a second copy of the batch under the training process's GIL).
        waveform = target = None
        ids, skipped = [], []
        while len(ids) < self._rows:
            try:
                element = next(self._parent)
            except StopIteration:
                if ids and not self._drop_remainder:
                    break
                raise
            if "error" in element:
                skipped.append((element["id"], element["error"], element["detail"]))
                self._failures_in_a_row += 1
                if self._failures_in_a_row >= MAX_CONSECUTIVE_FAILURES:
                    first = "; ".join(f"{i} ({reason}: {detail})" for i, reason, detail in skipped[:3])
                    raise UnreadableSourceError(
                        f"{self._failures_in_a_row} clips in a row could not be read from {self._description}; "
                        f"first failures: {first}")
            else:
                self._failures_in_a_row = 0
                if waveform is None:
                    waveform = np.empty((self._rows, element["waveform"].shape[0]), self._waveform_dtype)
                    target = np.empty((self._rows, element["target"].shape[0]), np.float32)
                row = len(ids)
                if self._waveform_dtype == "float32":
                    waveform[row] = audio.int16_to_float(element["waveform"])
                else:
                    waveform[row] = element["waveform"]
                target[row] = element["target"]
                ids.append(element["id"])
        return {"waveform": waveform[:len(ids)], "target": target[:len(ids)], "id": np.array(ids), "skipped": skipped}

    # A batch boundary holds nothing back, so the parent's position is the whole state.
    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


class ClipLoader(Iterator[dict]):
    """Iterator of batches {"waveform": (R, 320000) int16|float32, "target": (R, C) float32, "id": (R,) str}.

    `get_state()` / `set_state()` give a JSON-serialisable state (grain position + skip counts) so a resumed
    run continues the exact same sequence. `skipped` counts skipped clips per reason; `skipped_ids` lists the
    first SKIPPED_IDS_KEPT as (id, reason, detail).
    """

    def __init__(self, dataset: grain.IterDataset, config: LoaderConfig):
        self.config = config
        self._iterator = iter(dataset)
        self.skipped: collections.Counter[str] = collections.Counter()
        self.skipped_ids: list[tuple[str, str, str]] = []

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._iterator)
        for clip_id, reason, detail in batch.pop("skipped"):
            logger.warning("skipped clip %s: %s (%s)", clip_id, reason, detail)
            self.skipped[reason] += 1
            if len(self.skipped_ids) < SKIPPED_IDS_KEPT:
                self.skipped_ids.append((clip_id, reason, detail))
        return batch

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def get_state(self) -> dict:
        return {
            "grain": self._iterator.get_state(),
            "skipped": dict(self.skipped),
            "skipped_ids": [list(s) for s in self.skipped_ids],
        }

    def set_state(self, state: dict) -> None:
        self._iterator.set_state(state["grain"])
        self.skipped = collections.Counter(state["skipped"])
        self.skipped_ids = [tuple(s) for s in state["skipped_ids"]]

    def close(self) -> None:
        """Stop worker processes (if any)."""
        self._iterator.close()


def make_loader(source: ClipSource, config: LoaderConfig,
                shard_options: grain.sharding.ShardOptions | None = None) -> ClipLoader:
    """The loader for this host; `shard_options` defaults to this JAX process's shard."""
    shard_options = shard_options or jax_shard_options()
    host_memory.keep_freed_buffers()  # the reader threads' (or the workers' batches') buffers stay in the heap
    indices = index_stream(len(source), source.targets, config, shard_options)
    description = getattr(source, "description", type(source).__name__)
    if config.worker_count > 0:
        # Worker processes read into shared memory (data/parallel_read.py); the same clips, batches and state.
        from convnext_audio_jax.data.parallel_read import WorkerClipReader

        reader = WorkerClipReader(source, indices, config.worker_count)
        return ClipLoader(_ValidClipBatchIterator(reader, config.rows_per_batch, config.waveform_dtype,
                                                  config.drop_remainder, description), config)
    read_options = grain.ReadOptions(num_threads=config.read_threads,
                                     prefetch_buffer_size=config.prefetch_buffer_size)
    clips = indices.map(ReadClip(source)).to_iter_dataset(read_options)
    return ClipLoader(ValidClipBatches(clips, config.rows_per_batch, config.waveform_dtype, config.drop_remainder,
                                       description), config)



def mixup_pairs(batch: dict) -> tuple[dict, dict]:
    """Split a batch drawn with draws_per_example=2 into its even and odd rows: pair k is (first[k], second[k])."""
    rows = batch["waveform"].shape[0]
    if rows % 2:
        raise ValueError(f"a mixup batch needs an even number of rows, got {rows}")
    return ({key: value[0::2] for key, value in batch.items()}, {key: value[1::2] for key, value in batch.items()})
