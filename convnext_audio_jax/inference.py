"""Tagging users' audio, sound-event timelines and embeddings (the HEAR API is ``convnext_audio_jax.hear``).

Audio of any format soundfile/librosa decodes, any sample rate and channel count (downmixed to mono by the mean
of the channels) and any length is cut into 10 s windows at 32 kHz: a file shorter than 10 s is zero-padded at
the end to one window (the authors' models were trained and evaluated on AudioSet clips zero-padded at the end
to 10 s, PANNs' ``pad_or_truncate``); a longer one is cut into windows every ``hop`` seconds, the last window
ending at the end of the file. Every window is scored; a file's score is the max (or mean) over its windows.

Frame-level scores (ConvNeXt only): the last stage yields a sequence of T time steps per window (31 for 10 s:
mean over the mel axis of the stage-4 output). The clip head is ``Dense(LayerNorm(max_t s_t + mean_t s_t))``;
the score of step t is that head applied to a window whose every step equals s_t, i.e.
``sigmoid(Dense(LayerNorm(2 · s_t)))``. Step t is reported over the STFT frames its stride cell covers:
frames [t·S − P, (t+1)·S − P) with S = stem time stride · 2^(stages−1) (32) and P = the stem's time padding (4),
i.e. [0.32 t − 0.04, 0.32 t + 0.28) s for the released model, clipped to the audio.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import pathlib
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import soundfile
import tqdm

from convnext_audio_jax.data import audio as audio_lib
from convnext_audio_jax.data import labels as labels_lib
from convnext_audio_jax.forward import ShardedForward
from convnext_audio_jax.models.convnext import LN_EPS, STEM_VARIANTS, AudioConvNeXt

DEFAULT_HOP_SECONDS = 5.0
DEFAULT_THRESHOLD = 0.25  # the authors' demo's activity threshold
AGGREGATIONS = ("max", "mean")
OUTPUT_FORMATS = ("table", "json", "csv")
EMBEDDING_KINDS = ("scene", "frames", "sequence", "logits")
# Extensions looked for inside folders (files named explicitly are always tried).
AUDIO_EXTENSIONS = frozenset(
    {f".{fmt.lower()}" for fmt in soundfile.available_formats()}
    | {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aac", ".wma", ".aiff", ".aif", ".au", ".webm",
       ".mp4"}
)


# ----------------------------------------------------------------------------------------------- audio windows

@dataclasses.dataclass(frozen=True)
class Audio:
    """A decoded file: mono float32 at 32 kHz, and what it was."""

    name: str
    waveform: np.ndarray
    sample_rate: int  # the file's
    channels: int  # the file's; more than one were averaged

    @property
    def duration(self) -> float:
        return self.waveform.shape[0] / audio_lib.SAMPLE_RATE


def read_audio(path: str | os.PathLike) -> Audio:
    """Decode any file, downmix, resample to 32 kHz; raises ClipError (missing, unreadable, empty, NaN/Inf)."""
    samples, sample_rate = audio_lib.decode(path)
    mono = audio_lib.to_mono(samples, sample_rate, os.fspath(path), min_seconds=0.0)
    return Audio(os.fspath(path), mono, sample_rate, samples.shape[1])


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


# ------------------------------------------------------------------------------------------------ frame scores

def frame_grid(model: nn.Module) -> tuple[int, int] | None:
    """(stride, offset) in STFT frames of the last stage's time steps for an AudioConvNeXt, else None."""
    if not isinstance(model, AudioConvNeXt):
        return None
    stem = STEM_VARIANTS[model.stem]
    return stem["stride"][0] * 2 ** (len(model.depths) - 1), -stem["padding"][0]


def frame_bounds(model: nn.Module, num_steps: int) -> np.ndarray:
    """(num_steps, 2) start/end seconds of each last-stage time step within a window (see the module doc)."""
    stride, offset = frame_grid(model)
    seconds_per_frame = model.frontend.hop_length / model.frontend.sample_rate
    steps = np.arange(num_steps)
    bounds = np.stack([offset + steps * stride, offset + (steps + 1) * stride], axis=1) * seconds_per_frame
    return np.clip(bounds, 0.0, model.frontend.clip_seconds)


