"""``train.py --check`` and the command-line checks every run gets: a misspelt ``--config.KEY`` is one line naming
it and the closest key; ``--check`` does a run's set-up (config, data, distributed settings, workdir) and
reports one line, creating nothing."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from data_helpers import random_waveforms, write_packed_hdf5
from training_helpers import TINY_CONFIG, tiny_config

from convnext_audio_jax.artifacts import lock as lock_lib
from convnext_audio_jax.runtime.distributed import DistributedConfigError
from convnext_audio_jax.training import check
from convnext_audio_jax.training import config as config_lib
from convnext_audio_jax.training.config import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_train_py_misspelt_override_is_one_line_and_check_creates_nothing(tmp_path):
    config_file = tmp_path / "tiny.py"
    config_file.write_text(TINY_CONFIG)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "CONVNEXT_AUDIO_JAX_KEEP_FREED_MEMORY": "0"}

    def train_py(*flags):
        return subprocess.Popen([sys.executable, str(REPO / "train.py"), f"--config={config_file}", *flags],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    misspelt = train_py(f"--workdir={tmp_path / 'run'}", "--config.total_step=20")  # a training run, not --check
    checked = train_py("--workdir", str(tmp_path / "new" / "run"), "--check", "--config.total_steps=20")
    stdout, stderr = misspelt.communicate(timeout=240)
    assert misspelt.returncode == 1 and stdout == "", stdout
    assert stderr.strip() == (f"train.py: error: --config.total_step: {config_file} has no key 'total_step'; the "
                              "closest is 'total_steps'"), stderr
    stdout, stderr = checked.communicate(timeout=240)
    assert checked.returncode == 0, stderr
    (line,) = stdout.strip().splitlines()
    assert line.startswith("train.py: ok: data.train demo (256 clips), data.validation demo@validation (32 clips)"), line
    assert "1 process, 8 devices, batch 16 (16 per process, 1 micro-batch a step)" in line, line
    assert line.endswith(f"workdir {tmp_path / 'new' / 'run'} (new)"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.py"]  # neither workdir was created


def test_train_py_config_error_is_one_line_and_debug_shows_its_traceback(tmp_path):
    """A ConfigError (a UserError) is one line and exit 1; --debug or CONVNEXT_AUDIO_DEBUG=1 raise it instead."""
    config_file = tmp_path / "tiny.py"
    config_file.write_text(TINY_CONFIG)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "CONVNEXT_AUDIO_JAX_KEEP_FREED_MEMORY": "0"}
    env.pop("CONVNEXT_AUDIO_DEBUG", None)

    def train_py(workdir, *flags, **extra_env):
        return subprocess.Popen([sys.executable, str(REPO / "train.py"), f"--config={config_file}",
                                 f"--workdir={tmp_path / workdir}", "--config.total_steps=0", *flags],
                                cwd=REPO, env={**env, **extra_env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    runs = [train_py("plain"), train_py("flag", "--debug"), train_py("env", CONVNEXT_AUDIO_DEBUG="1")]
    (plain_out, plain_err), *debugged = [run.communicate(timeout=240) for run in runs]
    assert runs[0].returncode == 1 and plain_out == ""
    assert plain_err.strip() == "train.py: error: total_steps must be >= 1; got 0", plain_err
    for run, (_, stderr) in zip(runs[1:], debugged):
        assert run.returncode == 1
        assert "Traceback (most recent call last)" in stderr, stderr[-2000:]
        assert "ConfigError: total_steps must be >= 1; got 0" in stderr, stderr[-2000:]


def test_command_line_problem_reads_the_overrides_as_ml_collections_does(tmp_path):
    config_file = tmp_path / "tiny.py"
    config_file.write_text(TINY_CONFIG)
    argv = ["train.py", "--config", str(config_file), "--workdir=w"]
    assert check.command_line_problem(argv + ["--config.data.train=demo", "--config.model.overrides.dims=(1,)"]) is None
    assert check.command_line_problem(argv + ["--config.optimizer.peak_lr", "1"]) == (
        f"--config.optimizer.peak_lr: {config_file} has no key 'optimizer.peak_lr'; the closest is "
        "'optimizer.peak_learning_rate'")
    assert check.command_line_problem(argv + ["--noconfig.progres_bar"]).startswith("--config.progres_bar: ")
    assert check.command_line_problem(["train.py", "--config=configs/nope.py", "--config.seed=1"]) == (
        "--config configs/nope.py: no such file")
    assert check.command_line_problem(argv + ["--", "--config.not_a_flag=1"]) is None  # absl stops at --


def test_check_run_reports_the_first_problem_in_one_line(tmp_path):
    workdir = tmp_path / "run"
    summary = check.check_run(tiny_config(), workdir)
    assert summary.endswith(f"workdir {workdir} (new)") and not workdir.exists()
    workdir.mkdir()
    assert check.check_run(tiny_config(), workdir).endswith("(fresh)")
    assert list(workdir.iterdir()) == []

    def problem(error_type, config=None, path=workdir, **distributed) -> str:
        with pytest.raises(error_type) as error:
            check.check_run(config or tiny_config(), path, **distributed)
        assert "\n" not in str(error.value)
        return str(error.value)

    (tmp_path / "file").write_text("")
    assert problem(ConfigError, path=tmp_path / "file") == f"--workdir {tmp_path / 'file'} is a file: expected a folder (or a path to create)"
    assert problem(DistributedConfigError, coordinator="localhost", num_processes=2, process_id=0) == (
        "--coordinator must be HOST:PORT (e.g. node001:12345); got 'localhost'")
    assert problem(DistributedConfigError, coordinator="h:1", num_processes=2, process_id=1, local_device_ids="9",
                   layout="per_device") == "this process is to drive local device(s) [9], but it has 8 (per_device layout)"
    # Without joining, the job's devices are this process's times the processes: 2 x 8 does not divide batch 16 x 2.
    config = tiny_config()
    config.per_device_batch_size = 2
    assert "batch_size 16 is not a multiple of devices (16) x per_device_batch_size (2)" in problem(
        ConfigError, config, coordinator="h:1", num_processes=2, process_id=1)
    # The data is opened as training opens it: a packed 10 s / 32 kHz file does not fit the demo's 1 s / 16 kHz.
    packed = write_packed_hdf5(tmp_path / "packed.h5", random_waveforms(4), np.eye(4, 10, dtype=bool),
                               [f"clip{i}" for i in range(4)])
    config = tiny_config()
    config.data.train = str(packed)
    assert problem(ConfigError, config).startswith(f"data.train {str(packed)!r} holds clips of 320000 samples at 32000 Hz")
    config = tiny_config()
    config.init_from = str(tmp_path / "no_model")
    assert problem(ConfigError, config).startswith(f"init_from {str(tmp_path / 'no_model')!r} is no model directory")
    with lock_lib.WorkdirLock(workdir):
        assert problem(lock_lib.WorkdirLockedError).startswith(f"{workdir} is in use by another training run (pid {os.getpid()}")
    assert check.check_run(tiny_config(), workdir).endswith("(fresh)")  # the lock file alone blocks nothing


def test_check_run_on_a_resume_compares_config_and_process_count(tmp_path):
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "8" / "data").mkdir(parents=True)
    saved = config_lib.config_as_json(tiny_config())
    (workdir / config_lib.CONFIG_FILE).write_text(json.dumps(saved))
    assert check.check_run(tiny_config(), workdir).endswith("(resumes step 8)")
    config = tiny_config()
    config.total_steps = 48
    with pytest.raises(ConfigError, match=r"the config differs from .*config.json in keys that change the result "
                                          r"\(total_steps: 24 -> 48\)"):
        check.check_run(config, workdir)
    config.allow_config_change = True
    assert check.check_run(config, workdir).endswith("(resumes step 8)")
    (workdir / "checkpoints" / "8" / "data" / "process_0-of-2.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"was saved by a job of 2 processes .* this job has 1: resume with 2"):
        check.check_run(tiny_config(), workdir)
    assert sorted(p.name for p in workdir.iterdir()) == ["checkpoints", config_lib.CONFIG_FILE]
