"""The ``tag`` and ``embed`` commands (the HEAR API is ``convnext_audio_jax.hear``).

Reading, windowing and scoring live in `convnext_audio_jax.inference.tagging` (and `windowing`, `data.audio`); output
records in `tag_output` (tags, timelines) and `embed_output` (embeddings). Both commands read each file as a
stream of blocks and write each file's result when it is done, so memory does not grow with a file's length
and an interrupted run can be resumed (``--resume``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import tqdm

from convnext_audio_jax.data import audio as audio_lib
from convnext_audio_jax.data import labels as labels_lib
from convnext_audio_jax.inference import windowing
from convnext_audio_jax.inference.embed_output import EmbeddingStore
from convnext_audio_jax.inference.onnx_backend import BACKENDS
from convnext_audio_jax.inference.tag_output import (  # noqa: F401  (file_report re-exported)
    OUTPUT_FORMATS,
    RESUMABLE_FORMATS,
    FileSpool,
    RecordSink,
    file_report,
    record_chunks,
)
from convnext_audio_jax.inference.tagging import (  # noqa: F401  (re-exported: the library API of this module)
    AGGREGATIONS,
    AUDIO_EXTENSIONS,
    DEFAULT_HOP_SECONDS,
    AudioInfo,
    FileScored,
    FileStarted,
    TagError,
    TaggedFile,
    Tagger,
    WindowScores,
    expand_inputs,
    frame_bounds,
    frame_grid,
    frame_logits,
    merge_events,
    sequence_of,
)
from convnext_audio_jax.inference.windowing import cut_windows, window_starts  # noqa: F401  (re-exported)
from convnext_audio_jax.runtime.errors import UserError
from convnext_audio_jax.runtime.forward import ShardedForward

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
        raise UserError(f"{len(names)} class names for a model with {num_classes} classes")
    return names


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:  # named as the flag here: the forwards' own check is for code that calls them
        raise UserError(f"--batch-size must be ≥ 1, got {batch_size}")


def _check_backend(args: argparse.Namespace) -> None:
    if args.backend == "jax" and os.fspath(args.checkpoint).lower().endswith(".onnx"):
        raise UserError(f"--checkpoint {args.checkpoint} is an ONNX export: run it with --backend onnxruntime (or openvino)")


def add_tag_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="FILE_OR_DIR", help="audio files and folders (searched recursively)")
    parser.add_argument("--checkpoint", required=True,
                        help="model directory, training workdir (its model/best, else model/last) or pretrained name; "
                             "with --backend onnxruntime or openvino: an exported .onnx file")
    parser.add_argument("--backend", choices=BACKENDS, default="jax",
                        help="run the model with JAX, or an ONNX export with ONNX Runtime or OpenVINO (default %(default)s)")
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
                        help="seconds between the model's windows (10 s for the released models) of longer files "
                             "(default %(default)s)")
    parser.add_argument("--aggregate", choices=AGGREGATIONS, default="max",
                        help="file score from its window scores (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_tag(args: argparse.Namespace) -> int:
    """Exit code 0 when every file asked for is in the output (tagged now or before), 1 when none could be."""
    from convnext_audio_jax.hub.resolve import load_model, offline_flag

    if args.top_k < 1:
        raise UserError(f"--top-k must be ≥ 1, got {args.top_k}")
    _check_batch_size(args.batch_size)
    _check_backend(args)
    # Bad options fail before the model loads (the hop in samples needs the model's rate: checked once loaded).
    if not (math.isfinite(args.hop) and args.hop > 0):
        raise UserError(f"--hop must be a positive number of seconds, got {args.hop}")
    if args.resume and (args.output is None or args.format not in RESUMABLE_FORMATS):
        raise UserError(f"--resume needs --output and --format {' or '.join(RESUMABLE_FORMATS)}")
    if args.backend != "jax":
        from convnext_audio_jax.inference.onnx_backend import OnnxRuntimeForward

        scorer = OnnxRuntimeForward(args.checkpoint, args.batch_size, runtime=args.backend)
        model, variables, metadata = scorer.model, None, scorer.metadata
        scorer.restrict(["probs", "frame_probs"] if args.frames else ["probs"])
    else:
        model, variables, metadata = load_model(args.checkpoint, offline=offline_flag(args))
        scorer = None
    names = class_names_for(metadata, model.num_classes, args.labels)
    windowing.hop_samples(args.hop, model.frontend.sample_rate)  # a sub-sample hop fails before the output opens
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
                        max_windows=args.max_windows, scorer=scorer)
        spool_dir = os.path.dirname(os.path.abspath(args.output)) if args.output else None
        tagged, spool = 0, None
        with tqdm.tqdm(total=len(todo), unit="file", desc="tag", disable=args.no_progress, file=sys.stderr) as bar:
            for event in tagger.stream(todo):
                if isinstance(event, FileStarted) and args.frames:
                    spool = FileSpool(spool_dir, tagger.frames, tagger.window_seconds)
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
    if not tagged and (todo or not files):  # nothing tagged, or nothing found to tag (an empty folder)
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
                        help="model directory, training workdir (its model/best, else model/last) or pretrained name; "
                             "with --backend onnxruntime or openvino: an exported .onnx file")
    parser.add_argument("--backend", choices=BACKENDS, default="jax",
                        help="run the model with JAX, or an ONNX export with ONNX Runtime or OpenVINO (scene and sequence only)")
    parser.add_argument("--kind", choices=EMBEDDING_KINDS, default="scene",
                        help="scene (B, D), frames (B, T, F, C), sequence (B, T, C) or logits (default %(default)s)")
    parser.add_argument("--output", required=True, help="output .npz (built at the end from OUTPUT.parts/)")
    parser.add_argument("--resume", action="store_true", help="keep the files finished in OUTPUT.parts/ by an "
                                                               "interrupted run and embed only the others")
    parser.add_argument("--labels", help="--kind logits: class_labels_indices.csv whose names are stored as class_names "
                        "(default: the names stored in the model, else indices)")
    parser.add_argument("--hop", type=float, default=DEFAULT_HOP_SECONDS,
                        help="seconds between the model's windows (10 s for the released models) of longer files "
                             "(default %(default)s)")
    parser.add_argument("--max-windows", type=int, default=windowing.MAX_WINDOWS,
                        help="refuse a file with more windows than this (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _embed_file(path: str, store: EmbeddingStore, embed_windows, sample_rate: int, window: int, hop: int,
                max_windows: int, kind: str, batch_size: int) -> None:
    """Stream one file's windows (``window`` samples at ``sample_rate``, the model's) through ``embed_windows``
    into a part of ``store``; raises ClipError or UserError (nothing of the file is kept then)."""
    info, blocks = audio_lib.stream_mono(path, target_rate=sample_rate)
    if info.header_frames is not None:
        expected = int(np.ceil(info.header_frames * sample_rate / info.sample_rate))
        windowing.check_window_count(path, expected, window, hop, max_windows)
    part = store.begin(path)
    try:
        starts, batch = [], []
        for start, samples in windowing.stream_windows(blocks, window, hop):
            if len(starts) == max_windows:
                raise UserError(f"{path}: more than {max_windows} windows at a hop of {hop} samples")
            starts.append(start / sample_rate)
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
    from convnext_audio_jax.hub.resolve import load_model as load_checkpoint
    from convnext_audio_jax.hub.resolve import offline_flag

    # Bad options fail before the model loads (the hop in samples needs the model's rate: checked once loaded).
    if not (math.isfinite(args.hop) and args.hop > 0):
        raise UserError(f"--hop must be a positive number of seconds, got {args.hop}")
    if args.max_windows < 1:
        raise UserError(f"--max-windows must be ≥ 1, got {args.max_windows}")
    _check_batch_size(args.batch_size)
    _check_backend(args)
    store = EmbeddingStore(args.output, args.kind, args.resume)
    # The model's forward, one batch of windows (B, samples) → dict of arrays: the one call a backend replaces.
    if args.backend != "jax":
        from convnext_audio_jax.inference.onnx_backend import (
            EMBEDDING_OUTPUTS,
            OnnxRuntimeForward,
        )

        if args.kind not in EMBEDDING_OUTPUTS:
            raise UserError(f"--backend {args.backend} embeds --kind {' or '.join(EMBEDDING_OUTPUTS)}; an ONNX export has "
                             f"no {args.kind} output")
        output = EMBEDDING_OUTPUTS[args.kind]
        embed_windows = OnnxRuntimeForward(args.checkpoint, args.batch_size, select=[output], aliases={output: args.kind},
                                           runtime=args.backend)
        model, metadata = embed_windows.model, embed_windows.metadata
    else:
        model, variables, metadata = load_checkpoint(args.checkpoint, offline=offline_flag(args))
        embed_windows = ShardedForward(model, variables, args.batch_size, select=_select_embeddings(args.kind))
    sample_rate = int(model.frontend.sample_rate)  # files are resampled to the model's rate, cut to its window
    hop = windowing.hop_samples(args.hop, sample_rate)
    names = {"class_names": np.array(class_names_for(metadata, model.num_classes, args.labels))} if args.kind == "logits" else {}
    files, errors = expand_inputs(args.inputs)
    for error in errors:
        print(f"embed: skipped {error.line()}", file=sys.stderr)
    todo = [path for path in files if path not in store.done]
    if len(todo) < len(files):
        print(f"embed: {len(files) - len(todo)} files already in {store.parts}", file=sys.stderr)
    for path in tqdm.tqdm(todo, unit="file", desc="embed", disable=args.no_progress, file=sys.stderr):
        try:
            _embed_file(path, store, embed_windows, sample_rate, model.frontend.clip_samples, hop, args.max_windows,
                        args.kind, embed_windows.batch_size)
        except audio_lib.ClipError as error:
            print(f"embed: skipped {path}: {error.reason} ({error.detail})", file=sys.stderr)
        except UserError as error:  # too many windows, NaN embeddings: this file; other errors are bugs
            print(f"embed: skipped {path}: {str(error).removeprefix(path + ': ')}", file=sys.stderr)
    if not any(path in store.done for path in files):
        store.remove_parts()
        print(f"embed: no file could be embedded ({len(files)} files)", file=sys.stderr)
        return 1
    embedded, windows, row_shape = store.finish(files, names)
    print(f"embed: {len(embedded)} files, {windows} windows of {args.kind} embeddings {row_shape} → {args.output}")
    return 0
