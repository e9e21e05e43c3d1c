"""10 s analysis windows of audio: start positions, cutting from an array, and cutting from a stream of blocks.

A file of at most one window is one window, zero-padded at the end; a longer one gets a window every ``hop``
samples and a last one ending at the end of the file. `stream_windows` gives the same windows as
`window_starts` + `cut_windows` while holding at most one window plus one block of samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np

from convnext_audio_jax.runtime.errors import UserError

# More windows than this in one file is a mistake (a hop of microseconds), not a request: 10⁶ windows is a
# 58-day file at the default 5 s hop.
MAX_WINDOWS = 1_000_000


def hop_samples(hop_seconds: float, sample_rate: int) -> int:
    """``hop_seconds`` as a whole number of samples ≥ 1; ValueError for 0, negative, non-finite or sub-sample hops."""
    if not (isinstance(hop_seconds, int | float) and math.isfinite(hop_seconds) and hop_seconds > 0):
        raise UserError(f"--hop must be a positive number of seconds, got {hop_seconds}")
    hop = int(round(hop_seconds * sample_rate))
    if hop < 1:
        raise UserError(f"--hop {hop_seconds:g} s is shorter than one sample at {sample_rate} Hz "
                         f"({1 / sample_rate:.3g} s)")
    return hop


def window_count(num_samples: int, window: int, hop: int) -> int:
    """How many windows `window_starts` gives for ``num_samples`` (last window at the end)."""
    return 1 if num_samples <= window else -(-(num_samples - window) // hop) + 1


def check_window_count(name: str, num_samples: int, window: int, hop: int, max_windows: int = MAX_WINDOWS) -> None:
    count = window_count(num_samples, window, hop)
    if count > max_windows:
        raise UserError(f"{name}: {count} windows at a hop of {hop} samples exceeds the limit of {max_windows} "
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


def cut_windows(waveform: np.ndarray, starts: np.ndarray, window: int) -> np.ndarray:
    """(len(starts), window) float32 windows; the part past the end of the audio is zeros."""
    padded = np.zeros(int(starts[-1]) + window, dtype=np.float32)
    padded[: waveform.shape[0]] = waveform
    return np.stack([padded[s : s + window] for s in starts])


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
            offset = next_start - buffer_start
            yield next_start, buffer[offset : offset + window].copy()
            next_start += hop
        keep_from = max(buffer_start, min(next_start, total - window))
        buffer, buffer_start = buffer[keep_from - buffer_start :], keep_from
    if total <= window:
        padded = np.zeros(window, np.float32)
        padded[:total] = buffer
        yield 0, padded
    else:
        yield total - window, buffer[total - window - buffer_start :].copy()
