"""Export to StableHLO and ONNX: parity with the JAX model (ONNX Runtime runs the ONNX file), the files and
metadata written, the CLI and its errors.

Reduced-size variants of convnext_tiny, cnn14 and cnn6 (fewer blocks and channels, the same layers and front
end) keep the suite fast on a 2-core CPU; the full-size convnext_tiny in both formats is marked slow (ONNX
conversion of the full model takes minutes there)."""

from __future__ import annotations

import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import jax2onnx  # noqa: E402,F401  (README test command: pip install --no-deps jax2onnx==0.17.1)
import numpy as np

# Part of the [test] extra: a missing runtime fails the parity proof instead of skipping it.
import onnxruntime as ort  # noqa: E402
import pytest

from convnext_audio_jax import cli
from convnext_audio_jax import export as export_lib
from convnext_audio_jax.artifacts.model_dir import save_model
from convnext_audio_jax.data import audio as audio_lib
from convnext_audio_jax.models import create_model, init_variables
from convnext_audio_jax.models.frontend import FrontendConfig

SR = audio_lib.SAMPLE_RATE
TOLERANCE = 1e-4
REDUCED = {
    "convnext_tiny": dict(depths=(1, 1, 2, 1), dims=(16, 24, 32, 48), num_classes=7),
    "cnn14": dict(channels=(8, 16, 16, 32, 32, 48), num_classes=7),
    "cnn6": dict(channels=(8, 16, 32, 48), num_classes=7),
}
CLASS_NAMES = [f"class {i}" for i in range(7)]


def recordings(paths, count: int = 3) -> tuple[np.ndarray, str]:
    """10 s windows of real recordings (Debian's sound-theme-freedesktop) when installed; otherwise generated
    audio with the structure of recordings (a chirp, a decaying tone, noise bursts), and says which."""
    if paths:
        rows = []
        for path in paths[:count]:
            decoded = audio_lib.decode(path)
            mono = audio_lib.to_mono(*decoded, str(path), min_seconds=0.0)[: 10 * SR]
            rows.append(np.pad(mono, (0, 10 * SR - mono.shape[0])))
        return np.stack(rows).astype(np.float32), "freedesktop recordings"
    t = np.arange(10 * SR) / SR
    rng = np.random.default_rng(3)
    chirp = 0.3 * np.sin(2 * np.pi * (200 + 600 * t) * t)
    tone = 0.5 * np.exp(-t) * np.sin(2 * np.pi * 880 * t)
    bursts = 0.2 * rng.standard_normal(t.size) * ((t % 2.5) < 0.3)
    return np.stack([chirp, tone, bursts]).astype(np.float32), "generated audio (sound-theme-freedesktop not installed)"


@pytest.fixture(scope="module")
def test_audio():
    from tests.conftest import FREEDESKTOP_SOUNDS

    real, source = recordings(sorted(FREEDESKTOP_SOUNDS.glob("*.oga")))
    noise = (0.1 * np.random.default_rng(0).standard_normal((2, 10 * SR))).astype(np.float32)
    return np.concatenate([real, noise]), source


def reference(model, variables, waveform):
    return jax.jit(export_lib.forward_function(model, variables))(waveform)


def checkpoint_for(tmp_path, name, config, seed=0):
    model = create_model(name, **config)
    variables = init_variables(model, jax.random.key(seed))
    directory = save_model(tmp_path / name, name, variables, metadata={"class_names": CLASS_NAMES}, model_config=config)
    return model, variables, directory


def run_onnx(path, waveform):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(None, {"waveform": waveform})))


