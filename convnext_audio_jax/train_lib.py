"""Data-parallel training with the paper's recipe (Pellegrini et al., Interspeech 2023, section 6).

One process per host drives every local device. A one-axis mesh ``data`` spans all devices of all hosts;
the train state is replicated, each global batch is sharded over ``data`` and assembled from the hosts'
local batches with ``jax.make_array_from_process_local_data``. Under ``jax.jit`` every batch reduction is
global, so bn0/BatchNorm statistics, the loss and the gradients are those of the whole batch (one device
computes the same step: see the tests).

The step, all on the device: int16 waveform → float → speed perturbation → log-mel → bn0 → SpecAugment →
mixup (2B clips in, B out, targets mixed alike) → model (drop path) → BCE with logits → AdamW (no weight
decay on 1-D params) with a torch-OneCycleLR learning rate (and optionally β1) schedule. When devices ×
``per_device_batch_size`` is below ``batch_size`` the step scans over micro-batches and averages their
gradients. Randomness: a base key in the state, folded with the step and the micro-batch index; each
augmentation draws per example, so every example (hence every device) gets its own values.

Checkpoints (orbax ``CheckpointManager``, asynchronous) hold the state (params, batch_stats, opt_state,
step, rng) and the data loader's iterator state together; a resumed run repeats an uninterrupted run bit
for bit. Kept: the last ``keep_checkpoints`` plus the best by validation mAP.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from convnext_audio_jax import metrics as metrics_lib
from convnext_audio_jax import xla
from convnext_audio_jax.augment import AugmentConfig, augment_waveform, mix_pairs, mixup_lambdas, spec_augment
from convnext_audio_jax.data import demo, pipeline
from convnext_audio_jax.frontend import FrontendConfig
from convnext_audio_jax.models import create_model, get_spec, init_variables

logger = logging.getLogger(__name__)

DATA_SOURCES = ("demo", "prepared", "folder")
MODEL_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
INT16_SCALE = 32767.0
BEST_METRIC = "val_mAP"


# ----------------------------------------------------------------------------------------------- config


def default_config() -> ml_collections.ConfigDict:
    """Every key ``train`` reads, with the paper's recipe as defaults (ConvNeXt-Tiny on prepared AudioSet)."""
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.name = "convnext_tiny"
    config.model.drop_path_rate = 0.4
    config.model.dtype = "float32"  # "bfloat16": bf16 compute, fp32 params and optimizer state
    config.model.overrides = ml_collections.ConfigDict()  # any other model field (depths, dims, stem, ...)
    config.model.frontend = ml_collections.ConfigDict()  # FrontendConfig fields to override

    config.data = ml_collections.ConfigDict()
    config.data.source = "prepared"  # one of DATA_SOURCES
    config.data.path = ""  # prepared: the `convnext-audio prepare` output folder
    config.data.train_split = "unbalanced_train"
    config.data.val_split = "validation"  # a held-out split: the best checkpoint is chosen on it, never on eval
    config.data.audio_dir = ""  # folder: audio files ...
    config.data.train_csv = ""  # ... listed with labels in these CSVs
    config.data.val_csv = ""
    config.data.labels_csv = ""  # folder: class_labels_indices.csv
    config.data.demo_train_clips = 4096
    config.data.demo_val_clips = 512
    config.data.sampling = "balanced"  # "balanced" (PANNs' sampler) or "shuffle"
    config.data.worker_count = 0
    config.data.read_threads = 4

    config.batch_size = 512  # effective (global) examples per optimizer step
    config.per_device_batch_size = 64  # 0: batch_size / devices (no accumulation)
    config.eval_batch_size = 64  # global
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

    augment = AugmentConfig()
    config.augment = ml_collections.ConfigDict(dataclasses.asdict(augment))

    config.checkpoint_every = 5000
    config.keep_checkpoints = 3
    config.async_checkpointing = True
    config.eval_every = 5000
    config.log_every = 100
    config.init_from = ""  # a converted checkpoint directory (convnext_audio_jax.checkpoint.save_model)
    config.init_exclude = ()  # parameter path prefixes never taken from init_from (e.g. "head")
    config.progress_bar = True
    return config


