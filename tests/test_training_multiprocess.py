"""Multi-process training and evaluation, proven with real processes on localhost (issue 12): ``train.py``
over 2 processes × 4 simulated CPU devices (joined with its flags, gloo collectives) against 1 process × 8
devices; the same 2-process run killed (SIGKILL) after a checkpoint and restarted; ``convnext-audio evaluate``
over 2 processes against 1; a process 40 s late meeting the others at sharding.barrier.

The runs are shared by the tests (module fixtures) and use a tiny demo config with SpecAugment, mixup and
speed perturbation on. Their persistent compilation cache is the module's own (not the test run's, which
tests/multiprocess.py keeps from its processes, nor the user's, which train.py's "auto" would pick): JAX writes
it from process 0 only, so a later 2-process run finds process 0's programs compiled and process 1's not; the
processes meet at the barriers that training and evaluation pass after compiling (sharding.barrier), not at a
first collective, where gloo would wait only 30 s for a peer still compiling.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import sys
import threading

import jax
import numpy as np
import pytest

from convnext_audio_jax.artifacts import model_dir as checkpoint
from convnext_audio_jax.data import spec as spec_lib
from convnext_audio_jax.evaluation import evaluate
from convnext_audio_jax.training import checkpointing
from convnext_audio_jax.training.config import ConfigError

sys.path.insert(0, os.path.dirname(__file__))
import distributed_worker  # noqa: E402
from multiprocess import process_env, run_group, run_jax_processes  # noqa: E402

# Real processes compiling the train step: minutes on the shared 2-core CPU.
pytestmark = pytest.mark.slow

# Resumed from step 2, the killed run trains 2 steps again: every step costs each of the 7 training processes.
TOTAL_STEPS = 4
CHECKPOINT_EVERY = 2
TRAIN_CLIPS = 128  # 4 steps × 16 examples × 2 mixup draws: one epoch, every clip read exactly once
TINY_CONFIG = f"""
from configs.demo import get_config as demo_config


def get_config():
    config = demo_config()  # speed perturbation, SpecAugment, mixup and drop path on
    config.model.overrides.dims = (8, 16, 32, 64)
    config.data.demo_train_clips = {TRAIN_CLIPS}
    config.data.demo_val_clips = 32
    config.data.eval = ""
    config.batch_size = 16
    config.eval_batch_size = 32
    config.total_steps = {TOTAL_STEPS}
    config.checkpoint_every = {CHECKPOINT_EVERY}
    config.eval_every = {TOTAL_STEPS}
    config.log_every = 1
    config.progress_bar = False
    config.compilation_cache = XLA_CACHE
    return config
"""
TIMEOUT = 600


@pytest.fixture(scope="module", autouse=True)
def late_job():
    """A 2-process job whose process 1 comes 40 s late to its first collective (tests/distributed_worker.py
    --late=40), started before this module's first test and read by its last: the 40 s asleep pass while the
    training runs do. Killed if nothing reads it (a run of some of the tests)."""
    read, stop = threading.Event(), threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        job = pool.submit(run_jax_processes, ["tests/distributed_worker.py", "--late=40"], 2, 1, timeout=TIMEOUT,
                          use_flags=True, kill_when=stop.is_set)

        def result():
            read.set()
            return job.result()

        yield result
        if not read.is_set():
            stop.set()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess_training")
    config = root / "tiny.py"
    config.write_text(TINY_CONFIG.replace("XLA_CACHE", repr(str(root / "xla"))))
    cache = {}  # extra environment of every process (see the module docstring)
    return root, config, cache


def train_args(config, workdir):
    return ["train.py", f"--config={config}", f"--workdir={workdir}"]


def logged_train_args(config, workdir, clips: pathlib.Path) -> list[str]:
    """train.py run by tests/train_logging_clips.py: each process appends the clip ids of every training batch it
    read to ``clips/clips-process<I>.jsonl`` ({"step", "ids"} lines)."""
    clips.mkdir()
    return ["tests/train_logging_clips.py", f"--clip_log={clips}", *train_args(config, workdir)[1:]]


@pytest.fixture(scope="module")
def single(setup):
    """1 process × 8 devices."""
    root, config, cache = setup
    workdir = root / "single"
    (result,) = run_group([[sys.executable, *logged_train_args(config, workdir, root / "single_clips")]],
                          [process_env(8, cache)], timeout=TIMEOUT)
    return workdir, root / "single_clips", result


@pytest.fixture(scope="module")
def double(setup):
    """2 processes × 4 devices, uninterrupted."""
    root, config, cache = setup
    workdir = root / "double"
    outputs = run_jax_processes(logged_train_args(config, workdir, root / "double_clips"), 2, 4, timeout=TIMEOUT,
                                use_flags=True, extra_env=cache)
    return workdir, root / "double_clips", outputs


def metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def losses(workdir) -> dict[int, float]:
    """The loss of each step (the last line for a step that a resume ran again)."""
    return {line["step"]: line["train_loss"] for line in metrics(workdir) if "train_loss" in line}


def final_variables(workdir) -> dict:
    _, variables, metadata = checkpoint.load_model(workdir / "model" / "last")
    assert metadata["provenance"]["step"] == TOTAL_STEPS
    return variables


def max_difference(a, b, relative: bool = False) -> float:
    """The largest |a − b| over the leaves; with ``relative``, each leaf's divided by its largest |b|."""
    def leaf(x, y):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        return float(np.max(np.abs(x - y)) / (max(np.max(np.abs(y)), 1e-30) if relative else 1.0))

    return max(jax.tree.leaves(jax.tree.map(leaf, a, b)))


