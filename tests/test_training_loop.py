"""The training loop end to end on the tiny demo config cut to 8 steps: kill/resume bit-identity (also with SIGKILL while an
orbax temporary directory exists, and on a packed HDF5 source with corrupt clips, the balanced sampler and 4
read threads), NaN stop / skip_batch, the model directories, config.json and the resume check, the best mAP
across a resume, and the demo's mAP (slow)."""

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
from data_helpers import damage_hdf5_clips, random_waveforms, write_packed_hdf5
from flax import traverse_util
from training_helpers import TINY_CONFIG, load_config

from convnext_audio_jax import training
from convnext_audio_jax.artifacts import model_dir as checkpoint
from convnext_audio_jax.data import demo
from convnext_audio_jax.training import config as config_lib
from convnext_audio_jax.training import loop, optimizer
from convnext_audio_jax.training import step as step_lib

REPO = pathlib.Path(__file__).resolve().parents[1]

# The shared tiny config cut to 8 steps: a checkpoint every 2 (the first kill lands after step 2), an evaluation
# every 4, and 96 training clips, so the runs still cross epoch boundaries (32 rows a step with mixup) after the
# kill. The resume mechanisms do not depend on the run's length; every run here (the steady-state one too)
# compiles the same programs, so the persistent XLA cache serves all but the first.
LOOP_CONFIG = TINY_CONFIG.replace("    return config\n", """    config.data.demo_train_clips = 96
    config.total_steps = 8
    config.checkpoint_every = 2
    config.eval_every = 4
    return config
""")
assert LOOP_CONFIG != TINY_CONFIG


def tiny_config():
    return load_config(LOOP_CONFIG)


@pytest.fixture(scope="module")
def tiny_config_file(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("configs") / "tiny.py"
    path.write_text(LOOP_CONFIG)
    return path


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory) -> pathlib.Path:
    """The loop config trained for its 8 steps without interruption."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    training.train(tiny_config(), workdir)
    return workdir


def read_checkpoint_state(workdir: pathlib.Path, step: int) -> dict:
    """The whole saved train state (params, batch_stats, opt_state, step, rng) as {"['params']['bn0']...": array}."""
    restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    return {jax.tree_util.keystr(path): np.asarray(value)
            for path, value in jax.tree_util.tree_flatten_with_path(restored)[0]}


def read_checkpoint_params(workdir: pathlib.Path, step: int) -> dict:
    restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    return traverse_util.flatten_dict(restored["params"], sep="/")


def read_loader_state(workdir: pathlib.Path, step: int) -> dict:
    """What the checkpoint holds for the data loader (grain position, skip counts and ids) and the loop."""
    return json.loads((workdir / "checkpoints" / str(step) / "data" / "process_0-of-1.json").read_text())


def finished_steps(workdir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def start_train_py(config_file: pathlib.Path, workdir: pathlib.Path, prelude: str = "",
                   env: dict | None = None) -> subprocess.Popen:
    """``train.py`` in a child process (to be killed); ``prelude`` is Python run in the child first (a patch)."""
    runner = f"{prelude}\nimport runpy, sys\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')"
    command = [sys.executable, "-c", runner, str(REPO / "train.py"), f"--config={config_file}", f"--workdir={workdir}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}  # with the run's XLA cache (tests/conftest.py)
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_when(process: subprocess.Popen, condition, timeout: float = 240) -> None:
    """SIGKILL ``process`` as soon as ``condition()`` holds (polled every 20 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None and not condition():
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]


def assert_same_arrays(expected: dict, got: dict) -> None:
    assert sorted(expected) == sorted(got)
    for path, value in expected.items():
        np.testing.assert_array_equal(value, got[path], err_msg=path)


def metrics_lines(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_config_metrics_and_loadable_model_directories(uninterrupted_run):
    config = tiny_config()
    saved = json.loads((uninterrupted_run / "config.json").read_text())
    assert saved == config_lib.config_as_json(config)
    lines = metrics_lines(uninterrupted_run)
    evaluations = [line for line in lines if "val_mAP" in line]
    assert [line["step"] for line in evaluations] == [4, 8]
    assert all(line["val_skipped"] == 0 and "eval_mAP" in line for line in evaluations)  # eval reported each time
    assert any("train_skipped" in line and "learning_rate" in line for line in lines)

    _, last, metadata = checkpoint.load_model(uninterrupted_run / "model" / "last")
    assert metadata["provenance"]["step"] == 8 and metadata["class_names"] == list(demo.CLASS_NAMES)
    assert metadata["sample_rate"] == 16_000 and metadata["provenance"]["config"]["batch_size"] == 16
    final = read_checkpoint_params(uninterrupted_run, 8)
    for path, value in traverse_util.flatten_dict(last["params"], sep="/").items():
        np.testing.assert_array_equal(value, final[path], err_msg=path)
    _, _, best_metadata = checkpoint.load_model(uninterrupted_run / "model" / "best")
    best_step = max(evaluations, key=lambda line: line["val_mAP"])["step"]
    assert best_metadata["provenance"]["step"] == best_step
    assert best_metadata["provenance"]["validation"]["val_mAP"] == max(line["val_mAP"] for line in evaluations)


def test_killed_and_resumed_run_is_bit_identical(tiny_config_file, uninterrupted_run, tmp_path):
    config = tiny_config()
    uninterrupted = uninterrupted_run
    resumed = tmp_path / "resumed"
    process = start_train_py(tiny_config_file, resumed)
    checkpoints = resumed / "checkpoints"
    kill_when(process, lambda: checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()))
    killed_at = finished_steps(resumed)[-1]
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


