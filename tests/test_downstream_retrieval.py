"""Retrieval training on a frozen (tiny, random) encoder over the captioned demo set: the workdir a run leaves
(metrics.jsonl keys, model/best + model/last that RetrievalModel loads and that reproduce the logged metrics),
resume, the config checks, and train.py's dispatch on ``config.task``."""

import json
import pathlib
import subprocess
import sys

import pytest
from downstream_helpers import tiny_encoder  # noqa: F401  (a fixture)

from convnext_audio_jax.downstream import features, metrics, retrieval
from convnext_audio_jax.runtime.errors import UserError

pytest.importorskip("sentence_transformers", reason="text embeddings need the [downstream] extra")
REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(path, **changes):
    config = retrieval.retrieval_config()
    config.encoder = str(path)
    config.data.demo_train_clips, config.data.demo_val_clips = 32, 16
    config.data.validation = "demo-captions@eval"
    config.batch_size, config.total_steps, config.eval_every, config.log_every = 16, 20, 10, 5
    config.tags = True
    for key, value in changes.items():
        config[key] = value
    return config


def test_train_resume_and_the_saved_model(tmp_path, tiny_encoder):  # noqa: F811
    encoder = tiny_encoder
    workdir = tmp_path / "run"
    result = retrieval.train(_config(encoder), workdir)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "val_t2a_mAP@10" in r]
    assert [r["step"] for r in evaluations] == [0, 10, 20]  # step 0: the random projection
    keys = {f"val_{d}_{m}" for d in ("t2a", "a2t") for m in ("mAP@10", "R@1", "R@5", "R@10")}
    assert keys <= set(evaluations[-1]) and result["step"] == 20
    temperatures = [r["temperature"] for r in records if "train_loss" in r]
    assert len(temperatures) == 4 and len(set(temperatures)) == 4  # the temperature is learned

    # The saved model, on the cached features, gives the logged metrics of its step.
    model = retrieval.RetrievalModel(workdir)  # the workdir → its model/best
    saved = json.loads((model.directory / retrieval.MODEL_FILE).read_text())
    assert saved["metrics"][retrieval.BEST] == max(r[retrieval.BEST] for r in evaluations[1:])
    enc = features.AudioEncoder(str(encoder))
    from convnext_audio_jax.data import captions

    clips = captions.open_captions("demo-captions@eval", demo_clips=16)
    clip_features = features.cached_clip_features(clips, enc, "logits", workdir / "cache")
    texts, owner = clips.all_captions()
    scores = model.embed_text(texts) @ model.embed_audio(clip_features).T
    assert metrics.retrieval_metrics(scores, owner)["t2a_mAP@10"] == pytest.approx(saved["metrics"][retrieval.BEST],
                                                                                   abs=1e-5)
    # Resume: the run goes on from step 20 and logs no second step 0; a result-changing key needs allow_config_change.
    with pytest.raises(UserError, match="total_steps: 20 -> 30"):
        retrieval.train(_config(encoder, total_steps=30), workdir)
    retrieval.train(_config(encoder, total_steps=30, allow_config_change=True), workdir)
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(0) == 1 and steps[-1] == 30 and 25 in steps


def test_config_errors(tmp_path):
    for changes, expected in [({"encoder": ""}, "config.encoder is empty"),
                              ({"audio_features": "sequence"}, "expected 'logits' or 'scene'"),
                              ({"audio_features": "scene", "tags": True}, "needs audio_features 'logits'"),
                              ({"batch_size": 0}, "batch_size must be >= 1")]:
        with pytest.raises(UserError, match=expected):
            retrieval.check_config(_config("x", **changes))
    with pytest.raises(UserError, match="no retrieval model"):
        retrieval.RetrievalModel(tmp_path)


def test_train_py_dispatches_on_the_task(tmp_path):
    command = [sys.executable, str(REPO / "train.py"), f"--config={REPO / 'configs' / 'retrieval_demo.py'}",
               f"--workdir={tmp_path / 'w'}", "--check"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0 and "ok: retrieval config" in done.stdout, done.stderr[-2000:]
    done = subprocess.run([*command, "--config.audio_features=scene", "--config.tags=True"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 1 and "train.py: error: config.tags needs" in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("name", ["retrieval_demo", "retrieval_clotho"])
def test_config_files_check_and_document_themselves(name):
    path = REPO / "configs" / f"{name}.py"
    namespace: dict = {"__name__": name}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    retrieval.check_config(namespace["get_config"]())
    doc = namespace["__doc__"]
    assert f"python train.py --config configs/{name}.py" in doc and "mAP@10" in doc and "MEASURED" in doc
