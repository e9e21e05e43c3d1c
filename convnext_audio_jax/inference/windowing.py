"""The one way audio becomes model input: a file → its windows → batches (docs/glossary.md: *window*, *hop*).

A window is as long as the model's input (its metadata's ``clip_seconds`` at its ``sample_rate``). A file of at
most one window is one window, zero-padded at the end; a longer one gets a window every ``hop`` samples (by
default half a window: `window_hop`) and a last one ending at the end of the file. `stream_windows` gives the same windows as `window_starts` +
`cut_windows` while holding at most one window plus one block of samples; `FileWindows` reads a file that way.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator

import numpy as np

from convnext_audio_jax.data import audio as audio_lib
from convnext_audio_jax.runtime.errors import UserError

# More windows than this in one file is a mistake (a hop of microseconds), not a request: 10⁶ windows is a
# 58-day file at the released models' default 5 s hop.
MAX_WINDOWS = 1_000_000


class TooManyWindows(UserError):
    """A file with more windows than allowed (``--max-windows``); the message starts with the file's name."""


def check_hop_seconds(hop_seconds: float) -> None:
    """The one check of ``--hop`` before a model is known: a positive, finite number of seconds."""
    if not (isinstance(hop_seconds, int | float) and math.isfinite(hop_seconds) and hop_seconds > 0):
        raise UserError(f"--hop must be a positive number of seconds, got {hop_seconds}")


def hop_samples(hop_seconds: float, sample_rate: int) -> int:
    """``hop_seconds`` as a whole number of samples ≥ 1; a UserError for 0, negative, non-finite or sub-sample
    hops."""
    check_hop_seconds(hop_seconds)
    hop = int(round(hop_seconds * sample_rate))
    if hop < 1:
        raise UserError(f"--hop {hop_seconds:g} s is shorter than one sample at {sample_rate} Hz "
                         f"({1 / sample_rate:.3g} s)")
    return hop


