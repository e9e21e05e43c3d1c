"""Scoring audio files window by window: streamed reading, batches shared across files, time-step scores and
merged sound events (words as in docs/glossary.md).

Audio of any format soundfile/audioread decodes, any sample rate and channel count (downmixed to mono by the
mean of the channels) and any length is read a block at a time, resampled to the model's rate and cut into
windows of the model's length, both from the model's metadata (`convnext_audio_jax.inference.windowing`): a file
shorter than a window is zero-padded at the end to one window (the authors' models were trained and evaluated
on AudioSet clips zero-padded at the end to 10 s, PANNs' ``pad_or_truncate``); a longer one is cut into windows
every ``hop`` seconds, the last window ending at the end of the file. Every window is scored; a file's score is
the max (or mean) over its windows.

Step scores (ConvNeXt only, ``--frames``): a score per last-stage time step of each window (31 for the released
10 s model), placed over the STFT frames the step covers (`convnext_audio_jax.models.outputs`): for the released
model [0.32 t − 0.04, 0.32 t + 0.28) s, clipped to the audio.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import numpy as np
import soundfile

from convnext_audio_jax.data import audio as audio_lib
from convnext_audio_jax.inference import windowing
from convnext_audio_jax.models.outputs import (
    has_frame_scores,
    output_selector,
    step_bounds,
)
from convnext_audio_jax.runtime.errors import UserError
from convnext_audio_jax.runtime.forward import ShardedForward

AGGREGATIONS = ("max", "mean")
# Extensions looked for inside folders (files named explicitly are always tried).
AUDIO_EXTENSIONS = frozenset(
    {f".{fmt.lower()}" for fmt in soundfile.available_formats()}
    | {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aac", ".wma", ".aiff", ".aif", ".au", ".webm",
       ".mp4"}
)

# A batch of windows (B, samples) float32 at the model's rate → dict of numpy arrays with B rows ("probs", and
# "frame_probs" when frame scores are asked for). ShardedForward is one; another backend can stand in.
WindowScorer = Callable[[np.ndarray], Mapping[str, np.ndarray]]


# ---------------------------------------------------------------------------------------------------- events

class EventMerger:
    """Sound events from scored segments given in order: per class, the segments scoring ≥ ``threshold`` are
    merged where they overlap or touch into (class index, onset, offset (its end), peak score). Holds one open event per
    class and the finished events (a few numbers each), not the segments."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self._open: dict[int, list[float]] = {}
        self._events: list[tuple[int, float, float, float]] = []

    def add(self, starts: np.ndarray, ends: np.ndarray, probs: np.ndarray) -> None:
        active = probs >= self.threshold
        for row in np.flatnonzero(active.any(axis=1)):
            start, end = float(starts[row]), float(ends[row])
            for index in np.flatnonzero(active[row]):
                index, peak = int(index), float(probs[row, index])
                event = self._open.get(index)
                if event is not None and start <= event[1] + 1e-6:
                    event[1], event[2] = max(event[1], end), max(event[2], peak)
                    continue
                if event is not None:
                    self._events.append((index, event[0], event[1], event[2]))
                self._open[index] = [start, end, peak]

    def events(self) -> list[dict]:
        """Every event (the open ones closed), sorted by onset then class."""
        events = self._events + [(i, *event) for i, event in self._open.items()]
        return [dict(index=i, onset=on, offset=off, peak=p) for i, on, off, p in sorted(events, key=lambda e: (e[1], e[0]))]


def merge_events(starts: np.ndarray, ends: np.ndarray, probs: np.ndarray, threshold: float) -> list[dict]:
    """`EventMerger` over one array of segments (sorted by start); sorted by onset."""
    merger = EventMerger(threshold)
    merger.add(starts, ends, probs)
    return merger.events()


# --------------------------------------------------------------------------------------------------- results

@dataclasses.dataclass(frozen=True)
class AudioInfo:
    """What a file was: its name, sample rate and channels (more than one were averaged), its length in
    samples at the model's rate ``model_rate`` (what it was resampled to), how many samples lay outside [-1, 1]
    (clipped), and the length of the model's window in seconds (rate and window: the model's metadata)."""

    name: str
    sample_rate: int
    channels: int
    num_samples: int
    model_rate: int
    window_seconds: float
    clipped: int = 0

    @property
    def duration(self) -> float:
        return self.num_samples / self.model_rate


