import argparse
import errno
import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import soundfile
from array_record.python import array_record_module

from convnext_audio_jax.data import audio, prepare, sources
from multiprocess import spawned_children
from data_helpers import segment_file, tone, write_class_labels, write_generated_clips, write_segments_csv


def parse(*argv):
    parser = argparse.ArgumentParser()
    prepare.add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


@pytest.fixture
def audioset_folder(tmp_path):
    """Eight good clips plus one of each failure: missing, unreadable, empty, non-finite, too short."""
    audio_dir = tmp_path / "audio"
    rows = write_generated_clips(audio_dir, 8)
    bad = {
        "missing_": None,
        "unreadable_": lambda p: p.write_bytes(b"RIFF" + b"\x07" * 300),
        "empty_": lambda p: soundfile.write(p, np.zeros((0, 1), np.float32), 16_000),
        "nonfinite_": lambda p: soundfile.write(p, np.full((32_000, 1), np.inf, np.float32), 16_000, subtype="FLOAT"),
        "short_": lambda p: soundfile.write(p, tone(0.3, 16_000, 440.0), 16_000),
    }
    for ytid, make in bad.items():
        if make is not None:
            make(segment_file(audio_dir, ytid, 0.0, 10.0))
        rows.insert(3, (ytid, 0.0, 10.0, ["/m/04rlf"]))
    labels_csv = write_class_labels(tmp_path / "class_labels_indices.csv")
    segments = write_segments_csv(tmp_path / "balanced_train_segments.csv", rows)
    return audio_dir, segments, labels_csv, rows


@pytest.mark.parametrize("output_format", prepare.FORMATS)
def test_prepare_packs_good_clips_and_lists_skipped_ones(tmp_path, audioset_folder, output_format):
    audio_dir, segments, labels_csv, rows = audioset_folder
    output = tmp_path / "out"
    args = parse("--audio-dir", audio_dir, "--segments", segments, "--labels", labels_csv, "--output", output,
                 "--format", output_format, "--workers", 2, "--shard-size", 4, "--no-progress")
    assert prepare.run(args) == 0
    manifest = json.loads((output / "manifest.json").read_text())
    split = manifest["splits"]["balanced_train"]
    assert manifest["format"] == output_format and manifest["num_classes"] == 5
    assert split["num_clips"] == 8 and len(split["shards"]) == 4
    assert split["skipped_by_reason"] == {reason: 1 for reason in audio.SKIP_REASONS
                                          if reason not in (audio.TRUNCATED, audio.CHANGED)}
    assert {s["id"]: s["reason"] for s in split["skipped"]} == {
        "missing_": "missing", "unreadable_": "unreadable", "empty_": "empty", "nonfinite_": "non-finite",
        "short_": "too short"}
    good_rows = [r for r in rows if not r[0].endswith("_")]
    expected_counts = {mid: sum(mid in r[3] for r in good_rows) for mid, _ in
                       [(c["mid"], None) for c in split["class_counts"]]}
    assert {c["mid"]: c["clips"] for c in split["class_counts"]} == expected_counts
    assert split["class_counts"][1]["display_name"] == "Male speech, man speaking"

    source = sources.open_prepared(output, "balanced_train")
    assert [source.clip_id(i) for i in range(len(source))] == [r[0] for r in good_rows]
    for i, row in enumerate(good_rows):
        path = next(audio_dir.glob(f"{row[0]}_*"))
        np.testing.assert_array_equal(source[i]["waveform"], audio.load_clip(path))
        assert source[i]["target"].sum() == len(row[3])


def test_rerun_resumes_finished_shards(tmp_path, audioset_folder):
    audio_dir, segments, labels_csv, _ = audioset_folder
    output = tmp_path / "out"
    args = parse("--audio-dir", audio_dir, "--segments", segments, "--labels", labels_csv, "--output", output,
                 "--workers", 1, "--shard-size", 5, "--no-progress")
    assert prepare.run(args) == 0
    shards = sorted(output.glob("balanced_train-*.array_record"))
    assert len(shards) == 3
    # Written uncompressed: a read costs a copy, not riegeli's default brotli decode (~1 ms per clip).
    reader = array_record_module.ArrayRecordReader(str(shards[0]))
    assert "uncompressed" in reader.writer_options_string().split(",")
    reader.close()
    stamps = {p.name: p.stat().st_mtime_ns for p in shards}
    # An interrupted run: shard 1 never got its summary (its data file may be partial).
    (output / "balanced_train-00001-of-00003.json").unlink()
    shards[1].write_bytes(b"partial")
    assert prepare.run(args) == 0
    assert shards[0].stat().st_mtime_ns == stamps[shards[0].name]
    assert shards[2].stat().st_mtime_ns == stamps[shards[2].name]
    assert shards[1].stat().st_mtime_ns != stamps[shards[1].name]
    source = sources.open_prepared(output, "balanced_train")
    assert len(source) == 8 and all(source[i]["waveform"].any() for i in range(8))
    # A different shard size would mix two plans in one folder: refused with a clear message.
    other = parse("--audio-dir", audio_dir, "--segments", segments, "--labels", labels_csv, "--output", output,
                  "--workers", 1, "--shard-size", 4, "--no-progress")
    assert prepare.run(other) == 2


