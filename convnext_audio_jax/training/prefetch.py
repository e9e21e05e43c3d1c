"""The training batches, read and put on the devices by a background thread, ``ahead`` steps before the step that
takes them: the training thread only dispatches steps, so the host's reading and the host-to-device copy overlap
the device's work instead of following it."""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np


@dataclasses.dataclass
class Prefetched:
    """One step's batch: ``arrays`` on the devices, the clip ids, the loader's state right after this batch when
    the loop asked for it (``state_at``), and the loader's skip count by then."""

    step: int
    arrays: dict
    ids: np.ndarray
    loader_state: dict | None
    num_skipped: int


_DONE = object()


class DevicePrefetcher:
    """``next()`` gives the :class:`Prefetched` batch of step ``first_step``, then of each following step.

    ``read()`` returns the host batch of the next step (the loader plus any per-batch host work), ``to_device``
    makes its device arrays, ``state_at(step)`` says whether the loader's state after step ``step``'s batch is
    needed (a checkpoint); ``loader`` is read only from the background thread once this starts. An error in the
    thread is raised by the ``next()`` that would have returned its batch."""

    def __init__(self, loader, read: Callable[[], dict], to_device: Callable[[dict], dict], first_step: int,
                 last_step: int, state_at: Callable[[int], bool], ahead: int = 2):
        self._loader = loader
        self._read = read
        self._to_device = to_device
        self._state_at = state_at
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, ahead))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(first_step, last_step), name="device-prefetch",
                                        daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, first_step: int, last_step: int) -> None:
        try:
            for step in range(first_step, last_step + 1):
                if self._stop.is_set():
                    return
                local = self._read()
                state = self._loader.get_state() if self._state_at(step) else None
                item = Prefetched(step, self._to_device(local), local["id"], state, self._loader.num_skipped)
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as error:  # handed to the training thread, which raises it
            self._put(error)

    def __iter__(self):
        return self

    def __next__(self) -> Prefetched:
        item = self._queue.get()
        if item is _DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stops the thread (it finishes the batch in hand first); the loader is the caller's to close after."""
        self._stop.set()
        self._thread.join()