# In the child: the save of step 4 stalls while its orbax temporary directory exists (grain asks the loader
# for its state inside the save, after orbax created the directory), so the kill lands mid-save every time.
STALL_SAVE_OF_STEP_4 = """
import os, pathlib, time
from convnext_audio_jax.training import checkpointing
_get_state = checkpointing.LoaderCheckpoint.get_state
def _stalling_get_state(self):
    folder = pathlib.Path(os.environ["STALL_CHECKPOINTS"])
    if any(p.name.startswith("4.orbax-checkpoint-tmp") for p in folder.iterdir()):
        time.sleep(600)
    return _get_state(self)
checkpointing.LoaderCheckpoint.get_state = _stalling_get_state
"""


def test_kill_during_an_orbax_save_resumes_from_the_last_finished_step(tiny_config_file, uninterrupted_run,
                                                                       tmp_path):
    """SIGKILL while step 4's checkpoint is an orbax temporary directory: the resume starts from step 2 (the
    last finished save), and the final params, batch_stats, opt_state, step and rng are bitwise those of an
    uninterrupted run."""
    config = tiny_config()
    workdir = tmp_path / "run"
    checkpoints = workdir / "checkpoints"
    process = start_train_py(tiny_config_file, workdir, prelude=STALL_SAVE_OF_STEP_4,
                             env={"STALL_CHECKPOINTS": str(checkpoints)})

    def saving_step_4():
        return checkpoints.is_dir() and any(p.name.startswith("4.orbax-checkpoint-tmp") for p in checkpoints.iterdir())

    kill_when(process, saving_step_4)
    temporary = [p.name for p in checkpoints.iterdir() if not p.name.isdigit()]
    assert temporary and all(name.startswith("4.orbax-checkpoint-tmp") for name in temporary), temporary
    assert finished_steps(workdir) == [2]

    training.train(config, workdir)
    assert not any(".orbax-checkpoint-tmp" in p.name for p in checkpoints.iterdir())
    first = [line["step"] for line in metrics_lines(workdir) if "train_loss" in line]
    assert first.count(2) == 1 and first.count(3) == 2  # logged again from step 3 on: resumed at 2
    final = read_checkpoint_state(workdir, config.total_steps)
    assert {path.split("'")[1] for path in final} == {"params", "batch_stats", "opt_state", "step", "rng"}
    assert_same_arrays(read_checkpoint_state(uninterrupted_run, config.total_steps), final)


HDF5_CLIPS = 48
UNREADABLE_CLIPS = (3, 11, 20, 33)  # damaged gzip chunks
EMPTY_CLIPS = (7, 40)  # all-zero rows, as PANNs' packer leaves missing clips

HDF5_CONFIG = """
from configs.demo import get_config as demo_config


def get_config():
    config = demo_config()
    config.model.overrides.dims = (8, 16, 32, 64)
    config.model.frontend.sample_rate = 32_000  # packed HDF5 clips: 10 s at 32 kHz
    config.model.frontend.clip_seconds = 10.0
    config.model.frontend.hop_length = 1600  # 201 STFT frames: cheap
    config.data.train = {train!r}
    config.data.validation = "holdout:8"
    config.data.eval = ""
    config.data.sampling = "balanced"
    config.data.read_threads = 4
    config.data.max_skip_fraction = 0.5
    config.batch_size = 16
    config.eval_batch_size = 8
    config.total_steps = 6
    config.checkpoint_every = 2
    config.eval_every = 6
    config.log_every = 1
    config.progress_bar = False
    return config
"""


