"""The ``tag`` and ``embed`` commands, and a HEAR-style Python API.

Reading, windowing and scoring live in `convnext_audio_jax.tagging` (and `windowing`, `data.audio`); output
records in `tag_output` (tags, timelines) and `embed_output` (embeddings). Both commands read each file as a
stream of blocks and write each file's result when it is done, so memory does not grow with a file's length
and an interrupted run can be resumed (``--resume``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from convnext_audio_jax import windowing
from convnext_audio_jax.data import audio as audio_lib
from convnext_audio_jax.data import labels as labels_lib
from convnext_audio_jax.embed_output import EmbeddingStore
from convnext_audio_jax.forward import ShardedForward
from convnext_audio_jax.tag_output import (  # noqa: F401  (file_report re-exported)
    OUTPUT_FORMATS, RESUMABLE_FORMATS, FileSpool, RecordSink, file_report, record_chunks)
from convnext_audio_jax.tagging import (  # noqa: F401  (re-exported: the library API of this module)
    AGGREGATIONS, AUDIO_EXTENSIONS, DEFAULT_HOP_SECONDS, AudioInfo, FileScored, FileStarted, TaggedFile, TagError,
    Tagger, WindowScores, expand_inputs, frame_bounds, frame_grid, frame_logits, merge_events, sequence_of)
from convnext_audio_jax.windowing import cut_windows, window_starts  # noqa: F401  (re-exported)

DEFAULT_THRESHOLD = 0.25  # the authors' demo's activity threshold
EMBEDDING_KINDS = ("scene", "frames", "sequence", "logits")


# --------------------------------------------------------------------------------------------------- tagging

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
                        help="model directory or training workdir (its model/best, else model/last)")
    parser.add_argument("--labels", help="class_labels_indices.csv (default: the names stored in the model, else indices)")
    parser.add_argument("--top-k", type=int, default=10, help="classes reported per file (default %(default)s)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="report classes and events scoring at least this (default %(default)s)")
    parser.add_argument("--format", choices=OUTPUT_FORMATS, default="table",
                        help="output format; jsonl: one JSON object per file and line (default %(default)s)")
    parser.add_argument("--output", help="write to this file instead of standard output (one record per file, "
                                         "fsynced as each file is done)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the files already in --output (jsonl or csv) and tag only the others")
    parser.add_argument("--max-windows", type=int, default=windowing.MAX_WINDOWS,
                        help="refuse a file with more windows than this (default %(default)s)")
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
    """Exit code 0 when every file asked for is in the output (tagged now or before), 1 when none could be."""
    from convnext_audio_jax.checkpoint import load_model

    if args.top_k < 1:
        raise ValueError(f"--top-k must be ≥ 1, got {args.top_k}")
    windowing.hop_samples(args.hop, audio_lib.SAMPLE_RATE)  # bad options fail before the model loads
    if args.resume and (args.output is None or args.format not in RESUMABLE_FORMATS):
        raise ValueError(f"--resume needs --output and --format {' or '.join(RESUMABLE_FORMATS)}")
    model, variables, metadata = load_model(args.checkpoint)
    names = class_names_for(metadata, model.num_classes, args.labels)
    files, errors = expand_inputs(args.inputs)
    for error in errors:
        print(f"tag: skipped {error.line()}", file=sys.stderr)
    # Opened once the model has loaded: a bad checkpoint does not replace an existing output.
    sink = RecordSink(args.output, args.format, args.resume)
    try:
        todo = [path for path in files if path not in sink.done]
        if len(todo) < len(files):
            print(f"tag: {len(files) - len(todo)} files already in {args.output}", file=sys.stderr)
        tagger = Tagger(model, variables, args.batch_size, args.hop, args.aggregate, args.frames,
                        max_windows=args.max_windows)
        spool_dir = os.path.dirname(os.path.abspath(args.output)) if args.output else None
        tagged, spool = 0, None
        with tqdm.tqdm(total=len(todo), unit="file", desc="tag", disable=args.no_progress, file=sys.stderr) as bar:
            for event in tagger.stream(todo):
                if isinstance(event, FileStarted) and args.frames:
                    spool = FileSpool(spool_dir, tagger.frames)
                elif isinstance(event, WindowScores) and spool is not None:
                    spool.add(event)
                elif isinstance(event, FileScored):
                    sink.write(record_chunks(args.format, event, spool, names, args.top_k, args.threshold,
                                             args.all_scores))
                    tagged += 1
                elif isinstance(event, TagError):
                    bar.write(f"tag: skipped {event.line()}", file=sys.stderr)
                if isinstance(event, FileScored | TagError):
                    if spool is not None:
                        spool.close()
                    spool = None
                    bar.update()
    finally:
        sink.close()
    if not tagged and todo:
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


class EmbeddingModel:
    """A loaded model with the HEAR attributes (``sample_rate``, ``scene_embedding_size``,
    ``timestamp_embedding_size``); pass it to ``get_scene_embeddings`` / ``get_timestamp_embeddings``."""

    def __init__(self, model: nn.Module, variables: Mapping[str, Any], batch_size: int = 8, mesh=None):
        if not hasattr(model, "frontend"):
            raise ValueError(f"{type(model).__name__} does not take audio")
        self.model = model
        self.sample_rate = model.frontend.sample_rate
        self.window = model.frontend.clip_samples
        # One forward (one compilation) brings back both kinds.
        self._forward = ShardedForward(model, variables, batch_size, mesh, _select_embeddings("scene", "sequence"))
        shapes = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, self.window))), variables)
        self.scene_embedding_size = int(shapes["scene_embedding"].shape[-1])
        self.timestamp_embedding_size = int(shapes["frame_embeddings"].shape[-1])
        self.steps_per_window = int(shapes["frame_embeddings"].shape[1])

    def windows_of(self, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n·W, window) consecutive non-overlapping 10 s windows of each row (zero-padded) and the W starts."""
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 2:
            raise ValueError(f"audio must be (n_sounds, n_samples) at {self.sample_rate} Hz, got shape {audio.shape}")
        if not np.isfinite(audio).all():
            raise ValueError("audio has NaN/Inf samples")
        starts = window_starts(audio.shape[1], self.window, self.window, last_at_end=False)
        return np.concatenate([cut_windows(row, starts, self.window) for row in audio]), starts

    def embed_windows(self, kind: str, windows: np.ndarray) -> np.ndarray:
        """``kind`` ("scene" or "sequence") embeddings of (N, window) windows, a fixed-size batch at a time."""
        size = self._forward.batch_size
        return np.concatenate([self._forward(windows[i : i + size])[kind] for i in range(0, len(windows), size)])


