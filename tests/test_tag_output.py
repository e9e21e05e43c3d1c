import csv
import io
import json

import numpy as np
import pytest

from convnext_audio_jax.inference import tag_output, tagging

NAMES = ["a", "b", "c"]
BOUNDS = np.array([[0.0, 5.0], [5.0, 10.0]])


def scored_file(name, seconds, seed, frames=True):
    """A FileScored and the WindowScores a Tagger would give for a file of ``seconds`` (windows every 5 s)."""
    rng = np.random.default_rng(seed)
    num_samples = int(seconds * 32_000)
    starts = [0.0] if seconds <= 10 else [*np.arange(0.0, seconds - 10, 5.0), seconds - 10]
    windows = [tagging.WindowScores(name, float(s), rng.random(3).astype(np.float32),
                                    rng.random((2, 3)).astype(np.float32) if frames else None) for s in starts]
    clip = np.max([w.probs for w in windows], axis=0)
    audio = tagging.AudioInfo(name, 48_000, 2, num_samples, model_rate=32_000, window_seconds=10.0, clipped=3)
    return tagging.FileScored(audio, len(windows), clip, BOUNDS if frames else None), windows


def record_text(fmt, name, seconds, seed, all_scores=True, spool=True, frames=True):
    scored, windows = scored_file(name, seconds, seed, frames)
    file_spool = tag_output.FileSpool(None, frames, window_seconds=10.0) if spool else None
    for window in windows if spool else []:
        file_spool.add(window)
    text = "".join(tag_output.record_chunks(fmt, scored, file_spool, NAMES, 2, 0.5, all_scores))
    return text, scored, windows


def test_json_record_streams_windows_frames_and_events_from_the_spool():
    text, scored, windows = record_text("jsonl", "x.wav", 27.0, 0)
    record = json.loads(text)
    assert "\n" not in text and record["file"] == "x.wav" and record["num_windows"] == 5
    assert [w["start"] for w in record["windows"]] == [0, 5, 10, 15, 17]
    assert record["windows"][-1]["end"] == 27.0 and record["clipped_samples"] == 3
    # The frames and events are those of the in-memory TaggedFile.
    tagged = tagging.TaggedFile(scored.audio, np.array([w.start for w in windows]), np.stack([w.probs for w in windows]),
                                scored.clip_probs, np.stack([w.frame_probs for w in windows]), BOUNDS)
    starts, ends, probs = tagged.frame_segments()
    assert [f["start"] for f in record["frames"]] == pytest.approx(starts.tolist())
    assert [f["scores"]["b"] for f in record["frames"]] == pytest.approx(probs[:, 1].tolist())
    events = tagging.merge_events(starts, ends, probs, 0.5)
    assert [(e["index"], e["onset"], e["offset"]) for e in record["events"]] == [
        (e["index"], round(e["onset"], 4), round(e["offset"], 4)) for e in events]


def test_non_finite_scores_never_reach_json_as_nan():
    scored, _ = scored_file("x.wav", 5.0, 0, frames=False)
    scored.clip_probs[1] = np.nan
    with pytest.raises(ValueError, match="not JSON compliant"):
        "".join(tag_output.record_chunks("jsonl", scored, None, NAMES, 3, 0.0, True))


def test_csv_record_ends_with_a_file_row():
    text, _, _ = record_text("csv", "x.wav", 12.0, 1)
    rows = list(csv.reader(io.StringIO(text)))
    kinds = [row[1] for row in rows]
    assert kinds[-1] == "file" and kinds.count("file") == 1 and rows[-1][3] == "12.0"
    assert {"clip", "window", "frame", "file"} <= set(kinds)


@pytest.mark.parametrize("fmt", tag_output.RESUMABLE_FORMATS)
def test_resume_keeps_whole_records_and_cuts_a_torn_one(tmp_path, fmt):
    output = tmp_path / f"out.{fmt}"
    sink = tag_output.RecordSink(output, fmt)
    for number in range(2):
        sink.write(tag_output.record_chunks(fmt, *[scored_file(f"f{number}.wav", 12.0, number)[0], None], NAMES, 2,
                                            0.5, True))
    sink.close()
    whole = output.read_bytes()
    # A crash part-way through the third file's record.
    third = "".join(tag_output.record_chunks(fmt, scored_file("f2.wav", 12.0, 2)[0], None, NAMES, 2, 0.5, True))
    output.write_bytes(whole + third[: len(third) - 7].encode())
    done, end = tag_output.scan_output(output, fmt)
    assert done == {"f0.wav", "f1.wav"} and end == len(whole)

    sink = tag_output.RecordSink(output, fmt, resume=True)
    assert sink.done == {"f0.wav", "f1.wav"}
    sink.write(iter([third]))
    sink.close()
    assert output.read_bytes() == whole + third.encode() + (b"\n" if fmt == "jsonl" else b"")
    assert tag_output.scan_output(output, fmt)[0] == {"f0.wav", "f1.wav", "f2.wav"}


def test_resume_refuses_a_file_it_did_not_write(tmp_path):
    foreign = tmp_path / "notes.csv"
    foreign.write_text("name,score\nx,1\n")
    with pytest.raises(ValueError, match="line 1 is not a tag csv record"):
        tag_output.RecordSink(foreign, "csv", resume=True)
    assert foreign.read_text() == "name,score\nx,1\n"
    with pytest.raises(ValueError, match="--resume needs --output and --format jsonl or csv"):
        tag_output.RecordSink(tmp_path / "x.json", "json", resume=True)


def test_json_list_is_valid_with_any_number_of_records(tmp_path, capsys):
    for count in range(3):
        sink = tag_output.RecordSink(None, "json")
        for number in range(count):
            sink.write(tag_output.record_chunks("json", scored_file(f"f{number}.wav", 3.0, number)[0], None, NAMES,
                                                2, 0.0, False))
        sink.close()
        assert [r["file"] for r in json.loads(capsys.readouterr().out)] == [f"f{n}.wav" for n in range(count)]