def write_damaged_hdf5(path: pathlib.Path) -> pathlib.Path:
    rng = np.random.default_rng(3)
    waveforms = (random_waveforms(HDF5_CLIPS, seed=3) // 8).astype(np.int16)
    waveforms[list(EMPTY_CLIPS)] = 0
    targets = np.zeros((HDF5_CLIPS, 5), bool)
    targets[np.arange(HDF5_CLIPS), rng.integers(0, 5, HDF5_CLIPS)] = True
    targets[::7, 4] = True
    write_packed_hdf5(path, waveforms, targets, [f"Y{i:02d}" for i in range(HDF5_CLIPS)], compression="gzip")
    return damage_hdf5_clips(path, UNREADABLE_CLIPS)


def test_kill_and_resume_on_hdf5_with_corrupt_clips_balanced_sampler_and_read_threads(tmp_path):
    """Packed HDF5 with damaged and all-zero clips, PANNs' balanced sampler, 4 read threads: a run killed
    after its first checkpoint and resumed ends with the params and the skip counts (per reason, with the
    clip ids) of an uninterrupted run."""
    source = write_damaged_hdf5(tmp_path / "packed.h5")
    config_file = tmp_path / "hdf5.py"
    config_file.write_text(HDF5_CONFIG.format(train=str(source)))
    config = load_config(config_file)

    uninterrupted = tmp_path / "uninterrupted"
    training.train(config, uninterrupted)
    resumed = tmp_path / "resumed"
    process = start_train_py(config_file, resumed)
    checkpoints = resumed / "checkpoints"
    kill_when(process, lambda: checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()))
    killed_at = finished_steps(resumed)[-1]
    assert killed_at < config.total_steps
    training.train(config, resumed)

    assert_same_arrays(read_checkpoint_params(uninterrupted, config.total_steps),
                       read_checkpoint_params(resumed, config.total_steps))
    expected = read_loader_state(uninterrupted, config.total_steps)["loader"]
    got = read_loader_state(resumed, config.total_steps)["loader"]
    assert got["skipped"] == expected["skipped"] and got["skipped_ids"] == expected["skipped_ids"]
    assert expected["skipped"].get("unreadable", 0) > 0 and expected["skipped"].get("empty", 0) > 0
    assert {clip_id for clip_id, _, _ in expected["skipped_ids"]} <= {f"Y{i:02d}" for i in UNREADABLE_CLIPS + EMPTY_CLIPS}

    def skips(workdir):
        return {line["step"]: line["train_skipped"] for line in metrics_lines(workdir) if "train_skipped" in line}

    assert {s: v for s, v in skips(resumed).items() if s > killed_at} == {
        s: v for s, v in skips(uninterrupted).items() if s > killed_at}


def test_resume_with_a_changed_batch_size_is_refused_unless_allowed(uninterrupted_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted_run, workdir)
    config = tiny_config()
    config.batch_size = 32
    config.total_steps = 10
    config.eval_every = 10
    with pytest.raises(training.ConfigError, match=r"batch_size: 16 -> 32.*total_steps: 8 -> 10"):
        training.train(config, workdir)
    assert json.loads((workdir / "config.json").read_text())["batch_size"] == 16  # left as it was

    config.allow_config_change = True
    result = training.train(config, workdir)
    assert result["step"] == 10
    changes = [line for line in metrics_lines(workdir) if "config_change" in line]
    assert changes == [{"step": 8, "config_change": {"batch_size": [16, 32], "total_steps": [8, 10]}}]
    # The best validation mAP of the first 8 steps is read back, not reset.
    first_best = max(line["val_mAP"] for line in metrics_lines(uninterrupted_run) if "val_mAP" in line)
    assert result["best_val_mAP"] >= first_best
    assert json.loads((workdir / "config.json").read_text())["batch_size"] == 32