def load_model(checkpoint_dir: str | os.PathLike, batch_size: int = 8) -> EmbeddingModel:
    """HEAR ``load_model``: a model directory (``save_model`` / the converter) or a training workdir (its
    ``model/best``, else ``model/last``)."""
    from convnext_audio_jax.checkpoint import load_model as load_checkpoint

    model, variables, _ = load_checkpoint(checkpoint_dir)
    return EmbeddingModel(model, variables, batch_size)


def get_scene_embeddings(audio: Any, model: EmbeddingModel) -> np.ndarray:
    """HEAR: (n_sounds, n_samples) float32 at ``model.sample_rate`` → (n_sounds, scene_embedding_size).

    A sound of at most 10 s is zero-padded to one window and gets the model's scene embedding; a longer one is
    cut into consecutive 10 s windows and gets the mean of their scene embeddings."""
    windows, starts = model.windows_of(audio)
    embeddings = model.embed_windows("scene", windows)
    return embeddings.reshape(-1, len(starts), embeddings.shape[-1]).mean(axis=1)


def get_timestamp_embeddings(audio: Any, model: EmbeddingModel) -> tuple[np.ndarray, np.ndarray]:
    """HEAR: (n_sounds, n_samples) → (embeddings (n_sounds, T, timestamp_embedding_size), timestamps (n_sounds, T)
    in ms). The embeddings are the last stage's time steps (averaged over mel) of consecutive 10 s windows; a
    step's timestamp is the centre of its stride cell (see the module doc for ConvNeXt; for other models the
    window is split evenly). Steps starting past the end of the audio (padding) are dropped."""
    windows, starts = model.windows_of(audio)
    sequence = model.embed_windows("sequence", windows)
    n_sounds, steps = np.asarray(audio).shape[0], model.steps_per_window
    if frame_grid(model.model) is not None:
        bounds = frame_bounds(model.model, steps)
    else:
        edges = np.linspace(0.0, model.model.frontend.clip_seconds, steps + 1)
        bounds = np.stack([edges[:-1], edges[1:]], axis=1)
    step_starts = (starts[:, None] / model.sample_rate + bounds[None, :, 0]).ravel()
    centres = (starts[:, None] / model.sample_rate + bounds.mean(axis=1)[None, :]).ravel()
    keep = step_starts < np.asarray(audio).shape[1] / model.sample_rate
    keep[0] = True
    embeddings = sequence.reshape(n_sounds, -1, sequence.shape[-1])[:, keep]
    timestamps = np.broadcast_to(1000.0 * centres[keep], (n_sounds, int(keep.sum())))
    return embeddings, np.ascontiguousarray(timestamps)


