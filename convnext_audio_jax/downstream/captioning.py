"""Automated audio captioning on a frozen encoder (the paper's Sec. 7.1): the decoder of ``caption_model`` trained
on each clip's frozen sequence embeddings (computed once, stored under ``workdir/cache``) with teacher forcing and
label smoothing, validated by beam-search captions scored with CIDEr-D, BLEU-4 and ROUGE-L (``caption_metrics``).

``train(config, workdir)`` is what ``python train.py --config configs/captioning_*.py`` runs: config.json (resume
checks it), metrics.jsonl + TensorBoard (``val_CIDEr_D``, ``val_BLEU_4``, ``val_ROUGE_L``, and ``val_METEOR`` where Java
is present), ``checkpoints/
state.msgpack`` (resumed from), ``model/best`` (by ``val_CIDEr_D``) and ``model/last``: ``captioning.json``
(settings, vocabulary) + ``params.msgpack``, which ``convnext-audio caption`` loads (:class:`CaptioningModel`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import serialization

from convnext_audio_jax.artifacts import lock as lock_lib
from convnext_audio_jax.artifacts.model_dir import find_task_model
from convnext_audio_jax.data import audio as audio_lib
from convnext_audio_jax.data import captions as captions_lib
from convnext_audio_jax.downstream import caption_metrics
from convnext_audio_jax.downstream import features as features_lib
from convnext_audio_jax.downstream.caption_model import (
    CaptionDecoder,
    Tokenizer,
    beam_search,
    caption_loss,
)
from convnext_audio_jax.runtime import files
from convnext_audio_jax.runtime.errors import UserError
from convnext_audio_jax.training import config as config_lib
from convnext_audio_jax.training.loop import MetricsLog

logger = logging.getLogger(__name__)
TASK = "captioning"
BEST = "val_CIDEr_D"
MODEL_FILE, PARAMS_FILE = "captioning.json", "params.msgpack"
STATE_FILE = "checkpoints/state.msgpack"
DECODER_KEYS = ("max_length", "width", "layers", "heads", "feedforward", "dropout")


def captioning_config() -> ml_collections.ConfigDict:
    """The defaults a captioning config starts from: the paper's decoder (configs/captioning_*.py)."""
    config = ml_collections.ConfigDict()
    config.task = TASK
    config.encoder = ""  # a model folder, a tagging workdir or a pretrained name: frozen
    config.hop_seconds = 10.0
    config.data = ml_collections.ConfigDict({"train": "demo-captions@train", "validation": "demo-captions@eval",
                                             "demo_train_clips": 2048, "demo_val_clips": 256})
    config.decoder = ml_collections.ConfigDict({"max_length": 30, "width": 256, "layers": 6, "heads": 4,
                                                "feedforward": 2048, "dropout": 0.2})
    config.min_word_count = 1
    config.label_smoothing = 0.1
    config.beam = 2
    config.meteor = True  # also METEOR (val_METEOR) where a Java runtime is on the PATH: ~10 s more per evaluation
    config.batch_size = 64
    config.total_steps = 10_000
    config.learning_rate = 5e-4
    config.weight_decay = 1e-2
    config.warmup_steps = 500
    config.eval_every = 1000
    config.log_every = 100
    config.seed = 0
    config.cache_dir = ""  # "" = workdir/cache
    config.allow_config_change = False
    return config


def check_config(config) -> None:
    if config.get("task") != TASK:
        raise UserError(f"config task {config.get('task')!r}: expected {TASK!r}")
    if not config.encoder:
        raise UserError("config.encoder is empty: name the frozen tagging model (model folder, workdir or pretrained name)")
    for key in ("batch_size", "total_steps", "eval_every", "log_every", "beam"):
        if int(config[key]) < 1:
            raise UserError(f"config.{key} must be >= 1, got {config[key]}")
    if config.decoder.width % config.decoder.heads:
        raise UserError(f"config.decoder.width {config.decoder.width} is not a multiple of heads {config.decoder.heads}")
    if int(config.decoder.max_length) < 3:
        raise UserError(f"config.decoder.max_length must be >= 3 (<bos>, a word, <eos>), got {config.decoder.max_length}")


