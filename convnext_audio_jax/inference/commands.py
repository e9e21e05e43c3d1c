"""The ``tag`` and ``embed`` commands (the HEAR API is ``convnext_audio_jax.hear``).

Reading, windowing and scoring live in `convnext_audio_jax.inference.tagging` (and `windowing`, `data.audio`); output
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

import jax
import numpy as np
import tqdm

from convnext_audio_jax.data import audio as audio_lib
from convnext_audio_jax.data import labels as labels_lib
from convnext_audio_jax.inference import pipe, windowing
from convnext_audio_jax.inference.embed_output import EmbeddingStore
from convnext_audio_jax.inference.onnx_backend import (
    BACKENDS,
    EMBEDDING_OUTPUTS,
    OnnxRuntimeForward,
)
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
    AudioInfo,
    FileScored,
    FileStarted,
    TagError,
    TaggedFile,
    Tagger,
    WindowScores,
    expand_inputs,
    merge_events,
)
from convnext_audio_jax.inference.windowing import cut_windows, window_starts  # noqa: F401  (re-exported)
from convnext_audio_jax.models.outputs import (  # noqa: F401
    EMBEDDING_KINDS,
    output_selector,
    step_bounds,
)
from convnext_audio_jax.runtime import flags
from convnext_audio_jax.runtime.errors import UserError
from convnext_audio_jax.runtime.forward import ShardedForward
from convnext_audio_jax.runtime.sharding import barrier, data_mesh

DEFAULT_THRESHOLD = 0.25  # the authors' demo's activity threshold


# ------------------------------------------------------------------------------------------- shared flags

def add_file_arguments(parser: argparse.ArgumentParser, embeddings: bool) -> None:
    """The flags tag and embed share: what to read, with which model, cut how."""
    parser.add_argument("inputs", nargs="+", metavar="FILE_OR_DIR", help="audio files and folders (searched recursively)")
    flags.add_model_argument(parser, onnx=True)
    parser.add_argument("--backend", choices=BACKENDS, default="jax",
                        help="run the model with JAX, or an ONNX export with ONNX Runtime or OpenVINO (default %(default)s"
                             + ("; embeds scene and sequence only)" if embeddings else ")"))
    parser.add_argument("--labels", help="class_labels_indices.csv: the class names reported (embed: stored with "
                                         "--kind logits); default: the names stored in the model, else indices")
    parser.add_argument("--hop", type=float, metavar="SECONDS",
                        help="seconds from one window to the next in files longer than one window (the window is the "
                             "model's input length: 10 s for the released models, 1 s for the demo) (default: half a "
                             "window)")
    parser.add_argument("--max-windows", type=int, default=windowing.MAX_WINDOWS,
                        help="refuse a file with more windows than this (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_file_arguments(args: argparse.Namespace) -> None:
    """The shared flags' checks, before the model loads (the hop in samples needs the model's rate: checked by
    `windowing.hop_samples` once it is loaded)."""
    if args.hop is not None:
        windowing.check_hop_seconds(args.hop)
    if args.max_windows < 1:
        raise UserError(f"--max-windows must be ≥ 1, got {args.max_windows}")
    if args.batch_size < 1:  # named as the flag here: the forwards' own check is for code that calls them
        raise UserError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    if args.backend == "jax" and os.fspath(args.model).lower().endswith(".onnx"):
        raise UserError(f"{args.model_flag} {args.model} is an ONNX export: run it with --backend onnxruntime (or openvino)")


def class_names_for(metadata: Mapping[str, Any], num_classes: int, labels_csv: str | None) -> list[str]:
    """Names from --labels, else the model's metadata, else the class indices as text."""
    if labels_csv is not None:
        names = list(labels_lib.read_class_labels(labels_csv).display_names)
    elif metadata.get("class_names"):
        names = list(metadata["class_names"])
    else:
        return [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise UserError(f"{len(names)} class names for a model with {num_classes} classes")
    return names


# --------------------------------------------------------------------------------------------------- tagging

def add_tag_arguments(parser: argparse.ArgumentParser) -> None:
    add_file_arguments(parser, embeddings=False)
    parser.add_argument("--top-k", type=int, default=10, help="classes reported per file (default %(default)s)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="report classes and events scoring at least this (default %(default)s)")
    parser.add_argument("--format", choices=OUTPUT_FORMATS, default="table",
                        help="output format; jsonl: one JSON object per file and line (default %(default)s)")
    parser.add_argument("--output", help="write to this file instead of standard output (one record per file, "
                                         "fsynced as each file is done)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the files already in --output (jsonl or csv) and tag only the others")
    parser.add_argument("--frames", action="store_true",
                        help="add per-window (and, for ConvNeXt, per-time-step) scores and merged events")
    parser.add_argument("--all-scores", action="store_true", help="every class's score (json/csv)")
    parser.add_argument("--aggregate", choices=AGGREGATIONS, default="max",
                        help="file score from its window scores (default %(default)s)")
    parser.add_argument("--stream", action="store_true",
                        help="input '-': tag audio arriving on standard input, one JSON line per --hop with the latest "
                             "window's tags and latency (each window scored as it arrives, a batch of one)")
    parser.add_argument("--input-format", choices=pipe.INPUT_FORMATS, default="wav",
                        help="--stream: raw little-endian PCM, or a WAV stream (default %(default)s)")
    parser.add_argument("--input-rate", type=int, help="--stream: the raw PCM's sample rate in Hz")
    parser.add_argument("--input-channels", type=int, default=1,
                        help="--stream: the raw PCM's interleaved channels (default %(default)s)")


def run_tag(args: argparse.Namespace) -> int:
    """Exit code 0 when every file asked for is in the output (tagged now or before), 1 when none could be."""
    from convnext_audio_jax.hub.resolve import load_model, offline_flag

    if args.top_k < 1:
        raise UserError(f"--top-k must be ≥ 1, got {args.top_k}")
    check_file_arguments(args)  # bad options fail before the model loads
    if args.resume and (args.output is None or args.format not in RESUMABLE_FORMATS):
        raise UserError(f"--resume needs --output and --format {' or '.join(RESUMABLE_FORMATS)}")
    if args.stream:
        pipe.check_stream_arguments(args)
        args.batch_size = 1  # each window is scored as soon as it has arrived
    if args.backend != "jax":
        scorer = OnnxRuntimeForward(args.model, args.batch_size, runtime=args.backend)
        model, variables, metadata = scorer.model, None, scorer.metadata
        scorer.restrict(["probs", "frame_probs"] if args.frames else ["probs"])
    else:
        model, variables, metadata = load_model(args.model, offline=offline_flag(args))
        scorer = None
    names = class_names_for(metadata, model.num_classes, args.labels)
    # A sub-sample hop fails before the output opens.
    windowing.window_hop(args.hop, model.frontend.sample_rate, model.frontend.clip_samples)
    if args.stream:
        # One window at a time on one device: a batch of one padded to every device's share would be all padding.
        scorer = scorer or Tagger(model, variables, 1, mesh=data_mesh(jax.local_devices()[:1])).scorer
        return pipe.run_stream(args, scorer, model, names)
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

def add_embed_arguments(parser: argparse.ArgumentParser) -> None:
    add_file_arguments(parser, embeddings=True)
    parser.add_argument("--kind", choices=tuple(EMBEDDING_KINDS), default="scene",
                        help="scene (B, D), frames (B, T, F, C), sequence (B, T, C) or logits (default %(default)s)")
    parser.add_argument("--output", required=True, help="output .npz (built at the end from OUTPUT.parts/)")
    parser.add_argument("--resume", action="store_true", help="keep the files finished in OUTPUT.parts/ by an "
                                                               "interrupted run and embed only the others")
    flags.add_job_arguments(parser, "process p embeds files p, p + P, ... on its own devices into OUTPUT.parts/ "
                                    "(a folder every process can reach), process 0 writes OUTPUT")


def _embed_file(path: str, store: EmbeddingStore, embed_windows, sample_rate: int, window_samples: int, hop: int,
                max_windows: int, kind: str, batch_size: int) -> None:
    """Stream one file's windows (`windowing.FileWindows`) through ``embed_windows`` a batch at a time into a
    part of ``store``; raises ClipError or UserError (nothing of the file is kept then)."""
    source = windowing.FileWindows(path, sample_rate, window_samples, hop, max_windows)
    part = store.begin(path)
    try:
        starts = []
        for batch in windowing.batches(source, batch_size):
            starts += [start / sample_rate for start, _ in batch]
            part.add(embed_windows(np.stack([samples for _, samples in batch]))[kind])
    except BaseException:
        part.discard()
        raise
    part.commit(starts)
    store.add_done(path)


def _process() -> tuple[int, int]:
    """(this process's index, the number of processes) of the JAX job."""
    return jax.process_index(), jax.process_count()


def run_embed(args: argparse.Namespace) -> int:
    """Writes OUT.npz: ``embeddings`` (all windows of all files, stacked), ``file_index`` and ``window_start_s``
    per window, ``files`` (the paths, in order), ``kind``, and for ``--kind logits`` the ``class_names`` of the
    columns. Exit code 1 when no file could be embedded."""
    from convnext_audio_jax.hub.resolve import load_model, offline_flag

    check_file_arguments(args)  # bad options fail before the model loads
    flags.join_job(args)  # a no-op for one process
    process_index, process_count = _process()
    if process_count > 1:
        # Every process looks before any creates the folder, so all agree whether it held an earlier run's parts.
        parts_existed = os.path.isdir(os.fspath(args.output) + ".parts")
        barrier("embed: parts folder checked")
        store = EmbeddingStore(args.output, args.kind, args.resume or not parts_existed)
    else:
        store = EmbeddingStore(args.output, args.kind, args.resume)
    # The model's forward, one batch of windows (B, samples) → dict of arrays: the one call a backend replaces.
    if args.backend != "jax":
        if args.kind not in EMBEDDING_OUTPUTS:
            raise UserError(f"--backend {args.backend} embeds --kind {' or '.join(EMBEDDING_OUTPUTS)}; an ONNX export has "
                             f"no {args.kind} output")
        output = EMBEDDING_OUTPUTS[args.kind]
        embed_windows = OnnxRuntimeForward(args.model, args.batch_size, select=[output], aliases={output: args.kind},
                                           runtime=args.backend)
        model, metadata = embed_windows.model, embed_windows.metadata
    else:
        model, variables, metadata = load_model(args.model, offline=offline_flag(args))
        select = output_selector(model, [EMBEDDING_KINDS[args.kind]], {EMBEDDING_KINDS[args.kind]: args.kind})
        # This process's devices only: the processes embed different files, nothing is exchanged.
        embed_windows = ShardedForward(model, variables, args.batch_size, data_mesh(jax.local_devices()), select)
    sample_rate = int(model.frontend.sample_rate)  # files are resampled to the model's rate, cut to its window
    hop = windowing.window_hop(args.hop, sample_rate, model.frontend.clip_samples)
    names = {"class_names": np.array(class_names_for(metadata, model.num_classes, args.labels))} if args.kind == "logits" else {}
    files, errors = expand_inputs(args.inputs)
    for error in errors:
        print(f"embed: skipped {error.line()}", file=sys.stderr)
    mine = files[process_index::process_count]
    todo = [path for path in mine if path not in store.done]
    if len(todo) < len(mine):
        print(f"embed: {len(mine) - len(todo)} files already in {store.parts}", file=sys.stderr)
    for path in tqdm.tqdm(todo, unit="file", desc="embed", disable=args.no_progress, file=sys.stderr):
        try:
            _embed_file(path, store, embed_windows, sample_rate, model.frontend.clip_samples, hop, args.max_windows,
                        args.kind, embed_windows.batch_size)
        except audio_lib.ClipError as error:
            print(f"embed: skipped {path}: {error.reason} ({error.detail})", file=sys.stderr)
        except UserError as error:  # too many windows, NaN embeddings: this file; other errors are bugs
            print(f"embed: skipped {path}: {str(error).removeprefix(path + ': ')}", file=sys.stderr)
    if process_count > 1:
        barrier("embed: every process's files done")
        if process_index != 0:
            print(f"embed: process {process_index} of {process_count} embedded its {len(mine)} files into "
                  f"{store.parts}; process 0 writes {args.output}")
            return 0
        store = EmbeddingStore(args.output, args.kind, resume=True)  # every process's finished parts
    if not any(path in store.done for path in files):
        store.remove_parts()
        print(f"embed: no file could be embedded ({len(files)} files)", file=sys.stderr)
        return 1
    embedded, windows, row_shape = store.finish(files, names)
    print(f"embed: {len(embedded)} files, {windows} windows of {args.kind} embeddings {row_shape} → {args.output}")
    return 0