def add_embed_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="FILE_OR_DIR", help="audio files and folders (searched recursively)")
    parser.add_argument("--checkpoint", required=True,
                        help="model directory or training workdir (its model/best, else model/last)")
    parser.add_argument("--kind", choices=EMBEDDING_KINDS, default="scene",
                        help="scene (B, D), frames (B, T, F, C), sequence (B, T, C) or logits (default %(default)s)")
    parser.add_argument("--output", required=True, help="output .npz (built at the end from OUTPUT.parts/)")
    parser.add_argument("--resume", action="store_true", help="keep the files finished in OUTPUT.parts/ by an "
                                                               "interrupted run and embed only the others")
    parser.add_argument("--labels", help="--kind logits: class_labels_indices.csv whose names are stored as class_names "
                        "(default: the names stored in the model, else indices)")
    parser.add_argument("--hop", type=float, default=DEFAULT_HOP_SECONDS,
                        help="seconds between 10 s windows of longer files (default %(default)s)")
    parser.add_argument("--max-windows", type=int, default=windowing.MAX_WINDOWS,
                        help="refuse a file with more windows than this (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _embed_file(path: str, store: EmbeddingStore, embed_windows, window: int, hop: int, max_windows: int,
                kind: str, batch_size: int) -> None:
    """Stream one file's windows through ``embed_windows`` into a part of ``store``; raises ClipError or
    ValueError (nothing of the file is kept then)."""
    info, blocks = audio_lib.stream_mono(path)
    if info.header_frames is not None:
        expected = int(np.ceil(info.header_frames * audio_lib.SAMPLE_RATE / info.sample_rate))
        windowing.check_window_count(path, expected, window, hop, max_windows)
    part = store.begin(path)
    try:
        starts, batch = [], []
        for start, samples in windowing.stream_windows(blocks, window, hop):
            if len(starts) == max_windows:
                raise ValueError(f"{path}: more than {max_windows} windows at a hop of {hop} samples")
            starts.append(start / audio_lib.SAMPLE_RATE)
            batch.append(samples)
            if len(batch) == batch_size:
                part.add(embed_windows(np.stack(batch))[kind])
                batch = []
        if batch:
            part.add(embed_windows(np.stack(batch))[kind])
    except BaseException:
        part.discard()
        raise
    part.commit(starts)
    store.add_done(path)


def run_embed(args: argparse.Namespace) -> int:
    """Writes OUT.npz: ``embeddings`` (all windows of all files, stacked), ``file_index`` and ``window_start_s``
    per window, ``files`` (the paths, in order), ``kind``, and for ``--kind logits`` the ``class_names`` of the
    columns. Exit code 1 when no file could be embedded."""
    from convnext_audio_jax.checkpoint import load_model as load_checkpoint

    hop = windowing.hop_samples(args.hop, audio_lib.SAMPLE_RATE)
    if args.max_windows < 1:
        raise ValueError(f"--max-windows must be ≥ 1, got {args.max_windows}")
    store = EmbeddingStore(args.output, args.kind, args.resume)
    model, variables, metadata = load_checkpoint(args.checkpoint)
    names = {"class_names": np.array(class_names_for(metadata, model.num_classes, args.labels))} if args.kind == "logits" else {}
    files, errors = expand_inputs(args.inputs)
    for error in errors:
        print(f"embed: skipped {error.line()}", file=sys.stderr)
    # The model's forward, one batch of windows (B, samples) → dict of arrays: the one call a backend replaces.
    embed_windows = ShardedForward(model, variables, args.batch_size, select=_select_embeddings(args.kind))
    todo = [path for path in files if path not in store.done]
    if len(todo) < len(files):
        print(f"embed: {len(files) - len(todo)} files already in {store.parts}", file=sys.stderr)
    for path in tqdm.tqdm(todo, unit="file", desc="embed", disable=args.no_progress, file=sys.stderr):
        try:
            _embed_file(path, store, embed_windows, model.frontend.clip_samples, hop, args.max_windows, args.kind,
                        embed_windows.batch_size)
        except audio_lib.ClipError as error:
            print(f"embed: skipped {path}: {error.reason} ({error.detail})", file=sys.stderr)
        except ValueError as error:
            print(f"embed: skipped {path}: {str(error).removeprefix(path + ': ')}", file=sys.stderr)
    if not any(path in store.done for path in files):
        store.remove_parts()
        print(f"embed: no file could be embedded ({len(files)} files)", file=sys.stderr)
        return 1
    embedded, windows, row_shape = store.finish(files, names)
    print(f"embed: {len(embedded)} files, {windows} windows of {args.kind} embeddings {row_shape} → {args.output}")
    return 0
