import json
import os
import pickle

import h5py
import numpy as np
import pytest
import soundfile
from array_record.python import array_record_module

from convnext_audio_jax.data import audio, labels, records, sources
from data_helpers import (random_waveforms, segment_file, tone, write_class_labels, write_generated_clips,
                          write_packed_hdf5, write_segments_csv)


def skewed_targets(n: int, num_classes: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    targets = np.zeros((n, num_classes), dtype=bool)
    targets[np.arange(n), rng.integers(0, num_classes, n)] = True
    return targets


def test_packed_hdf5_files_are_concatenated_and_zero_rows_are_skipped(tmp_path):
    waveforms = random_waveforms(7)
    waveforms[4] = 0  # PANNs' packer leaves missing clips as zeros
    targets = skewed_targets(7, 5)
    names = [f"Y{i}.wav" for i in range(7)]
    write_packed_hdf5(tmp_path / "a.h5", waveforms[:3], targets[:3], names[:3])
    write_packed_hdf5(tmp_path / "b.h5", waveforms[3:], targets[3:], names[3:])
    source = sources.PackedHdf5Source.from_files([tmp_path / "a.h5", tmp_path / "b.h5"])
    assert len(source) == 7 and source.num_classes == 5
    np.testing.assert_array_equal(source.targets, targets)
    clip = source[5]
    assert clip["id"] == "Y5.wav"
    np.testing.assert_array_equal(clip["waveform"], waveforms[5])
    np.testing.assert_array_equal(clip["target"], targets[5].astype(np.float32))
    with pytest.raises(audio.ClipError) as error:
        source[4]
    assert error.value.reason == audio.EMPTY and error.value.clip_id == "Y4.wav"
    with pytest.raises(IndexError, match="out of range"):
        source[7]
    # Works again after pickling (how grain hands sources to worker processes).
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(source))[6]["waveform"], waveforms[6])


def test_packed_hdf5_rejects_wrong_layout(tmp_path):
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["audio_name"] = np.array([b"a"])
        f["waveform"] = np.zeros((1, 16000), np.int16)
        f["target"] = np.zeros((1, 3), bool)
    with pytest.raises(ValueError, match=r"bad\.h5: waveform has shape \(1, 16000\), expected \(N, 320000\)"):
        sources.PackedHdf5Source.from_files([tmp_path / "bad.h5"])


def test_corrupt_hdf5_chunk_is_unreadable_not_fatal(tmp_path):
    waveforms = random_waveforms(3)
    path = write_packed_hdf5(tmp_path / "c.h5", waveforms, skewed_targets(3, 2), ["a", "b", "c"], compression="gzip")
    with h5py.File(path, "r") as f:
        offset = f["waveform"].id.get_chunk_info(1).byte_offset
    with open(path, "r+b") as f:
        f.seek(offset + 10)
        f.write(b"\xff" * 200)
    source = sources.PackedHdf5Source.from_files([path])
    np.testing.assert_array_equal(source[0]["waveform"], waveforms[0])
    with pytest.raises(audio.ClipError) as error:
        source[1]
    assert error.value.reason == audio.UNREADABLE and error.value.clip_id == "b"


def test_pann_index_points_into_several_files_written_elsewhere(tmp_path):
    waveforms = random_waveforms(6)
    targets = skewed_targets(6, 4)
    write_packed_hdf5(tmp_path / "part0.h5", waveforms[:4], targets[:4], [f"Y{i}" for i in range(4)])
    write_packed_hdf5(tmp_path / "part1.h5", waveforms[4:], targets[4:], ["Y4", "Y5"])
    order = [5, 0, 3, 4]  # an index may select and reorder rows
    file_of = {i: ("part0.h5" if i < 4 else "part1.h5") for i in range(6)}
    with h5py.File(tmp_path / "full_train.h5", "w") as f:
        f["audio_name"] = np.array([f"Y{i}".encode() for i in order], dtype="S20")
        f["target"] = targets[order]
        # Absolute paths of the machine that packed them: resolved by file name next to the index.
        f["hdf5_path"] = np.array([f"/data/panns/hdf5s/{file_of[i]}".encode() for i in order])
        f["index_in_hdf5"] = np.array([i if i < 4 else i - 4 for i in order])
    source = sources.PackedHdf5Source.from_index(tmp_path / "full_train.h5")
    assert [source.clip_id(i) for i in range(4)] == ["Y5", "Y0", "Y3", "Y4"]
    for position, original in enumerate(order):
        np.testing.assert_array_equal(source[position]["waveform"], waveforms[original])
    os.remove(tmp_path / "part1.h5")
    with pytest.raises(FileNotFoundError, match="packed file '/data/panns/hdf5s/part1.h5' not found"):
        sources.PackedHdf5Source.from_index(tmp_path / "full_train.h5")


