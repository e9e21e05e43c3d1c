"""`convnext-audio tag/embed --backend onnxruntime|openvino`: the same windows, clip, window and frame scores and
embeddings as the JAX backend, from an exported ONNX file, through the same windowing code; its errors."""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

# Part of the [test] set-up: a missing runtime fails the parity proof instead of skipping it.
import onnxruntime  # noqa: E402,F401
import openvino  # noqa: E402,F401
import pytest
import soundfile

from convnext_audio_jax import cli
from convnext_audio_jax import export as export_lib
from convnext_audio_jax.artifacts.model_dir import save_model
from convnext_audio_jax.inference.onnx_backend import OnnxRuntimeForward  # noqa: E402
from convnext_audio_jax.models import create_model, init_variables

TINY = dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), num_classes=4)
NAMES = ["Burst", "Hum", "Speech", "Bell"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx_backend")
    model = create_model("convnext_tiny", **TINY)
    variables = init_variables(model, jax.random.key(2))
    checkpoint = save_model(root / "ckpt", "convnext_tiny", variables, {"class_names": NAMES}, TINY)
    path = root / "tiny.onnx"
    export_lib.export(model, variables, "onnx", path, {"model": "convnext_tiny", "model_config": TINY, "class_names": NAMES})
    rng = np.random.default_rng(0)
    long = 0.05 * rng.standard_normal(13 * 44_100)
    long[6 * 44_100 : 7 * 44_100] += 0.5 * rng.standard_normal(44_100)
    soundfile.write(root / "long.wav", long.astype(np.float32), 44_100)
    soundfile.write(root / "short.flac", (0.2 * rng.standard_normal((3 * 16_000, 2))).astype(np.float32), 16_000)
    return checkpoint, path, [str(root / "long.wav"), str(root / "short.flac")]


def tag_json(capsys, *argv):
    assert cli.main(["tag", *argv, "--format", "json", "--frames", "--all-scores", "--threshold", "0",
                     "--no-progress", "--batch-size", "3"]) == 0
    return json.loads(capsys.readouterr().out)


def test_tags_match_the_jax_backend(exported, capsys):
    checkpoint, path, files = exported
    ours = tag_json(capsys, *files, "--checkpoint", str(checkpoint))
    for backend in ("onnxruntime", "openvino"):
        assert_same_reports(ours, tag_json(capsys, *files, "--checkpoint", str(path), "--backend", backend), files)


def assert_same_reports(ours, onnx, files):
    assert [r["file"] for r in onnx] == files and [r["num_windows"] for r in onnx] == [2, 1]
    for jax_report, onnx_report in zip(ours, onnx):
        assert onnx_report["scores"].keys() == jax_report["scores"].keys() == set(NAMES)
        for name in NAMES:
            assert abs(onnx_report["scores"][name] - jax_report["scores"][name]) <= 1e-4
        for kind in ("windows", "frames"):
            assert len(onnx_report[kind]) == len(jax_report[kind]) > 0
            for a, b in zip(onnx_report[kind], jax_report[kind]):
                assert (a["start"], a["end"]) == (b["start"], b["end"])
                assert max(abs(a["scores"][n] - b["scores"][n]) for n in NAMES) <= 1e-4


def test_embed_matches_the_jax_backend(exported, tmp_path, capsys):
    checkpoint, path, files = exported
    for kind in ("scene", "sequence"):
        saved = {}
        for backend, model_path in (("jax", checkpoint), ("onnxruntime", path)):
            out = tmp_path / f"{backend}-{kind}.npz"
            assert cli.main(["embed", *files, "--checkpoint", str(model_path), "--backend", backend, "--kind", kind,
                             "--output", str(out), "--no-progress", "--batch-size", "3"]) == 0
            with np.load(out) as data:
                saved[backend] = {key: data[key] for key in data.files}
        assert saved["onnxruntime"]["embeddings"].shape == saved["jax"]["embeddings"].shape
        np.testing.assert_allclose(saved["onnxruntime"]["embeddings"], saved["jax"]["embeddings"], atol=1e-4)
        np.testing.assert_array_equal(saved["onnxruntime"]["window_start_s"], saved["jax"]["window_start_s"])
    capsys.readouterr()
    assert cli.main(["embed", files[0], "--checkpoint", str(path), "--backend", "onnxruntime", "--kind", "frames",
                     "--output", str(tmp_path / "x.npz"), "--no-progress"]) == 2
    assert "embeds --kind scene or sequence" in capsys.readouterr().err


def test_forward_returns_the_jax_outputs(exported):
    checkpoint, path, _ = exported
    from convnext_audio_jax.artifacts.model_dir import load_model

    model, variables, _ = load_model(checkpoint)
    forward = OnnxRuntimeForward(path, batch_size=2)
    assert forward.class_names == NAMES and forward.model.dims == model.dims and forward.window_samples == 320_000
    windows = (0.1 * np.random.default_rng(1).standard_normal((2, 320_000))).astype(np.float32)
    got = forward(windows)
    expected = jax.jit(export_lib.forward_function(model, variables))(windows)
    assert set(got) == {"probs", "scene_embedding", "sequence_embeddings", "frame_probs"}
    for name, value in got.items():
        np.testing.assert_allclose(value, expected[name], atol=1e-4)
    # OpenVINO, compiled for batches of 2: a single window is padded and its row returned.
    single = OnnxRuntimeForward(path, batch_size=2, runtime="openvino", select=["probs", "sequence_embeddings"])(windows[1:])
    for name, value in single.items():
        assert value.shape[0] == 1
        np.testing.assert_allclose(value, expected[name][1:], atol=1e-4)
    with pytest.raises(ValueError, match=r"expected 1 to 2 waveforms, got 3"):
        forward(np.zeros((3, 320_000), np.float32))
    with pytest.raises(ValueError, match=r"expected windows of shape \(n, 320000\)"):
        forward(np.zeros((1, 1000), np.float32))


def test_errors(exported, tmp_path, capsys, monkeypatch):
    checkpoint, path, files = exported
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
        assert cli.main(["tag", files[0], "--checkpoint", str(path), "--backend", "openvino", "--no-progress"]) == 2
        assert "--backend openvino needs the openvino package: pip install openvino" in capsys.readouterr().err
    with pytest.raises(ValueError, match="has no output"):
        OnnxRuntimeForward(path, select=["logits"])
    lonely = tmp_path / "lonely.onnx"
    lonely.write_bytes(path.read_bytes())
    assert cli.main(["tag", files[0], "--checkpoint", str(lonely), "--backend", "onnxruntime", "--no-progress"]) == 2
    assert "lonely.onnx has no metadata file" in capsys.readouterr().err
    assert cli.main(["tag", files[0], "--checkpoint", str(checkpoint), "--backend", "onnxruntime", "--no-progress"]) == 2
    assert "is not a file" in capsys.readouterr().err