def _decoder(document: dict) -> CaptionDecoder:
    return CaptionDecoder(len(document["vocabulary"]), **{key: document["decoder"][key] for key in DECODER_KEYS})


def generate(decoder: CaptionDecoder, params, tokenizer: Tokenizer, audio: np.ndarray, beam: int,
             batch_size: int = 8) -> list[str]:
    """Captions of (N, T, C) sequences, ``batch_size`` at a time (the last batch padded: one compiled shape)."""
    texts = []
    for first in range(0, len(audio), batch_size):
        chunk = audio[first : first + batch_size]
        padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
        tokens, _ = beam_search(decoder, params, jnp.asarray(padded), beam, decoder.max_length)
        texts.extend(tokenizer.decode(row) for row in np.asarray(tokens)[: len(chunk)])
    return texts


class CaptioningModel:
    """A trained decoder (``model/best`` or ``model/last`` of a captioning workdir, or the workdir itself)."""

    def __init__(self, path: str | os.PathLike):
        path = find_task_model(path, MODEL_FILE, "captioning model")
        self.directory = path
        self.document = json.loads((path / MODEL_FILE).read_text())
        self.tokenizer = Tokenizer(self.document["vocabulary"])
        self.decoder = _decoder(self.document)
        self.params = serialization.msgpack_restore((path / PARAMS_FILE).read_bytes())

    def caption(self, sequences: np.ndarray, beam: int | None = None) -> list[str]:
        return generate(self.decoder, self.params, self.tokenizer, np.asarray(sequences, np.float32),
                        beam or self.document["beam"])


