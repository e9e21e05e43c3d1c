"""The training loop end to end on the tiny demo config: kill/resume bit-identity, NaN stop, the model
directories, config.json and the resume check, the best mAP across a resume, and the demo's mAP (slow)."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from convnext_audio_jax import checkpoint, training
from convnext_audio_jax.data import demo
from convnext_audio_jax.training import config as config_lib, step as step_lib
from training_helpers import TINY_CONFIG, tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_config_file(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("configs") / "tiny.py"
    path.write_text(TINY_CONFIG)
    return path


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent XLA cache for this module (and its subprocesses): the kill/resume runs compile the same
    programs three times, which would otherwise dominate the module's run time on a small CPU."""
    directory = str(tmp_path_factory.mktemp("xla_cache"))
    saved = {name: getattr(jax.config, name) for name in
             ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")}
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield directory
    for name, value in saved.items():
        jax.config.update(name, value)


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory) -> pathlib.Path:
    """The tiny config trained for its 24 steps without interruption."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    training.train(tiny_config(), workdir)
    return workdir


def read_checkpoint_params(workdir: pathlib.Path, step: int) -> dict:
    restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    return traverse_util.flatten_dict(restored["params"], sep="/")


def metrics_lines(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_config_metrics_and_loadable_model_directories(uninterrupted_run):
    config = tiny_config()
    saved = json.loads((uninterrupted_run / "config.json").read_text())
    assert saved == config_lib.config_as_json(config)
    lines = metrics_lines(uninterrupted_run)
    evaluations = [line for line in lines if "val_mAP" in line]
    assert [line["step"] for line in evaluations] == [12, 24]
    assert all(line["val_skipped"] == 0 and "eval_mAP" in line for line in evaluations)  # eval reported each time
    assert any("train_skipped" in line and "learning_rate" in line for line in lines)

    _, last, metadata = checkpoint.load_model(uninterrupted_run / "model" / "last")
    assert metadata["provenance"]["step"] == 24 and metadata["class_names"] == list(demo.CLASS_NAMES)
    assert metadata["sample_rate"] == 16_000 and metadata["provenance"]["config"]["batch_size"] == 16
    final = read_checkpoint_params(uninterrupted_run, 24)
    for path, value in traverse_util.flatten_dict(last["params"], sep="/").items():
        np.testing.assert_array_equal(value, final[path], err_msg=path)
    _, _, best_metadata = checkpoint.load_model(uninterrupted_run / "model" / "best")
    best_step = max(evaluations, key=lambda line: line["val_mAP"])["step"]
    assert best_metadata["provenance"]["step"] == best_step
    assert best_metadata["provenance"]["validation"]["val_mAP"] == max(line["val_mAP"] for line in evaluations)


def test_killed_and_resumed_run_is_bit_identical(tiny_config_file, uninterrupted_run, compilation_cache, tmp_path):
    config = tiny_config()
    uninterrupted = uninterrupted_run
    resumed = tmp_path / "resumed"
    command = [sys.executable, str(REPO / "train.py"), f"--config={tiny_config_file}", f"--workdir={resumed}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_COMPILATION_CACHE_DIR": compilation_cache,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoints = resumed / "checkpoints"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()):
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    killed_at = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert killed_at < config.total_steps

    training.train(config, resumed)
    final_a = read_checkpoint_params(uninterrupted, config.total_steps)
    final_b = read_checkpoint_params(resumed, config.total_steps)
    for path, value in final_a.items():
        np.testing.assert_array_equal(value, final_b[path], err_msg=path)

    def losses(workdir):
        return {line["step"]: line["train_loss"] for line in metrics_lines(workdir) if "train_loss" in line}

    after_resume = {s: v for s, v in losses(resumed).items() if s > killed_at}
    assert after_resume and all(losses(uninterrupted)[s] == v for s, v in after_resume.items())


def test_resume_with_a_changed_batch_size_is_refused_unless_allowed(uninterrupted_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted_run, workdir)
    config = tiny_config()
    config.batch_size = 32
    config.total_steps = 26
    config.eval_every = 26
    with pytest.raises(training.ConfigError, match=r"batch_size: 16 -> 32.*total_steps: 24 -> 26"):
        training.train(config, workdir)
    assert json.loads((workdir / "config.json").read_text())["batch_size"] == 16  # left as it was

    config.allow_config_change = True
    result = training.train(config, workdir)
    assert result["step"] == 26
    changes = [line for line in metrics_lines(workdir) if "config_change" in line]
    assert changes == [{"step": 24, "config_change": {"batch_size": [16, 32], "total_steps": [24, 26]}}]
    # The best validation mAP of the first 24 steps is read back, not reset.
    first_best = max(line["val_mAP"] for line in metrics_lines(uninterrupted_run) if "val_mAP" in line)
    assert result["best_val_mAP"] >= first_best
    assert json.loads((workdir / "config.json").read_text())["batch_size"] == 32


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(uninterrupted_run, tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted_run, workdir)  # a finished 24-step run, continued to 30 steps
    good = read_checkpoint_params(workdir, 24)
    config = tiny_config()
    config.total_steps = 30
    config.checkpoint_every = 1  # the NaN step is itself a checkpoint step: it must not be saved
    config.allow_config_change = True
    monkeypatch.setattr(step_lib, "classification_loss", lambda logits, targets: jnp.full((), jnp.nan))
    with pytest.raises(training.NonFiniteLossError,
                       match=r"non-finite training loss at step 25 .*last good checkpoint: step 24"):
        training.train(config, workdir)
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 24
    kept = read_checkpoint_params(workdir, 24)
    for path, value in good.items():
        assert np.isfinite(kept[path]).all()
        np.testing.assert_array_equal(value, kept[path], err_msg=path)


def test_demo_source_is_deterministic_and_multi_label():
    a = demo.SyntheticAudioSet("train", 64)
    b = demo.SyntheticAudioSet("train", 64)
    val = demo.SyntheticAudioSet("validation", 64)
    held_out = demo.SyntheticAudioSet("eval", 64)
    np.testing.assert_array_equal(a[7]["waveform"], b[7]["waveform"])
    assert not np.array_equal(a[7]["waveform"], val[7]["waveform"])
    assert not np.array_equal(val[7]["waveform"], held_out[7]["waveform"])
    assert a.targets.shape == (64, demo.NUM_CLASSES) and 1 <= a.targets.sum(1).min() and a.targets.sum(1).max() <= 3
    np.testing.assert_array_equal(a[7]["target"], a.targets[7])
    assert a[0]["waveform"].dtype == np.int16 and a[0]["waveform"].shape == (16_000,)


@pytest.mark.slow
def test_demo_config_reaches_validation_map(tmp_path):
    """The README's demo as shipped: 800 steps, about 5 minutes on a shared 2-core CPU (290 s measured)."""
    namespace: dict = {}
    exec((REPO / "configs" / "demo.py").read_text(), namespace)
    config = namespace["get_config"]()
    config.progress_bar = False
    start = time.perf_counter()
    result = training.train(config, tmp_path)
    print(f"demo: validation mAP {result['val_mAP']:.4f} in {time.perf_counter() - start:.0f} s")
    assert result["val_mAP"] >= 0.95
    assert (tmp_path / "model" / "best" / "metadata.json").is_file()