def write_array_record_split(folder, clips, num_classes, extra_garbage_at=None):
    """An ArrayRecord shard + index + manifest as `prepare` writes them; optionally a damaged record."""
    writer = array_record_module.ArrayRecordWriter(str(folder / "train-00000-of-00001.array_record"), "group_size:1")
    ids, targets = [], []
    for position, (clip_id, class_indices, waveform) in enumerate(clips):
        record = records.encode_record(clip_id, class_indices, waveform)
        writer.write(record[:50] if position == extra_garbage_at else record)
        ids.append(clip_id)
        target = np.zeros(num_classes, bool)
        target[class_indices] = True
        targets.append(target)
    writer.close()
    np.savez(folder / "train-00000-of-00001.index.npz", ids=np.array(ids), targets=np.array(targets))
    manifest = {"format": "array_record", "num_classes": num_classes, "splits": {"train": {"shards": [
        {"data": "train-00000-of-00001.array_record", "index": "train-00000-of-00001.index.npz"}]}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("encoding", records.ENCODINGS)
def test_record_round_trip(encoding):
    waveform = random_waveforms(1)[0]
    clip_id, indices, decoded = records.decode_record(records.encode_record("ÿt-1", [3, 0], waveform, encoding))
    assert clip_id == "ÿt-1"
    np.testing.assert_array_equal(indices, [3, 0])
    np.testing.assert_array_equal(decoded, waveform)
    with pytest.raises(records.RecordError, match="expected b'CAJ1'"):
        records.decode_record(b"XXXX" + b"\x00" * 20)


def test_array_record_source_with_a_damaged_record(tmp_path):
    waveforms = random_waveforms(4)
    clips = [(f"c{i}", [i % 3], waveforms[i]) for i in range(4)]
    write_array_record_split(tmp_path, clips, num_classes=3, extra_garbage_at=2)
    source = sources.open_prepared(tmp_path, "train")
    assert isinstance(source, sources.ArrayRecordSource) and len(source) == 4
    np.testing.assert_array_equal(source[3]["waveform"], waveforms[3])
    np.testing.assert_array_equal(source.targets[:, 0], [True, False, False, True])
    with pytest.raises(audio.ClipError) as error:
        source[2]
    assert error.value.reason == audio.UNREADABLE and error.value.clip_id == "c2"
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(source))[1]["waveform"], waveforms[1])
    with pytest.raises(KeyError, match="no split 'eval'"):
        sources.ArrayRecordSource(tmp_path, "eval")


def test_folder_source_with_segments_csv_missing_and_corrupt_files(tmp_path):
    class_labels = labels.read_class_labels(write_class_labels(tmp_path / "labels.csv"))
    audio_dir = tmp_path / "audio"
    rows = write_generated_clips(audio_dir / "nested", 4)
    rows.append(("gone", 0.0, 10.0, ["/m/04rlf"]))  # no file
    rows.append(("broken", 0.0, 10.0, ["/m/04rlf"]))
    segment_file(audio_dir, "broken", 0.0, 10.0, "flac").write_bytes(b"fLaC" + b"\x01" * 500)
    rows.append(("pann", 5.0, 15.0, ["/m/0jbk"]))  # PANNs' naming: Y{YTID}.wav
    soundfile.write(audio_dir / "Ypann.wav", tone(10.0, 32_000, 500.0), 32_000)
    source = sources.FolderSource(audio_dir, write_segments_csv(tmp_path / "s.csv", rows), class_labels)
    assert len(source) == 7 and source.missing_ids == ["gone"]
    for i in range(4):
        clip = source[i]
        assert clip["waveform"].shape == (audio.CLIP_SAMPLES,) and clip["id"] == rows[i][0]
        assert clip["target"].sum() == len(rows[i][3])
    assert source[6]["target"][3] == 1.0
    reasons = {}
    for i in (4, 5):
        with pytest.raises(audio.ClipError) as error:
            source[i]
        reasons[error.value.clip_id] = error.value.reason
    assert reasons == {"gone": audio.MISSING, "broken": audio.UNREADABLE}


def test_folder_source_with_path_labels_csv_and_real_recordings(tmp_path, freedesktop_recordings):
    class_labels = labels.read_class_labels(write_class_labels(tmp_path / "labels.csv"))
    folder = freedesktop_recordings[0].parent
    names = [p.name for p in freedesktop_recordings[:4]]
    csv_path = tmp_path / "mine.csv"
    csv_path.write_text("path,labels\n" + "".join(f'{n},"Speech;Male speech, man speaking"\n' for n in names))
    source = sources.FolderSource(folder, csv_path, class_labels, min_seconds=0.05)
    assert [source.clip_id(i) for i in range(4)] == names
    for i in range(4):
        clip = source[i]
        assert np.abs(clip["waveform"]).max() > 100
        np.testing.assert_array_equal(clip["target"], [1, 1, 0, 0, 0])