def window_hop(hop_seconds: float | None, sample_rate: int, window_samples: int) -> int:
    """The hop in samples: ``hop_seconds`` (`hop_samples`), or without one half the model's window, so every moment
    of a long file is in two windows (5 s for the released 10 s models, 0.5 s for the 1 s demo)."""
    if hop_seconds is None:
        return max(1, window_samples // 2)
    return hop_samples(hop_seconds, sample_rate)


def window_count(num_samples: int, window: int, hop: int) -> int:
    """How many windows `window_starts` gives for ``num_samples`` (last window at the end)."""
    return 1 if num_samples <= window else -(-(num_samples - window) // hop) + 1


def check_window_count(name: str, num_samples: int, window: int, hop: int, max_windows: int = MAX_WINDOWS) -> None:
    count = window_count(num_samples, window, hop)
    if count > max_windows:
        raise TooManyWindows(f"{name}: {count} windows at a hop of {hop} samples exceeds the limit of {max_windows} "
                         "(use a longer --hop or a higher --max-windows)")


def window_starts(num_samples: int, window: int, hop: int, last_at_end: bool = True) -> np.ndarray:
    """Start samples of the windows covering ``num_samples``: one window when it fits, otherwise one every
    ``hop`` samples and a last one ending at the end (``last_at_end``) or running past it (zero-padded)."""
    if hop < 1:
        raise ValueError(f"hop must be ≥ 1 sample, got {hop}")
    if num_samples <= window:
        return np.zeros(1, dtype=np.int64)
    if last_at_end:
        starts = np.arange(0, num_samples - window, hop, dtype=np.int64)
        return np.append(starts, num_samples - window)
    return np.arange(-(-(num_samples - window) // hop) + 1, dtype=np.int64) * hop


def iter_windows(waveform: np.ndarray, starts: np.ndarray, window: int) -> Iterator[np.ndarray]:
    """The (window,) float32 windows of a 1-D ``waveform`` at ``starts``, one at a time (minutes of audio cut into
    overlapping windows need not fit in memory at once); the part past the end of the audio is zeros."""
    padded = np.zeros(max(int(np.max(starts)) + window, waveform.shape[0]), dtype=np.float32)
    padded[: waveform.shape[0]] = waveform
    for start in starts:
        yield padded[start : start + window]


def cut_windows(waveform: np.ndarray, starts: np.ndarray, window: int) -> np.ndarray:
    """(len(starts), window) float32 windows (`iter_windows`, stacked)."""
    return np.stack(list(iter_windows(waveform, starts, window)))


def batches(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of ``size`` items (the last one shorter)."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def window_segments(starts: np.ndarray, duration: float, window_seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) in seconds of windows starting at ``starts``, ends clipped to the audio's ``duration``."""
    return starts, np.minimum(starts + window_seconds, duration)


def step_segments(window_starts: np.ndarray, step_probs: np.ndarray, bounds: np.ndarray, duration: float):
    """(starts, ends, probs) of every time step of every window (``step_probs`` (W, T, C), ``bounds`` (T, 2) the
    steps' seconds within a window), in time order of the windows; steps that lie wholly in the zero padding past
    the end of the audio are left out, ends are clipped to it."""
    starts = (window_starts[:, None] + bounds[None, :, 0]).ravel()
    ends = (window_starts[:, None] + bounds[None, :, 1]).ravel()
    probs = step_probs.reshape(-1, step_probs.shape[-1])
    inside = starts < duration
    return starts[inside], np.minimum(ends[inside], duration), probs[inside]


def stream_windows(blocks: Iterable[np.ndarray], window: int, hop: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start sample, (window,) float32 samples) of the windows `window_starts` gives (``last_at_end``), cut from
    consecutive 1-D blocks as they arrive. Holds at most one window plus one block; the total length is only
    known at the end, so a hop window is given once a sample past its end has arrived."""
    if hop < 1:
        raise ValueError(f"hop must be ≥ 1 sample, got {hop}")
    buffer, buffer_start, total, next_start = np.zeros(0, np.float32), 0, 0, 0
    for block in blocks:
        buffer = np.concatenate([buffer, np.asarray(block, np.float32)])
        total += len(block)
        while next_start + window < total:
            at = next_start - buffer_start
            yield next_start, buffer[at : at + window].copy()
            next_start += hop
        keep_from = max(buffer_start, min(next_start, total - window))
        buffer, buffer_start = buffer[keep_from - buffer_start :], keep_from
    if total <= window:
        padded = np.zeros(window, np.float32)
        padded[:total] = buffer
        yield 0, padded
    else:
        yield total - window, buffer[total - window - buffer_start :].copy()


class FileWindows:
    """A file's windows, read as a stream: decoded, downmixed and resampled to ``sample_rate`` (the model's) a
    block at a time (`data.audio.stream_mono`), then cut by `stream_windows`. Opening raises ``ClipError`` for an
    unreadable file and `TooManyWindows` when the header already tells of more than ``max_windows``; iterating
    gives (start sample, window samples) and raises ``ClipError`` (e.g. truncated) or `TooManyWindows`.
    ``num_samples`` counts the samples read so far (the file's length once iterated)."""

    def __init__(self, path: str | os.PathLike, sample_rate: int, window_samples: int, hop: int,
                 max_windows: int = MAX_WINDOWS):
        self.name = os.fspath(path)
        self.sample_rate, self.window_samples, self.hop, self.max_windows = sample_rate, window_samples, hop, max_windows
        self.info, self._blocks = audio_lib.stream_mono(path, target_rate=sample_rate)
        if self.info.header_frames is not None:  # refuse before reading when the header already tells
            expected = int(np.ceil(self.info.header_frames * sample_rate / self.info.sample_rate))
            check_window_count(self.name, expected, window_samples, hop, max_windows)
        self.num_samples = 0

    def _counted(self) -> Iterator[np.ndarray]:
        for block in self._blocks:
            self.num_samples += block.shape[0]
            yield block

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        for count, (start, samples) in enumerate(stream_windows(self._counted(), self.window_samples, self.hop), 1):
            if count > self.max_windows:
                raise TooManyWindows(f"{self.name}: more than {self.max_windows} windows at a hop of {self.hop} samples")
            yield start, samples
