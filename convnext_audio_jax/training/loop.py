"""The training loop: ``train(config, workdir)`` ties config, data, step, evaluation, checkpoints and
logging together. One process per host drives every local device over a one-axis ``data`` mesh spanning
all devices of all hosts (``sharding.data_mesh``); the state is replicated and each global batch is
assembled from the hosts' local batches, each host's rows one contiguous block (data/pipeline.py,
``ProcessBlocks``), so a global batch is the single-process one. Logging and printing come from process 0."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from convnext_audio_jax.artifacts import lock as lock_lib
from convnext_audio_jax.evaluation import evaluate as evaluate_lib
from convnext_audio_jax.runtime import files, sharding, xla
from convnext_audio_jax.runtime.errors import UserError
from convnext_audio_jax.runtime.sharding import data_mesh
from convnext_audio_jax.training import checkpointing, optimizer
from convnext_audio_jax.training import config as config_lib
from convnext_audio_jax.training import data as data_lib
from convnext_audio_jax.training import step as step_lib
from convnext_audio_jax.training.checkpointing import BEST_METRIC
from convnext_audio_jax.training.prefetch import DevicePrefetcher

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm became NaN/Inf (``on_nonfinite = "stop"``), or did so in
    ``max_nonfinite_in_a_row`` steps in a row (``"skip_batch"``); nothing after the last good state was saved."""


class TooManySkippedError(UserError, RuntimeError):
    """More clips than ``data.max_skip_fraction`` of a split could not be read: the data is for the user to fix
    (a RuntimeError still, as it was)."""


def _summary_writer_class() -> type:
    """tensorboardX's SummaryWriter. tensorboardX imports torch where it can, only to accept its tensors (5 s of a
    run's start-up where torch is installed); this log gives it floats, so unless torch is imported already it is
    hidden from that import (``sys.modules[name] = None`` makes an import of it fail)."""
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsLog:
    """metrics.jsonl and TensorBoard events under the workdir, written by process 0 only."""

    def __init__(self, workdir: pathlib.Path):
        self._enabled = jax.process_index() == 0
        if not self._enabled:
            return
        path = workdir / "metrics.jsonl"
        self._jsonl = open(path, "a", encoding="utf-8")
        if path.stat().st_size and not _ends_with_newline(path):
            self._jsonl.write("\n")  # a line cut short by a kill stays alone, the next record starts clean
        self._writer = _summary_writer_class()(str(workdir / "tensorboard"))

    def write(self, step: int, values: dict[str, Any]) -> None:
        """One JSON line; the numbers also go to TensorBoard."""
        if not self._enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            if isinstance(value, int | float):
                self._writer.add_scalar(name, value, step)

    def sync(self) -> None:
        """On disk (before a checkpoint is saved: its metrics must survive a power cut with it)."""
        if self._enabled:
            files.sync_file(self._jsonl)
            self._writer.flush()

    def close(self) -> None:
        if self._enabled:
            self.sync()
            self._jsonl.close()
            self._writer.close()