@dataclasses.dataclass(frozen=True)
class TagError:
    name: str
    reason: str
    detail: str

    def line(self) -> str:
        return f"{self.name}: {self.reason} ({self.detail})"


@dataclasses.dataclass(frozen=True)
class FileStarted:
    name: str


@dataclasses.dataclass(frozen=True)
class WindowScores:
    name: str
    start: float  # seconds from the start of the file
    probs: np.ndarray  # (C,)
    frame_probs: np.ndarray | None  # (T, C): one score per time step


@dataclasses.dataclass(frozen=True)
class FileScored:
    audio: AudioInfo
    num_windows: int
    clip_probs: np.ndarray  # (C,)
    frame_bounds: np.ndarray | None  # (T, 2) within a window


@dataclasses.dataclass
class TaggedFile:
    """Scores of one file, every window in memory (`Tagger.tag`). Times are seconds from the start of the file."""

    audio: AudioInfo
    window_starts: np.ndarray  # (W,)
    window_probs: np.ndarray  # (W, C)
    clip_probs: np.ndarray  # (C,)
    frame_probs: np.ndarray | None  # (W, T, C): per time step, ConvNeXt with --frames only
    frame_bounds: np.ndarray | None  # (T, 2) seconds of each time step within a window

    def window_segments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(starts, ends, probs) of the windows, ends clipped to the audio."""
        return (*windowing.window_segments(self.window_starts, self.audio.duration, self.audio.window_seconds),
                self.window_probs)

    def frame_segments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(starts, ends, probs) of every time step of every window (`windowing.step_segments`)."""
        return windowing.step_segments(self.window_starts, self.frame_probs, self.frame_bounds, self.audio.duration)


# ---------------------------------------------------------------------------------------------------- tagger

@dataclasses.dataclass
class _File:
    """A file being scored: its windows as read, and the running aggregate of their scores."""

    source: windowing.FileWindows
    windows: int = 0
    scored: int = 0
    total: np.ndarray | None = None  # max or sum of the window probs
    non_finite: bool = False
    steps: int = 0  # time steps per window (frame scores)


@dataclasses.dataclass
class _Window:
    file: _File
    start: int
    samples: np.ndarray


@dataclasses.dataclass
class _Done:
    file: _File


