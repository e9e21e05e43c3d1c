"""Evaluation: sharded jitted forward with a padded partial last batch, skipped clips, reports, data SPECs, CLI."""

import csv
import json

import data_helpers
import jax
import numpy as np
import pytest

from convnext_audio_jax import cli
from convnext_audio_jax.artifacts.model_dir import save_model
from convnext_audio_jax.data import audio
from convnext_audio_jax.data.sources import PackedHdf5Source
from convnext_audio_jax.evaluation import evaluate as evaluate_lib
from convnext_audio_jax.evaluation.metrics import compute_metrics
from convnext_audio_jax.models import create_model, init_variables

NUM_CLASSES = len(data_helpers.CLASSES)
TINY = dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), num_classes=NUM_CLASSES)
NUM_CLIPS = 13  # with batch 8: one full batch, then a partial one of 4 valid clips + 1 skipped
BROKEN_ROW = 6


@pytest.fixture(scope="module")
def tiny_model():
    model = create_model("convnext_tiny", **TINY)
    variables = init_variables(model, jax.random.key(1))
    # Non-trivial BatchNorm statistics, so that padding rows would show if they leaked into the statistics.
    variables["batch_stats"]["bn0"]["mean"] = np.full(224, -30.0, np.float32)
    variables["batch_stats"]["bn0"]["var"] = np.full(224, 400.0, np.float32)
    return model, variables


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("packed")
    rng = np.random.default_rng(0)
    waveforms = data_helpers.random_waveforms(NUM_CLIPS)
    waveforms[BROKEN_ROW] = 0  # PANNs' packer leaves missing clips as zeros: read as "empty" and skipped
    targets = rng.random((NUM_CLIPS, NUM_CLASSES)) < 0.4
    targets[0] = True
    targets[1] = False  # every class has a positive and a negative
    names = [f"clip{i:02d}" for i in range(NUM_CLIPS)]
    path = data_helpers.write_packed_hdf5(folder / "eval.h5", waveforms, targets, names)
    return path, waveforms, targets


@pytest.fixture(scope="module")
def per_clip_reference(tiny_model, packed):
    """Unsharded (one device), one clip at a time: the computation evaluation must reproduce."""
    model, variables = tiny_model
    _, waveforms, targets = packed
    keep = [i for i in range(NUM_CLIPS) if i != BROKEN_ROW]
    one_clip = jax.jit(lambda v, x: model.apply(v, x)["probs"][0])
    probs = np.stack([np.asarray(one_clip(variables, audio.int16_to_float(waveforms[i])[None])) for i in keep])
    return probs, targets[keep], [f"clip{i:02d}" for i in keep]


def test_predict_equals_per_clip_computation_with_partial_batch_and_skip(tiny_model, packed, per_clip_reference):
    model, variables = tiny_model
    source = PackedHdf5Source.from_files([packed[0]])
    assert len(jax.devices()) == 8
    predictions = evaluate_lib.predict(model, variables, source, batch_size=8, progress=False)
    probs, targets, ids = per_clip_reference
    assert predictions.clip_ids == ids
    np.testing.assert_array_equal(predictions.targets, targets)
    np.testing.assert_allclose(predictions.scores, probs, rtol=0, atol=2e-6)
    assert dict(predictions.skipped) == {audio.EMPTY: 1}
    assert predictions.skipped_ids[0][:2] == (f"clip{BROKEN_ROW:02d}", audio.EMPTY)
    assert predictions.clips_per_second > 0


