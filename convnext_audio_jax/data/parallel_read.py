"""Clips read by worker processes straight into shared memory, for loaders that must keep many accelerators fed.

Each worker (``data/workers.py``: spawned, ordered, fails at once when one dies) is sent the source once, without
its label matrix (``sources.without_labels``), and the sampler's index stream, and attaches one shared ring of int16
clip slots. The loader sends (stream position, slot) pairs; a worker looks up the clip index, reads the clip into
its slot and answers with the index and a status, so no waveform crosses a pipe or is pickled, the loader's process
only gathers slots into batches (about 0.2 ms of CPU per clip), and reading scales with the worker processes instead of waiting behind
h5py's lock or one interpreter's GIL. The ring holds ``(workers × max_pending + 1) × chunksize`` clips (the most
the ordered map can have in flight, plus the chunk being taken): 272 slots, 174 MB of ``/dev/shm`` for 8 workers
at the defaults, whatever the batch.

:class:`WorkerClipReader` is the iterator of clip elements that ``pipeline.ValidClipBatches`` turns into
batches; its state is grain's (``{"next_index": N}``, the index-stream items consumed), so a run resumes with any
``worker_count``.
"""

from __future__ import annotations

import uuid
from multiprocessing import shared_memory

import grain
import numpy as np

from convnext_audio_jax.data import audio, sources
from convnext_audio_jax.data.workers import WorkerPool
from convnext_audio_jax.runtime import host_memory

CHUNKSIZE = 16
MAX_PENDING = 2

# One per worker process (set by _attach): the source without labels and the ring of slots.
_WORKER: dict = {}


def _attach(source, indices: grain.MapDataset, shm_name: str, slots: int, samples: int) -> None:
    host_memory.keep_freed_buffers()
    # Spawned workers share the parent's resource tracker, which already holds this name: the parent unlinks it.
    memory = shared_memory.SharedMemory(name=shm_name)
    _WORKER.update(source=source, indices=indices, memory=memory,
                   ring=np.ndarray((slots, samples), np.int16, buffer=memory.buf))


def _read_into_slot(item: tuple[int, int]) -> tuple[int, tuple[str, str] | None]:
    """Worker side: the clip at stream ``position`` into ring slot ``slot``; (its clip index, None) or (its clip
    index, (reason, detail)) when it cannot be used. The index is looked up here because grain's shuffle costs
    about as much per clip as the copy into the batch, and the loader's process must stay free to gather."""
    position, slot = item
    index = int(_WORKER["indices"][position])
    try:
        waveform = sources.read_waveform(_WORKER["source"], index)
    except audio.ClipError as error:
        return index, (error.reason, error.detail)
    ring = _WORKER["ring"]
    if waveform.shape != ring.shape[1:]:
        return index, (audio.UNREADABLE, f"{waveform.shape[0]} samples where the loader holds {ring.shape[1]}")
    ring[slot] = waveform
    return index, None


class WorkerClipReader(grain.DatasetIterator):
    """Clip elements of ``indices`` (a grain MapDataset of clip indices), read by ``workers`` processes:
    {"waveform": int16 view of a ring slot, valid until the next element, "target", "id"} or {"error", "id",
    "detail"}, as ``pipeline.ReadClip`` gives them."""

    def __init__(self, source, indices: grain.MapDataset, workers: int):
        super().__init__()
        self._source = source
        self._indices = indices
        self._workers = workers
        self._slots = (workers * MAX_PENDING + 1) * CHUNKSIZE
        self._memory = self._ring = None
        self._pool: WorkerPool | None = None
        self._statuses = None
        self._position = 0

    def _clip_samples(self) -> int:
        """The clips' length: that of the first readable clip from here (the ring is sized by it)."""
        end = min(len(self._indices), self._position + 100)
        for position in range(self._position, end):
            try:
                return sources.read_waveform(self._source, int(self._indices[position])).shape[0]
            except audio.ClipError:
                continue
        return audio.CLIP_SAMPLES

    def _start(self) -> None:
        if self._memory is None:
            samples = self._clip_samples()
            self._memory = shared_memory.SharedMemory(create=True, size=self._slots * samples * 2,
                                                      name=f"convnext-audio-{uuid.uuid4().hex[:16]}")
            self._ring = np.ndarray((self._slots, samples), np.int16, buffer=self._memory.buf)
        if self._pool is None:
            self._pool = WorkerPool(self._workers, chunksize=CHUNKSIZE, max_pending=MAX_PENDING, name="clip reader",
                                    initializer=_attach, initargs=(sources.without_labels(self._source),
                                                                   self._indices, self._memory.name,
                                                                   *self._ring.shape))
        # An endless stream's length is sys.maxsize: the range is lazy.
        items = ((position, position % self._slots) for position in range(self._position, len(self._indices)))

        self._statuses = self._pool.map(_read_into_slot, items)

    def __next__(self) -> dict:
        self._assert_not_closed()
        if self._statuses is None:
            self._start()
        index, status = next(self._statuses)  # StopIteration at the end of a finite stream
        position = self._position
        self._position += 1
        clip_id = self._source.clip_id(index)
        if status is not None:
            return {"error": status[0], "id": clip_id, "detail": status[1]}
        return {"waveform": self._ring[position % self._slots], "target": self._source.targets[index], "id": clip_id}

    def get_state(self) -> dict:
        return {"next_index": self._position}

    def set_state(self, state: dict) -> None:
        self._position = int(state["next_index"])
        if self._statuses is not None:  # reads under way belong to the old position: start the workers afresh
            self._statuses = None
            self._pool.close(kill=True)
            self._pool = None

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        self._statuses = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self._ring = None
        if self._memory is not None:
            self._memory.close()
            self._memory.unlink()
            self._memory = None