class Tagger:
    """Scores files window by window; windows of consecutive files share batches of a fixed size, so the forward
    compiles once whatever the files' lengths. Memory: one batch of windows plus one window and one read block
    per file being read, whatever the files' lengths."""

    def __init__(self, model: nn.Module, variables: Mapping[str, Any], batch_size: int = 8,
                 hop_seconds: float | None = None, aggregate: str = "max", frames: bool = False,
                 mesh=None, max_windows: int = windowing.MAX_WINDOWS, scorer: WindowScorer | None = None):
        if aggregate not in AGGREGATIONS:
            raise UserError(f"aggregate {aggregate!r}: expected one of {AGGREGATIONS}")
        if max_windows < 1:
            raise UserError(f"--max-windows must be ≥ 1, got {max_windows}")
        self.model = model
        # Files are decoded and resampled to the model's rate and cut into windows of its length.
        self.sample_rate = int(model.frontend.sample_rate)
        self.window_samples = model.frontend.clip_samples
        self.window_seconds = self.window_samples / self.sample_rate
        self.hop = windowing.window_hop(hop_seconds, self.sample_rate, self.window_samples)  # None: half a window
        self.aggregate = aggregate
        self.frames = frames and has_frame_scores(model)
        self.max_windows = max_windows
        self.output_names = ["probs", "frame_probs"] if self.frames else ["probs"]
        self.scorer = scorer or ShardedForward(model, variables, batch_size, mesh,
                                               output_selector(model, self.output_names))
        self.batch_size = getattr(self.scorer, "batch_size", batch_size)

    def stream(self, paths: Iterable[str | os.PathLike]
               ) -> Iterator[FileStarted | WindowScores | FileScored | TagError]:
        """Per path in order: FileStarted, its WindowScores in time order, then FileScored; or a TagError (before
        or after some of its WindowScores: a file can fail part-way, e.g. truncated)."""
        pending: list = []
        windows = 0
        for path in paths:
            for item in self._items(path):
                pending.append(item)
                windows += isinstance(item, _Window)
                if windows == self.batch_size:
                    yield from self._flush(pending)
                    pending, windows = [], 0
        yield from self._flush(pending)

    def tag(self, paths: Iterable[str | os.PathLike]) -> Iterator[TaggedFile | TagError]:
        """A TaggedFile (every window's scores in memory) or a TagError per path, in order."""
        starts, probs, frame_probs = [], [], []
        for event in self.stream(paths):
            if isinstance(event, FileStarted):
                starts, probs, frame_probs = [], [], []
            elif isinstance(event, WindowScores):
                starts.append(event.start)
                probs.append(event.probs)
                frame_probs.append(event.frame_probs)
            elif isinstance(event, FileScored):
                yield TaggedFile(event.audio, np.array(starts), np.stack(probs), event.clip_probs,
                                 np.stack(frame_probs) if self.frames else None, event.frame_bounds)
            else:
                yield event

    def _items(self, path) -> Iterator:
        name = os.fspath(path)
        try:
            source = windowing.FileWindows(path, self.sample_rate, self.window_samples, self.hop, self.max_windows)
        except (audio_lib.ClipError, windowing.TooManyWindows) as error:
            yield _tag_error(name, error)
            return
        file = _File(source)
        yield FileStarted(name)
        try:
            for start, samples in source:
                file.windows += 1
                yield _Window(file, start, samples)
        except (audio_lib.ClipError, windowing.TooManyWindows) as error:
            yield _tag_error(name, error)
            return
        yield _Done(file)

    def _flush(self, pending: list) -> Iterator:
        windows = [item for item in pending if isinstance(item, _Window)]
        outputs = self.scorer(np.stack([w.samples for w in windows])) if windows else {}
        row = 0
        for item in pending:
            if isinstance(item, _Window):
                probs = np.asarray(outputs["probs"][row])
                frame_probs = np.asarray(outputs["frame_probs"][row]) if self.frames else None
                row += 1
                file = item.file
                file.steps = 0 if frame_probs is None else frame_probs.shape[0]
                file.non_finite |= not (np.isfinite(probs).all() and (frame_probs is None or np.isfinite(frame_probs).all()))
                if file.total is None:
                    file.total = probs.astype(np.float64)
                elif self.aggregate == "max":
                    file.total = np.maximum(file.total, probs)
                else:
                    file.total = file.total + probs
                file.scored += 1
                yield WindowScores(file.source.info.name, item.start / self.sample_rate, probs, frame_probs)
            elif isinstance(item, _Done):
                yield self._scored(item.file)
            else:
                yield item

    def _scored(self, file: _File) -> FileScored | TagError:
        if file.non_finite:
            return TagError(file.source.info.name, "non-finite scores", "the model gave NaN/Inf scores for this file")
        clip_probs = file.total if self.aggregate == "max" else file.total / file.scored
        info = file.source.info
        audio = AudioInfo(info.name, info.sample_rate, info.channels, file.source.num_samples, self.sample_rate,
                          self.window_seconds, info.clipped)
        bounds = step_bounds(self.model, file.steps) if self.frames else None
        return FileScored(audio, file.windows, clip_probs.astype(np.float32), bounds)


def _tag_error(name: str, error: audio_lib.ClipError | windowing.TooManyWindows) -> TagError:
    if isinstance(error, windowing.TooManyWindows):
        return TagError(name, "too many windows", str(error).removeprefix(f"{name}: "))
    return TagError(name, error.reason, error.detail)


def expand_inputs(inputs: Sequence[str]) -> tuple[list[str], list[TagError]]:
    """Files named and audio files found (recursively, by extension) in folders named; a folder without
    audio files is an error."""
    files, errors = [], []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(root, name) for root, _, names in os.walk(item) for name in names
                           if os.path.splitext(name)[1].lower() in AUDIO_EXTENSIONS and not name.startswith("."))
            if not found:
                errors.append(TagError(item, "no audio", "the folder holds no file with an audio extension"))
            files.extend(found)
        else:
            files.append(item)
    return files, errors