def test_two_splits_share_one_output_and_labels_must_agree(tmp_path, audioset_folder):
    audio_dir, segments, labels_csv, rows = audioset_folder
    output = tmp_path / "out"
    eval_csv = write_segments_csv(tmp_path / "eval_segments.csv", rows[:2])
    base = ["--audio-dir", audio_dir, "--labels", labels_csv, "--output", output, "--format", "hdf5",
            "--workers", 1, "--no-progress"]
    assert prepare.run(parse(*base, "--segments", segments)) == 0
    assert prepare.run(parse(*base, "--segments", eval_csv)) == 0
    manifest = json.loads((output / "manifest.json").read_text())
    assert sorted(manifest["splits"]) == ["balanced_train", "eval"]
    assert len(sources.open_prepared(output, "eval")) == 2
    other_labels = tmp_path / "other.csv"
    other_labels.write_text("index,mid,display_name\n0,/m/x,X\n")
    assert prepare.run(parse("--audio-dir", audio_dir, "--labels", other_labels, "--output", output,
                             "--segments", eval_csv, "--format", "hdf5", "--no-progress")) == 2
    assert prepare.run(parse(*base[:-5], "--format", "array_record", "--segments", eval_csv, "--no-progress")) == 2


def test_real_recordings_with_a_path_labels_csv_and_flac_records(tmp_path, freedesktop_recordings):
    labels_csv = write_class_labels(tmp_path / "class_labels_indices.csv")
    folder = freedesktop_recordings[0].parent
    chosen = freedesktop_recordings[:3]
    clip_list = tmp_path / "mine.csv"
    clip_list.write_text("path,labels\n" + "".join(f"{p.name},Speech\n" for p in chosen) + "absent.oga,Music\n")
    output = tmp_path / "out"
    args = parse("--audio-dir", folder, "--segments", clip_list, "--labels", labels_csv, "--output", output,
                 "--waveform-encoding", "flac", "--min-seconds", 0.05, "--workers", 1, "--no-progress")
    assert prepare.run(args) == 0
    source = sources.open_prepared(output, "mine")
    assert len(source) == 3
    for i, path in enumerate(chosen):
        np.testing.assert_array_equal(source[i]["waveform"], audio.load_clip(path, min_seconds=0.05))
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["splits"]["mine"]["skipped"] == [
        {"id": "absent.oga", "reason": "missing", "detail": "no matching file in the audio folder"}]


def test_bad_inputs_exit_2_and_nothing_packed_exits_1(tmp_path, capsys):
    labels_csv = write_class_labels(tmp_path / "class_labels_indices.csv")
    (tmp_path / "audio").mkdir()
    missing_only = write_segments_csv(tmp_path / "x_segments.csv", [("nothere", 0.0, 10.0, ["/m/04rlf"])])
    args = parse("--audio-dir", tmp_path / "audio", "--segments", missing_only, "--labels", labels_csv,
                 "--output", tmp_path / "out", "--workers", 1, "--no-progress")
    assert prepare.run(args) == 1
    bad_csv = tmp_path / "bad_segments.csv"
    bad_csv.write_text('# c\nabc, 0.0, 10.0, "/m/unknown"\n')
    args = parse("--audio-dir", tmp_path / "audio", "--segments", bad_csv, "--labels", labels_csv,
                 "--output", tmp_path / "out2", "--no-progress")
    assert prepare.run(args) == 2
    assert "unknown class '/m/unknown'" in capsys.readouterr().err


def _base(audio_dir, labels_csv, output, *extra):
    return ["--audio-dir", audio_dir, "--labels", labels_csv, "--output", output, "--no-progress", *extra]


