"""End to end, as a user runs it: a folder of recordings + a clip list → ``convnext-audio prepare`` → ``train.py``
(a tiny ConvNeXt, a few steps at 32 kHz) → ``evaluate``, ``tag``, ``embed`` and ``convert --to-torch`` from the
training workdir → the PyTorch reference with those weights scores the audio as ``tag`` did. And the demo's user
story: the workdir of ``train.py --config configs/demo.py`` (16 kHz, 1 s windows, its own class names; the session's
demo run) → ``tag`` and ``embed`` from the workdir."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch
from data_helpers import write_class_labels

from convnext_audio_jax import cli
from convnext_audio_jax.artifacts import model_dir as checkpoint
from convnext_audio_jax.convert import load_torch_state_dict
from convnext_audio_jax.convert.torch_reference import build_reference
from convnext_audio_jax.data import audio as audio_lib
from convnext_audio_jax.data import demo

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}
LABELS = ("Speech", "Music", "Animal")  # names from data_helpers.CLASSES (the first, third and fourth)

FOLDER_CONFIG = """
from convnext_audio_jax.training.config import default_config


def get_config():
    config = default_config()
    config.model.name = "convnext_tiny"
    config.model.overrides.depths = {depths}
    config.model.overrides.dims = {dims}
    config.model.drop_path_rate = 0.0
    config.data.train = "{prepared}@train"
    config.data.validation = "{prepared}@val"
    config.data.eval = ""
    config.data.sampling = "shuffle"
    config.batch_size = 8
    config.per_device_batch_size = 0
    config.eval_batch_size = 8
    config.total_steps = 4
    config.checkpoint_every = 4
    config.eval_every = 4
    config.log_every = 1
    config.progress_bar = False
    return config
