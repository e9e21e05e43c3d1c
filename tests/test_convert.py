"""The converter's proof: PyTorch models from PyPI code (timm, torchlibrosa, panns_inference) with
random weights and non-trivial BatchNorm statistics, saved in the original checkpoint formats,
converted through the command, and compared on real recordings and noise."""

import importlib.util
import json
import pathlib
import subprocess
import sys
import types

import jax
import librosa
import numpy as np
import pytest
import soundfile as sf
import timm
import torch
from safetensors.numpy import save_file

from convnext_audio_jax.artifacts.model_dir import load_model
from convnext_audio_jax.cli import main as main_cli
from convnext_audio_jax.convert import load_torch_state_dict
from convnext_audio_jax.convert.torch_reference import build_reference, randomize_
from convnext_audio_jax.hub import convert_command as cli
from convnext_audio_jax.models import create_model
from convnext_audio_jax.runtime import xla

TOLERANCE = 1e-4
RECORDINGS = ["alarm-clock-elapsed.oga", "phone-outgoing-busy.oga", "audio-channel-front-left.oga"]


def convert(*argv) -> int:
    return cli.main([str(a) for a in argv])


def numpy_state_dict(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def flax_forward(model, variables, inputs):
    """One forward pass, compiled at LLVM -O1: the same values bit for bit (checked on ConvNeXt-Tiny and CNN14 on
    these clips), compiled 1.5-2.5x faster; each program here runs once."""
    forward = jax.jit(lambda v, x: model.apply(v, x), compiler_options=xla.RUN_ONCE_COMPILER_OPTIONS)
    return {k: np.asarray(v) for k, v in forward(variables, inputs).items()}


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def assert_informative(probs: np.ndarray) -> None:
    """Probabilities away from 0 and 1, so that a 1e-4 agreement says something."""
    assert np.mean((probs > 0.02) & (probs < 0.98)) > 0.3


@pytest.fixture(scope="module")
def clips(freedesktop_recordings) -> np.ndarray:
    """(4, 320000) at 32 kHz: three real recordings (48, 8 and 48 kHz originals), zero-padded to
    10 s, and one clip of noise."""
    by_name = {p.name: p for p in freedesktop_recordings}
    rows = []
    for name in RECORDINGS:
        audio, rate = sf.read(by_name[name], dtype="float32", always_2d=True)
        audio = librosa.resample(audio.mean(axis=1), orig_sr=rate, target_sr=32000)[:320000]
        rows.append(np.pad(audio, (0, 320000 - len(audio))))
    rows.append(0.1 * np.random.default_rng(0).standard_normal(320000))
    return np.stack(rows).astype(np.float32)


@pytest.fixture(scope="module")
def audio_convnext(clips):
    """The authors' audio ConvNeXt-Tiny with random weights and its outputs on the clips."""
    reference = randomize_(build_reference("convnext_tiny"), seed=1)
    with torch.no_grad():
        outputs = {k: v.numpy() for k, v in reference(torch.from_numpy(clips)).items()}
    assert_informative(outputs["clipwise_output"])
    return reference, outputs


@pytest.fixture(scope="module")
def authors_pth(audio_convnext, tmp_path_factory):
    """convnext_tiny_471mAP.pth style: torch.save({'model': state_dict}), converted by the command."""
    directory = tmp_path_factory.mktemp("authors")
    source = directory / "convnext_tiny_471mAP.pth"
    torch.save({"model": audio_convnext[0].state_dict()}, source)
    assert convert(source, directory / "flax") == 0
    return source, directory / "flax"


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla", "shift"])
def test_audio_convnext_parity(authors_pth, audio_convnext, clips, impl):
    _, expected = audio_convnext
    model, variables, metadata = load_model(authors_pth[1], depthwise_impl=impl)
    assert metadata["model"] == "convnext_tiny" and metadata["source"]["layout"] == "authors"
    out = flax_forward(model, variables, clips)
    assert max_abs(out["probs"], expected["clipwise_output"]) <= TOLERANCE
    assert max_abs(out["scene_embedding"], expected["scene_embedding"]) <= TOLERANCE
    assert max_abs(out["frame_embeddings"], expected["frame_embeddings"].transpose(0, 2, 3, 1)) <= 1e-3


def test_hugging_face_safetensors_convert_like_the_pth(authors_pth, audio_convnext, tmp_path):
    """HF topel/ConvNeXt-Tiny-AT: the same keys as model.safetensors, front-end tensors included."""
    source = tmp_path / "model.safetensors"
    state_dict = numpy_state_dict(audio_convnext[0])
    save_file(state_dict, source)
    assert convert(source, tmp_path / "flax") == 0
    _, from_pth, _ = load_model(authors_pth[1])
    _, from_safetensors, metadata = load_model(tmp_path / "flax")
    jax.tree.map(np.testing.assert_array_equal, from_safetensors, from_pth)
    assert metadata["source"]["file"] == "model.safetensors"
    assert metadata["source"]["sha256"] == cli.file_sha256(source)
    # The frozen STFT and mel tensors are exactly what our front end computes.
    check = metadata["conversion"]["frontend_check"]
    assert set(check) == {"spectrogram_extractor.stft.conv_real.weight", "spectrogram_extractor.stft.conv_imag.weight", "logmel_extractor.melW"}
    assert all(value == 0.0 for value in check.values())


def test_front_end_mismatch_is_an_error_unless_allowed(cnn6, tmp_path, capsys):
    """On CNN6, which carries the same torchlibrosa front-end tensors as the authors' ConvNeXt (checked by one
    function for both layouts) at a sixth of the size."""
    state_dict = numpy_state_dict(cnn6[0])
    state_dict["logmel_extractor.melW"] = state_dict["logmel_extractor.melW"] * 1.01
    source = tmp_path / "model.safetensors"
    save_file(state_dict, source)
    assert convert(source, tmp_path / "refused") == 1
    assert "logmel_extractor.melW differs" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    assert convert(source, tmp_path / "flax", "--allow-frontend-mismatch") == 0
    check = load_model(tmp_path / "flax")[2]["conversion"]["frontend_check"]
    assert check["logmel_extractor.melW"].startswith("MISMATCH")


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """naming -> (ImageNet ConvNeXt-Tiny with random weights, its checkpoint file, that file converted by the
    command): made once per naming, for the parity, the audio-model initialisation and the --to-torch tests."""
    made = {}

    def get(naming):
        if naming not in made:
            directory = tmp_path_factory.mktemp(f"imagenet-{naming}")
            reference = randomize_(build_reference("convnext_tiny_imagenet", naming=naming), seed=2)
            source = directory / ("convnext_tiny_1k_224_ema.pth" if naming == "facebookresearch" else "pytorch_model.pth")
            # facebookresearch wraps the state dict in {'model': ...}; timm saves it bare.
            torch.save({"model": reference.state_dict()} if naming == "facebookresearch" else reference.state_dict(), source)
            assert convert(source, directory / "flax") == 0
            made[naming] = reference, source, directory / "flax"
        return made[naming]

    return get


@pytest.mark.parametrize("naming", ["facebookresearch", "timm"])
def test_imagenet_convnext_parity(naming, imagenet):
    reference, _, converted = imagenet(naming)
    model, variables, metadata = load_model(converted)
    assert metadata["model"] == "convnext_tiny_imagenet" and metadata["source"]["layout"] == naming
    images = np.random.default_rng(3).standard_normal((2, 224, 224, 3)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    assert expected.std() > 0.1
    assert max_abs(flax_forward(model, variables, images)["logits"], expected) <= TOLERANCE


@pytest.mark.parametrize("naming, stem_init", [("facebookresearch", "fresh"), ("timm", "rgb-mean")])
def test_imagenet_initialisation_of_the_audio_model(naming, stem_init, imagenet, tmp_path):
    _, source, converted = imagenet(naming)
    assert convert(source, tmp_path / "audio", "--model", "convnext_tiny", "--stem-init", stem_init, "--seed", 7) == 0
    _, rgb_model, _ = load_model(converted)
    _, audio, metadata = load_model(tmp_path / "audio")  # load_model checks every shape against convnext_tiny
    assert metadata["model"] == "convnext_tiny"
    trunk, head_norm = audio["params"]["trunk"], audio["params"]["head_norm"]
    for name, value in rgb_model["params"]["trunk"].items():
        if name != "stem_conv":
            jax.tree.map(np.testing.assert_array_equal, trunk[name], value)
    jax.tree.map(np.testing.assert_array_equal, head_norm, rgb_model["params"]["head_norm"])
    rgb_kernel = rgb_model["params"]["trunk"]["stem_conv"]["kernel"]  # (4, 4, 3, 96)
    stem = trunk["stem_conv"]["kernel"]  # (4, 4, 1, 96)
    if stem_init == "rgb-mean":
        np.testing.assert_allclose(stem, rgb_kernel.mean(axis=2, keepdims=True), rtol=1e-6)
        np.testing.assert_array_equal(trunk["stem_conv"]["bias"], rgb_model["params"]["trunk"]["stem_conv"]["bias"])
    else:
        assert stem.shape == (4, 4, 1, 96) and 0.01 < stem.std() < 0.03  # N(0, 0.02), the paper's fresh stem
        assert not trunk["stem_conv"]["bias"].any()
    np.testing.assert_array_equal(audio["batch_stats"]["bn0"]["var"], np.ones(224))
    assert audio["params"]["head"]["kernel"].shape == (768, 527)
    fresh = metadata["conversion"]["imagenet_init"]["fresh"]
    assert "params/head/kernel" in fresh and "batch_stats/bn0/mean" in fresh
    assert ("params/trunk/stem_conv/kernel" in fresh) == (stem_init == "fresh")


@pytest.fixture(scope="module")
def cnn6(tmp_path_factory):
    reference = randomize_(build_reference("cnn6"), seed=5)
    source = tmp_path_factory.mktemp("cnn6") / "Cnn6_mAP=0.343.pth"
    torch.save({"model": reference.state_dict()}, source)
    return reference, source


@pytest.fixture(scope="module")
def cnn6_converted(cnn6, tmp_path_factory):
    """The CNN6 checkpoint converted by the command with no options, once for the tests that only read it."""
    out = tmp_path_factory.mktemp("cnn6-flax") / "flax"
    assert convert(cnn6[1], out) == 0
    return out


@pytest.fixture(scope="module")
def cnn14():
    """A random CNN14 (the largest reference): built once for the parity and the panns_inference tests."""
    return randomize_(build_reference("cnn14"), seed=6)


@pytest.mark.parametrize("name", ["cnn6", pytest.param("cnn14", marks=pytest.mark.slow)])
def test_pann_parity(name, cnn6, cnn6_converted, clips, tmp_path, request):
    if name == "cnn6":
        reference, converted = cnn6[0], cnn6_converted
    else:
        reference = request.getfixturevalue("cnn14")
        source = tmp_path / "Cnn14_mAP=0.431.pth"
        torch.save({"model": reference.state_dict()}, source)
        converted = tmp_path / "flax"
        assert convert(source, converted) == 0
    with torch.no_grad():
        expected = {k: v.numpy() for k, v in reference(torch.from_numpy(clips)).items()}
    assert_informative(expected["clipwise_output"])
    model, variables, metadata = load_model(converted)
    assert metadata["model"] == name and metadata["source"]["layout"] == "panns"
    out = flax_forward(model, variables, clips)
    assert max_abs(out["probs"], expected["clipwise_output"]) <= TOLERANCE
    assert max_abs(out["scene_embedding"], expected["embedding"]) <= TOLERANCE


def _import_panns_inference_models():
    """``panns_inference.models`` without running the package's ``__init__``, which downloads a
    labels CSV into the home directory at import time."""
    spec = importlib.util.find_spec("panns_inference")
    if spec is None:
        pytest.fail("panns-inference is not installed (part of the [test] extra)")
    if "panns_inference" not in sys.modules:
        package = types.ModuleType("panns_inference")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["panns_inference"] = package
    return importlib.import_module("panns_inference.models")


def test_reference_cnn14_is_panns_inference_cnn14(cnn14):
    """The CNN14 port in convnext_audio_jax/convert/torch_reference.py has PANNs' keys and computes what PyPI's does."""
    panns_models = _import_panns_inference_models()
    ours = cnn14
    theirs = panns_models.Cnn14(sample_rate=32000, window_size=1024, hop_size=320, mel_bins=64, fmin=50, fmax=14000, classes_num=527)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    theirs.eval()
    waveform = 0.1 * torch.randn(2, 32000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(waveform), theirs(waveform)
    assert torch.equal(a["clipwise_output"], b["clipwise_output"])
    assert torch.equal(a["embedding"], b["embedding"])


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("case", ["authors", "timm", "cnn6"])
def test_to_torch_round_trip(case, suffix, authors_pth, audio_convnext, cnn6, cnn6_converted, imagenet, tmp_path):
    if case == "authors":
        reference, converted = audio_convnext[0], authors_pth[1]
        extra = []
    elif case == "cnn6":
        reference, converted = cnn6[0], cnn6_converted
        extra = []
    else:
        reference, _, converted = imagenet("timm")
        extra = ["--layout", "timm"]
    output = tmp_path / f"back{suffix}"
    assert convert(converted, output, "--to-torch", *extra) == 0
    original = numpy_state_dict(reference)
    back = load_torch_state_dict(output)
    assert set(back) == set(original)
    for key, value in original.items():
        if key.endswith("num_batches_tracked"):  # Flax keeps no step counter: written as 0
            assert back[key] == 0
        else:
            np.testing.assert_array_equal(back[key], value, err_msg=key)
    # The result loads strictly into the PyTorch model.
    fresh = build_reference(**{"authors": {"name": "convnext_tiny"}, "cnn6": {"name": "cnn6"},
                               "timm": {"name": "convnext_tiny_imagenet", "naming": "timm"}}[case])
    fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in back.items()}, strict=True)


def test_to_torch_of_the_demo_model_loads_into_the_reference_built_from_its_metadata(tmp_path):
    """A non-default front end (the demo's: 16 kHz, n_fft 512, hop 160, 64 mels up to 8 kHz, 1 s clips) and a
    reduced size: ``build_reference(**model_config)`` is the PyTorch model its --to-torch file loads into, with
    the same logits."""
    import dataclasses

    from convnext_audio_jax.artifacts.model_dir import read_metadata, save_model
    from convnext_audio_jax.models import init_variables
    from convnext_audio_jax.models.frontend import FrontendConfig

    demo = FrontendConfig(sample_rate=16_000, n_fft=512, hop_length=160, n_mels=64, fmax=8_000.0, clip_seconds=1.0)
    config = {"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128], "num_classes": 10,
              "frontend": dataclasses.asdict(demo)}
    model = create_model("convnext_tiny", **config)
    variables = init_variables(model, jax.random.key(4))
    rng = np.random.default_rng(4)  # non-trivial bn0 statistics and head, so that the logits say something
    variables["batch_stats"]["bn0"] = {"mean": rng.normal(-20, 3, 64).astype(np.float32),
                                       "var": rng.uniform(50, 150, 64).astype(np.float32)}
    head = variables["params"]["head"]
    head["kernel"] = rng.normal(0, 1, np.shape(head["kernel"])).astype(np.float32)
    directory = save_model(tmp_path / "demo", "convnext_tiny", variables, None, config)
    assert convert(directory, tmp_path / "demo.safetensors", "--to-torch") == 0

    metadata = read_metadata(directory)
    reference = build_reference(metadata["model"], **metadata["model_config"])
    back = load_torch_state_dict(tmp_path / "demo.safetensors")
    reference.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in back.items()}, strict=True)
    waveform = (0.1 * rng.standard_normal((2, 16_000))).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(waveform))["clipwise_logits"].numpy()
    out = flax_forward(model, variables, waveform)
    assert np.std(expected) > 0.1 and max_abs(out["logits"], expected) <= TOLERANCE
    with pytest.raises(ValueError, match=r"\['hop'\] are not FrontendConfig fields"):
        build_reference("cnn6", frontend={"hop": 160})
    with pytest.raises(ValueError, match="no audio front end"):
        build_reference("convnext_tiny_imagenet", frontend={"n_mels": 64})


