"""Training configuration: every shipped config loads, validates and documents itself; bad settings and
SPECs are one-line errors; config.json and the resume check."""

import ast
import json
import os
import pathlib

import pytest
from training_helpers import load_config, tiny_config

from convnext_audio_jax.training import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
# Tagging configs; the downstream ones (retrieval_*, captioning_*: a frozen encoder's task) are tested in
# tests/test_downstream_*.py.
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.py")
                 if not p.name.startswith(("_", "retrieval_", "captioning_")))


def test_batch_layout_accumulates_when_devices_fall_short():
    config = config_lib.default_config()
    assert config_lib.batch_layout(config, 8) == (1, 512)  # 8 devices x 64 = 512
    assert config_lib.batch_layout(config, 2) == (4, 512)  # 2 devices x 64, 4 micro-batches
    config.per_device_batch_size = 48
    with pytest.raises(config_lib.ConfigError, match="not a multiple of devices"):
        config_lib.batch_layout(config, 8)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_files_load_validate_and_document_themselves(path):
    config = load_config(path)
    config_lib.validate_config(config, num_devices=8)
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert f"python train.py --config configs/{path.name}" in doc
    if not path.stem.startswith("demo"):
        assert "mAP" in doc
    model = config_lib.build_model(config, num_classes=527)
    assert model.num_classes == 527
    if not path.stem.startswith("demo"):  # the paper's input: 10 s at 32 kHz, 224 mels (PANN CNNs: 64)
        assert model.frontend.clip_samples == 320_000
        assert model.frontend.n_mels == (64 if config.model.name.startswith("cnn") else 224)


def test_paper_configs_name_the_paper_data():
    config = load_config("convnext_tiny_audioset")
    assert config.data.train == "data/audioset@balanced_train+data/audioset@unbalanced_train"
    assert config.data.validation.startswith("holdout:") and config.data.eval == "data/audioset@eval"
    doc = ast.get_docstring(ast.parse((REPO / "configs" / "convnext_tiny_audioset.py").read_text()))
    for command in ("convnext-audio prepare", "balanced_train_segments.csv", "unbalanced_train_segments.csv",
                    "eval_segments.csv", "tfds:audioset/int16@balanced_train", "tfds_builder"):
        assert command in doc


def test_bad_config_gives_a_one_line_error():
    config = tiny_config()
    config.data.train = "nowhere"
    with pytest.raises(config_lib.ConfigError, match="'nowhere' is none of DIR@SPLIT") as error:
        config_lib.validate_config(config, 8)
    assert "\n" not in str(error.value)
    config = tiny_config()
    config.data.validation = "holdout:0"
    with pytest.raises(config_lib.ConfigError, match="holdout count"):
        config_lib.validate_config(config, 8)
    config = tiny_config()
    config.eval_batch_size = 12
    with pytest.raises(config_lib.ConfigError, match="eval_batch_size 12"):
        config_lib.validate_config(config, 8)
    config = tiny_config()
    config.on_nonfinite = "ignore"
    with pytest.raises(config_lib.ConfigError,
                       match=r"^on_nonfinite must be one of \('stop', 'skip_batch'\); got 'ignore'$"):
        config_lib.validate_config(config, 8)
    config = tiny_config()
    config.max_nonfinite_in_a_row = 0
    with pytest.raises(config_lib.ConfigError, match=r"^max_nonfinite_in_a_row must be >= 1; got 0$"):
        config_lib.validate_config(config, 8)


def test_config_json_and_the_resume_check(tmp_path):
    config = tiny_config()
    assert config_lib.check_and_record_config(config, tmp_path, resuming=False) == {}
    saved = json.loads((tmp_path / config_lib.CONFIG_FILE).read_text())
    assert saved["batch_size"] == 16 and saved["model"]["overrides"]["dims"] == [8, 16, 32, 64]

    changed = tiny_config()
    changed.batch_size = 32
    changed.log_every = 7  # does not change the result: never listed
    changed.on_nonfinite = "skip_batch"  # nor does this: a run that meets no NaN computes the same
    with pytest.raises(config_lib.ConfigError, match=r"batch_size: 16 -> 32\); resume") as error:
        config_lib.check_and_record_config(changed, tmp_path, resuming=True)
    assert "log_every" not in str(error.value) and "on_nonfinite" not in str(error.value)
    assert "\n" not in str(error.value)
    changed.allow_config_change = True
    assert config_lib.check_and_record_config(changed, tmp_path, resuming=True) == {"batch_size": (16, 32)}
    assert json.loads((tmp_path / config_lib.CONFIG_FILE).read_text())["batch_size"] == 32


def test_config_json_is_fsynced_before_and_after_its_rename(tmp_path, monkeypatch):
    """A power cut leaves the old or the new config.json: the temporary file is on disk before the rename,
    and the folder (the rename) after it."""
    events = []
    real_fsync, real_replace = os.fsync, pathlib.Path.replace
    monkeypatch.setattr(os, "fsync",
                        lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd)))
    monkeypatch.setattr(pathlib.Path, "replace",
                        lambda self, target: (events.append(("rename", str(target))), real_replace(self, target))[1])
    config_lib.check_and_record_config(tiny_config(), tmp_path, resuming=False)
    target = str(tmp_path / config_lib.CONFIG_FILE)
    assert events == [("fsync", str(tmp_path / f".{config_lib.CONFIG_FILE}.0.tmp")), ("rename", target),
                      ("fsync", str(tmp_path))]
