"""Demo clips synthesised once per test instead of once per draw: the tests that train on the built-in demo set
spend about half their CPU time making its audio (a 32-clip mixup step draws 64 clips), and a clip is a pure
function of (seed, split, index, rate, length) (convnext_audio_jax/data/demo.py), so keeping it changes no run."""

import contextlib
import dataclasses

import numpy as np
import pytest

from convnext_audio_jax.training import data as data_lib


class MemoizedClips:
    """``source`` (any clip source) whose clips are kept in ``store`` after their first read; the arrays are
    read-only, so a reader that changed one in place would fail instead of corrupting later reads."""

    def __init__(self, source, store: dict):
        self._source = source
        self._store = store

    def __len__(self):
        return len(self._source)

    def __getattr__(self, name):
        if name.startswith("_"):  # not delegated: keeps copy and pickle away from a half-built object
            raise AttributeError(name)
        return getattr(self._source, name)

    def __getitem__(self, index):
        index = int(index)
        source = self._source
        key = (type(source).__name__, source.clip_id(index), getattr(source, "sample_rate", None),
               getattr(source, "clip_samples", None), getattr(source, "_seed", None))
        clip = self._store.get(key)
        if clip is None:
            clip = dict(source[index])
            for value in clip.values():
                if isinstance(value, np.ndarray):
                    value.setflags(write=False)
            self._store[key] = clip
        return dict(clip)


def memoized(source, store: dict):
    return None if source is None else MemoizedClips(source, store)


@contextlib.contextmanager
def memoized_run_data(store: dict | None = None):
    """Every ``training.train`` inside keeps the clips of its training, validation and eval sources in ``store``
    (shared by the runs inside; released at the end unless the caller keeps it). Yields the store."""
    store = {} if store is None else store
    open_run_data = data_lib.open_run_data

    def opened(config, frontend):
        data = open_run_data(config, frontend)
        return dataclasses.replace(data, train=memoized(data.train, store), validation=memoized(data.validation, store),
                                   eval=memoized(data.eval, store))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data_lib, "open_run_data", opened)
        yield store