class ConfigError(ValueError):
    """A configuration that cannot run; the message says which key and why."""


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
    """Raises ConfigError (one line) for settings that cannot run."""
    if config.data.source not in DATA_SOURCES:
        raise ConfigError(f"data.source must be one of {DATA_SOURCES}; got {config.data.source!r}")
    if config.data.sampling not in ("balanced", "shuffle"):
        raise ConfigError(f"data.sampling must be 'balanced' or 'shuffle'; got {config.data.sampling!r}")
    if config.model.dtype not in MODEL_DTYPES:
        raise ConfigError(f"model.dtype must be one of {sorted(MODEL_DTYPES)}; got {config.model.dtype!r}")
    if config.total_steps < 1:
        raise ConfigError(f"total_steps must be >= 1; got {config.total_steps}")
    for key in ("checkpoint_every", "eval_every", "log_every", "keep_checkpoints"):
        if config[key] < 1:
            raise ConfigError(f"{key} must be >= 1; got {config[key]}")
    if config.eval_batch_size < 1 or config.eval_batch_size % num_devices:
        raise ConfigError(f"eval_batch_size {config.eval_batch_size} must be a positive multiple of the {num_devices} devices")
    if config.optimizer.schedule not in ("one_cycle", "constant"):
        raise ConfigError(f"optimizer.schedule must be 'one_cycle' or 'constant'; got {config.optimizer.schedule!r}")
    if not 0.0 < config.optimizer.warmup_fraction < 1.0:
        raise ConfigError(f"optimizer.warmup_fraction must be in (0, 1); got {config.optimizer.warmup_fraction}")
    if config.optimizer.peak_learning_rate <= 0:
        raise ConfigError(f"optimizer.peak_learning_rate must be > 0; got {config.optimizer.peak_learning_rate}")
    if config.optimizer.weight_decay < 0 or config.optimizer.grad_clip_norm < 0:
        raise ConfigError("optimizer.weight_decay and optimizer.grad_clip_norm must be >= 0")
    unknown = set(config.augment) - {f.name for f in dataclasses.fields(AugmentConfig)}
    if unknown:
        raise ConfigError(f"unknown augment key(s) {sorted(unknown)}")
    batch_layout(config, num_devices, jax.process_count())


def augment_config(config) -> AugmentConfig:
    return AugmentConfig(**config.augment.to_dict())


# ------------------------------------------------------------------------------------------------ model


def build_model(config, num_classes: int) -> nn.Module:
    """The registered model ``config.model.name`` with the run's classes, drop path, dtype and front end."""
    spec = get_spec(config.model.name)
    fields = spec.module.__dataclass_fields__
    overrides = dict(config.model.overrides.to_dict())
    overrides["num_classes"] = num_classes
    if "drop_path_rate" in fields:
        overrides["drop_path_rate"] = float(config.model.drop_path_rate)
    elif config.model.drop_path_rate:
        raise ConfigError(f"model {config.model.name!r} has no drop path; set model.drop_path_rate = 0")
    if config.model.dtype != "float32":
        if "dtype" not in fields:
            raise ConfigError(f"model {config.model.name!r} has no dtype field; use model.dtype = 'float32'")
        overrides["dtype"] = MODEL_DTYPES[config.model.dtype]
    if config.model.frontend:
        if "frontend" not in fields:
            raise ConfigError(f"model {config.model.name!r} takes no waveform front end; leave model.frontend empty")
        base = spec.defaults.get("frontend", fields["frontend"].default)
        try:
            overrides["frontend"] = dataclasses.replace(base, **config.model.frontend.to_dict())
        except TypeError as error:
            raise ConfigError(f"model.frontend: {error}") from None
    try:
        return create_model(config.model.name, **overrides)
    except ValueError as error:
        raise ConfigError(str(error)) from None


# -------------------------------------------------------------------------------------------- optimizer


