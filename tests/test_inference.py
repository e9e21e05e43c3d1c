"""Tagging (real recordings, a long generated file with a placed event), timelines, embeddings, bad inputs and
the tag/embed commands (the HEAR API: tests/test_hear.py)."""

import csv
import io
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
import soundfile

from convnext_audio_jax import cli
from convnext_audio_jax.artifacts.model_dir import save_model
from convnext_audio_jax.data import audio
from convnext_audio_jax.inference import commands as inference
from convnext_audio_jax.models import create_model, init_variables
from convnext_audio_jax.models.convnext import LN_EPS

NUM_CLASSES = 4
TINY = dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), num_classes=NUM_CLASSES)
CLASS_NAMES = ["Burst", "Burst somewhere", "Speech", "Bell"]
SR = audio.SAMPLE_RATE
MODEL = create_model("convnext_tiny", **TINY)
# The one forward program of the file's own checks: four 10 s clips (the detector's calibration, the embeddings,
# one recording padded with silent rows), compiled once.
apply_four_clips = jax.jit(lambda v, x: MODEL.apply(v, x))


def quiet_noise(seconds, sample_rate, seed):
    return (1e-3 * np.random.default_rng(seed).standard_normal(int(seconds * sample_rate))).astype(np.float32)


def add_burst(signal, sample_rate, onset, seconds=1.0, seed=1):
    """A loud broadband burst (white noise at 0.5 RMS) over [onset, onset + seconds)."""
    first, count = int(onset * sample_rate), int(seconds * sample_rate)
    signal[first : first + count] += 0.5 * np.random.default_rng(seed).standard_normal(count).astype(np.float32)
    return signal


def point_head_at(params, class_index, positive, negative):
    """Set one class of the head to the direction from the mean ``negative`` to the mean ``positive`` head input,
    with its 0.5 threshold half-way between the two groups."""
    direction = positive.mean(axis=0) - negative.mean(axis=0)
    direction /= np.linalg.norm(direction)
    lowest_positive, highest_negative = (positive @ direction).min(), (negative @ direction).max()
    assert lowest_positive > highest_negative
    scale = 8.0 / (lowest_positive - highest_negative)
    params["head"]["kernel"][:, class_index] = scale * direction
    params["head"]["bias"][class_index] = -scale * 0.5 * (lowest_positive + highest_negative)


@pytest.fixture(scope="module")
def burst_detector():
    """A tiny random ConvNeXt set to respond to loud bursts, calibrated on 10 s clips of quiet noise with and
    without a burst: class 0 ("Burst") at the frame level (per-step head inputs LN(2·s_t) of burst steps vs quiet
    steps), class 1 ("Burst somewhere") at the clip level (scene embeddings of clips with and without a burst)."""
    model = MODEL
    variables = jax.tree.map(np.array, init_variables(model, jax.random.key(3)))  # writable copies
    onsets = [3.0, 8.5]
    clips = [add_burst(quiet_noise(10, SR, seed=10 + i), SR, onset, seed=20 + i) for i, onset in enumerate(onsets)]
    clips += [quiet_noise(10, SR, seed=30), quiet_noise(10, SR, seed=31)]
    outputs = apply_four_clips(variables, np.stack(clips))
    sequence = np.asarray(outputs["sequence_embeddings"][0])
    normalised = np.asarray(nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False).apply(
        {"params": variables["params"]["head_norm"]}, 2.0 * sequence))
    centres = inference.step_bounds(model, sequence.shape[0]).mean(axis=1)
    point_head_at(variables["params"], 0, normalised[(centres > 3.1) & (centres < 3.9)],
                  normalised[np.abs(centres - 3.5) > 2.5])
    scenes = np.asarray(outputs["scene_embedding"])
    point_head_at(variables["params"], 1, scenes[:2], scenes[2:])
    return model, variables