def test_two_processes_train_exactly_as_one(single, double):
    """Same rows in the same order on the same global mesh, so the same computation, except for one thing: the
    all-reduces between the two processes go through gloo, which adds the devices' partial sums (gradients,
    BatchNorm statistics, the loss) in another order than XLA does within one process, so a sum may differ in
    its last bit (seen: the step-4 loss 6e-8 apart, parameters 3.7e-7 apart, BatchNorm running statistics one
    float32 step apart, e.g. 1.5e-5 on a variance of 166). Hence losses, parameters and mAP to 1e-6 (running
    statistics: relative), not bit for bit."""
    single_dir, single_clips, _ = single
    double_dir, double_clips, outputs = double
    for index, output in enumerate(outputs):
        assert f"as process {index} of 2 (flags/env, per_host, local devices all)" in output.stderr
    # Output from process 0 only.
    assert "final validation mAP" in outputs[0].stdout and "final validation mAP" not in outputs[1].stdout
    assert "validation mAP" not in outputs[1].stdout + outputs[1].stderr

    one, two = losses(single_dir), losses(double_dir)
    assert list(two) == list(range(1, TOTAL_STEPS + 1))
    assert list(two.values()) == pytest.approx(list(one.values()), rel=1e-6, abs=1e-7), (one, two)
    [val_one] = [line for line in metrics(single_dir) if "val_mAP" in line]
    [val_two] = [line for line in metrics(double_dir) if "val_mAP" in line]
    for key in ("val_mAP", "val_AUC", "val_d_prime"):
        assert val_two[key] == pytest.approx(val_one[key], abs=1e-6), key
    variables_one, variables_two = final_variables(single_dir), final_variables(double_dir)
    difference = max_difference(variables_two["params"], variables_one["params"])
    statistics = max_difference(variables_two["batch_stats"], variables_one["batch_stats"], relative=True)
    print(f"2 processes vs 1: max |loss difference| {max(abs(one[s] - two[s]) for s in one):.3g}, max |parameter "
          f"difference| {difference:.3g}, running statistics relative {statistics:.3g}, val mAP "
          f"{val_two['val_mAP']} vs {val_one['val_mAP']}")
    assert difference <= 1e-6 and statistics <= 1e-6

    # Each process read its own clips, disjoint, together the whole training split (one epoch), and stacked in
    # process order they are the single process's batches row for row.
    def read(folder, name):
        return {entry["step"]: entry["ids"] for entry in map(json.loads, (folder / name).read_text().splitlines())}

    reference = read(single_clips, "clips-process0.jsonl")
    shares = [read(double_clips, f"clips-process{index}.jsonl") for index in range(2)]
    first, second = (sum(share.values(), []) for share in shares)
    assert not set(first) & set(second)
    assert len(first) == len(second) == TRAIN_CLIPS // 2
    assert sorted(first + second) == sorted(sum(reference.values(), [])) and len(set(first + second)) == TRAIN_CLIPS
    assert all(shares[0][step] + shares[1][step] == reference[step] for step in reference)

    # One loader position per process in every checkpoint; metrics written once.
    assert [line["step"] for line in metrics(double_dir) if "train_loss" in line] == list(range(1, TOTAL_STEPS + 1))
    for step in range(CHECKPOINT_EVERY, TOTAL_STEPS + 1, CHECKPOINT_EVERY):
        data = double_dir / "checkpoints" / str(step) / "data"
        assert sorted(p.name for p in data.glob("process_*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]
        for index in range(2):  # 8 examples × 2 mixup draws per process per step
            assert json.loads((data / f"process_{index}-of-2.json").read_text())["loader"]["grain"] == {"next_index": 16 * step}


def test_killed_and_restarted_equals_uninterrupted(setup, double):
    root, config, cache = setup
    workdir = root / "killed"
    finished_checkpoint = workdir / "checkpoints" / "2" / "data" / "process_1-of-2.json"
    killed = run_jax_processes(train_args(config, workdir), 2, 4, timeout=TIMEOUT, use_flags=True, extra_env=cache,
                               kill_when=finished_checkpoint.is_file)
    assert [output.returncode for output in killed] == [None, None]  # both killed mid-run
    assert not (workdir / "model" / "last").exists()
    resumed = run_jax_processes(train_args(config, workdir), 2, 4, timeout=TIMEOUT, use_flags=True, extra_env=cache)
    assert "resumed from" in resumed[0].stderr and "resumed from" not in resumed[1].stderr
    double_dir = double[0]
    assert losses(workdir) == losses(double_dir)
    assert max_difference(final_variables(workdir), final_variables(double_dir)) == 0.0


def test_resume_with_another_process_count_is_refused(double):
    """The 2-process run's checkpoints hold one loader position per process: this 1-process job may not use them."""
    checkpoints = double[0] / "checkpoints"
    checkpointer = checkpointing.Checkpointer(checkpoints, keep=3)
    try:
        with pytest.raises(ConfigError, match=rf"^checkpoint {checkpoints / str(TOTAL_STEPS)} was saved by a job of 2 "
                                              r"processes .*; this job has 1: resume with 2 processes$"):
            checkpointer.check_process_count(TOTAL_STEPS)
    finally:
        checkpointer.close()


def test_evaluate_over_two_processes_equals_one(setup, double):
    root, _, cache = setup
    model_dir = double[0] / "model" / "last"
    output = root / "evaluation"
    args = ["-m", "convnext_audio_jax.cli", "evaluate", f"--checkpoint={model_dir}", "--data=demo@validation",
            "--batch-size=32", f"--output={output}", "--no-progress", f"--compilation-cache={root / 'xla'}"]
    outputs = run_jax_processes(args, 2, 4, timeout=TIMEOUT, use_flags=True, extra_env=cache)
    assert "evaluate:" in outputs[0].stdout and "evaluate:" not in outputs[1].stdout
    two = json.loads((output / evaluate.METRICS_FILE).read_text())

    model, variables, metadata = checkpoint.load_model(model_dir)
    options = spec_lib.DataOptions(demo_sample_rate=model.frontend.sample_rate,
                                   demo_clip_seconds=model.frontend.clip_seconds)
    source, names = evaluate.open_data_spec("demo@validation", options=options)
    one = evaluate.evaluate(model, variables, source, 32, class_names=names or metadata.get("class_names"),
                            progress=False)
    assert two["num_clips"] == len(source) and two["num_skipped"] == 0
    for key in ("mAP", "AUC", "d_prime", "num_clips", "num_evaluated_classes"):
        assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-7), key
    np.testing.assert_allclose([c["AP"] for c in two["per_class"]], [c["AP"] for c in one["per_class"]], rtol=1e-6)


def test_a_process_40_s_late_meets_the_others_at_the_barrier(late_job):
    """A process 40 s late (a slower compile on a loaded host) still meets the others: gloo alone gives a late
    process 30 s before the first collective fails, so the train loop and evaluation meet at sharding.barrier."""
    first, second = distributed_worker.results(late_job())
    assert first["int_sum"] == second["int_sum"] == int(distributed_worker.global_data()[0].sum())