@pytest.mark.parametrize("name", list(REDUCED))
def test_both_formats_match_the_jax_model(name, test_audio, tmp_path):
    waveform, source = test_audio
    model, variables, directory = checkpoint_for(tmp_path, name, REDUCED[name])
    expected = reference(model, variables, waveform)

    hlo_path = tmp_path / f"{name}.stablehlo"
    assert cli.main(["export", str(directory), "--format", "stablehlo", "--output", str(hlo_path)]) == 0
    exported = jax.export.deserialize(hlo_path.read_bytes())
    assert exported.platforms == ("cpu", "cuda")
    got = exported.call(waveform)
    for key in ("probs", "scene_embedding", "sequence_embeddings"):
        assert np.abs(np.asarray(got[key]) - expected[key]).max() <= TOLERANCE, (key, source)

    onnx_path = tmp_path / f"{name}.onnx"
    assert cli.main(["export", str(directory), "--format", "onnx", "--output", str(onnx_path)]) == 0
    got = run_onnx(onnx_path, waveform)
    assert np.abs(got["probs"] - expected["probs"]).max() <= TOLERANCE, source
    assert np.abs(got["scene_embedding"] - expected["scene_embedding"]).max() <= TOLERANCE, source
    assert np.abs(got["sequence_embeddings"] - expected["sequence_embeddings"]).max() <= TOLERANCE, source
    assert set(got) == set(expected)
    if "frame_probs" in expected:
        assert np.abs(got["frame_probs"] - expected["frame_probs"]).max() <= TOLERANCE

    metadata = json.loads((tmp_path / f"{name}.onnx.json").read_text())
    assert metadata["class_names"] == CLASS_NAMES and metadata["sample_rate"] == SR
    assert metadata["window_samples"] == 10 * SR and metadata["input_shape"] == ["batch", 10 * SR]
    assert metadata["model"] == name and metadata["output_names"][:2] == ["probs", "scene_embedding"]


def test_stablehlo_symbolic_batch_and_length_and_metadata(tmp_path):
    model, variables, directory = checkpoint_for(tmp_path, "convnext_tiny", REDUCED["convnext_tiny"])
    path = tmp_path / "tiny.stablehlo"
    document = export_lib.export(model, variables, "stablehlo", path, {"model": "convnext_tiny", "class_names": CLASS_NAMES})
    assert document["symbolic_length"] and document["input_shape"] == ["batch", "samples"]
    assert document["platforms"] == ["cpu", "cuda"]
    # The released grid: 4-frame stem padding, 32-frame steps → the shortest input with one step is 23 hops.
    assert document["minimum_samples"] == 23 * 320
    assert json.loads((tmp_path / "tiny.stablehlo.json").read_text()) == document
    # The file is exactly Exported.serialize()'s bytes, and runs any batch and length with jax alone.
    exported = jax.export.deserialize(path.read_bytes())
    assert bytes(exported.serialize()) == path.read_bytes()
    rng = np.random.default_rng(1)
    # Two batches and two lengths, neither the 10 s window (test_both_formats_match_the_jax_model runs that).
    for batch, samples in [(1, 23 * 320), (3, 48_000)]:
        waveform = (0.1 * rng.standard_normal((batch, samples))).astype(np.float32)
        got = exported.call(waveform)
        expected = reference(model, variables, waveform)
        assert got["probs"].shape == (batch, 7)
        np.testing.assert_allclose(got["probs"], expected["probs"], atol=TOLERANCE)
    # Lowered for CUDA without a GPU: its module has the grouped convolution, the CPU module the shift-sum.
    assert "stablehlo.convolution" in exported.mlir_module()


def test_onnx_batch_is_symbolic(tmp_path):
    model, variables, directory = checkpoint_for(tmp_path, "cnn6", REDUCED["cnn6"])
    path = tmp_path / "cnn6.onnx"
    export_lib.export(model, variables, "onnx", path, {"model": "cnn6"})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch" and session.get_inputs()[0].shape[1] == 10 * SR
    for batch in (1, 5):
        waveform = (0.1 * np.random.default_rng(batch).standard_normal((batch, 10 * SR))).astype(np.float32)
        probs = session.run(["probs"], {"waveform": waveform})[0]
        np.testing.assert_allclose(probs, reference(model, variables, waveform)["probs"], atol=TOLERANCE)