@pytest.fixture(scope="module")
def checkpoint(burst_detector, tmp_path_factory):
    model, variables = burst_detector
    return save_model(tmp_path_factory.mktemp("ckpt") / "tiny", "convnext_tiny", variables,
                      {"class_names": CLASS_NAMES}, TINY)


@pytest.fixture(scope="module")
def tagger(burst_detector):
    model, variables = burst_detector
    return inference.Tagger(model, variables, batch_size=8, hop_seconds=5.0, frames=True)


def test_window_starts():
    window, hop = 10 * SR, 5 * SR
    assert inference.window_starts(3 * SR, window, hop).tolist() == [0]
    assert inference.window_starts(window, window, hop).tolist() == [0]
    # 23 s: windows every 5 s, the last one ending at the end of the file.
    assert (inference.window_starts(23 * SR, window, hop) / SR).tolist() == [0, 5, 10, 13]
    assert (inference.window_starts(23 * SR, window, window, last_at_end=False) / SR).tolist() == [0, 10, 20]
    assert (inference.window_starts(20 * SR, window, window, last_at_end=False) / SR).tolist() == [0, 10]
    windows = inference.cut_windows(np.ones(23 * SR, np.float32), np.array([0, 10, 20]) * SR, window)
    assert windows.shape == (3, window) and windows[2, : 3 * SR].all() and not windows[2, 3 * SR :].any()


def test_merge_events():
    starts = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    probs = np.array([[0.9, 0.1], [0.8, 0.1], [0.1, 0.1], [0.7, 0.6], [0.2, 0.1]])
    events = inference.merge_events(starts, starts + 1.0, probs, threshold=0.5)
    assert events == [dict(index=0, onset=0.0, offset=2.0, peak=0.9), dict(index=0, onset=3.0, offset=4.0, peak=0.7),
                      dict(index=1, onset=3.0, offset=4.0, peak=0.6)]


def test_frame_bounds_of_released_layout():
    bounds = inference.step_bounds(create_model("convnext_tiny"), 31)
    np.testing.assert_allclose(bounds[1], [0.28, 0.60], atol=1e-9)  # [0.32 t - 0.04, 0.32 t + 0.28)
    np.testing.assert_allclose(bounds[0], [0.0, 0.28], atol=1e-9)  # clipped at 0
    assert bounds[-1, 1] == pytest.approx(9.88)


def test_tag_real_recordings(tagger, burst_detector, freedesktop_recordings):
    model, variables = burst_detector
    files = freedesktop_recordings[:10]
    results = list(tagger.tag(files))
    assert [r.audio.name for r in results] == [str(f) for f in files]
    rates = {r.audio.sample_rate for r in results}
    channels = {r.audio.channels for r in results}
    assert rates <= {44_100, 48_000} and len(channels) > 1, (rates, channels)  # resampling and downmixing ran
    def one_clip(v, x):  # x in row 0, silent rows after it (rows do not mix in eval mode)
        return apply_four_clips(v, np.concatenate([x, np.zeros((3, x.shape[1]), np.float32)]))["probs"][0]

    for path, result in zip(files, results):
        samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
        assert result.audio.channels == samples.shape[1] and result.audio.sample_rate == rate
        assert result.audio.duration == pytest.approx(samples.shape[0] / rate, abs=1e-3)
        assert result.audio.duration < 10 and len(result.window_starts) == 1
        # Batched across files = this file alone, zero-padded to 10 s.
        expected = one_clip(variables, audio.to_clip(samples, rate, min_seconds=0)[None])
        np.testing.assert_allclose(result.clip_probs, expected, atol=2e-6)
        assert result.frame_probs.shape == (1, 31, NUM_CLASSES)
        starts, ends, _ = result.frame_segments()
        assert ends.max() <= result.audio.duration + 1e-9  # padding frames are not reported
    report = inference.file_report(results[0], CLASS_NAMES, 2, 0.0, all_scores=True)
    assert len(report["tags"]) == 2 and set(report["scores"]) == set(CLASS_NAMES)
    assert report["downmixed"] == (results[0].audio.channels > 1) and report["padded"]


