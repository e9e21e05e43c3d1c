import importlib.util
import logging

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from data_helpers import (
    segment_file,
    write_class_labels,
    write_generated_clips,
    write_segments_csv,
)

from convnext_audio_jax.data import audio, pipeline, sources, tfds_builder


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory):
    """A manual_dir as a user would lay it out: CSVs at the top, clips in a sub-folder, one clip missing."""
    folder = tmp_path_factory.mktemp("manual")
    write_class_labels(folder / tfds_builder.LABELS_CSV)
    rows = write_generated_clips(folder / "audio", 6)
    segment_file(folder / "audio", rows[2][0], 30.0, 40.0, "flac").unlink(missing_ok=True)
    segment_file(folder / "audio", rows[2][0], 30.0, 40.0, "wav").unlink(missing_ok=True)
    write_segments_csv(folder / "balanced_train_segments.csv", rows[:5])
    write_segments_csv(folder / "eval_segments.csv", rows[5:])
    return folder, rows


def build(manual, data_dir, config, **download_kwargs):
    builder = tfds_builder.Audioset(data_dir=str(data_dir), config=config)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual), **download_kwargs),
        file_format="array_record",
    )
    return builder


def expected_waveforms(manual, rows):
    return {row[0]: audio.load_clip(next((manual / "audio").glob(f"{row[0]}_*"))) for row in rows}


def test_builds_and_reads_without_tensorflow(tmp_path, manual_dir, caplog):
    assert importlib.util.find_spec("tensorflow") is None, "this test proves the no-TensorFlow path"
    manual, rows = manual_dir
    with caplog.at_level(logging.WARNING, logger=tfds_builder.__name__):
        builder = build(manual, tmp_path, "int16")
    assert f"skipped clip {rows[2][0]}: missing" in caplog.text
    assert builder.info.splits["balanced_train"].num_examples == 4
    assert builder.info.splits["eval"].num_examples == 1
    assert "unbalanced_train" not in builder.info.splits  # its CSV is absent

    source = sources.TfdsSource(builder, "balanced_train", num_classes=5)
    expected = expected_waveforms(manual, [r for i, r in enumerate(rows[:5]) if i != 2])
    assert sorted(source.clip_id(i) for i in range(len(source))) == sorted(expected)
    for i in range(len(source)):
        clip = source[i]
        np.testing.assert_array_equal(clip["waveform"], expected[clip["id"]])
        row = next(r for r in rows if r[0] == clip["id"])
        assert clip["target"].sum() == len(row[3])
    # The label scan is cached; a second source reads the cache.
    assert (tmp_path / "audioset" / "int16" / "1.0.0" / "balanced_train-label-cache.npz").is_file()
    np.testing.assert_array_equal(sources.TfdsSource(builder, "balanced_train", 5).targets, source.targets)

    loader = pipeline.make_loader(source, pipeline.LoaderConfig(batch_size=2, sampling="balanced"),
                                  grain.sharding.ShardOptions(0, 1))
    batch = next(loader)
    assert batch["waveform"].shape == (2, audio.CLIP_SAMPLES)


def test_flac_config_stores_the_same_samples(tmp_path, manual_dir):
    manual, rows = manual_dir
    builder = build(manual, tmp_path, "flac")
    records = builder.as_data_source(split="eval")
    assert isinstance(records[0]["waveform"], bytes)
    source = sources.TfdsSource(builder, "eval", num_classes=5)
    np.testing.assert_array_equal(source[0]["waveform"], expected_waveforms(manual, rows[5:])[rows[5][0]])


def test_missing_labels_file_explains_the_layout(tmp_path):
    (tmp_path / "manual").mkdir()
    write_segments_csv(tmp_path / "manual" / "eval_segments.csv", [("a", 0.0, 10.0, ["/m/04rlf"])])
    with pytest.raises(FileNotFoundError, match="class_labels_indices.csv"):
        build(tmp_path / "manual", tmp_path / "data", "int16")