# ---------------------------------------------------------------- bad input


def assert_refused(capsys, argv, message: str, output: pathlib.Path) -> None:
    """The command fails with one line naming the problem and writes nothing."""
    assert convert(*argv) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: "), err
    assert message in err, err
    assert not output.exists()
    assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]


def test_non_checkpoint_files(tmp_path, capsys, freedesktop_recordings):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    assert_refused(capsys, [text, tmp_path / "out"], "notes.pth is not a checkpoint", tmp_path / "out")
    audio = tmp_path / "bell.safetensors"
    audio.write_bytes(freedesktop_recordings[0].read_bytes())
    assert_refused(capsys, [audio, tmp_path / "out"], "bell.safetensors is not a checkpoint", tmp_path / "out")
    assert_refused(capsys, [tmp_path / "absent.pth", tmp_path / "out"], "checkpoint file not found", tmp_path / "out")


def test_truncated_files(cnn6, tmp_path, capsys):
    data = cnn6[1].read_bytes()
    truncated = tmp_path / "cut.pth"
    truncated.write_bytes(data[: len(data) // 2])
    assert_refused(capsys, [truncated, tmp_path / "out"], "cut.pth: cannot read it as a PyTorch checkpoint (truncated or corrupt?)", tmp_path / "out")
    full = tmp_path / "full.safetensors"
    save_file(numpy_state_dict(cnn6[0]), full)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert_refused(capsys, [cut, tmp_path / "out"], "cut.safetensors: cannot read it as a safetensors file", tmp_path / "out")


def test_other_architectures(cnn6, tmp_path, capsys):
    resnet = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), resnet)
    assert_refused(capsys, [resnet, tmp_path / "out"], "unrecognised state dict", tmp_path / "out")
    assert_refused(capsys, [cnn6[1], tmp_path / "out", "--model", "convnext_tiny"], "not a convnext_tiny checkpoint; omit --model or pass --model cnn6", tmp_path / "out")
    # CNN6 weights into CNN14: every mismatching tensor is named with its shapes.
    assert_refused(
        capsys,
        [cnn6[1], tmp_path / "out", "--model", "cnn14"],
        "conv_block1.conv1.weight (64, 1, 5, 5) in the file, (64, 1, 3, 3) expected",
        tmp_path / "out",
    )
    assert_refused(capsys, [cnn6[1], tmp_path / "out", "--model", "resnet"], "unknown model 'resnet'", tmp_path / "out")