def _ends_with_newline(path: pathlib.Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def best_logged_metric(workdir: pathlib.Path, up_to_step: int) -> float:
    """The best validation mAP metrics.jsonl records up to ``up_to_step`` (-inf when none): a resume keeps it."""
    path = workdir / "metrics.jsonl"
    best = -math.inf
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if BEST_METRIC in entry and entry.get("step", math.inf) <= up_to_step:
                best = max(best, float(entry[BEST_METRIC]))
    return best


def check_skips(name: str, skipped: int, seen: int, limit: float, where: str) -> None:
    if seen and skipped > limit * seen:
        raise TooManySkippedError(
            f"{skipped} of {seen} {name} clips could not be read ({skipped / seen:.1%}, more than "
            f"data.max_skip_fraction {limit:.1%}) from {where}; see the log for the clip ids and reasons")


def global_count(value: int) -> int:
    """``value`` summed over all processes; a collective, so every process calls it at the same point."""
    if jax.process_count() == 1:
        return value
    return int(np.sum(multihost_utils.process_allgather(np.int32(value))))


@dataclasses.dataclass
class _PendingMetrics:
    step: int
    values: dict  # device arrays, fetched together every log_every steps (and before a checkpoint)


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
          on_batch: Callable[[int, np.ndarray], None] | None = None) -> dict[str, Any]:
    """Train per ``config`` in ``workdir`` (config.json, checkpoints/, model/{best,last}, metrics.jsonl,
    tensorboard/) and return the last evaluation ({"step", "val_mAP", "val_AUC", "val_d_prime",
    "best_val_mAP", and "eval_*" when ``data.eval`` is set}).

    ``on_batch(step, clip_ids)``, when given, is called in every process before each training step with the ids of
    the clips this process read for it (e.g. to check which clips each process of a job trains on).

    Holds the workdir's lock (``lock.WorkdirLock``) for the whole run: a second run on the same workdir
    raises WorkdirLockedError. Starts from the workdir's latest checkpoint if there is one, else from
    ``config.init_from``, else from scratch. Raises ConfigError (before compiling anything),
    NonFiniteLossError (per ``config.on_nonfinite``, leaving the checkpoints written before it),
    TooManySkippedError, or pipeline.UnreadableSourceError.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with lock_lib.WorkdirLock(workdir, jax.process_index()):
        return _train(config, workdir, on_batch)


def _train(config: ml_collections.ConfigDict, workdir: pathlib.Path, on_batch) -> dict[str, Any]:
    mesh = data_mesh()
    config_lib.validate_config(config, mesh.size)
    xla.enable_compilation_cache(config.get("compilation_cache", ""), files.cache_root())
    accumulation_steps, examples_per_host = config_lib.batch_layout(config, mesh.size, jax.process_count())
    augment = config_lib.augment_config(config)

    probe_model = config_lib.build_model(config, num_classes=1)
    data = data_lib.open_run_data(config, probe_model.frontend)
    teacher, train_source, without_teacher = data_lib.open_teacher(config, data.train)
    data = dataclasses.replace(data, train=train_source)
    model = config_lib.build_model(config, num_classes=data.num_classes)
    checkpointer = checkpointing.Checkpointer(workdir / "checkpoints", config.keep_checkpoints, config.async_checkpointing)
    latest = checkpointer.latest_step()
    try:
        config_changes = config_lib.check_and_record_config(config, workdir, resuming=latest is not None)
    except config_lib.ConfigError:
        checkpointer.close()
        raise

    tx = optimizer.make_optimizer(config.optimizer, config.total_steps)
    state = step_lib.init_train_state(model, tx, config.seed, mesh)
    # The processes meet after compiling the initial state: a resume's first collective (orbax's restore sync)
    # must not wait on a process still compiling it (e.g. its peer loaded it from the XLA cache).
    sharding.barrier("train state initialized")
    skip_nonfinite = config.on_nonfinite == "skip_batch"
    train_step = step_lib.make_train_step(model, tx, augment, accumulation_steps, mesh,
                                          distillation=config_lib.distillation(config), skip_nonfinite=skip_nonfinite)
    scorer = evaluate_lib.Scorer(model, mesh)

    loader = data_lib.make_train_loader(config, data.train, examples_per_host, augment.mixup)
    run_counters: dict = {}
    if latest is not None:
        state, run_counters = checkpointer.restore(latest, state, loader)
        if jax.process_index() == 0:
            logger.info("resumed from %s at step %d", checkpointer.directory, latest)
    elif config.init_from:
        state = checkpointing.load_init(state, config.init_from, tuple(config.init_exclude), mesh)
    start_step = int(state.step)

    log = MetricsLog(workdir)
    if config_changes and jax.process_index() == 0:
        log.write(start_step, {"config_change": {key: list(values) for key, values in config_changes.items()}})
        logger.warning("resuming with a changed config (allow_config_change): %s", config_changes)
    if without_teacher:
        log.write(start_step, {"train_clips_without_teacher": without_teacher, "train_clips": len(data.train)})
    metadata = {"sample_rate": model.frontend.sample_rate,
                "provenance": {"config": config_lib.config_as_json(config), "git_revision": checkpointing.git_revision()}}
    if data.class_names:
        metadata["class_names"] = list(data.class_names)
    writer = checkpointing.ModelWriter(workdir, config.model.name,
                                       config_lib.artifact_model_config(config, data.num_classes), metadata,
                                       before_save=checkpointer.wait)
    from tqdm import tqdm

    progress = tqdm(total=config.total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                    disable=not (config.progress_bar and jax.process_index() == 0))
    last_report = {"time": time.perf_counter(), "step": start_step}
    result: dict[str, Any] = {}
    best = best_logged_metric(workdir, start_step)
    rows_per_host = loader.config.rows_per_batch
    max_skip = float(config.data.max_skip_fraction)
    # Steps whose update the jitted step skipped (skip_batch): in all, and in a row up to the last step seen.
    nonfinite = {"skipped": int(run_counters.get("nonfinite_skipped", 0)),
                 "in_a_row": int(run_counters.get("nonfinite_in_a_row", 0))}

    def stop(message: str, hint: str = "") -> None:
        writer.wait()
        checkpointer.wait()
        raise NonFiniteLossError(f"{message}; stopped; last good checkpoint: step {checkpointer.latest_step()} "
                                 f"in {checkpointer.directory}{hint}")

    def report_all(pendings: list[_PendingMetrics], loader_skipped: int) -> None:
        """The steps since the last report, fetched from the devices in one transfer: the only time the host
        waits on the device in the steady state. ``loader_skipped``: the clips the loader skipped by the last one."""
        if not pendings:
            return
        fetched = jax.device_get([pending.values for pending in pendings])
        now = time.perf_counter()
        rate = ((pendings[-1].step - last_report["step"]) * config.batch_size / max(now - last_report["time"], 1e-9))
        last_report.update(time=now, step=pendings[-1].step)
        for pending, values in zip(pendings, fetched):
            report(pending.step, {key: float(value) for key, value in values.items()}, rate, loader_skipped)
        pendings.clear()

    def report(step: int, values: dict, clips_per_second: float, loader_skipped: int) -> None:
        # The step's own test (loss and gradient norm finite) is the one the jitted step applied.
        finite = math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])
        applied_before = step - 1 - nonfinite["skipped"]  # optimizer updates before this step
        if not finite:
            seen = f"loss {values['loss']}, grad norm {values['grad_norm']}"
            if not skip_nonfinite:
                stop(f"non-finite training loss at step {step} ({seen})",
                     "; to skip such steps, resume with --config.on_nonfinite=skip_batch")
            nonfinite["skipped"] += 1
            nonfinite["in_a_row"] += 1
            logger.warning("step %d: %s; update skipped (%d in a row, %d in all)", step, seen,
                           nonfinite["in_a_row"], nonfinite["skipped"])
            log.write(step, {"nonfinite_skipped": nonfinite["skipped"],
                                     "nonfinite_in_a_row": nonfinite["in_a_row"]})
            if nonfinite["in_a_row"] >= config.max_nonfinite_in_a_row:
                stop(f"{nonfinite['in_a_row']} steps in a row (steps {step - nonfinite['in_a_row'] + 1} to "
                     f"{step}) had a non-finite loss or gradient norm (last: {seen}); their updates were "
                     f"skipped (on_nonfinite = 'skip_batch', max_nonfinite_in_a_row = {config.max_nonfinite_in_a_row})")
        else:
            nonfinite["in_a_row"] = 0
        # The rate the update of this step used (skipped updates do not advance the schedule), computed on
        # the host (no device call).
        lr = optimizer.host_learning_rate(config.optimizer, config.total_steps, applied_before)
        progress.update(step - progress.n)
        progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", clips_s=f"{clips_per_second:.1f}", refresh=False)
        if step % config.log_every == 0 or step == config.total_steps:
            # NaN is no JSON number: a skipped step's line has no loss, its count was written above.
            losses = ({"train_loss": values["loss"], "grad_norm": values["grad_norm"],
                       **{f"train_{key}": values[key] for key in ("label_loss", "distillation_loss") if key in values}}
                      if finite else {})
            log.write(step, {**losses, "learning_rate": lr, "clips_per_second": clips_per_second,
                                     "train_skipped": global_count(loader_skipped),
                                     "nonfinite_skipped": nonfinite["skipped"]})

    def evaluate_split(name: str, source, step: int) -> dict[str, float]:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        evaluation = evaluate_lib.evaluate(model, variables, source, config_lib.eval_batch_size(config, mesh.size), mesh,
                                           progress=False, scorer=scorer)
        metrics = {f"{name}_mAP": float(evaluation["mAP"]), f"{name}_AUC": float(evaluation["AUC"]),
                   f"{name}_d_prime": float(evaluation["d_prime"]), f"{name}_skipped": int(evaluation["num_skipped"])}
        try:
            check_skips(name, evaluation["num_skipped"], len(source), max_skip, getattr(source, "description", name))
        except TooManySkippedError:
            log.write(step, metrics)  # the counts that stopped the run are on record
            raise
        return metrics

    pending: list[_PendingMetrics] = []

    def needs_checkpoint(step: int) -> bool:
        return step % config.checkpoint_every == 0 or step % config.eval_every == 0 or step == config.total_steps

    prefetcher = DevicePrefetcher(loader, lambda: data_lib.add_teacher_logits(next(loader), teacher),
                                  lambda local: step_lib.global_batch(local, mesh), start_step + 1, config.total_steps,
                                  needs_checkpoint, ahead=config.get("prefetch_to_device", 2))
    try:
        for batch in prefetcher:
            step = batch.step
            if on_batch is not None:
                on_batch(step, batch.ids)
            evaluating = step % config.eval_every == 0 or step == config.total_steps
            saving = needs_checkpoint(step)
            if step == start_step + 1:
                # Compiled ahead of its first run, then the processes meet: the step's first all-reduce must not
                # wait on a process still compiling (on CPU devices, gloo waits for a late one only 30 s).
                train_step.lower(state, batch.arrays).compile()
                sharding.barrier("train step compiled")
            # The steady state moves nothing between host and device implicitly (a stray float() of a metric
            # would make every step wait for the device): tests/test_training_loop.py runs under this guard.
            with jax.transfer_guard("disallow"):
                state, step_metrics = train_step(state, batch.arrays)
                pending.append(_PendingMetrics(step, step_metrics))
            if step % config.log_every == 0 or saving:
                report_all(pending, batch.num_skipped)  # a checkpoint must hold a state whose own step was finite
            if not saving:
                continue
            loader_checkpoint = checkpointing.LoaderCheckpoint(loader, batch.loader_state)
            val_metrics = None
            if evaluating:
                # Summed over the processes, so that every process takes the same decision.
                check_skips("training", global_count(batch.num_skipped), step * rows_per_host * jax.process_count(),
                            max_skip, getattr(data.train, "description", "data.train"))
                val_metrics = evaluate_split("val", data.validation, step)
                is_best = val_metrics[BEST_METRIC] > best
                best = max(best, val_metrics[BEST_METRIC])
                eval_metrics = evaluate_split("eval", data.eval, step) if data.eval is not None else {}
                result = {"step": step, **val_metrics, "best_val_mAP": best, **eval_metrics}
                log.write(step, {**val_metrics, **eval_metrics})
            writer.wait()  # the model save in flight (if any) finishes before the next orbax save starts
            log.sync()
            loader_checkpoint.run = {"nonfinite_skipped": nonfinite["skipped"], "nonfinite_in_a_row": nonfinite["in_a_row"]}
            checkpointer.save(state, loader_checkpoint,
                              None if val_metrics is None else {BEST_METRIC: val_metrics[BEST_METRIC]})
            if val_metrics is not None:
                writer.write(state, step, val_metrics, is_best)
                message = (f"step {step}: validation mAP {val_metrics[BEST_METRIC]:.4f} AUC {val_metrics['val_AUC']:.4f} "
                           f"d' {val_metrics['val_d_prime']:.3f}")
                if eval_metrics:
                    message += f"; eval mAP {eval_metrics['eval_mAP']:.4f} (reported, not used for selection)"
                if jax.process_index() == 0:  # tqdm.write prints even when the bar is disabled
                    progress.write(message)
            last_report.update(time=time.perf_counter(), step=step)  # clips/s measures training only
        if pending:
            report_all(pending, batch.num_skipped)
        writer.wait()
        checkpointer.wait()
    finally:
        prefetcher.close()
        try:
            writer.wait()
        except Exception:  # already failing: the first error is the one to report
            logger.exception("writing the model directory failed")
        progress.close()
        log.close()
        loader.close()
        checkpointer.close()
        if teacher is not None:
            teacher.close()
    return result
