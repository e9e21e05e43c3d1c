"""What ``train.py`` checks before it trains: its ``--config.KEY`` overrides, and ``--check``'s whole set-up.

``command_line_problem(argv)`` names a misspelt override in one line with the closest key the config has
(ml_collections itself ends in a traceback). ``check_run`` makes the checks a run makes before it builds anything — the
config, the data SPECs opened as training opens them (sample rates included), the teacher file, ``init_from``,
the multi-process settings (resolved, not joined) and the workdir (lock, resume check) — and returns a
one-line summary. It trains nothing and writes nothing in the workdir (an absent one stays absent); only the
caches a run fills too (a TFDS split's label cache, the CPU kernels) may appear elsewhere.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import pathlib
import re

import jax
import ml_collections

from convnext_audio_jax.artifacts import lock as lock_lib
from convnext_audio_jax.artifacts import model_dir
from convnext_audio_jax.hub import registry as pretrained_registry
from convnext_audio_jax.runtime import distributed
from convnext_audio_jax.training import checkpointing
from convnext_audio_jax.training import config as config_lib
from convnext_audio_jax.training import data as data_lib
from convnext_audio_jax.training.config import ConfigError

CONFIG_FLAG = "config"


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of a configs/*.py file; ``FILE.py:ARG`` passes ARG, as ml_collections' config flag does."""
    file, *argument = path.split(":", 1)
    spec = importlib.util.spec_from_file_location(f"_config_{pathlib.Path(file).stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*argument)


def config_keys(config, prefix: str = "") -> list[str]:
    """Every dotted key of ``config``: the leaves, and the sub-configs as well (an override may replace one)."""
    keys = []
    for name, value in config.items():
        keys.append(prefix + name)
        if isinstance(value, ml_collections.ConfigDict):
            keys += config_keys(value, f"{prefix}{name}.")
    return keys


def unknown_key(config, key: str) -> str | None:
    """None when the dotted ``key`` exists in ``config``, else the closest key it has (looked for below the part
    of ``key`` that exists: optimizer.peak_lr → optimizer.peak_learning_rate)."""
    parts, path = key.split("."), [config]  # path: the nodes key names, as far as they exist
    for part in parts:
        if isinstance(path[-1], ml_collections.ConfigDict) and part in path[-1]:
            path.append(path[-1][part])
            continue
        depth = len(path) - 1
        while depth and not (isinstance(path[depth], ml_collections.ConfigDict) and path[depth]):  # a value, {}
            depth -= 1
        prefix, rest = "".join(f"{p}." for p in parts[:depth]), ".".join(parts[depth:])
        return prefix + difflib.get_close_matches(rest, config_keys(path[depth]), n=1, cutoff=0.0)[0]
    return None


def override_keys(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the --config file, the dotted keys of its --config.KEY overrides) of an absl command line, read the way
    ml_collections reads them (``--config.KEY=V``, ``--config.KEY V``, ``--noconfig.KEY``; flags stop at ``--``)."""
    path, keys = None, []
    for index, arg in enumerate(argv[1:], 1):
        if arg == "--":
            break
        if match := re.fullmatch(rf"--?{CONFIG_FLAG}(?:=(.*))?", arg, re.DOTALL):
            path = match.group(1) if match.group(1) is not None else (argv[index + 1] if index + 1 < len(argv) else None)
        elif re.match(rf"--?(no)?{CONFIG_FLAG}\.", arg):
            keys.append(arg.split("=", 1)[0].split(".", 1)[1])
    return path, keys


def command_line_problem(argv: list[str]) -> str | None:
    """One line for a --config file that does not exist or a --config.KEY its config lacks, else None (a config
    that fails to load is left to ml_collections, whose traceback shows where)."""
    path, keys = override_keys(argv)
    if path is None:
        return None
    if not pathlib.Path(path.split(":", 1)[0]).is_file():
        return f"--{CONFIG_FLAG} {path}: no such file"
    if not keys:
        return None
    config = load_config_file(path)
    for key in keys:
        if (closest := unknown_key(config, key)) is not None:
            return f"--{CONFIG_FLAG}.{key}: {path} has no key {key!r}; the closest is {closest!r}"
    return None


def _local_devices(spec: distributed.JoinSpec | None) -> int:
    """The devices this process would drive; a pinned device must exist here."""
    count = jax.local_device_count()
    if spec is None or spec.local_device_ids is None:
        return count
    missing = [i for i in spec.local_device_ids if i >= count]
    if missing:
        raise distributed.DistributedConfigError(
            f"this process is to drive local device(s) {missing}, but it has {count} ({spec.layout} layout)")
    return len(spec.local_device_ids)


def _check_workdir(workdir: pathlib.Path, config, process_index: int, process_count: int) -> str:
    """How the run would use ``workdir`` ("new", "fresh" or "resumes step N"); raises ConfigError or
    WorkdirLockedError for one it cannot use. Reads only."""
    if not workdir.exists():
        parent = next(p for p in workdir.absolute().parents if p.exists())
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"--workdir {workdir} cannot be created: {parent} is not a writable folder")
        return "new"
    if not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} is a file: expected a folder (or a path to create)")
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir {workdir} is not writable")
    for index in sorted({0, process_index}):  # process 0's lock is the one a second job meets
        lock_lib.WorkdirLock(workdir, index).check_free()
    steps = model_dir.orbax_steps(workdir / "checkpoints")
    if not steps:
        return "fresh"
    checkpointing.check_process_count(workdir / "checkpoints" / str(steps[-1]), process_count)
    if (workdir / config_lib.CONFIG_FILE).is_file():
        config_lib.compare_with_saved(config, workdir / config_lib.CONFIG_FILE)
    return f"resumes step {steps[-1]}"


def _check_init_from(init_from: str) -> None:
    """``init_from`` names a model without loading or downloading it."""
    if os.path.exists(init_from):
        try:
            model_dir.resolve_model_dir(init_from, announce=False)
        except model_dir.CheckpointError as error:
            raise ConfigError(f"init_from: {error}") from None
    elif init_from not in pretrained_registry.registry():
        raise ConfigError(f"init_from {init_from!r} is no model directory, training workdir or pretrained name "
                          f"(convnext-audio models --pretrained)")


def check_run(config, workdir: str | os.PathLike, coordinator=None, num_processes=None, process_id=None,
              local_device_ids=None, layout=None) -> str:
    """A one-line summary of the run ``train.py`` would start, or ConfigError, DistributedConfigError or
    WorkdirLockedError for the first problem; trains and joins nothing, leaves the workdir as it is."""
    spec = distributed.resolve(coordinator, num_processes, process_id, local_device_ids, layout)
    processes = 1 if spec is None else spec.num_processes
    # Without joining, the job's devices are this process's times the processes (hosts alike, as launched).
    devices = _local_devices(spec) * processes
    config_lib.validate_config(config, devices)
    accumulation, per_host = config_lib.batch_layout(config, devices, processes)
    data = data_lib.open_run_data(config, config_lib.build_model(config, num_classes=1).frontend)
    teacher, train_source, missing = data_lib.open_teacher(config, data.train)
    if teacher is not None:
        teacher.close()
    config_lib.build_model(config, num_classes=data.num_classes)
    use = _check_workdir(pathlib.Path(workdir), config, 0 if spec is None else spec.process_id, processes)
    if config.init_from and not use.startswith("resumes"):
        _check_init_from(config.init_from)

    def described(key, source):
        return f"data.{key} {config.data[key]} ({len(source)} clips)"

    parts = [described("train", train_source), described("validation", data.validation)]
    if data.eval is not None:
        parts.append(described("eval", data.eval))
    job = "1 process" if spec is None else (f"process {spec.process_id} of {processes} ({spec.cluster}, "
                                            f"{spec.layout})")
    return (f"ok: {', '.join(parts)}, {data.num_classes} classes"
            f"{f', {missing} clips without a teacher row left out' if missing else ''}; {config.model.name}; "
            f"{job}, {devices} devices, batch {config.batch_size} ({per_host} per process, {accumulation} "
            f"micro-batch{'es' if accumulation > 1 else ''} a step); workdir {workdir} ({use})")