def test_missing_unexpected_and_wrong_shaped_tensors(cnn6, tmp_path, capsys):
    state_dict = numpy_state_dict(cnn6[0])
    del state_dict["conv_block2.bn1.running_var"]
    state_dict["fc2.weight"] = np.zeros((3, 3), np.float32)
    state_dict["fc1.bias"] = np.zeros(511, np.float32)
    source = tmp_path / "damaged.safetensors"
    save_file(state_dict, source)
    assert_refused(
        capsys,
        [source, tmp_path / "out"],
        "state dict (panns layout) does not fit cnn6: 1 missing: conv_block2.bn1.running_var (128); "
        "1 of the wrong shape: fc1.bias (511) in the file, (512) expected; 1 unexpected: fc2.weight",
        tmp_path / "out",
    )


def test_class_count_and_labels(tmp_path, capsys):
    reference = randomize_(build_reference("cnn6", num_classes=1000), seed=10)
    source = tmp_path / "cnn6_1000.pth"
    torch.save({"model": reference.state_dict()}, source)
    out = tmp_path / "out"
    assert_refused(capsys, [source, out], "the checkpoint has 1000 classes (fc_audioset.weight (1000, 512)) but cnn6 has 527; pass --num-classes 1000", out)
    assert_refused(capsys, [source, out, "--num-classes", 10], "--num-classes 10 does not match the checkpoint's 1000 classes", out)
    assert_refused(capsys, [source, out, "--num-classes", 1000, "--labels", tmp_path / "nope.csv"], "labels file not found", out)
    labels = tmp_path / "class_labels_indices.csv"
    labels.write_text("index,mid,display_name\n" + "".join(f'{i},/m/{i:05d},"Class {i}, a sound"\n' for i in range(1000)))
    short = tmp_path / "short.csv"
    short.write_text("index,mid,display_name\n0,/m/0,Speech\n")
    assert_refused(capsys, [source, out, "--num-classes", 1000, "--labels", short], "short.csv lists 1 classes, cnn6 has 1000", out)
    assert convert(source, out, "--num-classes", 1000, "--labels", labels) == 0
    model, variables, metadata = load_model(out)
    assert model.num_classes == 1000 and metadata["model_config"] == {"num_classes": 1000}
    assert metadata["class_names"][3] == "Class 3, a sound" and len(metadata["class_names"]) == 1000
    assert variables["params"]["fc_audioset"]["kernel"].shape == (512, 1000)
    # An existing, non-empty output directory is left alone.
    metadata_text = (out / "metadata.json").read_text()
    assert convert(source, out, "--num-classes", 1000) == 1
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert (out / "metadata.json").read_text() == metadata_text


