"""The training configuration: every key ``train`` reads (with the paper's recipe as defaults), its
validation into one-line ``ConfigError``s, the batch layout over devices, the model it builds, and the
``WORKDIR/config.json`` record that a resume is checked against."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from convnext_audio_jax.data import spec as spec_lib
from convnext_audio_jax.models import create_model, get_spec
from convnext_audio_jax.runtime import files, sharding, xla
from convnext_audio_jax.runtime.errors import UserError
from convnext_audio_jax.training.augment import AugmentConfig
from convnext_audio_jax.training.distill import Distillation

MODEL_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
CONFIG_FILE = "config.json"
# Config keys that do not change what a run computes; everything else does (model, data, batch, steps,
# schedule, seed, augmentation), and a resume that changes it is refused unless allow_config_change is set.
RESULT_NEUTRAL_KEYS = frozenset({
    "allow_config_change", "checkpoint_every", "keep_checkpoints", "async_checkpointing", "eval_every",
    "log_every", "progress_bar", "eval_batch_size", "per_device_eval_batch_size", "data.worker_count",
    "data.read_threads", "prefetch_to_device", "compilation_cache",
    "data.max_skip_fraction", "data.eval",
    # Only decide whether a run stops at a NaN/Inf step: a run that meets none computes the same either way.
    "on_nonfinite", "max_nonfinite_in_a_row",
})
NONFINITE_POLICIES = ("stop", "skip_batch")


class ConfigError(UserError):
    """A configuration that cannot run; the message says which key and why."""


def default_config() -> ml_collections.ConfigDict:
    """Every key ``train`` reads, with the paper's recipe as defaults (ConvNeXt-Tiny on AudioSet)."""
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.name = "convnext_tiny"
    config.model.drop_path_rate = 0.4
    # "bfloat16": bf16 compute, fp32 params, optimizer state and front end; "auto": bfloat16 on a GPU or TPU,
    # float32 on the CPU.
    config.model.dtype = "float32"
    # "fallback": on a CPU without native bf16 (no AVX512_BF16 / AMX-BF16) model.dtype "bfloat16" computes in
    # float32, which is faster there (logged); "keep": bfloat16 anyway (convnext_audio_jax/runtime/xla.py).
    config.model.cpu_bfloat16 = "fallback"
    config.model.overrides = ml_collections.ConfigDict()  # any other model field (depths, dims, stem, ...)
    config.model.frontend = ml_collections.ConfigDict()  # FrontendConfig fields to override

    config.data = ml_collections.ConfigDict()
    # Data SPECs (convnext_audio_jax/data/spec.py, docs/data.md): DIR@SPLIT, FILE.h5, AUDIO_DIR@CLIPS.csv,
    # tfds:NAME[/CONFIG][:VERSION]@SPLIT, demo[@SPLIT], and SPEC+SPEC unions.
    config.data.train = "data/audioset@balanced_train+data/audioset@unbalanced_train"
    config.data.validation = "holdout:1%"  # a SPEC, or "holdout:N" / "holdout:P%" carved out of data.train
    config.data.eval = "data/audioset@eval"  # reported at every evaluation, never used for selection; "" for none
    config.data.labels_csv = ""  # class_labels_indices.csv: class names and count (folder + CSV, tfds SPECs)
    config.data.tfds_data_dir = ""  # tfds: SPECs; "" is TFDS's default (~/tensorflow_datasets)
    config.data.demo_train_clips = 4096  # clips of demo@train, demo@validation, demo@eval
    config.data.demo_val_clips = 512
    config.data.demo_eval_clips = 512
    config.data.sampling = "balanced"  # "balanced" (PANNs' sampler) or "shuffle"
    config.data.max_skip_fraction = 0.01  # more skipped (missing/corrupt) clips than this stops the run
    config.data.worker_count = 0
    config.data.read_threads = 4

    config.batch_size = 512  # effective (global) examples per optimizer step
    config.per_device_batch_size = 64  # 0: batch_size / devices (no accumulation)
    config.eval_batch_size = 0  # global; 0: per_device_eval_batch_size × devices
    config.per_device_eval_batch_size = 64
    # Device batches the loader thread keeps ready ahead of the step (training/prefetch.py).
    config.prefetch_to_device = 2
    # Persistent XLA compilation cache: "auto" is <cache root>/xla (docs/pretrained.md's cache), "" none, or a folder.
    # A restart or a preemption then skips recompiling the step in every process.
    config.compilation_cache = "auto"
    config.total_steps = 75_000

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.schedule = "one_cycle"  # or "constant" (peak_learning_rate throughout, as PANNs)
    config.optimizer.peak_learning_rate = 4e-3
    config.optimizer.warmup_fraction = 0.3
    config.optimizer.initial_div_factor = 25.0  # start lr = peak / 25 (torch OneCycleLR div_factor)
    config.optimizer.final_div_factor = 1e4  # end lr = start / 1e4
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-8
    config.optimizer.cycle_beta1 = False  # torch OneCycleLR's default: β1 0.95 → 0.85 → 0.95 instead of b1
    config.optimizer.beta1_low = 0.85
    config.optimizer.beta1_high = 0.95
    config.optimizer.weight_decay = 0.05
    config.optimizer.grad_clip_norm = 0.0  # 0: no clipping

    config.augment = ml_collections.ConfigDict(dataclasses.asdict(AugmentConfig()))

    # Knowledge distillation (Schmid et al. 2023): loss λ·BCE(labels) + (1 − λ)·BCE(σ(s/T), σ(t/T)) with the
    # teacher's logits t of each training clip read by clip id from a teacher file (convnext-audio predict).
    config.distill = ml_collections.ConfigDict()
    config.distill.teacher = ""  # teacher file (convnext_audio_jax/data/teacher.py); "" trains on labels only
    config.distill.label_weight = 0.1  # λ
    config.distill.temperature = 1.0  # T
    config.distill.allow_missing = False  # True: train only on the clips with a teacher row (counted, logged)

    config.checkpoint_every = 5000
    config.keep_checkpoints = 3
    config.async_checkpointing = True
    config.eval_every = 5000
    config.log_every = 100
    config.init_from = ""  # a model directory (convnext_audio_jax.artifacts.model_dir.save_model: convert, training)
    config.init_exclude = ()  # parameter path prefixes never taken from init_from (e.g. "head")
    config.allow_config_change = False  # resume although a result-changing key differs from config.json
    config.progress_bar = True
    # A step whose loss or gradient norm is NaN/Inf: "stop" (keep the last good checkpoint) or "skip_batch"
    # (leave the state as it was, count it, stop after max_nonfinite_in_a_row such steps in a row).
    config.on_nonfinite = "stop"
    config.max_nonfinite_in_a_row = 10
    return config