def test_evaluate_metrics_and_reports(tiny_model, packed, per_clip_reference, tmp_path):
    model, variables = tiny_model
    source = PackedHdf5Source.from_files([packed[0]])
    names = [name for _, name in data_helpers.CLASSES]
    # Batch 5 on 8 devices is rounded up to 8.
    result = evaluate_lib.evaluate(model, variables, source, batch_size=5, class_names=names, output_dir=tmp_path,
                                   progress=False)
    probs, targets, _ = per_clip_reference
    expected = compute_metrics(targets, probs, names)
    for key in ("mAP", "AUC", "d_prime"):
        assert result[key] == pytest.approx(expected[key], abs=1e-6)
    assert result["num_clips"] == NUM_CLIPS - 1
    assert result["num_skipped"] == 1 and result["skipped"] == {audio.EMPTY: 1}

    written = json.loads((tmp_path / evaluate_lib.METRICS_FILE).read_text())
    assert written["mAP"] == pytest.approx(result["mAP"])
    with open(tmp_path / evaluate_lib.PER_CLASS_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == names
    assert list(rows[0]) == ["index", "name", "AP", "AUC", "d_prime", "positives"]
    ap = [float(r["AP"]) for r in rows]
    assert np.mean(ap) == pytest.approx(result["mAP"], abs=1e-6)
    assert [int(r["positives"]) for r in rows] == targets.sum(axis=0).tolist()
    assert (tmp_path / evaluate_lib.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_data_specs(packed, tmp_path):
    source, names = evaluate_lib.open_data_spec(str(packed[0]))
    assert len(source) == NUM_CLIPS and names is None

    rows = data_helpers.write_generated_clips(tmp_path / "audio", 3)
    segments = data_helpers.write_segments_csv(tmp_path / "eval_segments.csv", rows)
    labels = data_helpers.write_class_labels(tmp_path / "class_labels_indices.csv")
    source, names = evaluate_lib.open_data_spec(f"{tmp_path / 'audio'}@{segments}", labels)
    assert len(source) == 3 and names == tuple(n for _, n in data_helpers.CLASSES)
    assert source[0]["waveform"].shape == (audio.CLIP_SAMPLES,)

    with pytest.raises(ValueError, match="needs the class list"):
        evaluate_lib.open_data_spec(f"{tmp_path / 'audio'}@{segments}")
    with pytest.raises(ValueError, match="no manifest"):
        evaluate_lib.open_data_spec(f"{tmp_path}@eval")
    with pytest.raises(ValueError, match="no file .*missing.h5 .*eval_segments.csv"):  # lists what exists
        evaluate_lib.open_data_spec(str(tmp_path / "missing.h5"))
    (tmp_path / "fake.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match="not an HDF5 file"):
        evaluate_lib.open_data_spec(str(tmp_path / "fake.h5"))
    with pytest.raises(ValueError, match="is none of DIR@SPLIT"):
        evaluate_lib.open_data_spec(str(segments))


def test_data_at_another_rate_or_length_than_the_model_is_refused(packed):
    """A model trained at 16 kHz on 1 s clips (the demo) must not read 10 s clips at 32 kHz as 20 s of its audio."""
    from convnext_audio_jax.models.frontend import FrontendConfig

    demo_frontend = FrontendConfig(sample_rate=16_000, n_mels=64, fmax=8_000.0, clip_seconds=1.0)
    with pytest.raises(ValueError, match=r"holds clips of 320000 samples at 32000 Hz; the model takes clips of 16000 samples at "
                                         r"16000 Hz"):
        evaluate_lib.open_data_spec(str(packed[0]), frontend=demo_frontend)
    source, _ = evaluate_lib.open_data_spec(str(packed[0]), frontend=FrontendConfig())
    assert len(source) == NUM_CLIPS


def test_cli_evaluate_end_to_end(tiny_model, packed, tmp_path, capsys):
    model, variables = tiny_model
    names = [name for _, name in data_helpers.CLASSES]
    checkpoint = save_model(tmp_path / "ckpt", "convnext_tiny", variables, {"class_names": names}, TINY)
    output = tmp_path / "report"
    code = cli.main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(packed[0]), "--batch-size", "8",
                     "--output", str(output), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "12 clips (1 skipped" in printed and "mAP" in printed
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["per_class"][2]["name"] == names[2]

    code = cli.main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "nope@eval"),
                     "--output", str(output)])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "no folder" in error


def test_reports_go_to_the_run_evaluated_not_the_current_folder(tmp_path):
    workdir = tmp_path / "runs" / "exp1"
    best = workdir / "model" / "best"
    best.mkdir(parents=True)
    converted = tmp_path / "models" / "tiny"
    converted.mkdir(parents=True)
    default = evaluate_lib.default_output
    # A workdir, or its model/best named directly (training replaces that folder): the workdir's evaluation/.
    assert default(workdir, best, "data/audioset@eval") == workdir / "evaluation" / "data_audioset@eval"
    assert default(best, best, "demo@eval") == workdir / "evaluation" / "demo@eval"
    assert default(converted, converted, "/mnt/a b/x.h5+demo") == converted / "evaluation" / "mnt_a_b_x.h5+demo"
    cached = tmp_path / "cache" / "models" / "convnext_tiny_471mAP"  # a pretrained name: its cached directory
    assert default("convnext_tiny_471mAP", cached, "tfds:audioset/flac@eval") == (
        cached / "evaluation" / "tfds_audioset_flac@eval")


def test_unreadable_first_clip_is_skipped_not_used_as_padding(tiny_model, tmp_path):
    """Clip 0 broken: evaluation pads with zero rows of the model's clip length, never with clip 0."""
    model, variables = tiny_model
    waveforms = data_helpers.random_waveforms(5)
    waveforms[0] = 0  # read as "empty"
    targets = np.eye(5, NUM_CLASSES, dtype=bool)
    targets[1:, 0] = True
    path = data_helpers.write_packed_hdf5(tmp_path / "first_broken.h5", waveforms, targets, [f"c{i}" for i in range(5)])
    predictions = evaluate_lib.predict(model, variables, PackedHdf5Source.from_files([path]), batch_size=8,
                                       progress=False)
    assert predictions.clip_ids == ["c1", "c2", "c3", "c4"]
    assert dict(predictions.skipped) == {audio.EMPTY: 1}
    

