"""PANNs' balanced sampler as a random-access, stateless sequence.

PANNs keep a shuffled queue of the class ids (refilled and reshuffled when empty) and, per class, a shuffled list
of its clips (reshuffled when exhausted); each draw pops a class and takes that class's next clip. Since every
refill of the queue holds each class exactly once, the class drawn at draw `i` comes from queue round
`i // K` (K = classes with at least one clip) and it is that class's `round`-th draw: so draw `i` can be computed
directly from (seed, i). The sampler therefore has no state beyond the draw number, which grain's iterator
state already records: a resumed run continues the exact sequence, and hosts can take their blocks of it.
"""

from __future__ import annotations

import sys

import grain
import numpy as np

from convnext_audio_jax.runtime.errors import UserError

_QUEUE_STREAM = 0
_CLASS_STREAM = 1


class BalancedIndices(grain.MapDataset):
    """Infinite sequence of clip indices: element `i` is the clip of the i-th balanced draw."""

    def __init__(self, targets: np.ndarray, seed: int):
        super().__init__()
        targets = np.asarray(targets, dtype=bool)
        if targets.ndim != 2:
            raise ValueError(f"targets must be an (N, C) matrix, got shape {targets.shape}")
        clips_per_class = targets.sum(axis=0)
        self._classes = np.flatnonzero(clips_per_class).astype(np.int64)
        if self._classes.size == 0:
            raise UserError(f"no class has a clip among the {targets.shape[0]} clips; cannot sample balanced")
        # Compressed per-class clip lists: clips of class c are _members[_starts[c]:_starts[c] + counts[c]].
        clip_of_label, class_of_label = np.nonzero(targets)
        order = np.argsort(class_of_label, kind="stable")
        self._members = clip_of_label[order].astype(np.int64)
        self._counts = clips_per_class.astype(np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self._counts)[:-1]])
        self._seed = int(seed)
        self._queue_cache: tuple[int, np.ndarray] | None = None
        self._class_cache: dict[int, tuple[int, np.ndarray]] = {}

    @property
    def sampled_classes(self) -> np.ndarray:
        """The class ids in the queue (classes without any clip are left out)."""
        return self._classes

    def __len__(self) -> int:
        return sys.maxsize

    def _class_queue(self, queue_round: int) -> np.ndarray:
        if self._queue_cache is None or self._queue_cache[0] != queue_round:
            rng = np.random.default_rng([self._seed, _QUEUE_STREAM, queue_round])
            self._queue_cache = (queue_round, rng.permutation(self._classes))
        return self._queue_cache[1]

    def _class_order(self, class_id: int, cycle: int) -> np.ndarray:
        cached = self._class_cache.get(class_id)
        if cached is None or cached[0] != cycle:
            rng = np.random.default_rng([self._seed, _CLASS_STREAM, class_id, cycle])
            start = self._starts[class_id]
            cached = (cycle, rng.permutation(self._members[start : start + self._counts[class_id]]))
            self._class_cache[class_id] = cached
        return cached[1]

    def class_of_draw(self, draw: int) -> int:
        queue_round, position = divmod(int(draw), self._classes.size)
        return int(self._class_queue(queue_round)[position])

    def __getitem__(self, draw):
        if isinstance(draw, slice):
            return self.slice(draw)
        queue_round, position = divmod(int(draw), self._classes.size)
        class_id = int(self._class_queue(queue_round)[position])
        # This class has been drawn once in each earlier queue round: this is its `queue_round`-th draw.
        cycle, position_in_cycle = divmod(queue_round, int(self._counts[class_id]))
        return int(self._class_order(class_id, cycle)[position_in_cycle])

    def __str__(self) -> str:
        return f"BalancedIndices(classes={self._classes.size}, seed={self._seed})"