def test_python_dash_m_convert_reports_one_line(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    result = subprocess.run([sys.executable, "-m", "convert", str(text), str(tmp_path / "out")], capture_output=True, text=True,
                            cwd=pathlib.Path(__file__).parents[1], timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: notes.pth is not a checkpoint: expected a PyTorch .pth/.pt (torch.save) or a .safetensors file"


def test_reduced_audio_convnext_converts_with_model_config():
    """The benchmark's tiny models: sizes no registered model has, named with ``model_config``."""
    from convnext_audio_jax.convert.conversion import convert_state_dict

    size = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}
    reference = randomize_(build_reference("convnext_tiny", **size), seed=11)
    state_dict = {k: v.detach().numpy().copy() for k, v in reference.state_dict().items()}
    with pytest.raises(ValueError, match="neither Tiny"):  # unnamed: no registered model has this size
        convert_state_dict(state_dict)
    conversion = convert_state_dict(state_dict, "convnext_tiny", model_config=size)
    assert conversion.model_config == size
    waveform = (0.1 * np.random.default_rng(0).standard_normal((2, 32000))).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(waveform))["clipwise_output"].numpy()
    out = flax_forward(create_model("convnext_tiny", **size), conversion.variables, waveform)
    assert max_abs(out["probs"], expected) <= TOLERANCE
    with pytest.raises(ValueError, match="audio ConvNeXt models only"):
        build_reference("cnn6", dims=(8, 16, 32, 64))