def test_same_split_twice_refuses_with_a_lock_message(tmp_path, audioset_folder, capsys):
    audio_dir, segments, labels_csv, _ = audioset_folder
    output = tmp_path / "out"
    output.mkdir()
    args = parse(*_base(audio_dir, labels_csv, output, "--segments", segments, "--workers", 1))
    # Another run holds the split's lock: the second refuses at once, naming the lock and the holder.
    with prepare._locked(output / "balanced_train.lock", blocking=False, message="holder"):
        assert prepare.run(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "being prepared by another run" in error
    assert f"balanced_train.lock held by pid {os.getpid()}" in error
    assert not (output / "manifest.json").exists()
    assert prepare.run(args) == 0  # the lock died with its holder


def test_runs_of_two_splits_at_once_both_reach_the_manifest(tmp_path, audioset_folder, monkeypatch):
    """Split B is prepared from start to end while split A is writing its first shard; A's manifest update
    must keep B's entry (it re-reads the manifest under the manifest lock)."""
    audio_dir, segments, labels_csv, rows = audioset_folder
    output = tmp_path / "out"
    eval_csv = write_segments_csv(tmp_path / "eval_segments.csv", rows[:2])
    write = prepare._ShardPlan.write
    started = []

    def write_while_another_split_runs(plan, *args, **kwargs):
        if not started and plan.summary_path.name.startswith("balanced_train"):
            started.append(True)
            assert prepare.run(parse(*_base(audio_dir, labels_csv, output, "--segments", eval_csv,
                                            "--workers", 1))) == 0
        return write(plan, *args, **kwargs)

    monkeypatch.setattr(prepare._ShardPlan, "write", write_while_another_split_runs)
    assert prepare.run(parse(*_base(audio_dir, labels_csv, output, "--segments", segments, "--workers", 1))) == 0
    manifest = json.loads((output / "manifest.json").read_text())
    assert sorted(manifest["splits"]) == ["balanced_train", "eval"]
    assert manifest["splits"]["eval"]["num_clips"] == 2 and manifest["splits"]["balanced_train"]["num_clips"] == 8


def test_disk_full_keeps_finished_shards_and_manifest_and_a_rerun_resumes(tmp_path, audioset_folder, monkeypatch,
                                                                         capsys):
    audio_dir, segments, labels_csv, rows = audioset_folder
    output = tmp_path / "out"
    eval_csv = write_segments_csv(tmp_path / "eval_segments.csv", rows[:2])
    assert prepare.run(parse(*_base(audio_dir, labels_csv, output, "--segments", eval_csv, "--workers", 1))) == 0
    manifest_before = (output / "manifest.json").read_bytes()
    args = parse(*_base(audio_dir, labels_csv, output, "--segments", segments, "--workers", 1, "--shard-size", 4))
    add = prepare._ShardWriter.add
    written = []

    def fill_the_disk(writer, *a):
        if len(written) == 5:  # shard 0 (4 clips) is finished; the disk fills during shard 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(writer._path))
        written.append(a[0])
        return add(writer, *a)

    monkeypatch.setattr(prepare._ShardWriter, "add", fill_the_disk)
    assert prepare.run(args) == 3
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "No space left on device" in error and "re-run" in error
    assert (output / "manifest.json").read_bytes() == manifest_before
    finished = output / "balanced_train-00000-of-00004.array_record"
    assert finished.is_file() and (output / "balanced_train-00000-of-00004.json").is_file()
    assert not list(output.glob("*.partial*"))  # the unfinished shard's temporary file is removed
    stamp = finished.stat().st_mtime_ns

    monkeypatch.setattr(prepare._ShardWriter, "add", add)
    assert prepare.run(args) == 0
    assert finished.stat().st_mtime_ns == stamp  # resumed, not redone
    manifest = json.loads((output / "manifest.json").read_text())
    assert sorted(manifest["splits"]) == ["balanced_train", "eval"]
    assert manifest["splits"]["balanced_train"]["num_clips"] == 8


def test_a_killed_worker_is_an_error_not_a_hang(tmp_path, audioset_folder, capsys):
    """SIGKILL of a decoding worker (what the out-of-memory killer sends) ends the run with one line."""
    audio_dir, segments, labels_csv, _ = audioset_folder
    output = tmp_path / "out"
    args = parse(*_base(audio_dir, labels_csv, output, "--segments", segments, "--workers", 2))
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("code", prepare.run(args)), daemon=True)
    runner.start()
    deadline = time.monotonic() + 60
    while not (workers := sorted(spawned_children())) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert workers, "no decoding worker started"
    os.kill(workers[0], signal.SIGKILL)
    runner.join(timeout=120)
    assert not runner.is_alive(), "prepare hangs after a worker was killed"
    assert result["code"] == 3
    error = capsys.readouterr().err.strip()
    assert "decoding worker died" in error and error.count("\n") == 0
    assert not list(output.glob("*.partial*"))
