"""Data SPECs: the grammar, every kind opened on files made here (prepare outputs in both formats, a PANN
index, a packed file, a folder + CSV, a TFDS build, the demo), unions, holdout validation, one-line errors,
and a tiny model trained a few steps from each kind, whose evaluation `convnext-audio evaluate` repeats."""

import json
import pathlib
import subprocess
import sys

import data_helpers
import numpy as np
import pytest

from convnext_audio_jax import cli, training
from convnext_audio_jax.data import pipeline, prepare
from convnext_audio_jax.data import spec as spec_lib
from convnext_audio_jax.data.sampler import BalancedIndices

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_CLASSES = len(data_helpers.CLASSES)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """16 generated clips: 10 in balanced_train, 6 in eval; packed by `prepare` in both formats, listed in
    CSVs, and laid out as a TFDS manual_dir."""
    root = tmp_path_factory.mktemp("corpus")
    audio_dir = root / "manual" / "audio"
    rows = data_helpers.write_generated_clips(audio_dir, 16)
    rows[0] = (rows[0][0], rows[0][1], rows[0][2], [m for m, _ in data_helpers.CLASSES])  # every class has a clip
    labels = data_helpers.write_class_labels(root / "manual" / "class_labels_indices.csv")
    train_csv = data_helpers.write_segments_csv(root / "manual" / "balanced_train_segments.csv", rows[:10])
    eval_csv = data_helpers.write_segments_csv(root / "manual" / "eval_segments.csv", rows[10:])
    for output_format in prepare.FORMATS:
        for csv in (train_csv, eval_csv):
            prepare.prepare_split(audio_dir=audio_dir, clip_list_csv=csv, labels_csv=labels,
                                  output=root / output_format, output_format=output_format, progress=False)
    return {"root": root, "audio": audio_dir, "labels": labels, "train_csv": train_csv, "eval_csv": eval_csv,
            "ids": [r[0] for r in rows]}


@pytest.fixture(scope="module")
def tfds_dir(corpus):
    import tensorflow_datasets as tfds

    from convnext_audio_jax.data import tfds_builder

    data_dir = corpus["root"] / "tfds"
    builder = tfds_builder.Audioset(data_dir=str(data_dir), config="int16")
    builder.download_and_prepare(file_format="array_record", download_config=tfds.download.DownloadConfig(
        manual_dir=str(corpus["root"] / "manual")))
    return data_dir


def kinds(corpus, tfds_dir) -> dict[str, str]:
    """A SPEC of each kind for the training clips (balanced_train)."""
    root = corpus["root"]
    packed = sorted((root / "hdf5").glob("balanced_train-*.h5"))
    assert len(packed) == 1
    return {
        "array_record": f"{root / 'array_record'}@balanced_train",
        "hdf5": f"{root / 'hdf5'}@balanced_train",
        "pann_index": str(root / "hdf5" / "balanced_train_index.h5"),
        "packed_file": str(packed[0]),
        "folder_csv": f"{corpus['audio']}@{corpus['train_csv']}",
        "tfds": "tfds:audioset/int16:1.0.0@balanced_train",
    }


def options(corpus, tfds_dir=None) -> spec_lib.DataOptions:
    return spec_lib.DataOptions(labels_csv=str(corpus["labels"]), tfds_data_dir=str(tfds_dir or ""))


# ------------------------------------------------------------------------------------------------ grammar