def one_cycle(start: float, peak: float, end: float, total_steps: int, warmup_fraction: float = 0.3) -> optax.Schedule:
    """torch ``OneCycleLR``'s two-phase cosine curve (``anneal_strategy='cos'``) as an optax schedule.

    Step 0 is ``start``, step ``warmup_fraction·total_steps - 1`` is ``peak`` and step ``total_steps - 1`` is
    ``end``; each phase is a half cosine between its ends, and steps past the last keep extrapolating the
    second phase, as torch does. Used for the learning rate and for β1 (0.95 → 0.85 → 0.95).
    """
    peak_step = float(warmup_fraction * total_steps) - 1.0
    last_step = float(total_steps - 1)
    if peak_step <= 0 or last_step <= peak_step:
        raise ConfigError(f"total_steps {total_steps} is too short for a one-cycle schedule peaking at {warmup_fraction:.0%}")

    def cosine(a, b, fraction):
        # torch's b + (a - b)/2·(cos(π·f) + 1) as a weighted mean with weight cos²(π·f/2): the same value,
        # but exact at both ends and without float32 cancellation near f = 1.
        weight = jnp.cos(jnp.pi / 2.0 * fraction) ** 2
        return a * weight + b * (1.0 - weight)

    def schedule(count):
        step = jnp.asarray(count, jnp.float32)
        rising = cosine(start, peak, step / peak_step)
        falling = cosine(peak, end, (step - peak_step) / (last_step - peak_step))
        return jnp.where(step <= peak_step, rising, falling)

    return schedule


def learning_rate_schedule(optimizer_config, total_steps: int) -> optax.Schedule:
    if optimizer_config.schedule == "constant":
        return optax.constant_schedule(optimizer_config.peak_learning_rate)
    start = optimizer_config.peak_learning_rate / optimizer_config.initial_div_factor
    return one_cycle(start, optimizer_config.peak_learning_rate, start / optimizer_config.final_div_factor,
                     total_steps, optimizer_config.warmup_fraction)


def weight_decay_mask(params) -> Any:
    """True for the parameters weight decay applies to: every one with more than one axis (conv and dense
    kernels); biases, norm scales/offsets, layer-scale γ and bn0 (all 1-D) are left alone."""
    return jax.tree.map(lambda p: len(p.shape) > 1, params)


def make_optimizer(optimizer_config, total_steps: int, params) -> optax.GradientTransformation:
    """AdamW with the one-cycle learning rate (and β1 when ``cycle_beta1``), masked decay, optional clipping."""
    b1 = optimizer_config.b1
    if optimizer_config.cycle_beta1:
        b1 = one_cycle(optimizer_config.beta1_high, optimizer_config.beta1_low, optimizer_config.beta1_high,
                       total_steps, optimizer_config.warmup_fraction)
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=learning_rate_schedule(optimizer_config, total_steps),
        b1=b1,
        b2=optimizer_config.b2,
        eps=optimizer_config.eps,
        weight_decay=optimizer_config.weight_decay,
        mask=weight_decay_mask(params),
    )
    if optimizer_config.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optimizer_config.grad_clip_norm), adamw)
    return adamw


# ------------------------------------------------------------------------------------------------ state


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. ``rng`` is the raw data of the run's base key (stored as uint32 so
    checkpoints hold a plain array); a step's key is ``fold_in(key, step)``."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array

    def as_dict(self) -> dict:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


def make_data_mesh(devices=None) -> jax.sharding.Mesh:
    """A one-axis 'data' mesh over ``devices`` (default: every device of every process)."""
    devices = list(devices if devices is not None else jax.devices())
    return jax.make_mesh((len(devices),), ("data",), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))


def init_train_state(model: nn.Module, tx: optax.GradientTransformation, seed: int, mesh) -> TrainState:
    """Random initial state, created by a jitted function directly in its replicated sharding."""

    def init(key):
        init_key, train_key = jax.random.split(key)
        variables = init_variables(model, init_key)
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
            rng=jax.random.key_data(train_key),
        )

    return jax.jit(init, out_shardings=NamedSharding(mesh, P()))(jax.random.key(seed))