def test_long_file_event_timestamps(tagger, tmp_path):
    """A 70 s stereo 48 kHz FLAC with one loud burst at 47.3-48.3 s: window and frame maxima and the merged
    event of the burst class line up with it."""
    onset, rate = 47.3, 48_000
    mono = add_burst(quiet_noise(70, rate, seed=20), rate, onset, seed=21)
    path = tmp_path / "long.flac"
    soundfile.write(path, np.stack([mono, mono], axis=1), rate)
    (result,) = tagger.tag([path])
    assert result.audio.duration == pytest.approx(70.0, abs=1e-3) and result.audio.channels == 2
    assert (result.window_starts).tolist() == [0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60]

    burst = result.window_probs[:, 1]
    holds_burst = (result.window_starts <= onset) & (result.window_starts + 10 >= onset + 1)
    assert burst[holds_burst].min() > 0.5 > burst[~holds_burst].max()
    assert result.clip_probs[1] == burst.max()

    starts, ends, probs = result.frame_segments()
    peak = np.argmax(probs[:, 0])
    assert onset - 0.4 <= 0.5 * (starts[peak] + ends[peak]) <= onset + 1.4
    events = [e for e in inference.merge_events(starts, ends, probs, 0.5) if e["index"] == 0]
    assert len(events) == 1
    assert events[0]["onset"] == pytest.approx(onset, abs=0.7)
    assert events[0]["offset"] == pytest.approx(onset + 1.0, abs=0.7)