def test_parse_names_each_kind_and_rejects_the_rest():
    assert [p.kind for p in spec_lib.parse("d@train+x.h5+a@c.csv+tfds:audioset/flac:1.0.0@eval+demo@eval")] == [
        "prepared", "hdf5", "folder", "tfds", "demo"]
    tfds_part = spec_lib.parse("tfds:audioset/flac:1.0.0@eval")[0]
    assert (tfds_part.tfds_name, tfds_part.selector) == ("audioset/flac:1.0.0", "eval")
    assert spec_lib.parse("demo")[0].selector == "train"
    for bad, message in [("data", "is none of"), ("a@b+", "empty term"), ("tfds:audioset", "tfds:NAME"),
                         ("demo@test", "demo has splits"), ("holdout:5%", "only valid as data.validation")]:
        with pytest.raises(spec_lib.SpecError, match=message) as error:
            spec_lib.parse(bad)
        assert "\n" not in str(error.value) and repr(bad) in str(error.value)
    assert spec_lib.parse_holdout("holdout:10%") == (None, 0.1)
    assert spec_lib.parse_holdout("holdout:25") == (25, None)
    assert spec_lib.parse_holdout("data@validation") is None
    with pytest.raises(spec_lib.SpecError, match="holdout:N"):
        spec_lib.parse_holdout("holdout:ten")


# ----------------------------------------------------------------------------------------------- opening


def test_every_kind_opens_the_same_clips(corpus, tfds_dir):
    reference = None
    for kind, spec in kinds(corpus, tfds_dir).items():
        opened = spec_lib.open_spec(spec, options(corpus, tfds_dir))
        source = opened.source
        clips = {source.clip_id(i): i for i in range(len(source))}
        assert sorted(clips) == sorted(corpus["ids"][:10]), kind
        assert source.num_classes == NUM_CLASSES and opened.sample_rate == 32_000, kind
        by_id = {clip_id: (source[i]["waveform"], source.targets[i]) for clip_id, i in clips.items()}
        if reference is None:
            reference = by_id
        for clip_id, (waveform, target) in by_id.items():
            np.testing.assert_array_equal(waveform, reference[clip_id][0], err_msg=f"{kind} {clip_id}")
            np.testing.assert_array_equal(target, reference[clip_id][1], err_msg=f"{kind} {clip_id}")


def test_errors_name_the_spec_and_what_exists(corpus, tfds_dir):
    root = corpus["root"]
    cases = [
        (f"{root / 'array_record'}@validation", r"no split 'validation' .*splits found: \['balanced_train', 'eval'\]"),
        (f"{root / 'nowhere'}@train", r"no folder .*nowhere \(.*holds .*array_record/"),
        (f"{root / 'manual'}@train", r"no manifest.json.*holds .*audio/"),
        (str(root / "hdf5" / "missing.h5"), r"no file .*missing.h5 \(.*holds .*balanced_train_index.h5"),
        ("tfds:audioset/int16@validation", r"splits found: \['balanced_train', 'eval'\]"),
        (f"{root / 'hdf5'}@{corpus['train_csv']}", "none of the 10 clips listed .* has a file in .*hdf5"),
    ]
    for spec, message in cases:
        with pytest.raises(spec_lib.SpecError, match=message) as error:
            spec_lib.open_spec(spec, options(corpus, tfds_dir))
        assert "\n" not in str(error.value) and repr(spec) in str(error.value)


# ------------------------------------------------------------------------------------------ union, holdout


def test_union_spans_both_parts_and_resumes_exactly(corpus):
    root = corpus["root"]
    spec = f"{root / 'array_record'}@balanced_train+{root / 'hdf5'}@eval"
    union = spec_lib.open_spec(spec, options(corpus)).source
    assert len(union) == 16 and union.targets.shape == (16, NUM_CLASSES)
    assert [union.clip_id(i) for i in range(10, 16)] == corpus["ids"][10:]
    np.testing.assert_array_equal(union[11]["waveform"], spec_lib.open_spec(f"{root / 'hdf5'}@eval").source[1]["waveform"])
    draws = BalancedIndices(union.targets, seed=0)
    assert {draws[i] >= 10 for i in range(200)} == {True, False}  # the sampler draws from both parts

    config = pipeline.LoaderConfig(batch_size=3, sampling="balanced", seed=1, read_threads=1)
    shard = pipeline.grain.sharding.ShardOptions(shard_index=0, shard_count=1)
    loader = pipeline.make_loader(union, config, shard)
    next(loader)
    state = loader.get_state()
    expected = [next(loader)["id"].tolist() for _ in range(3)]
    resumed = pipeline.make_loader(union, config, shard)
    resumed.set_state(state)
    assert [next(resumed)["id"].tolist() for _ in range(3)] == expected