"""


def train_py(config: pathlib.Path | str, workdir: pathlib.Path, *overrides: str) -> None:
    """train.py in a subprocess, with the run's XLA cache (tests/conftest.py)."""
    command = [sys.executable, str(REPO / "train.py"), f"--config={config}", f"--workdir={workdir}", *overrides]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def run_cli(capsys, *argv) -> tuple[str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out, captured.err


def decoded_window(path: pathlib.Path, sample_rate: int, window: int) -> np.ndarray:
    """The one window ``tag`` scores for a file no longer than a window: decoded, resampled, zero-padded."""
    _, blocks = audio_lib.stream_mono(path, target_rate=sample_rate)
    samples = np.concatenate(list(blocks))
    assert samples.shape[0] <= window
    padded = np.zeros(window, np.float32)
    padded[: samples.shape[0]] = samples
    return padded


def test_folder_prepare_train_evaluate_tag_embed_convert_and_pytorch_parity(tmp_path, freedesktop_recordings, capsys):
    recordings = freedesktop_recordings[:12]  # all shorter than one 10 s window
    folder = recordings[0].parent
    labels_csv = write_class_labels(tmp_path / "class_labels_indices.csv",
                                    [("/m/09x0r", "Speech"), ("/m/04rlf", "Music"), ("/m/0jbk", "Animal")])
    rows = [f"{path.name},{LABELS[i % 3]}" + (f";{LABELS[(i + 1) % 3]}" if i % 4 == 0 else "")
            for i, path in enumerate(recordings)]
    (tmp_path / "train.csv").write_text("path,labels\n" + "\n".join(rows[: len(rows) * 2 // 3]) + "\n")
    (tmp_path / "val.csv").write_text("path,labels\n" + "\n".join(rows[len(rows) * 2 // 3 :]) + "\n")
    prepared = tmp_path / "prepared"
    for split in ("train", "val"):
        run_cli(capsys, "prepare", "--audio-dir", folder, "--segments", tmp_path / f"{split}.csv", "--labels",
                labels_csv, "--output", prepared, "--min-seconds", 0.05, "--workers", 1, "--no-progress")

    config = tmp_path / "folder_config.py"
    config.write_text(FOLDER_CONFIG.format(prepared=prepared.as_posix(), **TINY))
    workdir = tmp_path / "workdir"
    train_py(config, workdir)
    assert (workdir / "model" / "best" / "metadata.json").is_file() and (workdir / "config.json").is_file()
    _, _, metadata = checkpoint.load_model(workdir)
    assert metadata["class_names"] == list(LABELS) and metadata["sample_rate"] == 32_000

    # evaluate from the workdir, on the prepared validation split (class names compared, not just counts).
    out, err = run_cli(capsys, "evaluate", "--checkpoint", workdir, "--data", f"{prepared}@val",
                       "--output", tmp_path / "evaluation", "--batch-size", 8, "--no-progress")
    assert "training workdir: using" in err and "model/best" in err and "mAP" in out
    assert any((tmp_path / "evaluation").iterdir())

    # tag and embed from the workdir: names from the model, no --labels.
    chosen = recordings[:3]
    tags = tmp_path / "tags.jsonl"
    run_cli(capsys, "tag", *chosen, "--checkpoint", workdir, "--format", "jsonl", "--output", tags,
            "--all-scores", "--no-progress")
    records = {r["file"]: r for r in map(json.loads, tags.read_text().splitlines())}
    assert set(records) == {str(p) for p in chosen}
    for record in records.values():
        assert set(record["scores"]) == set(LABELS) and record["model_sample_rate"] == 32_000
    embeddings = tmp_path / "scene.npz"
    run_cli(capsys, "embed", *chosen, "--checkpoint", workdir, "--output", embeddings, "--no-progress")
    with np.load(embeddings) as stored:
        assert stored["embeddings"].shape == (3, TINY["dims"][-1]) and np.isfinite(stored["embeddings"]).all()

    # convert --to-torch from the workdir; the authors' PyTorch model with those weights scores the same audio.
    state_path = tmp_path / "back.pth"
    run_cli(capsys, "convert", workdir, state_path, "--to-torch")
    reference = build_reference("convnext_tiny", num_classes=len(LABELS), **TINY)
    reference.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in load_torch_state_dict(state_path).items()},
                              strict=True)
    windows = np.stack([decoded_window(p, 32_000, 320_000) for p in chosen])
    with torch.no_grad():
        expected = reference(torch.from_numpy(windows))["clipwise_output"].numpy()
    for row, path in enumerate(chosen):
        got = np.array([records[str(path)]["scores"][name] for name in LABELS])
        np.testing.assert_allclose(got, expected[row], atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def demo_workdir(demo_run) -> pathlib.Path:
    """The README's first command's workdir: configs/demo.py as shipped, trained once per session by the
    ``demo_run`` fixture (tests/conftest.py), which the demo and distillation tests train anyway (train.py's own
    command line is run above, by the folder test). Only read here."""
    return demo_run["workdir"]


def test_demo_user_story_train_then_tag_and_embed_from_the_workdir(demo_workdir, freedesktop_recordings, tmp_path,
                                                                   capsys):
    """Then ``convnext-audio tag some.wav --checkpoint WORKDIR``: the 16 kHz demo model gets files resampled to
    its rate and cut into its 1 s windows, and its class names come from the model."""
    model, _, metadata = checkpoint.load_model(demo_workdir)
    assert model.frontend.sample_rate == 16_000 and model.frontend.clip_samples == 16_000  # stored, read back
    assert metadata["class_names"] == list(demo.CLASS_NAMES)

    recording = max(freedesktop_recordings, key=lambda p: soundfile.info(p).duration)  # several 1 s windows
    assert soundfile.info(recording).samplerate != 16_000
    out, err = run_cli(capsys, "tag", recording, "--checkpoint", demo_workdir, "--threshold", 0, "--top-k", 3,
                       "--no-progress")
    assert "training workdir: using" in err
    assert "resampled to 16000 Hz" in out and any(name in out for name in demo.CLASS_NAMES)

    tags = tmp_path / "tags.json"
    run_cli(capsys, "tag", recording, "--checkpoint", demo_workdir, "--format", "json", "--output", tags,
            "--hop", 0.5, "--frames", "--no-progress")
    [record] = json.loads(tags.read_text())
    _, blocks = audio_lib.stream_mono(recording, target_rate=16_000)
    samples = sum(block.shape[0] for block in blocks)
    assert record["duration_s"] == pytest.approx(samples / 16_000, abs=1e-4) and record["window_s"] == 1.0
    expected_windows = 1 if samples <= 16_000 else -(-(samples - 16_000) // 8_000) + 1
    assert record["num_windows"] == expected_windows == len(record["windows"]) > 1
    assert all(w["end"] - w["start"] <= 1.0 + 1e-6 for w in record["windows"])

    embeddings = tmp_path / "logits.npz"
    run_cli(capsys, "embed", recording, "--checkpoint", demo_workdir, "--kind", "logits", "--hop", 0.5,
            "--output", embeddings, "--no-progress")
    with np.load(embeddings) as stored:
        assert list(stored["class_names"]) == list(demo.CLASS_NAMES)
        assert stored["embeddings"].shape == (expected_windows, len(demo.CLASS_NAMES))
        np.testing.assert_allclose(stored["window_start_s"], [w["start"] for w in record["windows"]], atol=1e-4)


FAKE_NAME = "e2e_registered_name"  # not a path: checkpoint.resolve_model_dir asks pretrained.resolve


@pytest.fixture
def pretrained_name(demo_workdir, monkeypatch) -> str:
    """A registered pretrained name, faked at the hook every consumer goes through: ``pretrained.resolve`` (which
    would download and convert) gives the demo's model/best for it."""
    from convnext_audio_jax.hub import pretrained

    real = pretrained.resolve
    target = demo_workdir / "model" / "best"
    monkeypatch.setattr(pretrained, "resolve",
                        lambda name, **kw: target if os.fspath(name) == FAKE_NAME else real(name, **kw))
    assert not os.path.exists(FAKE_NAME)
    return FAKE_NAME


@pytest.mark.parametrize("form", ["model_dir", "workdir", "pretrained"])
def test_every_consumer_takes_a_model_dir_a_workdir_and_a_pretrained_name(form, demo_workdir, pretrained_name,
                                                                          tmp_path, capsys, monkeypatch):
    import jax

    from convnext_audio_jax import export, hear
    from convnext_audio_jax.evaluation import predict
    from convnext_audio_jax.models import init_variables
    from convnext_audio_jax.runtime.sharding import data_mesh
    from convnext_audio_jax.training import checkpointing
    from convnext_audio_jax.training import step as step_lib

    given = {"model_dir": demo_workdir / "model" / "last", "workdir": demo_workdir, "pretrained": pretrained_name}[form]
    directory = demo_workdir / "model" / ("last" if form == "model_dir" else "best")
    model, variables, _ = checkpoint.load_model(directory)
    head = np.asarray(variables["params"]["head"]["kernel"])

    run_cli(capsys, "convert", given, tmp_path / "back.safetensors", "--to-torch")
    np.testing.assert_array_equal(load_torch_state_dict(tmp_path / "back.safetensors")["head_audioset.weight"], head.T)

    exported = {}

    def fake_export(m, v, fmt, output, metadata, overwrite):  # what export would write, not the lowering itself
        exported.update(model=m, head=np.asarray(v["params"]["head"]["kernel"]))
        pathlib.Path(output).write_bytes(b"exported")
        return {"model": metadata["model"], "input_shape": ["batch", 16_000], "output_names": ["probs"]}

    monkeypatch.setattr(export, "export", fake_export)
    run_cli(capsys, "export", given, "--format", "onnx", "--output", tmp_path / "model.onnx")
    assert exported["model"] == model
    np.testing.assert_array_equal(exported["head"], head)

    hear_model = hear.load_model(os.fspath(given), batch_size=8)
    assert hear_model.jax_model == model and hear_model.model_rate == 16_000

    [(name, member_model, member_variables)] = predict.load_members([os.fspath(given)])
    assert name == str(directory.absolute()) and member_model == model
    np.testing.assert_array_equal(member_variables["params"]["head"]["kernel"], head)

    fresh = init_variables(model, jax.random.key(1))
    state = step_lib.TrainState(step=np.zeros((), np.int32), params=fresh["params"],
                                batch_stats=fresh["batch_stats"], opt_state={}, rng=np.zeros(2, np.uint32))
    loaded = checkpointing.load_init(state, os.fspath(given), ("head",), data_mesh())
    np.testing.assert_array_equal(np.asarray(loaded.params["head"]["kernel"]), fresh["params"]["head"]["kernel"])
    np.testing.assert_array_equal(np.asarray(loaded.params["head_norm"]["scale"]),
                                  variables["params"]["head_norm"]["scale"])


def test_evaluate_tag_and_embed_take_a_pretrained_name(pretrained_name, demo_workdir, freedesktop_recordings, tmp_path,
                                                      capsys):
    """docs/train.md's third command with a name instead of the workdir: ``evaluate --data demo@validation``
    rebuilds the demo at the model's rate and length; the names come from the model."""
    out, _ = run_cli(capsys, "evaluate", "--checkpoint", pretrained_name, "--data", "demo@validation",
                     "--output", tmp_path / "evaluation", "--no-progress")
    assert "512 clips" in out and "mAP" in out
    shortest = min(freedesktop_recordings, key=lambda p: soundfile.info(p).duration)  # one 1 s window
    out, _ = run_cli(capsys, "tag", shortest, "--checkpoint", pretrained_name, "--threshold", 0, "--top-k", 2,
                     "--no-progress")
    assert any(name in out for name in demo.CLASS_NAMES)
    run_cli(capsys, "embed", shortest, "--checkpoint", pretrained_name, "--output", tmp_path / "scene.npz",
            "--no-progress")
    _, variables, _ = checkpoint.load_model(demo_workdir / "model" / "best")  # the model the name stands for
    with np.load(tmp_path / "scene.npz") as stored:  # one window of the model's scene embedding (its head's input)
        assert stored["embeddings"].shape == (1, variables["params"]["head"]["kernel"].shape[0])
