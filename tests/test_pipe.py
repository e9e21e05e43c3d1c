"""``convnext-audio tag - --stream``: ten minutes of raw PCM through a real pipe give one JSON line per hop whose
tags equal the windows of ``tag --frames`` on the same audio in a file; a WAV stream (a pipe's header, sizes
unknown) the same; memory stays flat; bad flags are one-line errors."""

import io
import json
import os
import sys
import threading
import tracemalloc

import numpy as np
import psutil
import pytest
import soundfile
from serve_helpers import prototypes, tiny_model_dir

from convnext_audio_jax import cli

RATE = 16_000


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def ten_minutes():
    """Ten minutes at 16 kHz: the five class prototypes (voice, bell, beeps, chord, near silence) in a shuffled
    order at random gains, so the tags change along the stream."""
    rng = np.random.default_rng(1)
    pieces = prototypes(RATE)
    order = rng.integers(0, len(pieces), 60)
    audio = np.concatenate([pieces[i] * rng.uniform(0.3, 1.0) for i in order])
    return (np.clip(audio, -1, 1) * 32767).astype(np.int16)


@pytest.fixture(scope="module")
def files(ten_minutes, tmp_path_factory):
    """The ten minutes as a 16 kHz mono WAV, and its first 25 s as a stereo WAV."""
    folder = tmp_path_factory.mktemp("pipe")
    soundfile.write(folder / "ten_minutes.wav", ten_minutes, RATE, subtype="PCM_16")
    soundfile.write(folder / "short.wav", np.repeat(ten_minutes[: 25 * RATE, None], 2, axis=1), RATE,
                    subtype="PCM_16")
    return folder / "ten_minutes.wav", folder / "short.wav"


@pytest.fixture(scope="module")
def records(model_dir, files):
    """``tag --frames --all-scores --hop 10`` of both files (one run), by file name."""
    output = files[0].parent / "tags.jsonl"
    assert cli.main(["tag", *map(str, files), "--checkpoint", model_dir, "--format", "jsonl", "--frames",
                     "--all-scores", "--hop", "10", "--no-progress", "--output", str(output)]) == 0
    return {os.path.basename(r["file"]): r for r in map(json.loads, output.read_text().splitlines())}


def stream(monkeypatch, capsys, argv, data: bytes, rss: list | None = None):
    """Runs ``argv`` with ``data`` written into a real pipe on its standard input (64 KiB at a time, from a
    thread); with ``rss``, the process's RSS is sampled at each write. (exit code, JSON lines, stderr)."""
    read_end, write_end = os.pipe()

    def write():
        with os.fdopen(write_end, "wb") as pipe:
            for at in range(0, len(data), 65536):
                pipe.write(data[at : at + 65536])
                pipe.flush()
                if rss is not None and at % (1 << 20) == 0:
                    rss.append((psutil.Process().memory_info().rss, tracemalloc.get_traced_memory()[0]))

    writer = threading.Thread(target=write)
    with os.fdopen(read_end, "rb") as reader:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(reader))
        writer.start()
        capsys.readouterr()
        if rss is not None:
            tracemalloc.start()
        try:
            code = cli.main(argv)
        finally:
            writer.join()
            tracemalloc.stop()
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines()], captured.err


def assert_windows_equal(lines, record):
    assert len(lines) == len(record["windows"]) == record["num_windows"]
    for line, window in zip(lines, record["windows"]):
        assert (line["start"], line["end"]) == (window["start"], window["end"])
        assert line["tags"], line
        for tag in line["tags"]:
            assert abs(tag["score"] - window["scores"][tag["label"]]) <= 1e-5, (line, window)
        assert line["latency_ms"] >= 0


def test_ten_minutes_of_pcm_give_the_windows_of_tag(model_dir, ten_minutes, records, monkeypatch, capsys):
    rss: list = []
    code, lines, err = stream(monkeypatch, capsys, ["tag", "-", "--stream", "--input-rate", str(RATE),
                                                     "--input-format", "s16le", "--hop", "10", "--checkpoint",
                                                     model_dir, "--top-k", "3", "--threshold", "0"],
                              ten_minutes.tobytes(), rss)
    assert code == 0 and f"{len(lines)} windows from standard input" in err
    assert len(lines) == 60  # 600 s at a 10 s hop
    assert_windows_equal(lines, records["ten_minutes.wav"])
    assert len({line["tags"][0]["label"] for line in lines}) >= 3  # the tags follow the audio
    # Memory does not follow the stream: once warm (the first 2.5 minutes: compile, allocator pools), the floor
    # of the Python objects and numpy arrays alive (tracemalloc) rises by less than 1 MiB over the last 7.5
    # minutes, which hold 55 MiB of audio at the model's 32 kHz in float32 (a floor, because a sample taken while
    # a window is in flight holds that window: ~1.3 MiB, seen on a Xeon with AMX); the process's RSS (XLA's
    # buffers too, and the allocator's noise in a busy pytest process) by less than 40 MiB.
    warm = len(rss) // 4
    traced = [t for _, t in rss]
    assert min(traced[-3:]) - min(traced[warm:warm + 3]) < 2**20, [t // 2**10 for t in traced]
    assert max(r for r, _ in rss[warm:]) - rss[warm][0] < 40 * 2**20, [r // 2**20 for r, _ in rss]


def test_a_wav_stream_and_bad_flags(model_dir, files, records, monkeypatch, capsys):
    data = bytearray(files[1].read_bytes())  # 25 s, stereo  # as arecord writes to a pipe: the sizes are not known
    data[4:8] = data[data.find(b"data") + 4 : data.find(b"data") + 8] = b"\xff\xff\xff\xff"
    code, lines, _ = stream(monkeypatch, capsys, ["tag", "-", "--stream", "--hop", "10", "--checkpoint", model_dir,
                                                   "--threshold", "0"], bytes(data))
    assert code == 0 and [line["start"] for line in lines] == [0.0, 10.0, 15.0]
    assert_windows_equal(lines, records["short.wav"])
    for argv, words in [(["tag", "a.wav", "--stream"], "give '-' as the only input"),
                        (["tag", "-", "--stream", "--input-format", "s16le"], "needs --input-rate"),
                        (["tag", "-", "--stream", "--frames"], "--frames does not apply")]:
        assert cli.main([*argv, "--checkpoint", model_dir]) == 2
        error = capsys.readouterr().err
        assert words in error and error.count("\n") == 1, error
    code, _, err = stream(monkeypatch, capsys, ["tag", "-", "--stream", "--checkpoint", model_dir], b"OggS" * 100)
    assert code == 2 and "does not start with a WAV header" in err