def test_union_with_a_clip_in_two_parts_names_it(corpus):
    root = corpus["root"]
    spec = f"{root / 'array_record'}@balanced_train+{root / 'hdf5'}@balanced_train"
    with pytest.raises(spec_lib.SpecError, match=f"clip id '{corpus['ids'][0]}' is in both") as error:
        spec_lib.open_spec(spec, options(corpus))
    assert "\n" not in str(error.value)


def _holdout_ids(spec: str, holdout: str) -> tuple[list[str], list[str]]:
    source = spec_lib.open_spec(spec).source
    train, validation = spec_lib.split_holdout(source, holdout)
    return ([train.clip_id(i) for i in range(len(train))], [validation.clip_id(i) for i in range(len(validation))])


def test_open_for_model_makes_the_demo_at_the_models_format_and_refuses_other_data(corpus):
    """The one check of a SPEC against a model's rate and clip length (evaluate, predict and training use it)."""
    from convnext_audio_jax.models.frontend import FrontendConfig

    small = spec_lib.DataOptions(demo_clips={"eval": 4})
    other = FrontendConfig(sample_rate=22_050, n_mels=32, fmax=8_000.0, clip_seconds=0.5)
    opened = spec_lib.open_for_model("demo@eval", small, other)
    assert (opened.sample_rate, opened.clip_samples) == (22_050, 11_025) and opened.source[0]["waveform"].shape == (11_025,)
    packed = f"{corpus['root'] / 'hdf5'}@eval"  # 10 s at 32 kHz
    with pytest.raises(spec_lib.ClipFormatError, match=r"^data\.eval '.*' holds clips of 320000 samples at 32000 Hz; "
                                                        r"the model takes clips of 11025 samples at 22050 Hz$"):
        spec_lib.open_for_model(packed, options(corpus), other, where="data.eval")
    source, names = spec_lib.open_data_spec(packed, corpus["labels"], frontend=FrontendConfig())
    assert len(source) == 6 and len(names) == NUM_CLASSES


def test_holdout_is_disjoint_deterministic_and_the_same_in_another_process():
    spec = "demo"
    options_ = spec_lib.DataOptions(demo_clips={"train": 400})
    source = spec_lib.open_spec(spec, options_).source
    train, validation = spec_lib.split_holdout(source, "holdout:10%")
    train_ids = {train.clip_id(i) for i in range(len(train))}
    validation_ids = [validation.clip_id(i) for i in range(len(validation))]
    assert not train_ids & set(validation_ids) and len(train_ids) + len(validation_ids) == 400
    assert 20 <= len(validation_ids) <= 60  # about 10 % of 400
    np.testing.assert_array_equal(validation.targets, source.targets[validation.indices])
    _, by_count = spec_lib.split_holdout(source, "holdout:25")
    assert len(by_count) == 25
    # A fresh interpreter (another hash seed, as a resumed run or another host) carves the same clips.
    code = ("from convnext_audio_jax.data import spec as s; o = s.DataOptions(demo_clips={'train': 400}); "
            "src = s.open_spec('demo', o).source; _, v = s.split_holdout(src, 'holdout:10%'); "
            "print(','.join(v.clip_id(i) for i in range(len(v))))")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                            env={"PYTHONPATH": str(REPO), "PYTHONHASHSEED": "123", "JAX_PLATFORMS": "cpu"})
    assert output.stdout.strip().split(",") == validation_ids


# ------------------------------------------------------------------------------------------------ training