def frame_logits(model: AudioConvNeXt, params: Mapping[str, Any], sequence: jax.Array) -> jax.Array:
    """(B, T, C) per-step logits: the clip head applied to each step s_t as if the window were constant,
    Dense(LayerNorm(2·s_t)) (the head's input is max_t + mean_t)."""
    norm = nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, dtype=model.dtype)
    dense = nn.Dense(model.num_classes, dtype=model.dtype)
    normalised = norm.apply({"params": params["head_norm"]}, 2.0 * sequence)
    return dense.apply({"params": params["head"]}, normalised).astype(jnp.float32)


def sequence_of(outputs: Mapping[str, jax.Array]) -> jax.Array:
    """(B, T, C) time sequence: the last stage's output averaged over the mel axis (any model)."""
    if "sequence_embeddings" in outputs:
        return outputs["sequence_embeddings"]
    return jnp.mean(outputs["frame_embeddings"], axis=2)


# -------------------------------------------------------------------------------------------------- tagging

@dataclasses.dataclass
class TaggedFile:
    """Scores of one file. Times are seconds from the start of the file."""

    audio: Audio
    window_starts: np.ndarray  # (W,)
    window_probs: np.ndarray  # (W, C)
    clip_probs: np.ndarray  # (C,)
    frame_probs: np.ndarray | None  # (W, T, C), ConvNeXt with frames only
    frame_bounds: np.ndarray | None  # (T, 2) within a window

    def window_segments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(starts, ends, probs) of the windows, ends clipped to the audio."""
        ends = np.minimum(self.window_starts + audio_lib.CLIP_SECONDS, self.audio.duration)
        return self.window_starts, ends, self.window_probs

    def frame_segments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(starts, ends, probs) of every frame of every window, in time order of the windows; frames that lie
        wholly in the zero padding past the end of the audio are left out."""
        starts = (self.window_starts[:, None] + self.frame_bounds[None, :, 0]).ravel()
        ends = (self.window_starts[:, None] + self.frame_bounds[None, :, 1]).ravel()
        probs = self.frame_probs.reshape(-1, self.frame_probs.shape[-1])
        inside = starts < self.audio.duration
        return starts[inside], np.minimum(ends[inside], self.audio.duration), probs[inside]


@dataclasses.dataclass(frozen=True)
class TagError:
    name: str
    reason: str
    detail: str

    def line(self) -> str:
        return f"{self.name}: {self.reason} ({self.detail})"


def merge_events(starts: np.ndarray, ends: np.ndarray, probs: np.ndarray, threshold: float) -> list[dict]:
    """Sound events from scored segments (sorted by start): per class, the segments scoring ≥ ``threshold``
    are merged where they overlap or touch into (class index, onset, offset, peak score); sorted by onset."""
    events = []
    for index in np.flatnonzero((probs >= threshold).any(axis=0)):
        active = np.flatnonzero(probs[:, index] >= threshold)
        onset, offset, peak = starts[active[0]], ends[active[0]], probs[active[0], index]
        for segment in active[1:]:
            if starts[segment] <= offset + 1e-6:
                offset, peak = max(offset, ends[segment]), max(peak, probs[segment, index])
            else:
                events.append((int(index), float(onset), float(offset), float(peak)))
                onset, offset, peak = starts[segment], ends[segment], probs[segment, index]
        events.append((int(index), float(onset), float(offset), float(peak)))
    return [dict(index=i, onset=on, offset=off, peak=p) for i, on, off, p in sorted(events, key=lambda e: (e[1], e[0]))]


@dataclasses.dataclass
class _QueuedFile:
    """A file waiting for its windows' scores (or an error, which waits for nothing)."""

    item: Audio | TagError
    starts: np.ndarray | None = None
    outputs: list | None = None
    windows_left: int = 0


