"""Language-based audio retrieval on a frozen encoder (the paper's Sec. 7, after PaSST-MPnet): each clip's frozen
logits (or scene embedding), optionally with the "+tags" vector (the sentence embeddings of the encoder's class
names weighted by the clip's class probabilities), standardised and projected by ONE linear layer onto the
sentence-embedding space of the captions; trained with a symmetric InfoNCE loss and a learned temperature.

``train(config, workdir)`` is what ``python train.py --config configs/retrieval_*.py`` runs: the workdir gets
config.json (resume checks it as for tagging), metrics.jsonl + TensorBoard (``val_t2a_mAP@10``, ``val_t2a_R@1``,
…, ``val_a2t_…``; step 0 is the untrained, random projection), ``checkpoints/state.msgpack`` (resumed from), and
``model/best`` and ``model/last`` (best by ``val_t2a_mAP@10``): ``retrieval.json`` + ``params.npz``, which
``convnext-audio index``/``search`` load (:class:`RetrievalModel`). Audio features and text embeddings are
computed once and stored under ``workdir/cache``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import serialization

from convnext_audio_jax.artifacts import lock as lock_lib
from convnext_audio_jax.artifacts.model_dir import find_task_model
from convnext_audio_jax.data import captions as captions_lib
from convnext_audio_jax.downstream import features as features_lib
from convnext_audio_jax.downstream import metrics as metrics_lib
from convnext_audio_jax.downstream import text as text_lib
from convnext_audio_jax.runtime import files
from convnext_audio_jax.runtime.errors import UserError
from convnext_audio_jax.training import config as config_lib
from convnext_audio_jax.training.loop import MetricsLog

logger = logging.getLogger(__name__)
TASK = "retrieval"
BEST = "val_t2a_mAP@10"
MODEL_FILE, PARAMS_FILE = "retrieval.json", "params.npz"
STATE_FILE = "checkpoints/state.msgpack"


def retrieval_config() -> ml_collections.ConfigDict:
    """The defaults a retrieval config starts from (configs/retrieval_*.py)."""
    config = ml_collections.ConfigDict()
    config.task = TASK
    config.encoder = ""  # a model folder, a tagging workdir or a pretrained name: frozen
    config.audio_features = "logits"  # or "scene"
    config.tags = False  # "+tags": add the class-name embeddings weighted by the clip's probabilities
    config.text_model = text_lib.DEFAULT_TEXT_MODEL
    config.hop_seconds = 5.0  # between the encoder's windows on clips longer than one window
    config.data = ml_collections.ConfigDict({"train": "demo-captions@train", "validation": "demo-captions@validation",
                                             "demo_train_clips": 2048, "demo_val_clips": 256})
    config.batch_size = 64
    config.total_steps = 1000
    config.learning_rate = 1e-3
    config.weight_decay = 1e-4
    config.init_temperature = 0.07
    config.eval_every = 250
    config.log_every = 50
    config.seed = 0
    config.cache_dir = ""  # where features and text embeddings are stored; "" = workdir/cache (runs may share one)
    config.allow_config_change = False
    return config


def check_config(config) -> None:
    """One-line errors for settings that cannot work, before anything is computed."""
    if config.get("task") != TASK:
        raise UserError(f"config task {config.get('task')!r}: expected {TASK!r}")
    if not config.encoder:
        raise UserError("config.encoder is empty: name the frozen tagging model (model folder, workdir or pretrained name)")
    if config.audio_features not in ("logits", "scene"):
        raise UserError(f"config.audio_features {config.audio_features!r}: expected 'logits' or 'scene'")
    if config.tags and config.audio_features != "logits":
        raise UserError("config.tags needs audio_features 'logits' (the class probabilities weight the tag names)")
    for key in ("batch_size", "total_steps", "eval_every", "log_every"):
        if int(config[key]) < 1:
            raise UserError(f"config.{key} must be >= 1, got {config[key]}")


# ------------------------------------------------------------------------------------------------- the model

def audio_inputs(features: np.ndarray, tag_embeddings: np.ndarray | None) -> np.ndarray:
    """The projection's input: the features, and with ``tag_embeddings`` (classes, D) the probability-weighted
    mean of the class-name embeddings appended."""
    if tag_embeddings is None:
        return features
    probs = 1.0 / (1.0 + np.exp(-features))
    tags = probs @ tag_embeddings / np.maximum(probs.sum(axis=-1, keepdims=True), 1e-6)
    return np.concatenate([features, tags], axis=-1).astype(np.float32)


def init_params(seed: int, in_dim: int, out_dim: int, temperature: float) -> dict:
    w = jax.random.normal(jax.random.key(seed), (in_dim, out_dim), jnp.float32) / math.sqrt(in_dim)
    return {"w": w, "b": jnp.zeros(out_dim), "log_scale": jnp.asarray(math.log(1.0 / temperature), jnp.float32)}


def project(params: dict, inputs: jax.Array) -> jax.Array:
    """Standardised inputs (B, in) → unit vectors (B, D) in the text space."""
    out = inputs @ params["w"] + params["b"]
    return out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-6)


def info_nce(params: dict, inputs: jax.Array, texts: jax.Array) -> jax.Array:
    """Symmetric InfoNCE: row i of ``inputs`` matches row i of ``texts`` (unit vectors)."""
    logits = jnp.exp(params["log_scale"]) * project(params, inputs) @ texts.T
    labels = jnp.arange(logits.shape[0])
    return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                  + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())


class RetrievalModel:
    """A trained projection (``model/best`` or ``model/last`` of a retrieval workdir, or the workdir itself)."""

    def __init__(self, path: str | os.PathLike):
        path = find_task_model(path, MODEL_FILE, "retrieval model")
        self.directory = path
        self.config = json.loads((path / MODEL_FILE).read_text())
        with np.load(path / PARAMS_FILE) as arrays:
            self.arrays = {name: arrays[name] for name in arrays.files}
        self.params = {name: jnp.asarray(self.arrays[name]) for name in ("w", "b", "log_scale")}

    def embed_audio(self, features: np.ndarray) -> np.ndarray:
        """(N, D_feature) frozen features → (N, D_text) unit vectors."""
        inputs = audio_inputs(np.asarray(features, np.float32), self.arrays.get("tag_embeddings"))
        inputs = (inputs - self.arrays["mean"]) / self.arrays["std"]
        return np.asarray(project(self.params, jnp.asarray(inputs)))

    def embed_text(self, texts: list[str]) -> np.ndarray:
        return text_lib.embed_texts(texts, self.config["text_model"])


def _save_model(directory: pathlib.Path, params: dict, arrays: dict, document: dict) -> None:
    """``directory``/params.npz then retrieval.json (written last: the folder is complete once it is there)."""
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(value) for name, value in {**params, **arrays}.items()})
    files.write_bytes(directory / PARAMS_FILE, buffer.getvalue())
    files.write_text(directory / MODEL_FILE, json.dumps(document, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- the training

def _split(spec: str, clips_count: int, config, encoder, tag_embeddings, cache: pathlib.Path):
    clips = captions_lib.open_captions(spec, demo_clips=clips_count, seed=int(config.seed))
    texts, owner = clips.all_captions()
    features = features_lib.cached_clip_features(clips, encoder, config.audio_features, cache)
    text_embeddings = text_lib.cached_text_embeddings(texts, config.text_model, cache)
    return audio_inputs(features, tag_embeddings), text_embeddings, owner


def evaluate(params: dict, inputs: np.ndarray, texts: np.ndarray, owner: np.ndarray) -> dict[str, float]:
    """Both directions' metrics of standardised ``inputs`` (clips) against caption embeddings ``texts``."""
    audio = np.asarray(project(params, jnp.asarray(inputs)))
    return metrics_lib.retrieval_metrics(texts @ audio.T, owner)


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Train a retrieval projection per ``config`` in ``workdir`` (module doc); returns the last evaluation with
    ``best_val_t2a_mAP@10`` and ``step``."""
    check_config(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with lock_lib.WorkdirLock(workdir, jax.process_index()):
        return _train(config, workdir)


def _train(config, workdir: pathlib.Path) -> dict:
    state_path = workdir / STATE_FILE
    config_changes = config_lib.check_and_record_config(config, workdir, resuming=state_path.is_file())
    cache = pathlib.Path(config.get("cache_dir") or workdir / "cache")
    encoder = features_lib.AudioEncoder(config.encoder, float(config.hop_seconds))
    tag_embeddings = (text_lib.cached_text_embeddings(encoder.class_names, config.text_model, cache)
                      if config.tags else None)
    train_inputs, train_texts, train_owner = _split(config.data.train, int(config.data.demo_train_clips), config,
                                                    encoder, tag_embeddings, cache)
    val_inputs, val_texts, val_owner = _split(config.data.validation, int(config.data.demo_val_clips), config,
                                              encoder, tag_embeddings, cache)
    # Standardised with the training clips' statistics (stored with the model): logits of very different scales.
    mean, std = train_inputs.mean(axis=0), train_inputs.std(axis=0) + 1e-6
    train_inputs, val_inputs = (train_inputs - mean) / std, (val_inputs - mean) / std
    captions_of = [np.flatnonzero(train_owner == i) for i in range(len(train_inputs))]
    if len(train_inputs) < config.batch_size:
        raise UserError(f"config.batch_size {config.batch_size} exceeds the {len(train_inputs)} training clips of "
                        f"{config.data.train}")

    params = init_params(int(config.seed), train_inputs.shape[1], train_texts.shape[1], float(config.init_temperature))
    tx = optax.adamw(optax.cosine_decay_schedule(float(config.learning_rate), int(config.total_steps)),
                     weight_decay=float(config.weight_decay))
    state = {"params": params, "opt_state": tx.init(params), "step": 0, "best": -1.0}
    if state_path.is_file():
        state = serialization.from_bytes(state, state_path.read_bytes())
        logger.info("resumed from %s at step %d", state_path, int(state["step"]))

    @jax.jit
    def train_step(params, opt_state, inputs, texts):
        loss, grads = jax.value_and_grad(info_nce)(params, inputs, texts)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    arrays = {"mean": mean, "std": std, **({"tag_embeddings": tag_embeddings} if config.tags else {})}
    document = {"task": TASK, "encoder": str(encoder.directory.resolve()), "audio_features": config.audio_features,
                "tags": bool(config.tags), "text_model": config.text_model, "hop_seconds": float(config.hop_seconds),
                "sample_rate": encoder.sample_rate}
    log = MetricsLog(workdir)
    result: dict = {}
    try:
        if config_changes:
            log.write(int(state["step"]), {"config_change": {k: list(v) for k, v in config_changes.items()}})
        if int(state["step"]) == 0:  # the untrained, random projection: the baseline of every run
            log.write(0, {f"val_{key}": value for key, value in evaluate(state["params"], val_inputs, val_texts,
                                                                           val_owner).items()})
        params, opt_state = state["params"], state["opt_state"]
        started, first = time.perf_counter(), int(state["step"]) + 1
        for step in range(first, int(config.total_steps) + 1):
            rng = np.random.default_rng([int(config.seed), step])  # a step's batch depends on the step only: resumable
            clips = rng.choice(len(train_inputs), int(config.batch_size), replace=False)
            rows = np.array([rng.choice(captions_of[c]) for c in clips])
            params, opt_state, loss = train_step(params, opt_state, train_inputs[clips], train_texts[rows])
            if step % config.log_every == 0 or step == config.total_steps:
                rate = (step - first + 1) / max(time.perf_counter() - started, 1e-9)
                log.write(step, {"train_loss": float(loss), "temperature": float(jnp.exp(-params["log_scale"])),
                                 "steps_per_second": rate})
            if step % config.eval_every == 0 or step == config.total_steps:
                values = {f"val_{key}": value for key, value in evaluate(params, val_inputs, val_texts, val_owner).items()}
                is_best = values[BEST] > float(state["best"])
                best = max(values[BEST], float(state["best"]))
                log.write(step, values)
                log.sync()
                state = {"params": params, "opt_state": opt_state, "step": step, "best": best}
                state_path.parent.mkdir(exist_ok=True)
                files.write_bytes(state_path, serialization.to_bytes(state))
                record = {**document, "step": step, "metrics": values}
                _save_model(workdir / "model" / "last", params, arrays, record)
                if is_best:
                    _save_model(workdir / "model" / "best", params, arrays, record)
                result = {"step": step, **values, f"best_{BEST}": best}
                logger.info("step %d: validation t2a mAP@10 %.4f R@10 %.4f", step, values[BEST], values["val_t2a_R@10"])
    finally:
        log.close()
    return result
