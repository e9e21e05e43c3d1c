"""The one evaluation engine: a model's probabilities on every clip of a labelled source, sharded over all
devices and processes, then AP/AUC/d′ per class and their means.

``evaluate(model, variables, source, batch_size)`` is the library entry point; training's periodic
evaluation and ``convnext-audio evaluate --model DIR --data SPEC`` both call it. Each process reads its
block of every global batch of clips as int16 (half the bytes to the device), every process runs the same
number of fixed-size batches (short batches are padded with zero rows, which carry no clip and are dropped),
the batches are assembled with ``jax.make_array_from_process_local_data`` and the results gathered with
``process_allgather``. Clips that cannot be read are skipped and counted by reason, over all processes.

Data SPECs (``--data``) follow convnext_audio_jax/data/spec.py: ``DIR@SPLIT``, ``FILE.h5``,
``AUDIO_DIR@CLIPS.csv`` (needs ``--labels``), ``tfds:NAME[/CONFIG][:VERSION]@SPLIT`` (needs ``--labels``),
``demo[@SPLIT]`` and ``SPEC+SPEC`` unions.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import json
import logging
import math
import os
import pathlib
import re
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from convnext_audio_jax.artifacts.model_dir import (
    BEST_MODEL,
    LAST_MODEL,
    WORKDIR_MODELS,
    load_model,
)
from convnext_audio_jax.data import audio
from convnext_audio_jax.data import spec as spec_lib
from convnext_audio_jax.data.pipeline import (
    LoaderConfig,
    jax_shard_options,
    make_loader,
)
from convnext_audio_jax.data.spec import open_data_spec  # noqa: F401  (its former home: callers' imports work)
from convnext_audio_jax.evaluation import metrics as metrics_lib
from convnext_audio_jax.runtime import files, flags, xla
from convnext_audio_jax.runtime.errors import UserError
from convnext_audio_jax.runtime.sharding import (
    barrier,
    batch_spec,
    data_mesh,
    jit_forward,
)

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
PER_CLASS_FILE = "per_class.csv"
PLOT_FILE = "per_class_ap.png"


@dataclasses.dataclass
class Predictions:
    """Scores of every clip that could be read (all processes), in source order, and what was skipped."""

    clip_ids: list[str]
    targets: np.ndarray  # (N, C) bool
    scores: np.ndarray  # (N, C) float32 probabilities
    skipped: collections.Counter  # reason → count, over all processes
    skipped_ids: list[tuple[str, str, str]]  # (id, reason, detail), the first ones of this process
    seconds: float  # wall time of reading + forward, compilation excluded

    @property
    def clips_per_second(self) -> float:
        return len(self.clip_ids) / self.seconds if self.seconds > 0 else float("nan")


class Scorer:
    """The jitted ``scorer(variables, int16 or float32 waveforms) -> probs`` on a batch sharded over every
    axis of ``mesh``, variables replicated. Build it once and pass it to :func:`predict` to reuse the
    compiled program (training evaluates many times)."""

    def __init__(self, model: nn.Module, mesh: Mesh):
        self.mesh = mesh
        self._score = _score_program(model, mesh)

    def __call__(self, variables, waveforms: jax.Array) -> jax.Array:
        return self._score(variables, waveforms)


@xla.reused
def _score_program(model: nn.Module, mesh: Mesh):
    def score(variables, waveforms):
        if waveforms.dtype == np.int16:
            waveforms = audio.int16_to_float(waveforms)
        return model.apply(variables, waveforms, train=False)["probs"]

    return jit_forward(score, mesh)


def predict(model: nn.Module, variables: Mapping[str, Any], source, batch_size: int, mesh: Mesh | None = None,
            progress: bool = True, read_threads: int = 4, scorer: Scorer | None = None) -> Predictions:
    """Probabilities of every readable clip of ``source``, over all processes and devices.

    ``batch_size`` is global and rounded up to a multiple of the device count. Raises ValueError when the
    source is empty or no clip could be read.
    """
    if len(source) == 0:
        raise UserError("the evaluation source has no clips")
    scorer = scorer or Scorer(model, mesh or data_mesh())
    mesh = scorer.mesh
    num_devices, hosts = mesh.devices.size, jax.process_count()
    global_batch = -(-batch_size // num_devices) * num_devices
    if global_batch != batch_size:
        logger.info("batch size %d rounded up to %d, a multiple of the %d devices", batch_size, global_batch, num_devices)
    local_batch = global_batch // hosts
    clip_samples = model.frontend.clip_samples
    loader = make_loader(source, LoaderConfig(batch_size=local_batch, sampling="sequential", num_epochs=1,
                                              drop_remainder=False, waveform_dtype="int16",
                                              read_threads=read_threads), jax_shard_options())
    # Every process runs as many batches as the largest share needs; skipped clips only shorten a share.
    num_batches = math.ceil(math.ceil(len(source) / hosts) / local_batch)
    sharding = NamedSharding(mesh, batch_spec(mesh))
    replicated = NamedSharding(mesh, PartitionSpec())
    variables = jax.device_put(dict(variables), replicated)
    position = {source.clip_id(i): i for i in range(len(source))}
    zeros = np.zeros((local_batch, clip_samples), np.int16)
    scorer(variables, jax.make_array_from_process_local_data(sharding, zeros)).block_until_ready()  # compile
    barrier("eval step compiled")  # before the first gather: a process may compile for longer than gloo waits
    indices, scores = [], []
    start = time.perf_counter()
    with tqdm.tqdm(total=len(source), unit="clip", desc="evaluate", file=sys.stderr,
                   disable=not progress or jax.process_index() != 0) as bar:
        for _ in range(num_batches):
            batch = next(loader, None)
            rows = 0 if batch is None else batch["waveform"].shape[0]
            waveform = zeros.copy()
            index = np.full(local_batch, -1, np.int64)
            if rows:
                if batch["waveform"].shape[1] != clip_samples:
                    raise UserError(f"the data holds clips of {batch['waveform'].shape[1]} samples, the model "
                                     f"takes {clip_samples}")
                waveform[:rows] = batch["waveform"]
                index[:rows] = [position[str(i)] for i in batch["id"]]
            probs = scorer(variables, jax.make_array_from_process_local_data(sharding, waveform))
            probs, index = (np.asarray(x) for x in multihost_utils.process_allgather((probs, index), tiled=True))
            keep = index >= 0
            indices.append(index[keep])
            scores.append(probs[keep])
            bar.update(int(keep.sum()) + loader.num_skipped - bar.n)
            bar.set_postfix(skipped=loader.num_skipped)
    seconds = time.perf_counter() - start
    reasons = audio.SKIP_REASONS
    local_counts = np.array([loader.skipped.get(r, 0) for r in reasons], np.int64)
    counts = np.asarray(multihost_utils.process_allgather(local_counts)).reshape(-1, len(reasons)).sum(axis=0)
    skipped = collections.Counter({r: int(c) for r, c in zip(reasons, counts) if c})
    skipped_ids = list(loader.skipped_ids)
    loader.close()
    order = np.concatenate(indices)
    if order.size == 0:
        raise UserError(f"none of the {len(source)} clips could be read: {dict(skipped)}")
    ranking = np.argsort(order, kind="stable")
    order = order[ranking]
    return Predictions([source.clip_id(int(i)) for i in order], np.asarray(source.targets, bool)[order],
                       np.concatenate(scores)[ranking], skipped, skipped_ids, seconds)


def evaluate(model: nn.Module, variables: Mapping[str, Any], source, batch_size: int,
             mesh: Mesh | None = None, class_names: Sequence[str] | None = None,
             output_dir: str | os.PathLike | None = None, progress: bool = True,
             scorer: Scorer | None = None) -> dict[str, Any]:
    """``compute_metrics`` of the model's probabilities on ``source``, plus ``num_skipped``, ``skipped``
    (count per reason), ``skipped_ids`` and ``clips_per_second``. With ``output_dir``, also writes
    metrics.json, per_class.csv and per_class_ap.png there (process 0)."""
    predictions = predict(model, variables, source, batch_size, mesh, progress, scorer=scorer)
    result = metrics_lib.compute_metrics(predictions.targets, predictions.scores, class_names)
    result.update(
        num_skipped=sum(predictions.skipped.values()),
        skipped=dict(predictions.skipped),
        skipped_ids=[list(s) for s in predictions.skipped_ids],
        clips_per_second=predictions.clips_per_second,
    )
    if output_dir is not None and jax.process_index() == 0:
        write_reports(result, output_dir)
    return result


def write_reports(result: Mapping[str, Any], output_dir: str | os.PathLike) -> list[pathlib.Path]:
    """metrics.json (everything), per_class.csv (index, name, AP, AUC, d′, positives) and a plot of the
    per-class AP sorted from best to worst with the mAP as a line."""
    output_dir = pathlib.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / METRICS_FILE, output_dir / PER_CLASS_FILE, output_dir / PLOT_FILE]
    paths[0].write_text(json.dumps(result, indent=2) + "\n")
    with open(paths[1], "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "name", "AP", "AUC", "d_prime", "positives"])
        for entry in result["per_class"]:
            writer.writerow([entry["index"], entry.get("name", ""),
                             *("" if entry[k] is None else f"{entry[k]:.6f}" for k in ("AP", "AUC", "d_prime")),
                             entry["positives"]])
    _plot_per_class_ap(result, paths[2])
    return paths


def _plot_per_class_ap(result: Mapping[str, Any], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    ap = np.sort([e["AP"] for e in result["per_class"] if e["AP"] is not None])[::-1]
    figure, axes = plt.subplots(figsize=(10, 4))
    axes.bar(np.arange(len(ap)), ap, width=1.0, color="tab:blue")
    axes.axhline(result["mAP"], color="tab:red", label=f"mAP {result['mAP']:.4f}")
    axes.set_xlabel(f"class, sorted by AP ({len(ap)} classes with positives and negatives)")
    axes.set_ylabel("average precision")
    axes.set_xlim(-0.5, len(ap) - 0.5)
    axes.set_ylim(0, 1)
    axes.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_model_argument(parser)
    flags.add_data_arguments(parser)
    parser.add_argument("--remap-by-name", action="store_true",
                        help="the model and the data list the same class names in different orders: score each data "
                        "class with the model output of the same name")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="clips per step over all devices, rounded up to a multiple of the device count (default: "
                        "32 per device)")
    parser.add_argument("--compilation-cache", default="auto", metavar="DIR",
                        help="persistent XLA compilation cache: 'auto' (default) is <cache root>/xla, '' none")
    parser.add_argument("--output", help="folder for the reports (default: evaluation/SPEC in the training workdir "
                        "evaluated, else in the model directory; SPEC with characters other than letters, digits and "
                        "@.+=- as _)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    flags.add_job_arguments(parser, "each reads its share of the clips, process 0 writes the reports")


def class_order(model_names: Sequence[str] | None, data_names: Sequence[str] | None, model_classes: int,
                data_classes: int, remap_by_name: bool = False) -> list[int] | None:
    """For each data class, the index of the model output that scores it: None when the model's classes are the
    data's in the same order. Raises ValueError naming the first differing index when the names differ (with
    ``remap_by_name``: when the data names a class the model does not have, or a count or a name repeats).
    Without names on both sides, only the counts are compared."""
    if model_names is None or data_names is None:
        if remap_by_name:
            side = "the model" if model_names is None else "the data (--labels gives them)"
            raise UserError(f"--remap-by-name needs class names on both sides; {side} has none")
        if data_classes != model_classes:
            raise UserError(f"the data has {data_classes} classes, the model {model_classes}")
        return None
    model_names, data_names = list(model_names), list(data_names)
    if model_names == data_names:
        return None
    if not remap_by_name:
        first = next((i for i, (m, d) in enumerate(zip(model_names, data_names)) if m != d), None)
        where = (f"first difference at index {first}: the model's class {first} is {model_names[first]!r}, the data's "
                 f"{data_names[first]!r}" if first is not None else "the shorter list is a prefix of the longer")
        counts = f"the data has {len(data_names)} classes, the model {len(model_names)}; "
        same_set = len(model_names) == len(data_names) and sorted(model_names) == sorted(data_names)
        hint = " (the same names in another order: --remap-by-name scores each data class by name)" if same_set else ""
        raise UserError(f"the model's class names differ from the data's: "
                         f"{counts if len(model_names) != len(data_names) else ''}{where}{hint}")
    for side, names in (("model", model_names), ("data", data_names)):
        seen = set()
        repeated = next((n for n in names if n in seen or seen.add(n)), None)
        if repeated is not None:
            raise UserError(f"--remap-by-name: the {side} lists class {repeated!r} twice")
    if len(model_names) != len(data_names):
        raise UserError(f"--remap-by-name: the data has {len(data_names)} classes, the model {len(model_names)}")
    position = {name: i for i, name in enumerate(model_names)}
    missing = [(i, n) for i, n in enumerate(data_names) if n not in position]
    if missing:
        raise UserError(f"--remap-by-name: the data's class {missing[0][0]} {missing[0][1]!r} is not a class of the "
                         f"model ({len(missing)} such)")
    return [position[name] for name in data_names]


def reorder_classifier(variables: Mapping[str, Any], order: Sequence[int]) -> dict[str, Any]:
    """``variables`` whose classifier (the one top-level Dense with ``len(order)`` outputs) has output ``j`` =
    the old output ``order[j]``: the model then scores classes in the new order, exactly."""
    params = variables["params"]
    classes = len(order)
    heads = [name for name, layer in params.items() if isinstance(layer, Mapping) and set(layer) == {"kernel", "bias"}
             and np.ndim(layer["kernel"]) == 2 and np.shape(layer["kernel"])[1] == classes
             and np.shape(layer["bias"]) == (classes,)]
    if len(heads) != 1:
        raise ValueError(f"cannot reorder the classes: expected one top-level dense layer with {classes} outputs, "
                         f"found {heads or 'none'}")
    head = params[heads[0]]
    order = np.asarray(order)
    reordered = {"kernel": np.asarray(head["kernel"])[:, order], "bias": np.asarray(head["bias"])[order]}
    return {**variables, "params": {**params, heads[0]: reordered}}


def default_output(checkpoint: str | os.PathLike, model_dir: pathlib.Path, data_spec: str) -> pathlib.Path:
    """Where ``evaluate`` writes its reports without ``--output``: ``evaluation/SPEC`` in the run the model belongs
    to. That is the training workdir ``checkpoint`` names, or holds the model directory (``WORKDIR/model/best``:
    training replaces that directory, so the reports go beside it, not into it); else the model directory
    itself (a ``convert`` output, a pretrained name's cached directory)."""
    given = pathlib.Path(checkpoint)
    if given.is_dir() and given.resolve() != model_dir.resolve():  # a workdir, resolved to its model/best or last
        run_folder = given
    elif model_dir.parent.name == WORKDIR_MODELS and model_dir.name in (BEST_MODEL, LAST_MODEL):
        run_folder = model_dir.parent.parent
    else:
        run_folder = model_dir
    slug = re.sub(r"[^A-Za-z0-9@.+=-]+", "_", data_spec).strip("_.")[:120] or "data"
    return run_folder / "evaluation" / slug


def run(args: argparse.Namespace) -> int:
    from convnext_audio_jax.hub.resolve import offline_flag, resolve_model_dir

    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    flags.join_job(args)  # a no-op for one process
    xla.enable_compilation_cache(args.compilation_cache, files.cache_root())
    first = jax.process_index() == 0
    model_dir = resolve_model_dir(args.model, offline=offline_flag(args))
    model, variables, metadata = load_model(model_dir)
    output = args.output or default_output(args.model, model_dir, args.data)
    frontend = model.frontend
    source, data_names = spec_lib.open_data_spec(args.data, args.labels, frontend=frontend)
    model_names = metadata.get("class_names")
    order = class_order(model_names, data_names, model.num_classes, source.num_classes, args.remap_by_name)
    if order is not None:
        variables = reorder_classifier(variables, order)
        moved = sum(i != j for i, j in enumerate(order))
        if first:
            print(f"evaluate: {moved} of {len(order)} classes matched by name at another index", file=sys.stderr)
    class_names = data_names or model_names
    batch_size = args.batch_size or 32 * jax.device_count()
    result = evaluate(model, variables, source, batch_size, class_names=class_names, output_dir=output,
                      progress=not args.no_progress)
    if not first:
        return 0
    print(f"evaluate: {result['num_clips']} clips ({result['num_skipped']} skipped {result['skipped']}), "
          f"{result['num_evaluated_classes']} of {result['num_classes']} classes scored: mAP {result['mAP']:.4f}, "
          f"AUC {result['AUC']:.4f}, d' {result['d_prime']:.4f}; {result['clips_per_second']:.1f} clips/s; "
          f"reports in {output}")
    return 0