class Tagger:
    """Scores files window by window; windows of consecutive files share batches of a fixed size, so the forward
    compiles once whatever the files' lengths."""

    def __init__(self, model: nn.Module, variables: Mapping[str, Any] | None, batch_size: int = 8,
                 hop_seconds: float = DEFAULT_HOP_SECONDS, aggregate: str = "max", frames: bool = False,
                 mesh=None, forward=None):
        """``forward``: another backend for the windows (e.g. ``onnx_backend.OnnxRuntimeForward``): a callable
        (n ≤ forward.batch_size, window) → {"probs", "frame_probs" with ``frames``}; ``variables`` is then unused."""
        if aggregate not in AGGREGATIONS:
            raise ValueError(f"aggregate {aggregate!r}: expected one of {AGGREGATIONS}")
        if not 0 < hop_seconds:
            raise ValueError(f"hop must be positive, got {hop_seconds} s")
        if model.frontend.sample_rate != audio_lib.SAMPLE_RATE:
            raise ValueError(f"the model takes {model.frontend.sample_rate} Hz audio; tagging decodes to "
                             f"{audio_lib.SAMPLE_RATE} Hz")
        self.model = model
        self.window = model.frontend.clip_samples
        self.hop = max(1, int(round(hop_seconds * audio_lib.SAMPLE_RATE)))
        self.aggregate = aggregate
        self.frames = frames and frame_grid(model) is not None

        def select(variables, outputs):
            selected = {"probs": outputs["probs"]}
            if self.frames:
                selected["frame_probs"] = jax.nn.sigmoid(frame_logits(model, variables["params"], sequence_of(outputs)))
            return selected

        self._forward = forward if forward is not None else ShardedForward(model, variables, batch_size, mesh, select)

    def tag(self, paths: Iterable[str | os.PathLike]) -> Iterator[TaggedFile | TagError]:
        """A TaggedFile or a TagError per path, in order."""
        queue: deque[_QueuedFile] = deque()  # files in input order
        pending: list[tuple[_QueuedFile, int, np.ndarray]] = []  # windows not yet run: (file, index, samples)
        for path in paths:
            try:
                decoded = read_audio(path)
            except audio_lib.ClipError as error:
                queue.append(_QueuedFile(TagError(os.fspath(path), error.reason, error.detail)))
            else:
                starts = window_starts(decoded.waveform.shape[0], self.window, self.hop)
                queued = _QueuedFile(decoded, starts, [None] * len(starts), len(starts))
                queue.append(queued)
                windows = cut_windows(decoded.waveform, starts, self.window)
                pending.extend((queued, i, window) for i, window in enumerate(windows))
            while len(pending) >= self._forward.batch_size:
                self._run(pending[: self._forward.batch_size])
                del pending[: self._forward.batch_size]
            yield from self._finished(queue)
        if pending:
            self._run(pending)
        yield from self._finished(queue)

    def _run(self, batch: list) -> None:
        outputs = self._forward(np.stack([window for _, _, window in batch]))
        for row, (queued, window_index, _) in enumerate(batch):
            queued.outputs[window_index] = {name: value[row] for name, value in outputs.items()}
            queued.windows_left -= 1

    def _finished(self, queue: deque) -> Iterator[TaggedFile | TagError]:
        while queue and queue[0].windows_left == 0:
            queued = queue.popleft()
            if isinstance(queued.item, TagError):
                yield queued.item
                continue
            decoded, outputs, starts = queued.item, queued.outputs, queued.starts
            window_probs = np.stack([o["probs"] for o in outputs])
            clip_probs = window_probs.max(axis=0) if self.aggregate == "max" else window_probs.mean(axis=0)
            frame_probs = np.stack([o["frame_probs"] for o in outputs]) if self.frames else None
            bounds = frame_bounds(self.model, frame_probs.shape[1]) if self.frames else None
            yield TaggedFile(decoded, starts / audio_lib.SAMPLE_RATE, window_probs, clip_probs, frame_probs, bounds)


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


# ------------------------------------------------------------------------------------------------- reporting