def classification_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Binary cross-entropy of the sigmoid outputs, averaged over examples and classes (torch's BCELoss)."""
    return optax.sigmoid_binary_cross_entropy(logits, targets).mean()


def _logmel_augmentation(rng, targets, augment: AugmentConfig):
    """The model's ``logmel_hook`` (SpecAugment, then mixup of consecutive pairs) and the targets mixed with
    the same λ: the hook only sees the log-mel, so λ is drawn here for both."""
    spec_key, mixup_key = jax.random.split(rng)
    lambdas = mixup_lambdas(mixup_key, targets.shape[0] // 2, augment.mixup_alpha) if augment.mixup else None

    def hook(logmel):
        if augment.spec_augment:
            logmel = spec_augment(spec_key, logmel, time_stripes=augment.time_stripes,
                                  time_max_width=augment.time_max_width, freq_stripes=augment.freq_stripes,
                                  freq_max_width=augment.freq_max_width)
        return mix_pairs(logmel, lambdas) if augment.mixup else logmel

    return hook, (mix_pairs(targets, lambdas) if augment.mixup else targets)


def waveform_to_float(waveform: jax.Array) -> jax.Array:
    """Loader batches carry int16 samples (half the transfer); the model takes float32 in [-1, 1]."""
    if waveform.dtype == jnp.int16:
        return waveform.astype(jnp.float32) / INT16_SCALE
    return waveform.astype(jnp.float32)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, augment: AugmentConfig,
                    accumulation_steps: int, mesh) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The jitted step ``(state, batch) -> (state, {"loss", "grad_norm"})``; the state is donated.

    ``batch`` is {"waveform": (R, L) int16|float32, "target": (R, C)} sharded on 'data', with R = 2B rows when
    mixup is on. With accumulation the rows are split into micro-batches device by device (each device's
    rows stay on it and mixup pairs stay together), and the gradients of the micro-batches are averaged;
    BatchNorm statistics are updated micro-batch after micro-batch.
    """
    num_devices = mesh.size
    replicated = NamedSharding(mesh, P())
    micro_sharding = NamedSharding(mesh, P(None, "data"))

    def split_micro_batches(x):
        rows = x.shape[0]
        local = x.reshape((num_devices, accumulation_steps, rows // (num_devices * accumulation_steps)) + x.shape[1:])
        micro = jnp.swapaxes(local, 0, 1).reshape((accumulation_steps, rows // accumulation_steps) + x.shape[1:])
        return jax.lax.with_sharding_constraint(micro, micro_sharding)

    def step(state: TrainState, batch: dict):
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        waveforms = split_micro_batches(waveform_to_float(batch["waveform"]))
        targets = split_micro_batches(batch["target"].astype(jnp.float32))

        def micro_step(carry, inputs):
            grad_sum, batch_stats = carry
            waveform, target, index = inputs
            speed_key, logmel_key, drop_path_key, dropout_key = jax.random.split(jax.random.fold_in(step_key, index), 4)
            waveform = augment_waveform(speed_key, waveform, augment)
            hook, target = _logmel_augmentation(logmel_key, target, augment)

            def loss_fn(params):
                outputs, updates = model.apply(
                    {"params": params, "batch_stats": batch_stats}, waveform, train=True, logmel_hook=hook,
                    mutable=["batch_stats"], rngs={"drop_path": drop_path_key, "dropout": dropout_key},
                )
                return classification_loss(outputs["logits"], target), updates.get("batch_stats", {})

            (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
            return (jax.tree.map(jnp.add, grad_sum, grads), batch_stats), loss

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grad_sum, batch_stats), losses = jax.lax.scan(
            micro_step, (zeros, state.batch_stats), (waveforms, targets, jnp.arange(accumulation_steps))
        )
        grads = jax.tree.map(lambda g: g / accumulation_steps, grad_sum)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1, params=optax.apply_updates(state.params, updates), batch_stats=batch_stats,
            opt_state=opt_state,
        )
        return new_state, {"loss": jnp.mean(losses), "grad_norm": optax.global_norm(grads)}

    batch_sharding = NamedSharding(mesh, P("data"))
    return xla.jit(step, in_shardings=(replicated, batch_sharding), out_shardings=(replicated, replicated),
                   donate_argnums=(0,))


def make_eval_step(model: nn.Module, mesh) -> Callable:
    """Jitted ``(params, batch_stats, waveform) -> probs`` on a 'data'-sharded batch."""

    def predict(params, batch_stats, waveform):
        outputs = model.apply({"params": params, "batch_stats": batch_stats}, waveform_to_float(waveform), train=False)
        return outputs["probs"]

    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return xla.jit(predict, in_shardings=(replicated, replicated, sharded), out_shardings=sharded)


def global_batch(local_batch: dict, mesh, keys=("waveform", "target")) -> dict:
    """This host's rows of each array → one global array sharded on 'data'."""
    sharding = NamedSharding(mesh, P("data"))
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(local_batch[key])) for key in keys}


# ------------------------------------------------------------------------------------------------- data