def test_clear_errors(tmp_path, capsys):
    model, variables, directory = checkpoint_for(tmp_path, "cnn6", REDUCED["cnn6"])
    out = tmp_path / "out.bin"
    assert cli.main(["export", str(directory), "--format", "tflite", "--output", str(out)]) == 2
    assert "unknown export format 'tflite'; expected one of stablehlo, onnx" in capsys.readouterr().err
    assert cli.main(["export", str(directory), "--format", "onnx", "--output", str(tmp_path / "missing" / "x.onnx")]) == 2
    assert "missing does not exist" in capsys.readouterr().err
    out.write_bytes(b"keep me")
    assert cli.main(["export", str(directory), "--format", "onnx", "--output", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    image_model = create_model("convnext_tiny_imagenet", depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), num_classes=3)
    with pytest.raises(export_lib.ExportError, match="does not take a waveform"):
        export_lib.export(image_model, {}, "onnx", tmp_path / "image.onnx")


class HostCallbackTagger(nn.Module):
    """An audio model whose forward calls back into Python: neither StableHLO nor ONNX can hold that."""

    frontend: FrontendConfig = FrontendConfig(n_mels=8)
    depthwise_impl: str = "auto"
    num_classes: int = 2

    @nn.compact
    def __call__(self, waveform, train=False):
        level = jax.pure_callback(lambda x: np.abs(x).mean(axis=1, keepdims=True).astype(np.float32),
                                  jax.ShapeDtypeStruct((waveform.shape[0], 1), jnp.float32), waveform)
        frames = jnp.broadcast_to(level[:, None, None, :], (waveform.shape[0], 3, 2, self.num_classes))
        logits = frames.mean(axis=(1, 2))
        return {"logits": logits, "probs": jax.nn.sigmoid(logits), "scene_embedding": logits, "frame_embeddings": frames}


def test_an_op_that_cannot_be_exported_is_named(tmp_path):
    model = HostCallbackTagger()
    with pytest.raises(export_lib.ExportError, match=r"cannot export HostCallbackTagger to ONNX: .*callback"):
        export_lib.export(model, {}, "onnx", tmp_path / "callback.onnx")
    with pytest.raises(export_lib.ExportError, match=r"cannot export HostCallbackTagger to StableHLO: .*callback"):
        export_lib.export(model, {}, "stablehlo", tmp_path / "callback.stablehlo")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_a_missing_package_is_one_line_naming_its_install(monkeypatch, tmp_path):
    """A registered model needs only onnx (written directly); any other is traced with jax2onnx."""
    monkeypatch.setitem(sys.modules, "jax2onnx", None)  # `import jax2onnx` now raises ImportError
    with pytest.raises(export_lib.ExportError, match=r"traces it with jax2onnx, which is not installed: "
                                                     r"pip install --no-deps jax2onnx==0\.17\.1$"):
        export_lib.export_onnx(HostCallbackTagger(), {})
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(export_lib.ExportError, match=r'needs the onnx package: pip install -e "\.\[export\]"'):
        export_lib.export_onnx(create_model("cnn6", channels=(8, 16, 32, 48)), {})
    monkeypatch.setitem(sys.modules, "flatbuffers", None)
    with pytest.raises(export_lib.ExportError, match=r"StableHLO serialisation needs flatbuffers .*: pip install flatbuffers$"):
        export_lib.export(create_model("cnn6", channels=(8, 16, 32, 48)), {}, "stablehlo", tmp_path / "x.stablehlo")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_full_size_convnext_tiny_both_formats(test_audio, tmp_path):
    # One recording: the reduced models' tests prove batches and clips; this one the full depth and width.
    waveform, source = test_audio[0][:1], test_audio[1]
    model = create_model("convnext_tiny")
    variables = init_variables(model, jax.random.key(0))
    expected = reference(model, variables, waveform)
    exported = export_lib.export_stablehlo(model, variables)
    assert np.abs(np.asarray(exported.call(waveform)["probs"]) - expected["probs"]).max() <= TOLERANCE, source
    path = tmp_path / "tiny.onnx"
    export_lib.export(model, variables, "onnx", path, {"model": "convnext_tiny"})
    assert np.abs(run_onnx(path, waveform)["probs"] - expected["probs"]).max() <= TOLERANCE, source
