"""Captioning training on a frozen (tiny, random) encoder over the captioned demo set: the workdir a run leaves
(metrics.jsonl keys, model/best + model/last that CaptioningModel loads and whose captions reproduce the logged
CIDEr-D), resume, ``convnext-audio caption``, the config checks and train.py's dispatch."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import soundfile
from downstream_helpers import tiny_encoder  # noqa: F401  (a fixture)

from convnext_audio_jax import cli
from convnext_audio_jax.data import captions
from convnext_audio_jax.downstream import caption_metrics, captioning, features
from convnext_audio_jax.runtime.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(path, **changes):
    config = captioning.captioning_config()
    config.encoder = str(path)
    config.hop_seconds = 1.0
    config.data.demo_train_clips, config.data.demo_val_clips = 24, 4
    config.decoder.update(max_length=12, width=32, layers=1, heads=2, feedforward=64, dropout=0.1)
    config.batch_size, config.total_steps, config.eval_every, config.log_every, config.warmup_steps = 8, 20, 10, 5, 5
    config.learning_rate = 3e-3
    config.meteor = False  # its Java start-up: tests/test_downstream_caption_metrics.py runs it once
    for key, value in changes.items():
        config[key] = value
    return config


def test_train_resume_caption_command(tmp_path, capsys, tiny_encoder):  # noqa: F811
    encoder = tiny_encoder
    workdir = tmp_path / "run"
    result = captioning.train(_config(encoder), workdir)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "val_CIDEr_D" in r]
    assert [r["step"] for r in evaluations] == [10, 20] and result["step"] == 20
    assert {"val_BLEU_4", "val_ROUGE_L"} <= set(evaluations[-1]) and records[0]["trainable_parameters"] > 0
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert losses[-1] < losses[0]  # 20 steps on 24 clips' captions: the word frequencies at least

    model = captioning.CaptioningModel(workdir)
    saved = json.loads((model.directory / captioning.MODEL_FILE).read_text())
    clips = captions.open_captions("demo-captions@eval", demo_clips=4)
    sequences = features.cached_clip_features(clips, features.AudioEncoder(str(encoder), 1.0), "sequence",
                                              workdir / "cache")
    texts = model.caption(sequences)
    assert all(isinstance(t, str) for t in texts)
    assert caption_metrics.caption_metrics(texts, clips.captions)["CIDEr_D"] == pytest.approx(
        saved["metrics"]["val_CIDEr_D"], abs=1e-9)

    captioning.train(_config(encoder, total_steps=30, allow_config_change=True), workdir)
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 30 and steps.count(10) == 2  # step 10's loss and evaluation, once: resumed from 20

    wav = tmp_path / "clip.wav"
    soundfile.write(wav, clips.read(0, 16_000)[np.arange(24_000) % 16_000], 16_000)  # 1.5 s: two windows
    assert cli.main(["caption", str(wav), "--model", str(workdir), "--beam", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[1] for line in lines] == ["0.0-1.0 s", "0.5-1.5 s"]
    assert cli.main(["caption", str(wav), "--model", str(tmp_path)]) == 2
    assert "no captioning model" in capsys.readouterr().err


def test_config_errors_and_train_py(tmp_path):
    for changes, expected in [({"encoder": ""}, "config.encoder is empty"), ({"beam": 0}, "beam must be >= 1")]:
        with pytest.raises(UserError, match=expected):
            captioning.check_config(_config("x", **changes))
    config = _config("x")
    config.decoder.heads = 3
    with pytest.raises(UserError, match="not a multiple of heads 3"):
        captioning.check_config(config)
    command = [sys.executable, str(REPO / "train.py"), f"--config={REPO / 'configs' / 'captioning_demo.py'}",
               f"--workdir={tmp_path / 'w'}", "--check"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0 and "ok: captioning config" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("name", ["captioning_demo", "captioning_audiocaps"])
def test_config_files_check_and_document_themselves(name):
    path = REPO / "configs" / f"{name}.py"
    namespace: dict = {"__name__": name}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    captioning.check_config(namespace["get_config"]())
    doc = namespace["__doc__"]
    assert f"python train.py --config configs/{name}.py" in doc and "CIDEr-D" in doc and "MEASURED" in doc