def open_source(config, role: str, frontend: FrontendConfig):
    """The clip source of ``role`` ('train' or 'val') for ``config.data``."""
    data = config.data
    if data.source == "demo":
        clips = data.demo_train_clips if role == "train" else data.demo_val_clips
        split = "train" if role == "train" else "validation"
        return demo.SyntheticAudioSet(split, clips, sample_rate=frontend.sample_rate,
                                      clip_seconds=frontend.clip_seconds, seed=config.seed)
    from convnext_audio_jax.data import audio, labels, sources  # AudioSet-format sources: 10 s at 32 kHz

    if frontend.sample_rate != audio.SAMPLE_RATE or frontend.clip_samples != audio.CLIP_SAMPLES:
        raise ConfigError(f"data.source {data.source!r} holds {audio.CLIP_SECONDS} s clips at {audio.SAMPLE_RATE} Hz; "
                          f"the model's front end expects {frontend.clip_seconds} s at {frontend.sample_rate} Hz")
    if data.source == "prepared":
        if not data.path:
            raise ConfigError("data.path must name a `convnext-audio prepare` output folder")
        return sources.open_prepared(data.path, data.train_split if role == "train" else data.val_split)
    csv = data.train_csv if role == "train" else data.val_csv
    if not (data.audio_dir and csv and data.labels_csv):
        raise ConfigError("data.source 'folder' needs data.audio_dir, data.train_csv, data.val_csv and data.labels_csv")
    return sources.FolderSource(data.audio_dir, csv, labels.read_class_labels(data.labels_csv))


def make_train_loader(config, source, examples_per_host: int, mixup: bool) -> pipeline.ClipLoader:
    return pipeline.make_loader(source, pipeline.LoaderConfig(
        batch_size=examples_per_host,
        sampling=config.data.sampling,
        seed=config.seed,
        draws_per_example=2 if mixup else 1,
        waveform_dtype="int16",
        worker_count=config.data.worker_count,
        read_threads=config.data.read_threads,
    ))


class LoaderCheckpoint:
    """The loader as grain's orbax checkpoint handler wants an iterator (``get_state() -> bytes``,
    ``set_state(bytes)``, ``start_prefetch()``), holding the state captured when the step's batch was taken:
    the loader itself runs ahead by then. grain writes one file per process, so multi-host runs work."""

    def __init__(self, loader: pipeline.ClipLoader, state: dict | None = None):
        self._loader = loader
        self._state = state

    def get_state(self) -> bytes:
        return json.dumps(self._state).encode()

    def set_state(self, state: bytes) -> None:
        self._loader.set_state(json.loads(state))

    def start_prefetch(self) -> None:
        """Nothing to start: the loader prefetches on its own."""


# ------------------------------------------------------------------------------------------ checkpoints


class Checkpointer:
    """Orbax CheckpointManager for {state, data iterator}: asynchronous saves, the last ``keep`` checkpoints
    plus the best by validation mAP (saves carrying metrics) are kept."""

    def __init__(self, directory: str | os.PathLike, keep: int, asynchronous: bool = True):
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
            state=ocp.args.StandardSave(state.as_dict()),
            data=grain.checkpoint.CheckpointSave(loader_checkpoint),
        ), metrics=metrics, force=True)

    def restore(self, step: int, template: TrainState, loader: pipeline.ClipLoader | None) -> TrainState:
        """The state saved at ``step`` in ``template``'s shardings; the loader is moved to its saved position."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template.as_dict())
        items = {"state": ocp.args.StandardRestore(abstract)}
        if loader is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(LoaderCheckpoint(loader))
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return TrainState(**restored["state"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


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
    """``state`` with params and batch_stats taken from a converted checkpoint (ImageNet or AudioSet) where
    names and shapes match: e.g. everything but the stem conv, bn0 and the classifier from ImageNet, or
    everything but a new-sized head for fine-tuning."""
    try:
        from convnext_audio_jax import checkpoint  # the converter's module
    except ImportError as error:
        raise ConfigError(f"init_from needs convnext_audio_jax.checkpoint (the converter): {error}") from None
    _, variables, metadata = checkpoint.load_model(directory)
    params, loaded, kept = transplant_params(jax.device_get(state.params), variables.get("params", {}), exclude)
    if not loaded:
        raise ConfigError(f"init_from {directory}: no parameter of the model matches the checkpoint's names and shapes")
    stats, _, _ = transplant_params(jax.device_get(state.batch_stats), variables.get("batch_stats", {}), exclude)
    logger.info("init_from %s (model %s): loaded %d parameter arrays, kept %d initial: %s", directory,
                metadata.get("model"), len(loaded), len(kept), "; ".join(kept))
    replicated = NamedSharding(mesh, P())
    return state.replace(params=jax.device_put(params, replicated), batch_stats=jax.device_put(stats, replicated))


# ---------------------------------------------------------------------------------------------- logging


class MetricsLog:
    """metrics.jsonl and TensorBoard events under the workdir, written by process 0 only."""

    def __init__(self, workdir: pathlib.Path):
        self._enabled = jax.process_index() == 0
        if not self._enabled:
            return
        from tensorboardX import SummaryWriter

        self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
        self._writer = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self._enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            self._writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self._enabled:
            self._jsonl.close()
            self._writer.close()


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm became NaN/Inf; training stopped before saving anything after it."""