def _tags(probs: np.ndarray, names: Sequence[str], top_k: int, threshold: float) -> list[dict]:
    best = np.argsort(-probs, kind="stable")[:top_k]
    return [{"index": int(i), "label": names[i], "score": float(probs[i])} for i in best if probs[i] >= threshold]


def file_report(result: TaggedFile, names: Sequence[str], top_k: int, threshold: float, all_scores: bool) -> dict:
    """A JSON-ready dict of one file's tags (and timeline when computed)."""
    source = result.audio
    report: dict[str, Any] = {
        "file": source.name,
        "duration_s": round(source.duration, 4),
        "sample_rate": source.sample_rate,
        "channels": source.channels,
        "downmixed": source.channels > 1,
        "padded": source.duration < audio_lib.CLIP_SECONDS,
        "num_windows": len(result.window_starts),
        "tags": _tags(result.clip_probs, names, top_k, threshold),
    }
    if all_scores:
        report["scores"] = {names[i]: float(p) for i, p in enumerate(result.clip_probs)}
    return report


def timeline_report(result: TaggedFile, names: Sequence[str], top_k: int, threshold: float,
                    all_scores: bool) -> dict:
    """Per-window and per-frame scores of the file's reported classes (every class with ``all_scores``) and
    the merged events above ``threshold``."""
    reported = (np.arange(len(names)) if all_scores
                else np.array([t["index"] for t in _tags(result.clip_probs, names, top_k, threshold)], dtype=int))

    def rows(segments):
        starts, ends, probs = segments
        return [{"start": round(float(s), 4), "end": round(float(e), 4),
                 "scores": {names[i]: float(p[i]) for i in reported}} for s, e, p in zip(starts, ends, probs)]

    report = {"windows": rows(result.window_segments())}
    segments = result.window_segments()
    if result.frame_probs is not None:
        report["frames"] = rows(result.frame_segments())
        segments = result.frame_segments()
    report["events"] = [{"label": names[e["index"]], **e, "onset": round(e["onset"], 4),
                         "offset": round(e["offset"], 4)} for e in merge_events(*segments, threshold)]
    return report


def _describe(report: dict) -> str:
    details = [f"{report['duration_s']:.2f} s", f"{report['sample_rate']} Hz"]
    if report["sample_rate"] != audio_lib.SAMPLE_RATE:
        details[-1] += f" resampled to {audio_lib.SAMPLE_RATE} Hz"
    if report["downmixed"]:
        details.append(f"{report['channels']} channels downmixed to mono")
    details.append("zero-padded to 10 s" if report["padded"] else f"{report['num_windows']} windows")
    return f"{report['file']} ({', '.join(details)})"


def write_table(reports: list[dict], threshold: float, out) -> None:
    for report in reports:
        print(_describe(report), file=out)
        if not report["tags"]:
            print(f"  no class scores ≥ {threshold:g}", file=out)
        for tag in report["tags"]:
            print(f"  {tag['score']:.3f}  {tag['label']}", file=out)
        for event in report.get("events", []):
            print(f"  event {event['onset']:8.2f} – {event['offset']:8.2f} s  peak {event['peak']:.3f}  "
                  f"{event['label']}", file=out)


def write_csv(reports: list[dict], names: Sequence[str], out) -> None:
    """Long format: file, kind (clip|window|frame|event), start, end, index, label, score (events: peak)."""
    index_of = {name: i for i, name in enumerate(names)}
    writer = csv.writer(out)
    writer.writerow(["file", "kind", "start", "end", "index", "label", "score"])
    for report in reports:
        clip_scores = report.get("scores") or {t["label"]: t["score"] for t in report["tags"]}
        for label, score in clip_scores.items():
            writer.writerow([report["file"], "clip", 0.0, report["duration_s"], index_of[label], label, f"{score:.6f}"])
        for kind in ("window", "frame"):
            for row in report.get(kind + "s", []):
                for label, score in row["scores"].items():
                    writer.writerow([report["file"], kind, row["start"], row["end"], index_of[label], label,
                                     f"{score:.6f}"])
        for event in report.get("events", []):
            writer.writerow([report["file"], "event", event["onset"], event["offset"], event["index"],
                             event["label"], f"{event['peak']:.6f}"])