def tiny_audioset_config(corpus, tfds_dir, train: str, validation: str, eval_spec: str = ""):
    config = training.default_config()
    config.model.overrides.depths = (1, 1, 1, 1)
    config.model.overrides.dims = (8, 16, 32, 64)
    config.model.drop_path_rate = 0.0
    config.model.frontend.n_mels = 32
    config.data.train, config.data.validation, config.data.eval = train, validation, eval_spec
    config.data.labels_csv = str(corpus["labels"])
    config.data.tfds_data_dir = str(tfds_dir)
    config.data.read_threads = 2
    config.batch_size = 8
    config.per_device_batch_size = 0
    config.eval_batch_size = 8
    config.total_steps = 2
    config.optimizer.schedule = "constant"  # two steps: too short for a one-cycle schedule
    config.eval_every = config.checkpoint_every = config.log_every = 2
    config.augment.time_max_width = 16
    config.augment.freq_max_width = 4
    config.progress_bar = False
    return config


KINDS = ["array_record", "hdf5", "pann_index", "packed_file", "folder_csv", "tfds", "union"]


@pytest.mark.parametrize("kind", KINDS)
def test_training_runs_from_each_kind(corpus, tfds_dir, tmp_path, kind):
    specs = kinds(corpus, tfds_dir)
    root = corpus["root"]
    train = specs.get(kind) or f"{root / 'array_record'}@balanced_train+{corpus['audio']}@{corpus['eval_csv']}"
    validation = f"{root / 'hdf5'}@eval" if kind != "union" else "holdout:6"
    config = tiny_audioset_config(corpus, tfds_dir, train, validation, eval_spec=specs["packed_file"])
    result = training.train(config, tmp_path)
    assert result["step"] == 2 and 0.0 <= result["val_mAP"] <= 1.0 and result["eval_skipped"] == 0
    assert (tmp_path / "model" / "best" / "metadata.json").is_file()
    metadata = json.loads((tmp_path / "model" / "last" / "metadata.json").read_text())
    assert metadata["class_names"] == [name for _, name in data_helpers.CLASSES]


def test_training_evaluation_equals_convnext_audio_evaluate(corpus, tfds_dir, tmp_path, capsys):
    validation = f"{corpus['root'] / 'hdf5'}@eval"
    config = tiny_audioset_config(corpus, tfds_dir, f"{corpus['root'] / 'array_record'}@balanced_train", validation)
    result = training.train(config, tmp_path / "run")
    code = cli.main(["evaluate", "--checkpoint", str(tmp_path / "run" / "model" / "last"), "--data", validation,
                     "--batch-size", "8", "--output", str(tmp_path / "report"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert report["mAP"] == pytest.approx(result["val_mAP"], abs=1e-6)
    assert report["AUC"] == pytest.approx(result["val_AUC"], abs=1e-6)


def test_a_training_folder_with_no_readable_clip_stops_at_once(corpus, tfds_dir, tmp_path):
    config = tiny_audioset_config(corpus, tfds_dir, f"{tmp_path}@{corpus['train_csv']}", "holdout:2")
    with pytest.raises(training.ConfigError, match=f"none of the 10 clips listed in .* has a file in {tmp_path}"):
        training.train(config, tmp_path / "run")


def test_too_many_skipped_validation_clips_stop_the_run(corpus, tfds_dir, tmp_path):
    """One unreadable clip of 6 (17 %) is over data.max_skip_fraction (1 %): the run stops, naming the split."""
    waveforms = data_helpers.random_waveforms(6)
    waveforms[0] = 0  # clip 0 unreadable ("empty"): evaluation must not pad with it either
    targets = np.eye(6, NUM_CLASSES, dtype=bool)
    targets[:, 0] = True
    targets[5, 0] = False
    path = data_helpers.write_packed_hdf5(tmp_path / "validation.h5", waveforms, targets, [f"v{i}" for i in range(6)])
    config = tiny_audioset_config(corpus, tfds_dir, f"{corpus['root'] / 'array_record'}@balanced_train", str(path))
    with pytest.raises(training.TooManySkippedError, match=r"1 of 6 val clips could not be read .*validation.h5"):
        training.train(config, tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("train_skipped" in line for line in lines)
    assert [line["val_skipped"] for line in lines if "val_skipped" in line] == [1]