# ------------------------------------------------------------------------------------------- evaluation


def evaluate(predict: Callable, state: TrainState, source, batch_size: int, mesh) -> dict[str, Any]:
    """mAP/AUC/d′ of ``state`` on every clip of ``source`` (each host reads its strided share).

    Every host runs the same number of batches (padding with masked zero rows), as the sharded steps need."""
    hosts = jax.process_count()
    local_batch = batch_size // hosts
    loader = pipeline.make_loader(source, pipeline.LoaderConfig(
        batch_size=local_batch, sampling="sequential", num_epochs=1, drop_remainder=False, waveform_dtype="int16"))
    clips_per_host = math.ceil(len(source) / hosts)
    scores, targets = [], []
    for _ in range(math.ceil(clips_per_host / local_batch)):
        batch = next(loader, None)
        rows = 0 if batch is None else batch["waveform"].shape[0]
        if batch is None:
            batch = {"waveform": np.zeros((0,) + source[0]["waveform"].shape, np.int16),
                     "target": np.zeros((0, source.num_classes), np.float32)}
        pad = local_batch - rows
        waveform = np.concatenate([batch["waveform"], np.zeros((pad,) + batch["waveform"].shape[1:], np.int16)])
        target = np.concatenate([batch["target"], np.zeros((pad, batch["target"].shape[1]), np.float32)])
        valid = np.arange(local_batch) < rows
        probs = predict(state.params, state.batch_stats, global_batch({"waveform": waveform}, mesh, keys=("waveform",))["waveform"])
        probs, target, valid = (multihost_utils.process_allgather(x, tiled=True) for x in (probs, target, valid))
        scores.append(np.asarray(probs)[valid])
        targets.append(np.asarray(target)[valid])
    loader.close()
    return metrics_lib.compute_metrics(np.concatenate(targets), np.concatenate(scores))


# ----------------------------------------------------------------------------------------------- train


def maybe_initialize_distributed() -> None:
    """``jax.distributed.initialize()`` when the environment describes a multi-process job (a coordinator
    address, or a SLURM / Open MPI job of several tasks); single-process runs skip it."""
    multi_process = (
        os.environ.get("JAX_COORDINATOR_ADDRESS")
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    )
    if multi_process:
        jax.distributed.initialize()


