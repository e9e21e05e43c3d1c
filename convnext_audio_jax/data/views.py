"""Sources made of other sources: the union of several (:class:`ConcatSource`, a ``SPEC+SPEC``) and a subset
of one (:class:`SubsetSource`: a holdout split, or the clips a teacher file covers). The clips are read by the
parent sources; a view holds only its label matrix and the index arithmetic."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np

from convnext_audio_jax.data import sources


class _SourceView:
    """What a union and a subset share: they hold the label matrix; the clips are read by the parent sources."""

    _targets: np.ndarray

    def __len__(self) -> int:
        return self._targets.shape[0]

    @property
    def targets(self) -> np.ndarray:
        return self._targets

    @property
    def num_classes(self) -> int:
        return self._targets.shape[1]

    def _checked(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"clip index {index} out of range for a source of {len(self)} clips")
        return index

    def read_waveform(self, index: int) -> np.ndarray:
        """Clip ``index``'s waveform alone, read by its parent (``sources.read_waveform``)."""
        source, local = self._locate(index)
        return sources.read_waveform(source, local)

    def without_labels(self):
        """A copy for worker processes: the parents without their label matrices, and no label matrix here."""
        view = copy.copy(self)
        view._targets = np.zeros((len(self), 0), dtype=bool)
        view._replace_parents([sources.without_labels(parent) for parent in self._parents()])
        return view


class ConcatSource(_SourceView):
    """Several sources as one: clip ``i`` of part k is clip ``offset_k + i``; targets concatenated, so the
    balanced sampler spans every part. Clip ids must be unique across the parts (``spec.open_spec`` checks)."""

    def __init__(self, parts: Sequence, names: Sequence[str]):
        self._parts = list(parts)
        self._names = list(names)
        self._offsets = np.cumsum([0] + [len(p) for p in self._parts])
        self._targets = np.concatenate([np.asarray(p.targets, dtype=bool) for p in self._parts])

    def _locate(self, index: int) -> tuple[object, int]:
        index = self._checked(index)
        k = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return self._parts[k], index - int(self._offsets[k])

    def _parents(self) -> list:
        return self._parts

    def _replace_parents(self, parents: list) -> None:
        self._parts = parents

    def clip_id(self, index: int) -> str:
        part, local = self._locate(index)
        return part.clip_id(local)

    def __getitem__(self, index: int) -> dict:
        part, local = self._locate(index)
        return part[local]

    @property
    def description(self) -> str:
        return " + ".join(_describe(p) for p in self._parts)


class SubsetSource(_SourceView):
    """The clips ``indices`` (in that order) of ``parent``."""

    def __init__(self, parent, indices: np.ndarray):
        self._parent = parent
        self.indices = np.asarray(indices, dtype=np.int64)
        self._targets = np.asarray(parent.targets, dtype=bool)[self.indices]

    def clip_id(self, index: int) -> str:
        return self._parent.clip_id(int(self.indices[index]))

    def _locate(self, index: int) -> tuple[object, int]:
        return self._parent, int(self.indices[self._checked(index)])

    def _parents(self) -> list:
        return [self._parent]

    def _replace_parents(self, parents: list) -> None:
        (self._parent,) = parents

    def __getitem__(self, index: int) -> dict:
        return self._parent[int(self.indices[self._checked(index)])]

    @property
    def description(self) -> str:
        return _describe(self._parent)


def _describe(source) -> str:
    return getattr(source, "description", type(source).__name__)