def test_nan_loss_stops_the_run_and_a_skip_batch_resume_skips_then_stops(uninterrupted_run, tmp_path, monkeypatch):
    """on_nonfinite = "stop": the NaN step stops the run, nothing after step 8 is saved and the message says
    how to resume with skip_batch. Resumed so: steps 9, 10, 11 are skipped (state kept bit for bit,
    counted in metrics.jsonl and in the checkpoints) and the run stops at the third in a row."""
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted_run, workdir)  # a finished 8-step run, continued to 14 steps
    good = read_checkpoint_state(workdir, 8)
    config = tiny_config()
    config.total_steps = 14
    config.checkpoint_every = 1  # the NaN step is itself a checkpoint step: it must not be saved
    config.allow_config_change = True
    monkeypatch.setattr(step_lib, "classification_loss", lambda logits, targets: jnp.full((), jnp.nan))  # grad norm 0
    with pytest.raises(training.NonFiniteLossError,
                       match=r"^non-finite training loss at step 9 \(loss nan, grad norm 0.0\); stopped; last good "
                             r"checkpoint: step 8 in .*; to skip such steps, resume with "
                             r"--config.on_nonfinite=skip_batch$"):
        training.train(config, workdir)
    assert finished_steps(workdir)[-1] == 8
    kept = read_checkpoint_state(workdir, 8)
    assert all(np.isfinite(value).all() for path, value in kept.items() if path.startswith("['params']"))
    assert_same_arrays(good, kept)

    config.on_nonfinite = "skip_batch"  # result-neutral: no config_change entry needed
    config.max_nonfinite_in_a_row = 3
    with pytest.raises(training.NonFiniteLossError,
                       match=r"^3 steps in a row \(steps 9 to 11\) had a non-finite loss or gradient norm \(last: "
                             r"loss nan, grad norm 0.0\); their updates were skipped .*; stopped; last good "
                             r"checkpoint: step 10 in "):
        training.train(config, workdir)
    assert finished_steps(workdir)[-1] == 10
    for step in (9, 10):
        saved = read_checkpoint_state(workdir, step)
        assert int(saved["['step']"]) == step
        assert_same_arrays({p: v for p, v in good.items() if p != "['step']"},
                           {p: v for p, v in saved.items() if p != "['step']"})
        assert read_loader_state(workdir, step)["run"] == {"nonfinite_skipped": step - 8,
                                                           "nonfinite_in_a_row": step - 8}
    lines = [line for line in metrics_lines(workdir) if line["step"] > 8]
    assert [(line["step"], line["nonfinite_in_a_row"]) for line in lines if "nonfinite_in_a_row" in line] == [
        (9, 1), (10, 2), (11, 3)]
    regular = [line for line in lines if "learning_rate" in line]
    assert [line["step"] for line in regular] == [9, 10]  # step 11 stopped before its log line
    assert all("train_loss" not in line for line in regular)  # no NaN token in the JSON
    assert [line["nonfinite_skipped"] for line in regular] == [1, 2]
    # No update was applied: the logged rate stays that of the schedule's step 8.
    lr_8 = optimizer.host_learning_rate(config.optimizer, config.total_steps, 8)
    assert all(line["learning_rate"] == lr_8 for line in regular)


def test_steady_state_never_waits_on_the_device(tmp_path, monkeypatch):
    """The metrics of the steps come back in one ``device_get`` every ``log_every`` steps (and before a
    checkpoint), each step's values kept; the step loop dispatches under ``jax.transfer_guard("disallow")`` (as
    big_vision runs its loop), so a batch that was not put on the devices ahead raises instead of being copied
    on the training thread. (XLA:CPU's arrays live in host memory, so the guard cannot see a device-to-host read
    here; the fetch count is the proof of that side.)"""
    config = tiny_config()  # its programs are the uninterrupted run's: only host-side settings change
    config.log_every, config.checkpoint_every, config.eval_every = 3, 8, 8
    fetches = []
    real_device_get = jax.device_get

    def counting_device_get(tree):
        if isinstance(tree, list) and tree and isinstance(tree[0], dict) and "grad_norm" in tree[0]:
            fetches.append(len(tree))
        return real_device_get(tree)

    monkeypatch.setattr(jax, "device_get", counting_device_get)
    training.train(config, tmp_path / "run")
    assert fetches == [3, 3, 2]  # steps 1-3, 4-6, 7-8 (the checkpoint at 8)
    assert [line["step"] for line in metrics_lines(tmp_path / "run") if "train_loss" in line] == [3, 6, 8]

    monkeypatch.setattr(step_lib, "global_batch", lambda local, mesh: {key: local[key] for key in ("waveform", "target")})
    with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
        training.train(config, tmp_path / "host_batches")


def test_metrics_log_starts_a_new_line_after_one_cut_short_by_a_kill(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 3, "train_loss": 0.5}\n{"step": 4, "train_lo')
    log = loop.MetricsLog(tmp_path)
    log.write(4, {"train_loss": 0.25})
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines == ['{"step": 3, "train_loss": 0.5}', '{"step": 4, "train_lo', '{"step": 4, "train_loss": 0.25}']
    assert loop.best_logged_metric(tmp_path, 10) == -float("inf")  # the cut line is skipped, not fatal


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
def test_demo_config_reaches_validation_map(demo_run):
    """The README's demo as shipped: 800 steps (371 s measured on the quiet 2-core Xeon, 8 simulated devices).
    The run is the session's ``demo_run`` fixture, which the distillation experiment also uses as its teacher."""
    print(f"demo: validation mAP {demo_run['result']['val_mAP']:.4f} in {demo_run['seconds']:.0f} s")
    assert demo_run["result"]["val_mAP"] >= 0.95
    assert (demo_run["workdir"] / "model" / "best" / "metadata.json").is_file()