def test_bad_inputs_are_reported_and_the_rest_tagged(checkpoint, freedesktop_recordings, tmp_path, capsys):
    text = tmp_path / "notes.wav"
    text.write_text("not audio at all\n")
    empty = tmp_path / "empty.flac"
    empty.write_bytes(b"")
    nan = tmp_path / "nan.wav"
    soundfile.write(nan, np.full(16_000, np.nan, np.float32), 16_000, subtype="FLOAT")
    no_frames = tmp_path / "no_frames.wav"
    soundfile.write(no_frames, np.zeros((0, 1), np.float32), 16_000)
    no_audio_dir = tmp_path / "docs"
    no_audio_dir.mkdir()
    (no_audio_dir / "readme.txt").write_text("hello")
    bad = [text, empty, nan, no_frames, tmp_path / "missing.ogg", no_audio_dir]
    good = freedesktop_recordings[0]

    code = cli.main(["tag", *map(str, bad), str(good), "--checkpoint", str(checkpoint), "--format", "json",
                     "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0
    reports = json.loads(captured.out)
    assert [r["file"] for r in reports] == [str(good)]
    lines = captured.err.strip().splitlines()
    assert len(lines) == len(bad)
    for path, reason in [(text, "unreadable"), (empty, "empty"), (nan, "non-finite"), (no_frames, "empty"),
                         (tmp_path / "missing.ogg", "missing"), (no_audio_dir, "no audio")]:
        assert any(f"{path}: {reason}" in line for line in lines), (path, lines)

    code = cli.main(["tag", *map(str, bad), "--checkpoint", str(checkpoint), "--no-progress"])
    assert code == 1
    assert "no file could be tagged" in capsys.readouterr().err

    # A folder without audio: nothing to tag is a failure too, not an empty listing with exit 0.
    code = cli.main(["tag", str(no_audio_dir), "--checkpoint", str(checkpoint), "--no-progress"])
    assert code == 1
    assert "no file could be tagged (0 files, 1 empty folders)" in capsys.readouterr().err


def test_cli_tag_formats(checkpoint, freedesktop_recordings, tmp_path, capsys):
    long_file = tmp_path / "long.wav"
    soundfile.write(long_file, add_burst(quiet_noise(24, SR, 30), SR, 14.0, seed=31), SR)
    inputs = [str(freedesktop_recordings[1]), str(long_file)]
    base = ["tag", *inputs, "--checkpoint", str(checkpoint), "--no-progress", "--threshold", "0.5"]

    assert cli.main([*base, "--format", "json", "--frames", "--all-scores", "--top-k", "3"]) == 0
    short, long = json.loads(capsys.readouterr().out)
    assert set(short["scores"]) == set(CLASS_NAMES) and len(short["frames"]) <= 31
    assert long["num_windows"] == 4 and [w["start"] for w in long["windows"]] == [0, 5, 10, 14]
    assert all(len(frame["scores"]) == NUM_CLASSES for frame in long["frames"])
    burst_events = [e for e in long["events"] if e["label"] == "Burst"]
    assert len(burst_events) == 1 and burst_events[0]["onset"] == pytest.approx(14.0, abs=0.7)

    assert cli.main([*base, "--format", "csv", "--frames"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["kind"] for r in rows} == {"clip", "window", "frame", "event", "file"}
    assert any(r["kind"] == "event" and r["label"] == "Burst" and r["file"] == str(long_file) for r in rows)

    labels = tmp_path / "labels.csv"
    labels.write_text("index,mid,display_name\n" + "".join(f"{i},/m/x{i},Class {i}\n" for i in range(NUM_CLASSES)))
    output = tmp_path / "tags.txt"
    assert cli.main([*base, "--labels", str(labels), "--output", str(output), "--frames"]) == 0
    table = output.read_text()
    assert "resampled to 32000 Hz" in table and "zero-padded to 10 s" in table and "4 windows" in table
    assert "Class 0" in table and "event" in table


def test_embeddings(burst_detector, checkpoint, freedesktop_recordings, tmp_path, capsys):
    model, variables = burst_detector
    clips = np.stack([quiet_noise(10, SR, 40), add_burst(quiet_noise(10, SR, 41), SR, 2.0),
                      quiet_noise(10, SR, 42), add_burst(quiet_noise(10, SR, 43), SR, 6.0, seed=2)])
    outputs = apply_four_clips(variables, clips)
    sequence = outputs["sequence_embeddings"]
    assert sequence.shape == (4, 31, 64) and outputs["frame_embeddings"].shape == (4, 31, 7, 64)
    pooled = sequence.max(axis=1) + sequence.mean(axis=1)
    rebuilt = nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False).apply(
        {"params": variables["params"]["head_norm"]}, pooled)
    np.testing.assert_allclose(rebuilt, outputs["scene_embedding"], atol=1e-5)

    output = tmp_path / "emb.npz"
    files = [str(f) for f in freedesktop_recordings[:2]]
    assert cli.main(["embed", *files, "--checkpoint", str(checkpoint), "--kind", "sequence", "--output", str(output),
                     "--no-progress"]) == 0
    with np.load(output) as saved:
        assert saved["embeddings"].shape == (2, 31, 64) and saved["files"].tolist() == files
        assert saved["file_index"].tolist() == [0, 1] and str(saved["kind"]) == "sequence"
    capsys.readouterr()
    assert cli.main(["embed", str(tmp_path / "none.wav"), "--checkpoint", str(checkpoint), "--output",
                     str(output), "--no-progress"]) == 1
    assert "none.wav: missing" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- adversarial

def _write(path, seconds, rate=SR, seed=0, channels=1, subtype="PCM_16"):
    signal = np.stack([quiet_noise(seconds, rate, seed + c) for c in range(channels)], axis=1)
    soundfile.write(path, signal, rate, subtype=subtype)
    return str(path)


def test_bad_hops_and_window_counts_are_one_line_errors(checkpoint, tmp_path, capsys):
    wav = _write(tmp_path / "a.wav", 1.0)
    for argv in (["tag", wav, "--hop", "1e-9"], ["tag", wav, "--hop", "nan"],
                 ["embed", wav, "--hop", "0", "--output", str(tmp_path / "e.npz")],
                 ["embed", wav, "--hop", "-2", "--output", str(tmp_path / "e.npz")]):
        assert cli.main([*argv, "--checkpoint", str(checkpoint), "--no-progress"]) == 2
        error = capsys.readouterr().err.strip()
        assert "\n" not in error and "--hop" in error, error
    assert not (tmp_path / "e.npz.parts").exists()
    long = _write(tmp_path / "long.wav", 60.0, rate=8_000)  # 51 windows at a 1 s hop
    for command in (["tag"], ["embed", "--output", str(tmp_path / "e.npz")]):
        code = cli.main([*command, long, "--hop", "1", "--max-windows", "50", "--checkpoint", str(checkpoint),
                         "--no-progress"])
        assert code == 1
        assert f"{long}: too many windows" in capsys.readouterr().err or command[0] == "embed"


def test_huge_samples_silence_and_empty_files(checkpoint, tmp_path, capsys):
    loud = np.stack([quiet_noise(12, 16_000, 1), quiet_noise(12, 16_000, 2)], axis=1)
    loud[5_000:5_100] = 1e20
    loud[90_000:90_010] = -3e38
    loud_path = tmp_path / "loud.wav"
    soundfile.write(loud_path, loud, 16_000, subtype="FLOAT")
    silent = _write(tmp_path / "silent.wav", 3.0)
    soundfile.write(silent, np.zeros(3 * SR, np.int16), SR)
    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros((0, 1), np.float32), SR)
    assert cli.main(["tag", str(loud_path), silent, str(empty), "--checkpoint", str(checkpoint), "--format", "jsonl",
                     "--frames", "--all-scores", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "NaN" not in captured.out and "Infinity" not in captured.out
    loud_record, silent_record = map(json.loads, captured.out.splitlines())
    assert loud_record["file"] == str(loud_path) and loud_record["clipped_samples"] == 2 * 110
    assert silent_record["file"] == silent and silent_record["num_windows"] == 1
    for record in (loud_record, silent_record):
        scores = [*record["scores"].values(), *(s for f in record["frames"] for s in f["scores"].values())]
        assert all(0.0 <= s <= 1.0 for s in scores)
    assert f"{empty}: empty" in captured.err


def test_tag_output_survives_a_crash_and_resumes(checkpoint, tmp_path, monkeypatch, capsys):
    files = [_write(tmp_path / f"{n}.wav", seconds, seed=n) for n, seconds in enumerate([3.0, 17.0, 4.0])]
    base = ["tag", *files, "--checkpoint", str(checkpoint), "--format", "jsonl", "--frames", "--no-progress"]
    reference = tmp_path / "reference.jsonl"
    assert cli.main([*base, "--output", str(reference)]) == 0

    output = tmp_path / "tags.jsonl"
    record_chunks = inference.record_chunks

    def crash_in_the_second_record(*args):
        chunks = record_chunks(*args)
        if args[1].audio.name == files[1]:
            yield next(chunks)  # a torn record: part of it written, then the process dies
            raise KeyboardInterrupt
        yield from chunks

    monkeypatch.setattr(inference, "record_chunks", crash_in_the_second_record)
    with pytest.raises(KeyboardInterrupt):
        cli.main([*base, "--output", str(output)])
    first_line = reference.read_text().splitlines(keepends=True)[0]
    assert output.read_text().startswith(first_line) and len(output.read_text()) > len(first_line)

    monkeypatch.setattr(inference, "record_chunks", record_chunks)
    capsys.readouterr()
    assert cli.main([*base, "--output", str(output), "--resume"]) == 0
    assert "1 files already in" in capsys.readouterr().err
    assert output.read_text() == reference.read_text()


def test_embed_survives_a_crash_and_resumes(checkpoint, tmp_path, monkeypatch):
    files = [_write(tmp_path / f"{n}.wav", seconds, seed=n) for n, seconds in enumerate([3.0, 14.0, 4.0])]
    base = ["embed", *files, "--checkpoint", str(checkpoint), "--kind", "scene", "--no-progress"]
    assert cli.main([*base, "--output", str(tmp_path / "reference.npz")]) == 0
    embed_file = inference._embed_file

    def crash_at_the_third_file(path, *args):
        if path == files[2]:
            raise KeyboardInterrupt
        return embed_file(path, *args)

    monkeypatch.setattr(inference, "_embed_file", crash_at_the_third_file)
    output = tmp_path / "emb.npz"
    with pytest.raises(KeyboardInterrupt):
        cli.main([*base, "--output", str(output)])
    assert not output.exists() and len(list((tmp_path / "emb.npz.parts").glob("*.json"))) == 2
    monkeypatch.setattr(inference, "_embed_file", embed_file)
    assert cli.main([*base, "--output", str(output)]) == 2  # the parts are not silently overwritten
    assert cli.main([*base, "--output", str(output), "--resume"]) == 0
    with np.load(output) as resumed, np.load(tmp_path / "reference.npz") as reference:
        for key in ("embeddings", "file_index", "window_start_s", "files"):
            np.testing.assert_array_equal(resumed[key], reference[key])
        assert resumed["window_start_s"].tolist() == [0.0, 0.0, 4.0, 0.0]


_BOUNDED_TAG = r"""
import json, resource, sys
import numpy as np
from convnext_audio_jax import cli
from convnext_audio_jax.data import audio

checkpoint, short, long, out, headroom = sys.argv[1:6]
base = ["--checkpoint", checkpoint, "--hop", "300", "--format", "jsonl", "--frames", "--all-scores",
        "--no-progress"]
assert cli.main(["tag", short, *base, "--output", out + ".warm"]) == 0  # compiles, fills the allocator's arenas

def vm(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

limit = vm("VmSize") + int(headroom)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
code = cli.main(["tag", long, *base, "--output", out])
# The whole-file route under the same limit: decode, downmix and resample the hour at once, then the
# zero-padded copy windows were cut from.
try:
    samples, rate = audio.decode(long)
    mono = audio.to_mono(samples, rate, min_seconds=0.0)
    padded = np.zeros(mono.shape[0] + 1, np.float32)
    padded[:-1] = mono
    whole_file = "fitted"
except MemoryError:
    whole_file = "MemoryError"
print(json.dumps({"code": code, "limit": limit, "whole_file": whole_file, "peak": vm("VmPeak")}))
"""


def test_an_hour_is_tagged_under_an_address_space_limit(checkpoint, tmp_path):
    """1 h of 8 kHz audio (resampled to 32 kHz while read), tagged with --frames --all-scores in a process whose
    address space may grow only 400 MB past its size after tagging a short file. The whole-file route needs
    2 × 4 B × 32 kHz × 3600 s = 922 MB for the resampled hour and its padded copy (plus the decoded file), and
    fails under the same limit."""
    import subprocess
    import sys

    long = tmp_path / "hour.wav"
    rate = 8_000
    with soundfile.SoundFile(long, "w", rate, 1, "PCM_16") as file:
        for minute in range(60):
            file.write(quiet_noise(60, rate, seed=minute))
    short = _write(tmp_path / "short.wav", 2.0)
    out = tmp_path / "hour.jsonl"
    headroom = 400 << 20
    # One CPU device: eight simulated ones start collective threads that an address-space limit can starve.
    # XLA reads a non-empty XLA_FLAGS that does not start with "--" as a file name: drop the variable when empty.
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count="))
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    if flags:
        env["XLA_FLAGS"] = flags
    run = subprocess.run([sys.executable, "-c", _BOUNDED_TAG, str(checkpoint), short, str(long), str(out),
                          str(headroom)], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["code"] == 0 and result["whole_file"] == "MemoryError", (result, run.stderr[-2000:])
    (record,) = map(json.loads, out.read_text().splitlines())
    assert record["duration_s"] == pytest.approx(3600.0) and record["num_windows"] == 13
    assert [w["start"] for w in record["windows"]][-2:] == [3300.0, 3590.0]
    assert len(record["frames"]) == 13 * 31 and record["sample_rate"] == rate