def batch_layout(config, num_devices: int, process_count: int = 1) -> tuple[int, int]:
    """(accumulation steps, examples per host per step) for the effective ``batch_size`` on ``num_devices``."""
    batch, per_device = int(config.batch_size), int(config.per_device_batch_size)
    if batch < 1:
        raise ConfigError(f"batch_size must be >= 1; got {batch}")
    if per_device < 0:
        raise ConfigError(f"per_device_batch_size must be >= 0; got {per_device}")
    per_step = num_devices * (per_device or max(1, batch // num_devices))
    if batch % per_step:
        raise ConfigError(
            f"batch_size {batch} is not a multiple of devices ({num_devices}) x per_device_batch_size "
            f"({per_device or batch // num_devices})"
        )
    if batch % process_count:
        raise ConfigError(f"batch_size {batch} is not a multiple of the {process_count} processes")
    return batch // per_step, batch // process_count


def validate_config(config, num_devices: int) -> None:
    """Raises ConfigError (one line) for settings that cannot run; reads no data (SPECs are only parsed)."""
    data = config.data
    for key in ("train", "validation"):
        if not data[key]:
            raise ConfigError(f"data.{key} must name a data SPEC (see docs/data.md)")
    try:
        spec_lib.parse(data.train)
        if spec_lib.parse_holdout(data.validation) is None:
            spec_lib.parse(data.validation)
        if data.eval:
            spec_lib.parse(data.eval)
    except spec_lib.SpecError as error:
        raise ConfigError(str(error)) from None
    if data.sampling not in ("balanced", "shuffle"):
        raise ConfigError(f"data.sampling must be 'balanced' or 'shuffle'; got {data.sampling!r}")
    if not 0.0 <= data.max_skip_fraction <= 1.0:
        raise ConfigError(f"data.max_skip_fraction must be in [0, 1]; got {data.max_skip_fraction}")
    if config.model.dtype not in (*MODEL_DTYPES, "auto"):
        raise ConfigError(f"model.dtype must be one of {sorted(MODEL_DTYPES) + ['auto']}; got {config.model.dtype!r}")
    if config.total_steps < 1:
        raise ConfigError(f"total_steps must be >= 1; got {config.total_steps}")
    if config.on_nonfinite not in NONFINITE_POLICIES:
        raise ConfigError(f"on_nonfinite must be one of {NONFINITE_POLICIES}; got {config.on_nonfinite!r}")
    for key in ("checkpoint_every", "eval_every", "log_every", "keep_checkpoints", "max_nonfinite_in_a_row"):
        if config[key] < 1:
            raise ConfigError(f"{key} must be >= 1; got {config[key]}")
    if config.eval_batch_size < 0 or config.eval_batch_size % num_devices:
        raise ConfigError(f"eval_batch_size {config.eval_batch_size} must be 0 (per device) or a positive multiple of "
                          f"the {num_devices} devices")
    if config.get("per_device_eval_batch_size", 1) < 1:
        raise ConfigError(f"per_device_eval_batch_size must be >= 1; got {config.per_device_eval_batch_size}")
    if config.get("prefetch_to_device", 1) < 1:
        raise ConfigError(f"prefetch_to_device must be >= 1; got {config.prefetch_to_device}")
    if config.optimizer.schedule not in ("one_cycle", "constant"):
        raise ConfigError(f"optimizer.schedule must be 'one_cycle' or 'constant'; got {config.optimizer.schedule!r}")
    if not 0.0 < config.optimizer.warmup_fraction < 1.0:
        raise ConfigError(f"optimizer.warmup_fraction must be in (0, 1); got {config.optimizer.warmup_fraction}")
    peak_step = config.optimizer.warmup_fraction * config.total_steps - 1
    if config.optimizer.schedule == "one_cycle" and (peak_step <= 0 or config.total_steps - 1 <= peak_step):
        raise ConfigError(f"total_steps {config.total_steps} is too short for a one-cycle schedule peaking at "
                          f"{config.optimizer.warmup_fraction:.0%}; use more steps or optimizer.schedule = 'constant'")
    if config.optimizer.peak_learning_rate <= 0:
        raise ConfigError(f"optimizer.peak_learning_rate must be > 0; got {config.optimizer.peak_learning_rate}")
    if config.optimizer.weight_decay < 0 or config.optimizer.grad_clip_norm < 0:
        raise ConfigError("optimizer.weight_decay and optimizer.grad_clip_norm must be >= 0")
    unknown = set(config.augment) - {f.name for f in dataclasses.fields(AugmentConfig)}
    if unknown:
        raise ConfigError(f"unknown augment key(s) {sorted(unknown)}")
    distill = config.distill
    if distill.teacher:
        if not pathlib.Path(distill.teacher).is_file():
            raise ConfigError(f"distill.teacher {distill.teacher!r} is not a file; make one with convnext-audio predict")
        if not 0.0 <= distill.label_weight <= 1.0:
            raise ConfigError(f"distill.label_weight must be in [0, 1]; got {distill.label_weight}")
        if not distill.temperature > 0:
            raise ConfigError(f"distill.temperature must be > 0; got {distill.temperature}")
    batch_layout(config, num_devices, jax.process_count())


def augment_config(config) -> AugmentConfig:
    return AugmentConfig(**config.augment.to_dict())


def distillation(config) -> Distillation | None:
    """The train step's distillation settings, or None when ``distill.teacher`` is "" (labels only)."""
    if not config.distill.teacher:
        return None
    return Distillation(float(config.distill.label_weight), float(config.distill.temperature))


def model_overrides(config, num_classes: int) -> dict:
    """The ``create_model`` fields of the run's model: classes, drop path, dtype, front end, overrides."""
    spec = get_spec(config.model.name)
    fields = spec.module.__dataclass_fields__
    overrides = dict(config.model.overrides.to_dict())
    overrides["num_classes"] = num_classes
    if "drop_path_rate" in fields:
        overrides["drop_path_rate"] = float(config.model.drop_path_rate)
    elif config.model.drop_path_rate:
        raise ConfigError(f"model {config.model.name!r} has no drop path; set model.drop_path_rate = 0")
    dtype = xla.resolve_dtype(config.model.dtype)
    if dtype != "float32":
        if "dtype" not in fields:
            raise ConfigError(f"model {config.model.name!r} has no dtype field; use model.dtype = 'float32'")
        try:
            overrides["dtype"] = MODEL_DTYPES[xla.compute_dtype(dtype, config.model.get("cpu_bfloat16", "fallback"))]
        except UserError as error:
            raise ConfigError(f"model.cpu_bfloat16: {error}") from None
    if config.model.frontend:
        if "frontend" not in fields:
            raise ConfigError(f"model {config.model.name!r} takes no waveform front end; leave model.frontend empty")
        base = spec.defaults.get("frontend", fields["frontend"].default)
        try:
            overrides["frontend"] = dataclasses.replace(base, **config.model.frontend.to_dict())
        except TypeError as error:
            raise ConfigError(f"model.frontend: {error}") from None
    return overrides


def build_model(config, num_classes: int) -> nn.Module:
    """The registered model ``config.model.name`` with the run's classes, drop path, dtype and front end."""
    try:
        return create_model(config.model.name, **model_overrides(config, num_classes))
    except UserError as error:  # an unknown name or field, a front end setting (any other error is a bug)
        raise ConfigError(str(error)) from None


def artifact_model_config(config, num_classes: int) -> dict:
    """The JSON model config a model directory stores: the fields that shape the weights and the front end
    (compute dtype and drop path are training choices, left at the model's defaults for inference)."""
    overrides = model_overrides(config, num_classes)
    overrides.pop("dtype", None)
    overrides.pop("drop_path_rate", None)
    if "frontend" in overrides:
        overrides["frontend"] = dataclasses.asdict(overrides["frontend"])
    return json.loads(json.dumps(overrides))


# ----------------------------------------------------------------------------------------- config.json


def config_as_json(config) -> dict:
    """The config as plain JSON values (tuples become lists), as config.json stores it."""
    return json.loads(json.dumps(config.to_dict()))


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def result_changing_differences(saved: dict, current: dict) -> dict[str, tuple]:
    """{key: (saved value, current value)} for every key that differs and changes what a run computes. A key
    the saved config lacks counts as its default value (the run was recorded before the key existed)."""
    defaults = _flatten(config_as_json(default_config()))
    old, new = _flatten(saved), _flatten(current)
    old.update({key: defaults[key] for key in new if key not in old and key in defaults})
    return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
            if key not in RESULT_NEUTRAL_KEYS and old.get(key) != new.get(key)}


def compare_with_saved(config, path: pathlib.Path) -> dict[str, tuple]:
    """The result-changing differences of ``config`` from the saved config.json ``path``, accepted (to be logged)
    with ``allow_config_change``; else a ConfigError listing them."""
    differences = result_changing_differences(json.loads(path.read_text()), config_as_json(config))
    if differences and not config.allow_config_change:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in differences.items())
        raise ConfigError(f"the config differs from {path} in keys that change the result ({listed}); resume "
                          "with the saved config, or pass --config.allow_config_change=True to accept it")
    return differences


def check_and_record_config(config, workdir: pathlib.Path, resuming: bool) -> dict[str, tuple]:
    """Writes ``workdir/config.json`` (process 0, after every process compared). On a resume, compares with the
    saved one first (every process, the same file): raises
    ConfigError listing the result-changing keys that differ unless ``allow_config_change``; returns the
    accepted differences (to be logged)."""
    path = workdir / CONFIG_FILE
    current = config_as_json(config)
    differences = compare_with_saved(config, path) if resuming and path.is_file() else {}
    sharding.barrier("config.json checked")  # every process compared with the same file before process 0 replaces it
    if jax.process_index() == 0:
        # A power cut leaves the old or the new config.json.
        files.write_text(path, json.dumps(current, indent=2) + "\n",
                         temporary=path.with_name(f".{path.name}.{jax.process_index()}.tmp"))
    return differences


def eval_batch_size(config, num_devices: int) -> int:
    """The global evaluation batch: ``eval_batch_size``, or ``per_device_eval_batch_size`` on each device."""
    return int(config.eval_batch_size) or int(config.get("per_device_eval_batch_size", 64)) * num_devices
