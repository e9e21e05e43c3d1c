"""What a run saves and restores: the orbax train-state checkpoints (state + data loader position), the
model directories ``WORKDIR/model/best`` and ``WORKDIR/model/last`` that every tool reads, and ``init_from``.

Orbax checkpoints (``CheckpointManager``, asynchronous) hold the state (params, batch_stats, opt_state, step,
rng) and the loader's iterator state together, so a resumed run repeats an uninterrupted run bit for bit;
kept: the last ``keep_checkpoints`` plus the best by validation mAP. The model directories are written by
``convnext_audio_jax.artifacts.model_dir.save_model`` on process 0, in a background thread after the variables were
fetched to the host, after the train-state save in flight has finished (orbax saves must not overlap), so
the step loop waits no longer than for a train-state save.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import subprocess
import threading
from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from orbax.checkpoint._src.metadata import array_metadata_store

from convnext_audio_jax.data import pipeline
from convnext_audio_jax.hub import resolve as hub_resolve
from convnext_audio_jax.training.config import ConfigError
from convnext_audio_jax.training.step import TrainState

logger = logging.getLogger(__name__)

BEST_METRIC = "val_mAP"
MODEL_DIR = "model"
# Orbax splits each replicated array into one slice per replica so that replicas write in parallel (its default
# everywhere but on GPU). For the many small arrays of a train state that costs one eager slice per array and
# device: 4.0 s of CPU for a first save and 0.8 s for each later one of a 180-array state on 8 CPU devices, against
# 0.3 s unsliced. Only slices of at least this many bytes are written in parallel.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _use_replica_parallel_for_large_arrays_only() -> None:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(  # otherwise as orbax's default handler (its metadata store)
            array_metadata_store=array_metadata_store.Store(),
            min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES), override=True)


@jax.jit
def _copied(tree):
    return jax.tree.map(lambda x: x.copy(), tree)


def _host_safe(state: dict) -> dict:
    """The state as an asynchronous save may keep reading after ``save`` returns. Orbax writes an unsliced array
    from ``np.asarray`` of its shard, which on a CPU device is a view of the device buffer itself: the next train
    step donates that buffer, so on the CPU the save gets a copy (one dispatch). On an accelerator ``np.asarray``
    is already a host copy."""
    if jax.default_backend() == "cpu":
        return _copied(state)
    return state


class LoaderCheckpoint:
    """The loader as grain's orbax checkpoint handler wants an iterator (``get_state() -> bytes``,
    ``set_state(bytes)``, ``start_prefetch()``), holding the state captured when the step's batch was taken:
    the loader itself runs ahead by then. ``run`` carries the loop's host-side counters (non-finite steps
    skipped) with it, so a resume continues them. grain writes one file per process, so multi-host runs work."""

    def __init__(self, loader: pipeline.ClipLoader, state: dict | None = None, run: dict | None = None):
        self._loader = loader
        self._state = state
        self.run = dict(run or {})

    def get_state(self) -> bytes:
        return json.dumps({"loader": self._state, "run": self.run}).encode()

    def set_state(self, state: bytes) -> None:
        saved = json.loads(state)
        if "loader" not in saved:  # written before the run counters were added: the loader state alone
            saved = {"loader": saved, "run": {}}
        self._loader.set_state(saved["loader"])
        self.run = dict(saved.get("run") or {})

    def start_prefetch(self) -> None:
        """Nothing to start: the loader prefetches on its own."""


class Checkpointer:
    """Orbax CheckpointManager for {state, data iterator}: asynchronous saves, the last ``keep`` checkpoints
    plus the best by validation mAP (saves carrying metrics) are kept."""

    def __init__(self, directory: str | os.PathLike, keep: int, asynchronous: bool = True):
        _use_replica_parallel_for_large_arrays_only()
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(n=keep),
            ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1,
                                          keep_checkpoints_without_metrics=False),
        ])
        self.directory = pathlib.Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(preservation_policy=policy, enable_async_checkpointing=asynchronous,
                                                 cleanup_tmp_directories=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, loader_checkpoint: LoaderCheckpoint, metrics: dict | None = None) -> None:
        step = int(state.step)
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_host_safe(state.as_dict())),
            data=grain.checkpoint.CheckpointSave(loader_checkpoint),
        ), metrics=metrics, force=True)

    def restore(self, step: int, template: TrainState, loader: pipeline.ClipLoader | None
                ) -> tuple[TrainState, dict]:
        """(the state saved at ``step`` in ``template``'s shardings, the run counters saved with it); the
        loader is moved to its saved position."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template.as_dict())
        items = {"state": ocp.args.StandardRestore(abstract)}
        loader_checkpoint = LoaderCheckpoint(loader) if loader is not None else None
        if loader_checkpoint is not None:
            self.check_process_count(step)
            items["data"] = grain.checkpoint.CheckpointRestore(loader_checkpoint)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return TrainState(**restored["state"]), (loader_checkpoint.run if loader_checkpoint is not None else {})

    def check_process_count(self, step: int) -> None:
        check_process_count(self.directory / str(step), jax.process_count())

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def check_process_count(step_dir: pathlib.Path, process_count: int) -> None:
    """Raises ConfigError unless the checkpoint ``step_dir`` holds one loader position per process of a job of
    ``process_count`` (grain's ``data/process_I-of-N.json``): a resume needs the number of processes that saved it."""
    saved = {int(match.group(1)) for path in (step_dir / "data").glob("process_*-of-*.json")
             if (match := re.fullmatch(r"process_\d+-of-(\d+)\.json", path.name))}
    if saved and saved != {process_count}:
        counts = " and ".join(str(count) for count in sorted(saved))
        raise ConfigError(
            f"checkpoint {step_dir} was saved by a job of {counts} processes (its loader positions, "
            f"data/process_I-of-N.json); this job has {process_count}: resume with {counts} processes")


def git_revision() -> str | None:
    """The source tree's git commit when it is a git checkout (with "-dirty" for local changes), else None."""
    root = pathlib.Path(__file__).resolve().parents[2]
    try:
        revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return revision + ("-dirty" if dirty else "") if revision else None


class ModelWriter:
    """Writes ``WORKDIR/model/last`` (every call) and ``WORKDIR/model/best`` (when the validation mAP is the
    best so far) with ``checkpoint.save_model``, on process 0, one save at a time in a background thread."""

    def __init__(self, workdir: pathlib.Path, model_name: str, model_config: dict, metadata: dict[str, Any],
                 before_save: Callable[[], None] | None = None):
        self.directory = workdir / MODEL_DIR
        # Orbax saves must not overlap within a process (they share its signalling keys): the thread first
        # waits for the train-state save in flight (``before_save``), and the caller calls ``wait()`` before
        # starting the next one.
        self._before_save = before_save
        self._model_name = model_name
        self._model_config = model_config
        self._metadata = metadata
        self._enabled = jax.process_index() == 0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def write(self, state: TrainState, step: int, metrics: dict[str, float], is_best: bool) -> None:
        if not self._enabled:
            return
        self.wait()
        variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
        metadata = {**self._metadata, "provenance": {**self._metadata.get("provenance", {}), "step": step,
                                                      "validation": metrics}}
        names = ["last", "best"] if is_best else ["last"]
        self._thread = threading.Thread(target=self._save, args=(variables, metadata, names), daemon=False,
                                        name="model-writer")
        self._thread.start()

    def _save(self, variables, metadata, names) -> None:
        from convnext_audio_jax.artifacts import model_dir as checkpoint

        try:
            if self._before_save is not None:
                self._before_save()
            for name in names:
                checkpoint.save_model(self.directory / name, self._model_name, variables, metadata=metadata,
                                      model_config=self._model_config, overwrite=True)
        except BaseException as error:  # reported by the next wait(), on the main thread
            self._error = error

    def wait(self) -> None:
        """Waits for the save in flight; re-raises its error, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def transplant_params(target: dict, source: dict, exclude=()) -> tuple[dict, list[str], list[str]]:
    """``target`` with every leaf that ``source`` has at the same path with the same shape replaced by the
    source's value (cast to the target's dtype), except paths starting with an ``exclude`` prefix.
    Returns (tree, loaded paths, kept paths with the reason)."""
    flat_source = traverse_util.flatten_dict(source, sep="/")
    merged, loaded, kept = {}, [], []
    for path, value in traverse_util.flatten_dict(target, sep="/").items():
        candidate = flat_source.get(path)
        if any(path == prefix or path.startswith(prefix.rstrip("/") + "/") for prefix in exclude):
            kept.append(f"{path} (excluded)")
        elif candidate is None:
            kept.append(f"{path} (not in the checkpoint)")
        elif tuple(candidate.shape) != tuple(value.shape):
            kept.append(f"{path} (shape {tuple(value.shape)} vs checkpoint {tuple(candidate.shape)})")
        else:
            value = np.asarray(candidate).astype(value.dtype)
            loaded.append(path)
        merged[path] = value
    return traverse_util.unflatten_dict(merged, sep="/"), loaded, kept


def load_init(state: TrainState, directory: str, exclude, mesh) -> TrainState:
    """``state`` with params and batch_stats taken from a model directory (ImageNet or AudioSet) where
    names and shapes match: e.g. everything but the stem conv, bn0 and the classifier from ImageNet, or
    everything but a new-sized head for fine-tuning."""
    _, variables, metadata = hub_resolve.load_model(directory)
    params, loaded, kept = transplant_params(jax.device_get(state.params), variables.get("params", {}), exclude)
    if not loaded:
        raise ConfigError(f"init_from {directory}: no parameter of the model matches the checkpoint's names and shapes")
    stats, _, _ = transplant_params(jax.device_get(state.batch_stats), variables.get("batch_stats", {}), exclude)
    logger.info("init_from %s (model %s): loaded %d parameter arrays, kept %d initial: %s", directory,
                metadata.get("model"), len(loaded), len(kept), "; ".join(kept))
    replicated = NamedSharding(mesh, P())
    return state.replace(params=jax.device_put(params, replicated), batch_stats=jax.device_put(stats, replicated))