def test_class_order():
    names = ["Speech", "Dog", "Music"]
    assert evaluate_lib.class_order(names, list(names), 3, 3) is None
    assert evaluate_lib.class_order(None, names, 3, 3) is None  # no names on one side: counts only
    with pytest.raises(ValueError, match="the data has 4 classes, the model 3"):
        evaluate_lib.class_order(names, None, 3, 4)
    with pytest.raises(ValueError) as error:
        evaluate_lib.class_order(names, ["Speech", "Music", "Dog"], 3, 3)
    assert str(error.value) == ("the model's class names differ from the data's: first difference at index 1: the "
                                "model's class 1 is 'Dog', the data's 'Music' (the same names in another order: "
                                "--remap-by-name scores each data class by name)")
    with pytest.raises(ValueError, match="first difference at index 2: the model's class 2 is 'Music', the data's "
                                         "'Cat'$"):
        evaluate_lib.class_order(names, ["Speech", "Dog", "Cat"], 3, 3)
    with pytest.raises(ValueError, match="the data has 2 classes, the model 3; the shorter list is a prefix"):
        evaluate_lib.class_order(names, names[:2], 3, 2)
    assert evaluate_lib.class_order(names, ["Music", "Speech", "Dog"], 3, 3, remap_by_name=True) == [2, 0, 1]
    with pytest.raises(ValueError, match="--remap-by-name: the data's class 2 'Cat' is not a class of the model"):
        evaluate_lib.class_order(names, ["Music", "Speech", "Cat"], 3, 3, remap_by_name=True)
    with pytest.raises(ValueError, match="--remap-by-name: the data lists class 'Dog' twice"):
        evaluate_lib.class_order(names, ["Dog", "Speech", "Dog"], 3, 3, remap_by_name=True)
    with pytest.raises(ValueError, match="--remap-by-name needs class names on both sides; the model has none"):
        evaluate_lib.class_order(None, names, 3, 3, remap_by_name=True)


def test_reorder_classifier_reorders_the_outputs_exactly(tiny_model, packed):
    model, variables = tiny_model
    order = [3, 0, 4, 1, 2]
    waveform = audio.int16_to_float(packed[1][:2])
    forward = jax.jit(lambda v, x: model.apply(v, x)["logits"])
    expected = np.asarray(forward(variables, waveform))[:, order]
    np.testing.assert_array_equal(np.asarray(forward(evaluate_lib.reorder_classifier(variables, order), waveform)),
                                  expected)


def test_cli_refuses_other_class_names_and_remaps_by_name(tiny_model, packed, per_clip_reference, tmp_path, capsys):
    """The model's names in the data's order is refused naming the first differing index; --remap-by-name scores
    each data class with the model's output of that name. The model is given as a training workdir."""
    model, variables = tiny_model
    names = [name for _, name in data_helpers.CLASSES]
    workdir = tmp_path / "run"
    save_model(workdir / "model" / "best", "convnext_tiny", variables, {"class_names": names}, TINY)
    order = [2, 0, 4, 1, 3]  # data class j is the model's class order[j]
    shuffled = data_helpers.write_class_labels(tmp_path / "shuffled.csv", [data_helpers.CLASSES[i] for i in order])
    # The packed targets' columns are in the model's order; permute them so the data is in the shuffled order.
    path, waveforms, targets = packed
    data = data_helpers.write_packed_hdf5(tmp_path / "shuffled.h5", waveforms, targets[:, order],
                                          [f"clip{i:02d}" for i in range(NUM_CLIPS)])
    argv = ["evaluate", "--checkpoint", str(workdir), "--data", str(data), "--labels", str(shuffled),
            "--batch-size", "8", "--output", str(tmp_path / "report"), "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"using {workdir / 'model' / 'best'}" in err
    assert err.strip().splitlines()[-1] == (
        "convnext-audio evaluate: error: the model's class names differ from the data's: first difference at index "
        f"0: the model's class 0 is {names[0]!r}, the data's {names[2]!r} (the same names in another order: "
        "--remap-by-name scores each data class by name)")
    assert not (tmp_path / "report").exists()

    assert cli.main(argv + ["--remap-by-name"]) == 0
    assert "5 of 5 classes matched by name at another index" in capsys.readouterr().err
    probs, reference_targets, _ = per_clip_reference
    expected = compute_metrics(reference_targets[:, order], probs[:, order], [names[i] for i in order])
    metrics = json.loads((tmp_path / "report" / evaluate_lib.METRICS_FILE).read_text())
    assert metrics["mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
    assert [c["name"] for c in metrics["per_class"]] == [names[i] for i in order]
    for got, want in zip(metrics["per_class"], expected["per_class"]):
        assert got["AP"] == pytest.approx(want["AP"], abs=1e-6)