def _save_model(directory: pathlib.Path, params, document: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    files.write_bytes(directory / PARAMS_FILE, serialization.msgpack_serialize(jax.tree.map(np.asarray, params)))
    files.write_text(directory / MODEL_FILE, json.dumps(document) + "\n")  # last: the folder is complete


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Train a captioning decoder per ``config`` in ``workdir`` (module doc); returns the last evaluation with
    ``best_val_CIDEr_D`` and ``step``."""
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
    train_clips = captions_lib.open_captions(config.data.train, demo_clips=int(config.data.demo_train_clips),
                                             seed=int(config.seed))
    val_clips = captions_lib.open_captions(config.data.validation, demo_clips=int(config.data.demo_val_clips),
                                           seed=int(config.seed))
    train_audio = features_lib.cached_clip_features(train_clips, encoder, "sequence", cache)
    val_audio = features_lib.cached_clip_features(val_clips, encoder, "sequence", cache)
    texts, owner = train_clips.all_captions()
    tokenizer = Tokenizer.from_captions(texts, int(config.min_word_count))
    length = int(config.decoder.max_length)
    train_tokens = np.stack([tokenizer.encode(text, length) for text in texts])
    captions_of = [np.flatnonzero(owner == i) for i in range(len(train_clips))]
    if len(train_clips) < config.batch_size:
        raise UserError(f"config.batch_size {config.batch_size} exceeds the {len(train_clips)} training clips of "
                        f"{config.data.train}")
    document = {"task": TASK, "encoder": str(encoder.directory.resolve()), "hop_seconds": float(config.hop_seconds),
                "vocabulary": tokenizer.words, "decoder": {k: config.decoder[k] for k in DECODER_KEYS},
                "beam": int(config.beam), "sample_rate": encoder.sample_rate}
    decoder = _decoder(document)
    params = decoder.init(jax.random.key(int(config.seed)), jnp.asarray(train_audio[:1]),
                          jnp.asarray(train_tokens[:1, :-1]))["params"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, float(config.learning_rate), int(config.warmup_steps),
                                                  int(config.total_steps))
    tx = optax.adamw(schedule, weight_decay=float(config.weight_decay))
    state = {"params": params, "opt_state": tx.init(params), "step": 0, "best": -1.0}
    if state_path.is_file():
        state = serialization.from_bytes(state, state_path.read_bytes())
        logger.info("resumed from %s at step %d", state_path, int(state["step"]))
    trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

    @jax.jit
    def train_step(params, opt_state, audio, tokens, key):
        def loss_fn(params):
            logits = decoder.apply({"params": params}, audio, tokens[:, :-1], deterministic=False,
                                   rngs={"dropout": key})
            return caption_loss(logits, tokens, float(config.label_smoothing))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def evaluate(params) -> dict[str, float]:
        candidates = generate(decoder, params, tokenizer, val_audio, int(config.beam))
        values = caption_metrics.caption_metrics(candidates, val_clips.captions, with_meteor=bool(config.meteor))
        return {f"val_{k}": v for k, v in values.items()}

    log = MetricsLog(workdir)
    result: dict = {}
    try:
        if config_changes:
            log.write(int(state["step"]), {"config_change": {k: list(v) for k, v in config_changes.items()}})
        if int(state["step"]) == 0:
            log.write(0, {"trainable_parameters": trainable})
        params, opt_state = state["params"], state["opt_state"]
        started, first = time.perf_counter(), int(state["step"]) + 1
        for step in range(first, int(config.total_steps) + 1):
            rng = np.random.default_rng([int(config.seed), step])  # a step's batch depends on the step only
            clips = rng.choice(len(train_clips), int(config.batch_size), replace=False)
            rows = np.array([rng.choice(captions_of[c]) for c in clips])
            key = jax.random.fold_in(jax.random.key(int(config.seed)), step)
            params, opt_state, loss = train_step(params, opt_state, train_audio[clips], train_tokens[rows], key)
            if step % config.log_every == 0 or step == config.total_steps:
                rate = (step - first + 1) / max(time.perf_counter() - started, 1e-9)
                log.write(step, {"train_loss": float(loss), "steps_per_second": rate})
            if step % config.eval_every == 0 or step == config.total_steps:
                values = evaluate(params)
                is_best = values[BEST] > float(state["best"])
                best = max(values[BEST], float(state["best"]))
                log.write(step, values)
                log.sync()
                state = {"params": params, "opt_state": opt_state, "step": step, "best": best}
                state_path.parent.mkdir(exist_ok=True)
                files.write_bytes(state_path, serialization.to_bytes(state))
                record = {**document, "step": step, "metrics": values}
                _save_model(workdir / "model" / "last", params, record)
                if is_best:
                    _save_model(workdir / "model" / "best", params, record)
                result = {"step": step, **values, f"best_{BEST}": best}
                logger.info("step %d: validation CIDEr-D %.4f BLEU-4 %.4f", step, values[BEST], values["val_BLEU_4"])
    finally:
        log.close()
    return result


# ------------------------------------------------------------------------------------------ the caption command

def add_caption_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="FILE", help="audio files")
    parser.add_argument("--model", required=True, help="a trained captioning model: its workdir (model/best, else "
                                                       "model/last) or model folder")
    parser.add_argument("--beam", type=int, default=None, help="beam size (default: the model's; 1 is greedy)")


def run_caption(args: argparse.Namespace) -> int:
    """Prints, for each file, one line per window: start-end seconds and the caption."""
    from convnext_audio_jax.hub.resolve import offline_flag

    if args.beam is not None and args.beam < 1:
        raise UserError(f"--beam must be ≥ 1, got {args.beam}")
    model = CaptioningModel(args.model)
    encoder = features_lib.AudioEncoder(model.document["encoder"], model.document["hop_seconds"],
                                        offline=offline_flag(args))
    failed = 0
    for path in args.inputs:
        try:
            _, blocks = audio_lib.stream_mono(path, target_rate=encoder.sample_rate)
            waveform = np.concatenate([np.zeros(0, np.float32), *blocks])
        except audio_lib.ClipError as error:
            print(f"caption: skipped {path}: {error.reason} ({error.detail})", file=sys.stderr)
            failed += 1
            continue
        starts, windows = encoder.windows(waveform)
        texts = model.caption(encoder.forward(windows)["sequence"], args.beam)
        for start, text in zip(starts, texts):
            begin = start / encoder.sample_rate
            print(f"{path}\t{begin:.1f}-{begin + encoder.window / encoder.sample_rate:.1f} s\t{text}")
    return 1 if failed == len(args.inputs) else 0