# ---------------------------------------------------------------- class names, workdirs, overwrite, no torch


def test_527_classes_get_audioset_names_and_tag_with_them(cnn6_converted, tmp_path, capsys):
    """No --labels: the model holds AudioSet's names and ids, and `tag` prints them."""
    out = cnn6_converted
    _, _, metadata = load_model(out)
    assert len(metadata["class_names"]) == 527 and len(metadata["class_ids"]) == 527
    assert (metadata["class_ids"][0], metadata["class_names"][0]) == ("/m/09x0r", "Speech")
    assert (metadata["class_ids"][526], metadata["class_names"][526]) == ("/m/07hvw1", "Field recording")
    assert "AudioSet" in metadata["class_labels_from"]
    capsys.readouterr()
    wav = tmp_path / "tone.wav"
    t = np.arange(32000) / 32000
    sf.write(wav, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 32000)
    assert main_cli(["tag", str(wav), "--checkpoint", str(out), "--format", "json", "--all-scores",
                     "--threshold", "0", "--top-k", "3", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)[0]
    assert list(report["scores"])[:2] == ["Speech", "Male speech, man speaking"] and len(report["scores"]) == 527
    assert all(tag["label"] == metadata["class_names"][tag["index"]] for tag in report["tags"])
    # --labels still overrides what the model holds.
    labels = tmp_path / "mine.csv"
    labels.write_text("index,mid,display_name\n" + "".join(f"{i},/x/{i},Mine {i}\n" for i in range(527)))
    assert main_cli(["tag", str(wav), "--checkpoint", str(out), "--labels", str(labels), "--format", "json",
                     "--all-scores", "--no-progress"]) == 0
    assert list(json.loads(capsys.readouterr().out)[0]["scores"])[0] == "Mine 0"
    # embed --kind logits stores the column names.
    npz = tmp_path / "logits.npz"
    assert main_cli(["embed", str(wav), "--checkpoint", str(out), "--kind", "logits", "--output", str(npz),
                     "--no-progress"]) == 0
    with np.load(npz) as stored:
        assert stored["class_names"][0] == "Speech" and stored["class_names"].shape == (527,)


def test_to_torch_from_a_training_workdir(cnn6, tmp_path, capsys):
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "10").mkdir(parents=True)
    assert convert(cnn6[1], tmp_path / "run" / "model" / "last") == 0
    capsys.readouterr()
    assert convert(workdir, tmp_path / "back.safetensors", "--to-torch") == 0
    assert "using " + str(workdir / "model" / "last") in capsys.readouterr().err
    back = load_torch_state_dict(tmp_path / "back.safetensors")
    np.testing.assert_array_equal(back["fc_audioset.weight"], numpy_state_dict(cnn6[0])["fc_audioset.weight"])
    empty = tmp_path / "fresh_run"
    (empty / "checkpoints" / "5").mkdir(parents=True)
    assert_refused(capsys, [empty, tmp_path / "x.pth", "--to-torch"],
                   "is a training workdir with no model yet (no model/best or model/last); orbax steps under "
                   "checkpoints/: 5", tmp_path / "x.pth")