def class_names_for(metadata: Mapping[str, Any], num_classes: int, labels_csv: str | None) -> list[str]:
    """Names from --labels, else the checkpoint's metadata, else the class indices as text."""
    if labels_csv is not None:
        names = list(labels_lib.read_class_labels(labels_csv).display_names)
    elif metadata.get("class_names"):
        names = list(metadata["class_names"])
    else:
        return [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for a model with {num_classes} classes")
    return names


def add_tag_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="FILE_OR_DIR", help="audio files and folders (searched recursively)")
    parser.add_argument("--checkpoint", required=True,
                        help="model checkpoint folder (with --backend onnxruntime: an exported .onnx file)")
    parser.add_argument("--backend", choices=("jax", "onnxruntime"), default="jax",
                        help="run the model with JAX, or an ONNX export with ONNX Runtime (default %(default)s)")
    parser.add_argument("--labels", help="class_labels_indices.csv (default: names in the checkpoint, else indices)")
    parser.add_argument("--top-k", type=int, default=10, help="classes reported per file (default %(default)s)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="report classes and events scoring at least this (default %(default)s)")
    parser.add_argument("--format", choices=OUTPUT_FORMATS, default="table", help="output format (default %(default)s)")
    parser.add_argument("--output", help="write to this file instead of standard output")
    parser.add_argument("--frames", action="store_true",
                        help="add per-window (and, for ConvNeXt, per-frame) scores and merged events")
    parser.add_argument("--all-scores", action="store_true", help="every class's score (json/csv)")
    parser.add_argument("--hop", type=float, default=DEFAULT_HOP_SECONDS,
                        help="seconds between 10 s windows of longer files (default %(default)s)")
    parser.add_argument("--aggregate", choices=AGGREGATIONS, default="max",
                        help="file score from its window scores (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_tag(args: argparse.Namespace) -> int:
    """Exit code 0 when at least one file was tagged, 1 when none could be."""
    from convnext_audio_jax.checkpoint import load_model

    if args.top_k < 1:
        raise ValueError(f"--top-k must be ≥ 1, got {args.top_k}")
    if args.backend == "onnxruntime":
        from convnext_audio_jax.onnx_backend import OnnxRuntimeForward

        backend = OnnxRuntimeForward(args.checkpoint, args.batch_size)
        model, variables, metadata = backend.model, None, backend.metadata
        backend.restrict(["probs", "frame_probs"] if args.frames else ["probs"])
    else:
        model, variables, metadata = load_model(args.checkpoint)
        backend = None
    names = class_names_for(metadata, model.num_classes, args.labels)
    files, errors = expand_inputs(args.inputs)
    for error in errors:
        print(f"tag: skipped {error.line()}", file=sys.stderr)
    tagger = Tagger(model, variables, args.batch_size, args.hop, args.aggregate, args.frames, forward=backend)
    reports = []
    with tqdm.tqdm(total=len(files), unit="file", desc="tag", disable=args.no_progress, file=sys.stderr) as bar:
        for result in tagger.tag(files):
            bar.update()
            if isinstance(result, TagError):
                bar.write(f"tag: skipped {result.line()}", file=sys.stderr)
                continue
            report = file_report(result, names, args.top_k, args.threshold, args.all_scores)
            if args.frames:
                report.update(timeline_report(result, names, args.top_k, args.threshold, args.all_scores))
            reports.append(report)
    out = io.StringIO()
    if args.format == "json":
        json.dump(reports, out, indent=2)
        out.write("\n")
    elif args.format == "csv":
        write_csv(reports, names, out)
    else:
        write_table(reports, args.threshold, out)
    if args.output:
        pathlib.Path(args.output).write_text(out.getvalue())
    else:
        sys.stdout.write(out.getvalue())
    if not reports:
        print(f"tag: no file could be tagged ({len(files)} files, {len(errors)} empty folders)", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------------------- embeddings

def _select_embeddings(*kinds: str):
    def select(variables, outputs):
        del variables
        by_kind = {"scene": lambda: outputs["scene_embedding"], "sequence": lambda: sequence_of(outputs),
                   "frames": lambda: outputs["frame_embeddings"], "logits": lambda: outputs["logits"]}
        return {kind: by_kind[kind]().astype(jnp.float32) for kind in kinds}
    return select


def add_embed_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="FILE_OR_DIR", help="audio files and folders (searched recursively)")
    parser.add_argument("--checkpoint", required=True,
                        help="model checkpoint folder (with --backend onnxruntime: an exported .onnx file)")
    parser.add_argument("--backend", choices=("jax", "onnxruntime"), default="jax",
                        help="run the model with JAX, or an ONNX export with ONNX Runtime (scene and sequence only)")
    parser.add_argument("--kind", choices=EMBEDDING_KINDS, default="scene",
                        help="scene (B, D), frames (B, T, F, C), sequence (B, T, C) or logits (default %(default)s)")
    parser.add_argument("--output", required=True, help="output .npz")
    parser.add_argument("--hop", type=float, default=DEFAULT_HOP_SECONDS,
                        help="seconds between 10 s windows of longer files (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_embed(args: argparse.Namespace) -> int:
    """Writes OUT.npz: ``embeddings`` (all windows of all files, stacked), ``file_index`` and ``window_start_s``
    per window, ``files`` (the paths, in order), ``kind``. Exit code 1 when no file could be embedded."""
    from convnext_audio_jax.checkpoint import load_model as load_checkpoint

    if args.backend == "onnxruntime":
        from convnext_audio_jax.onnx_backend import EMBEDDING_OUTPUTS, OnnxRuntimeForward

        if args.kind not in EMBEDDING_OUTPUTS:
            raise ValueError(f"--backend onnxruntime embeds --kind {' or '.join(EMBEDDING_OUTPUTS)}; an ONNX export has "
                             f"no {args.kind} output")
        output = EMBEDDING_OUTPUTS[args.kind]
        forward = OnnxRuntimeForward(args.checkpoint, args.batch_size, select=[output], aliases={output: args.kind})
        model = forward.model
    else:
        model, variables, _ = load_checkpoint(args.checkpoint)
        forward = ShardedForward(model, variables, args.batch_size, select=_select_embeddings(args.kind))
    files, errors = expand_inputs(args.inputs)
    for error in errors:
        print(f"embed: skipped {error.line()}", file=sys.stderr)
    hop = max(1, int(round(args.hop * audio_lib.SAMPLE_RATE)))
    embeddings, file_index, window_start, embedded = [], [], [], []
    for path in tqdm.tqdm(files, unit="file", desc="embed", disable=args.no_progress, file=sys.stderr):
        try:
            decoded = read_audio(path)
        except audio_lib.ClipError as error:
            print(f"embed: skipped {path}: {error.reason} ({error.detail})", file=sys.stderr)
            continue
        starts = window_starts(decoded.waveform.shape[0], model.frontend.clip_samples, hop)
        windows = cut_windows(decoded.waveform, starts, model.frontend.clip_samples)
        for first in range(0, len(windows), forward.batch_size):
            embeddings.append(forward(windows[first : first + forward.batch_size])[args.kind])
        file_index.extend([len(embedded)] * len(starts))
        window_start.extend(starts / audio_lib.SAMPLE_RATE)
        embedded.append(path)
    if not embedded:
        print(f"embed: no file could be embedded ({len(files)} files)", file=sys.stderr)
        return 1
    embeddings = np.concatenate(embeddings)
    np.savez(args.output, embeddings=embeddings, file_index=np.array(file_index, dtype=np.int32),
             window_start_s=np.array(window_start, dtype=np.float64), files=np.array(embedded), kind=args.kind)
    print(f"embed: {len(embedded)} files, {len(file_index)} windows of {args.kind} embeddings "
          f"{embeddings.shape[1:]} → {args.output}")
    return 0
