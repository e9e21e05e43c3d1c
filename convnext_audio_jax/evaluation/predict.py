"""Teacher predictions: ``convnext-audio predict --model MODEL [MODEL ...] --data SPEC --output teacher.h5``.

Writes the logits of one model, or the mean logits of an ensemble (:func:`teacher.ensemble_mean`), for every
readable clip of a data SPEC, keyed by clip id, in the teacher file layout of
:mod:`convnext_audio_jax.data.teacher` (float16 by default, ``--dtype float32`` for full precision). The source is
cut into chunks of ``--chunk-clips`` consecutive clips; each finished chunk is stored at once, so an
interrupted run, started again with the same command, continues after the last finished chunk. With several
JAX processes (the multi-process flags, as evaluate and train.py take them), process p takes chunks p, p + P, ...
on its local devices; the file is assembled when every chunk is there (by process 0 after a barrier). Clips that cannot be read are skipped, listed on stderr and
stored under ``/skipped`` in the file.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
import tqdm

from convnext_audio_jax.data import teacher as teacher_lib
from convnext_audio_jax.data.pipeline import LoaderConfig, make_loader
from convnext_audio_jax.models.outputs import output_selector
from convnext_audio_jax.runtime import flags
from convnext_audio_jax.runtime.errors import UserError
from convnext_audio_jax.runtime.forward import ShardedForward

logger = logging.getLogger(__name__)

SKIPPED_SHOWN = 20


def make_logits_forward(model, variables, batch_size: int, mesh=None):
    """The one place that runs a model for predictions: waveforms (n ≤ batch, L) → logits (n, C) float32,
    data-sharded over ``mesh`` (default: every device)."""
    forward = ShardedForward(model, variables, batch_size, mesh, output_selector(model, ["logits"]))
    return forward.batch_size, lambda waveforms: forward(waveforms)["logits"]


class SourceRange:
    """Clips ``start`` to ``stop`` of a source, as a source of their own (one chunk of the work)."""

    def __init__(self, source, start: int, stop: int):
        self._source, self._start, self._stop = source, start, stop

    def __len__(self) -> int:
        return self._stop - self._start

    @property
    def targets(self) -> np.ndarray:
        return self._source.targets[self._start:self._stop]

    @property
    def num_classes(self) -> int:
        return self._source.num_classes

    def clip_id(self, index: int) -> str:
        return self._source.clip_id(self._start + index)

    def __getitem__(self, index: int) -> dict:
        return self._source[self._start + index]


def load_members(checkpoints: Sequence[str], offline: bool | None = None) -> list[tuple[str, Any, Any]]:
    """(name, model, variables) of each model directory, training workdir or pretrained name, named by the
    absolute path of the model directory it resolves to (``checkpoint.resolve_model_dir``; ``offline`` as there)."""
    from convnext_audio_jax.hub.resolve import load_model, resolve_model_dir

    members = []
    for path in checkpoints:
        directory = resolve_model_dir(path, offline=offline).absolute()
        members.append((str(directory), *load_model(directory)[:2]))
    return members


def predict_teacher(members: Sequence[tuple[str, Any, Any]], source, output: str | os.PathLike, *,
                    source_name: str = "", batch_size: int = 32, chunk_clips: int = 4096, dtype: str = "float16",
                    mesh=None, progress: bool = True, read_threads: int = 4, process_index: int | None = None,
                    process_count: int | None = None) -> dict[str, Any]:
    """Writes the teacher file of the ensemble ``members`` ((name, model, variables) each; their mean logits)
    on ``source`` to ``output``.

    Returns {"output", "complete", "skipped" (reason → count), "skipped_ids", "chunks_done", "num_chunks"} for
    this run: ``complete`` is False while other processes' chunks are missing (this process did its share)."""
    import jax

    from convnext_audio_jax.runtime.sharding import barrier, data_mesh

    if not members:
        raise ValueError("predict needs at least one model")
    if chunk_clips < 1 or batch_size < 1:
        raise UserError(f"--chunk-clips and --batch-size must be ≥ 1, got {chunk_clips} and {batch_size}")
    if len(source) == 0:
        raise UserError(f"data {source_name!r} has no clips")
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    classes = {model.num_classes for _, model, _ in members}
    if len(classes) != 1:
        raise UserError(f"the models disagree on the number of classes: "
                         f"{[(name, model.num_classes) for name, model, _ in members]}")
    num_chunks = -(-len(source) // chunk_clips)
    settings = {"models": [name for name, _, _ in members], "source": source_name, "clips": len(source),
                "first_clip": source.clip_id(0), "last_clip": source.clip_id(len(source) - 1),
                "chunk_clips": chunk_clips}
    writer = teacher_lib.TeacherWriter(output, num_chunks, classes.pop(), settings, dtype)
    done = writer.done_chunks()
    mine = [k for k in range(num_chunks) if k % process_count == process_index]
    todo = [k for k in mine if k not in done]
    skipped: collections.Counter = collections.Counter()
    skipped_ids: list[tuple[str, str, str]] = []
    if todo:
        mesh = mesh or data_mesh(jax.local_devices())
        forwards = [make_logits_forward(model, variables, batch_size, mesh) for _, model, variables in members]
        rows = forwards[0][0]
        remaining = sum(min(chunk_clips, len(source) - k * chunk_clips) for k in todo)
        with tqdm.tqdm(total=remaining, unit="clip", desc="predict", disable=not progress, file=sys.stderr) as bar:
            for k in todo:
                chunk = SourceRange(source, k * chunk_clips, min((k + 1) * chunk_clips, len(source)))
                ids, logits, chunk_skips = _predict_chunk(chunk, forwards, members, rows, read_threads, bar)
                writer.write_chunk(k, ids, logits, chunk_skips)
                skipped.update(reason for _, reason, _ in chunk_skips)
                skipped_ids.extend(chunk_skips)
    if process_count > 1:
        barrier("predict: all chunks written")
    complete = len(writer.done_chunks()) == num_chunks
    if complete and (process_index == 0 or jax.process_count() == 1):
        writer.finish()
    return {"output": os.fspath(output), "complete": writer.is_complete(), "skipped": dict(skipped),
            "skipped_ids": skipped_ids, "chunks_done": len(writer.done_chunks()), "num_chunks": num_chunks}


def _predict_chunk(chunk: SourceRange, forwards, members, rows: int, read_threads: int, bar):
    config = LoaderConfig(batch_size=rows, sampling="sequential", num_epochs=1, drop_remainder=False,
                          waveform_dtype="float32", read_threads=read_threads)
    loader = make_loader(chunk, config, grain.sharding.ShardOptions(shard_index=0, shard_count=1))
    ids, logits = [], []
    seen = 0
    for batch in loader:
        waveforms = batch["waveform"]
        for name, model, _ in members:
            if waveforms.shape[1] != model.frontend.clip_samples:
                raise UserError(f"{name}: the model takes {model.frontend.clip_samples}-sample clips "
                                 f"({model.frontend.sample_rate} Hz), the data gives {waveforms.shape[1]} samples")
        logits.append(teacher_lib.ensemble_mean([forward(waveforms) for _, forward in forwards]))
        ids.extend(str(i) for i in batch["id"])
        bar.update(len(ids) + loader.num_skipped - seen)
        seen = len(ids) + loader.num_skipped
        bar.set_postfix(skipped=loader.num_skipped)
    bar.update(len(chunk) - seen)  # a chunk of only unreadable clips yields no batch
    num_classes = members[0][1].num_classes
    stacked = np.concatenate(logits) if logits else np.zeros((0, num_classes), np.float32)
    if loader.num_skipped > len(loader.skipped_ids):
        logger.warning("%d clips skipped in one chunk; the file lists the first %d", loader.num_skipped,
                       len(loader.skipped_ids))
    return ids, stacked, list(loader.skipped_ids)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_model_argument(parser, several=True)
    flags.add_data_arguments(parser)
    parser.add_argument("--output", required=True, help="teacher file to write (HDF5), e.g. teacher.h5")
    parser.add_argument("--dtype", choices=teacher_lib.DTYPES, default="float16",
                        help="storage type of the logits (default %(default)s: 2 M × 527 clips fit in 2.1 GB)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="clips per step, rounded up to a multiple of the device count (default %(default)s)")
    parser.add_argument("--chunk-clips", type=int, default=4096,
                        help="clips per stored chunk: the most work an interruption loses (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    flags.add_job_arguments(parser, "process p predicts chunks p, p + P, ... of the data on its own devices, "
                                    "process 0 assembles the file")


def run(args: argparse.Namespace) -> int:
    from convnext_audio_jax.data.spec import open_data_spec
    from convnext_audio_jax.hub.resolve import offline_flag

    flags.join_job(args)  # a no-op for one process
    members = load_members(args.model, offline_flag(args))
    # demo@SPLIT is synthesised at the (first) model's rate and clip length; other data must hold clips of those.
    source, _ = open_data_spec(args.data, args.labels, frontend=members[0][1].frontend)
    result = predict_teacher(members, source, args.output, source_name=args.data, batch_size=args.batch_size,
                             chunk_clips=args.chunk_clips, dtype=args.dtype, progress=not args.no_progress)
    for clip_id, reason, detail in result["skipped_ids"][:SKIPPED_SHOWN]:
        print(f"skipped {clip_id}: {reason} ({detail})", file=sys.stderr)
    if len(result["skipped_ids"]) > SKIPPED_SHOWN:
        print(f"... {len(result['skipped_ids']) - SKIPPED_SHOWN} more skipped clips (all under /skipped in the file)",
              file=sys.stderr)
    if not result["complete"]:
        print(f"predict: {result['chunks_done']} of {result['num_chunks']} chunks written; the file is assembled "
              f"when every process's chunks are there")
        return 0
    teacher = teacher_lib.TeacherPredictions(args.output)
    print(f"predict: {len(teacher)} clips × {teacher.num_classes} classes from {len(args.model)} model(s) in "
          f"{args.output} ({sum(result['skipped'].values())} skipped this run: {result['skipped']})")
    return 0