def test_overwrite_replaces_only_a_model_directory(cnn6, tmp_path, capsys):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("months of work")
    assert convert(cnn6[1], folder, "--overwrite") == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is a non-empty folder that is not a model directory" in err
    assert [p.name for p in folder.iterdir()] == ["chapter1.tex"] and (folder / "chapter1.tex").read_text() == "months of work"
    out = tmp_path / "model"
    assert convert(cnn6[1], out, "--num-classes", 527) == 0
    before = load_model(out)[2]["source"]["sha256"]
    other = tmp_path / "other.safetensors"
    reference = randomize_(build_reference("cnn6"), seed=21)
    save_file(numpy_state_dict(reference), other)
    assert convert(other, out, "--overwrite") == 0
    after = load_model(out)[2]
    assert after["source"]["file"] == "other.safetensors" and after["source"]["sha256"] != before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_pth_without_torch_is_one_line_and_safetensors_needs_no_torch(cnn6, tmp_path, capsys, monkeypatch):
    """torch made unimportable (as where the [torch] extra is not installed), not uninstalled."""
    safetensors_file = tmp_path / "cnn6.safetensors"
    save_file(numpy_state_dict(cnn6[0]), safetensors_file)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ImportError):
        import torch as _  # noqa: F401
    assert_refused(capsys, [cnn6[1], tmp_path / "out"],
                   "Cnn6_mAP=0.343.pth: reading a PyTorch .pth/.pt file needs torch, which is not installed: install "
                   'the [torch] extra (pip install "convnext-audio-jax[torch]") or convert the file to .safetensors',
                   tmp_path / "out")
    assert convert(safetensors_file, tmp_path / "flax") == 0
    assert_refused(capsys, [tmp_path / "flax", tmp_path / "back.pth", "--to-torch"],
                   "back.pth: writing a PyTorch .pth/.pt file needs torch", tmp_path / "back.pth")
    assert convert(tmp_path / "flax", tmp_path / "back.safetensors", "--to-torch") == 0
    # The PyTorch reference says what it needs.
    spec = importlib.util.spec_from_file_location("reference_without_torch",
                                                  pathlib.Path(build_reference.__code__.co_filename))
    with pytest.raises(ImportError, match=r"needs the \[torch\] extra"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_the_wheel_ships_the_package_and_class_names_but_no_top_level_convert(tmp_path):
    import shutil
    import zipfile

    root, source = pathlib.Path(__file__).parents[1], tmp_path / "checkout"  # a copy: the build writes beside it
    for name in ("convnext_audio_jax", "convert"):
        shutil.copytree(root / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"convnext_audio_jax"}
    assert "convnext_audio_jax/data/audioset_classes/class_labels_indices.csv" in names
    assert "convnext_audio_jax/hub/convert_command.py" in names