@dataclasses.dataclass
class _PendingMetrics:
    step: int
    values: dict  # device arrays, fetched one step later


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Train per ``config`` in ``workdir`` (checkpoints/, metrics.jsonl, tensorboard/) and return the last
    validation metrics ({"step", "val_mAP", "val_AUC", "val_d_prime", "best_val_mAP"}).

    Starts from the workdir's latest checkpoint if there is one, else from ``config.init_from``, else from
    scratch. Raises NonFiniteLossError on a NaN/Inf loss, leaving the checkpoints written before it.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = make_data_mesh()
    validate_config(config, mesh.size)
    accumulation_steps, examples_per_host = batch_layout(config, mesh.size, jax.process_count())
    augment = augment_config(config)

    probe_model = build_model(config, num_classes=1)
    train_source = open_source(config, "train", probe_model.frontend)
    val_source = open_source(config, "val", probe_model.frontend)
    if val_source.num_classes != train_source.num_classes:
        raise ConfigError(f"validation split has {val_source.num_classes} classes, training split {train_source.num_classes}")
    model = build_model(config, num_classes=train_source.num_classes)

    schedule = learning_rate_schedule(config.optimizer, config.total_steps)
    params_shape = jax.eval_shape(lambda: init_variables(model, jax.random.key(0))["params"])
    tx = make_optimizer(config.optimizer, config.total_steps, params_shape)
    state = init_train_state(model, tx, config.seed, mesh)
    train_step = make_train_step(model, tx, augment, accumulation_steps, mesh)
    predict = make_eval_step(model, mesh)

    loader = make_train_loader(config, train_source, examples_per_host, augment.mixup)
    checkpointer = Checkpointer(workdir / "checkpoints", config.keep_checkpoints, config.async_checkpointing)
    latest = checkpointer.latest_step()
    if latest is not None:
        state = checkpointer.restore(latest, state, loader)
        logger.info("resumed from %s at step %d", checkpointer.directory, latest)
    elif config.init_from:
        state = load_init(state, config.init_from, tuple(config.init_exclude), mesh)
    start_step = int(state.step)

    log = MetricsLog(workdir)
    from tqdm import tqdm

    progress = tqdm(total=config.total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                    disable=not (config.progress_bar and jax.process_index() == 0))
    last_report = {"time": time.perf_counter(), "step": start_step}
    result: dict[str, Any] = {}
    best = -math.inf

    def report(pending: _PendingMetrics) -> None:
        values = {key: float(value) for key, value in jax.device_get(pending.values).items()}
        if not all(math.isfinite(v) for v in values.values()):
            checkpointer.wait()
            raise NonFiniteLossError(
                f"non-finite training loss at step {pending.step} (loss {values['loss']}, grad norm "
                f"{values['grad_norm']}); stopped; last good checkpoint: step {checkpointer.latest_step()} "
                f"in {checkpointer.directory}"
            )
        now = time.perf_counter()
        clips_per_second = (pending.step - last_report["step"]) * config.batch_size / max(now - last_report["time"], 1e-9)
        last_report.update(time=now, step=pending.step)
        lr = float(schedule(pending.step - 1))  # the rate the update of this step used
        progress.update(pending.step - progress.n)
        progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", clips_s=f"{clips_per_second:.1f}", refresh=False)
        if pending.step % config.log_every == 0 or pending.step == config.total_steps:
            log.write(pending.step, {"train_loss": values["loss"], "grad_norm": values["grad_norm"],
                                     "learning_rate": lr, "clips_per_second": clips_per_second})

    pending = None
    try:
        for step in range(start_step + 1, config.total_steps + 1):
            local = next(loader)
            saving = step % config.checkpoint_every == 0 or step % config.eval_every == 0 or step == config.total_steps
            loader_checkpoint = LoaderCheckpoint(loader, loader.get_state()) if saving else None
            state, step_metrics = train_step(state, global_batch(local, mesh))
            if pending is not None:
                report(pending)  # the previous step: finished by now or about to, so this does not stall
            pending = _PendingMetrics(step, step_metrics)
            if not saving:
                continue
            report(pending)  # a checkpoint must hold a state whose own step was finite
            pending = None
            val_metrics = None
            if step % config.eval_every == 0 or step == config.total_steps:
                evaluation = evaluate(predict, state, val_source, config.eval_batch_size, mesh)
                val_metrics = {BEST_METRIC: float(evaluation["mAP"]), "val_AUC": float(evaluation["AUC"]),
                               "val_d_prime": float(evaluation["d_prime"])}
                best = max(best, val_metrics[BEST_METRIC])
                result = {"step": step, **val_metrics, "best_val_mAP": best}
                log.write(step, val_metrics)
                progress.write(f"step {step}: validation mAP {val_metrics[BEST_METRIC]:.4f} "
                               f"AUC {val_metrics['val_AUC']:.4f} d' {val_metrics['val_d_prime']:.3f}")
            checkpointer.save(state, loader_checkpoint, val_metrics)
            last_report.update(time=time.perf_counter(), step=step)  # clips/s measures training only
        if pending is not None:
            report(pending)
        checkpointer.wait()
    finally:
        progress.close()
        log.close()
        loader.close()
        checkpointer.close()
    return result
