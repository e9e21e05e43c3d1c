"""Clips read by worker processes straight into shared memory, for loaders that must keep many accelerators fed.

Each worker (``data/workers.py``: spawned, ordered, fails at once when one dies) is sent the source once, without
its label matrix (``sources.without_labels``), and attaches one shared ring of int16 clip slots. The loader sends
(clip index, slot) pairs; a worker reads the clip into its slot and answers with nothing but a status, so no
waveform crosses a pipe or is pickled, and reading scales with the worker processes instead of waiting behind
h5py's lock or one interpreter's GIL. The ring holds ``(workers × max_pending + 1) × chunksize`` clips (the most
the ordered map can have in flight, plus the chunk being taken): 272 slots, 174 MB of ``/dev/shm`` for 8 workers
at the defaults, whatever the batch.

:class:`WorkerClipReader` is the iterator of clip elements that ``pipeline.ValidClipBatches`` turns into
batches; its state is grain's (``{"next_index": N}``, the index-stream items consumed), so a run resumes with any
``worker_count``.
"""

from __future__ import annotations

import collections
import uuid
from multiprocessing import shared_memory

import grain
import numpy as np

from convnext_audio_jax.data import audio, sources
from convnext_audio_jax.data.workers import WorkerPool

CHUNKSIZE = 16
MAX_PENDING = 2

# One per worker process (set by _attach): the source without labels and the ring of slots.
_WORKER: dict = {}


def _attach(source, shm_name: str, slots: int, samples: int) -> None:
    # Spawned workers share the parent's resource tracker, which already holds this name: the parent unlinks it.
    memory = shared_memory.SharedMemory(name=shm_name)
    _WORKER.update(source=source, memory=memory, ring=np.ndarray((slots, samples), np.int16, buffer=memory.buf))


def _read_into_slot(item: tuple[int, int]) -> tuple[str, str] | None:
    """Worker side: clip ``index`` into ring slot ``slot``; None, or (reason, detail) of a clip that cannot be used."""
    index, slot = item
    try:
        waveform = sources.read_waveform(_WORKER["source"], index)
    except audio.ClipError as error:
        return error.reason, error.detail
    ring = _WORKER["ring"]
    if waveform.shape != ring.shape[1:]:
        return audio.UNREADABLE, f"{waveform.shape[0]} samples where the loader holds {ring.shape[1]}"
    ring[slot] = waveform
    return None


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
        self._sent: collections.deque[int] = collections.deque()  # indices sent to the workers, oldest first
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
                                                                   self._memory.name, *self._ring.shape))
        self._sent.clear()

        def items():  # an endless stream's length is sys.maxsize: the range is lazy
            for position in range(self._position, len(self._indices)):
                index = int(self._indices[position])
                self._sent.append(index)  # taken back in order by __next__, which reads each status in order
                yield index, position % self._slots

        self._statuses = self._pool.map(_read_into_slot, items())

    def __next__(self) -> dict:
        self._assert_not_closed()
        if self._statuses is None:
            self._start()
        status = next(self._statuses)  # StopIteration at the end of a finite stream
        position = self._position
        self._position += 1
        index = self._sent.popleft()
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
