"""The JSON API of ``convnext-audio serve`` against a real server (uvicorn in a thread): ``/v1/tag`` equals ``tag
--format jsonl``, ``/v1/embed`` equals ``embed``, bad input gets its 4xx and the server goes on, concurrency,
the upload limit (a 2 GB stream refused while arriving), file names, the queue, the time limit and CORS."""

import concurrent.futures
import json
import os
import pathlib
import shutil
import subprocess
import threading
import urllib.error
import urllib.request

import numpy as np
import psutil
import pytest
import soundfile
from serve_helpers import (
    CLASS_NAMES,
    app_with,
    multipart,
    post_file,
    raw_request,
    running,
    served_models,
    tiny_model_dir,
)

from convnext_audio_jax import cli

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def temp_root(tmp_path_factory):
    return tmp_path_factory.mktemp("serve_uploads")


@pytest.fixture(scope="module")
def models(model_dir):
    return served_models([model_dir])


@pytest.fixture(scope="module")
def server(models, temp_root):
    app = app_with(models, max_upload_bytes=16 * MiB, max_seconds=60.0, temp_root=str(temp_root))
    with running(app) as port:
        yield port


@pytest.fixture(scope="module")
def recordings(freedesktop_recordings, tmp_path_factory):
    """Three Debian recordings and espeak-ng speech (a 22.05 kHz WAV)."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed (apt-get install espeak-ng; .ci/run does)")
    speech = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(speech), "the kettle is boiling, please answer the door"], check=True,
                   capture_output=True)
    return [*freedesktop_recordings[:3], speech]


def get(port, path, headers=None):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, dict(answer.headers), json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


def assert_close(actual, expected, path="record"):
    if isinstance(expected, dict):
        assert set(actual) == set(expected), path
        for key in expected:
            assert_close(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, f"{path}[{i}]")
    elif isinstance(expected, float):
        assert abs(actual - expected) <= 1e-5, f"{path}: {actual} != {expected}"
    else:
        assert actual == expected, path


def cli_records(capsys, model_dir, paths, *flags):
    capsys.readouterr()
    assert cli.main(["tag", *map(str, paths), "--checkpoint", model_dir, "--format", "jsonl", "--no-progress",
                     *flags]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_tag_equals_the_cli_on_real_recordings(server, model_dir, recordings, capsys):
    flags = ["--top-k", "3", "--threshold", "0.1"]
    expected = cli_records(capsys, model_dir, recordings, "--frames", *flags)
    for path, record in zip(recordings, expected):
        status, _, answer = post_file(server, "/v1/tag?frames=true&top_k=3&threshold=0.1", path.name, path.read_bytes())
        assert status == 200, answer
        assert answer["file"] == path.name
        assert_close({**answer, "file": record["file"]}, record)
        # Without frames: the same record without the timeline (`tag` without --frames writes the same fields).
        status, _, plain = post_file(server, "/v1/tag?top_k=3&threshold=0.1", path.name, path.read_bytes())
        assert status == 200 and set(record) - set(plain) == {"windows", "frames", "events"}
        assert_close({**plain, "file": record["file"]}, {k: record[k] for k in plain})
    assert expected[0]["tags"] and expected[0]["frames"]
    # CSV: the text `tag --format csv` writes, the path in its first column replaced by the upload's name.
    capsys.readouterr()
    assert cli.main(["tag", *map(str, recordings), "--checkpoint", model_dir, "--format", "csv", "--no-progress",
                     "--frames", *flags]) == 0
    expected_csv = capsys.readouterr().out
    header = expected_csv.splitlines()[0]
    for path in recordings:
        status, headers, answer = post_file(server, "/v1/tag?frames=1&top_k=3&threshold=0.1&format=csv", path.name,
                                            path.read_bytes())
        assert status == 200 and headers["content-type"].startswith("text/csv")
        rows = [line for line in expected_csv.splitlines()[1:] if line.startswith(str(path) + ",")]
        assert answer.decode().splitlines() == [header] + [row.replace(str(path), path.name, 1) for row in rows]
        assert len(rows) > 10


def test_models_health_and_embed_equal_the_cli(server, model_dir, recordings, tmp_path, capsys):
    status, _, models = get(server, "/v1/models")
    assert status == 200
    [described] = models["models"]
    assert described["name"] == "tiny" and described["classes"] == CLASS_NAMES
    assert described["sample_rate"] == 32_000 and described["window_s"] == 10.0
    assert models["limits"] == {"max_upload_bytes": 16 * MiB, "max_seconds": 60.0, "time_limit_s": 120.0,
                                "upload_time_limit_s": 300.0}
    assert get(server, "/healthz")[2]["status"] == "ok"
    path = recordings[-1]
    assert cli.main(["embed", str(path), "--checkpoint", model_dir, "--kind", "sequence", "--output",
                     str(tmp_path / "e.npz"), "--no-progress"]) == 0
    with np.load(tmp_path / "e.npz") as expected:
        status, _, answer = post_file(server, "/v1/embed?kind=sequence", path.name, path.read_bytes())
        assert status == 200, answer
        np.testing.assert_allclose(answer["embeddings"], expected["embeddings"], atol=1e-5)
        np.testing.assert_allclose(answer["window_start_s"], expected["window_start_s"])
        status, headers, npz = post_file(server, "/v1/embed?kind=sequence&format=npz", path.name, path.read_bytes())
        assert status == 200 and "speech.sequence.npz" in headers["content-disposition"]
        (tmp_path / "got.npz").write_bytes(npz)
        with np.load(tmp_path / "got.npz") as got:
            np.testing.assert_allclose(got["embeddings"], expected["embeddings"], atol=1e-5)


def _wav(path, seconds, rate=8_000, subtype="PCM_16"):
    soundfile.write(path, 0.1 * np.sin(np.arange(int(seconds * rate)) * 0.05), rate, subtype=subtype)
    return path.read_bytes()


def test_bad_input_gets_its_4xx_and_the_server_goes_on(server, model_dir, tmp_path):
    silent = tmp_path / "silent.wav"
    soundfile.write(silent, np.zeros((0, 1), np.float32), 16_000)
    nan = tmp_path / "nan.wav"
    signal = np.sin(np.arange(32_000) * 0.01).astype(np.float32)
    signal[100] = np.nan
    soundfile.write(nan, signal, 16_000, subtype="FLOAT")
    liar = bytearray(_wav(tmp_path / "liar.wav", 1.0, subtype="PCM_U8"))
    at = liar.find(b"data")
    liar[at + 4 : at + 8] = (2**31).to_bytes(4, "little")  # a WAV header promising more bytes than the file holds
    long = _wav(tmp_path / "long.wav", 75.0)  # refused from its header (60 s limit) before it is decoded
    truncated = _wav(tmp_path / "cut.wav", 30.0)[:-100_000]
    cases = [  # (what, path, upload name, bytes, status, words of the error)
        ("garbage", "/v1/tag", "x.wav", b"RIFF\x00\x00not really a wave file" * 10, 422, "not audio"),
        ("zero bytes", "/v1/tag", "x.ogg", b"", 422, "empty"),
        ("no frames", "/v1/tag", "x.wav", silent.read_bytes(), 422, "empty"),
        ("NaN samples", "/v1/tag", "x.wav", nan.read_bytes(), 422, "non-finite"),
        ("truncated", "/v1/tag", "x.wav", truncated, 422, "truncated"),
        ("a lying header", "/v1/tag", "x.wav", bytes(liar), 422, "truncated"),
        ("longer than the limit", "/v1/tag", "x.wav", long, 413, "longer than the server's limit of 60 s"),
        ("unknown model", "/v1/tag?model=../../etc", "x.wav", b"", 404, "no model named '../../etc'"),
        ("bad top_k", "/v1/tag?top_k=0", "x.wav", b"", 400, "top_k"),
        ("bad threshold", "/v1/tag?threshold=nan", "x.wav", b"", 400, "threshold"),
        ("bad kind", "/v1/embed?kind=pixels", "x.wav", _wav(tmp_path / "ok.wav", 1.0), 422, "kind 'pixels'"),
        ("embed beyond the limit", "/v1/embed", "x.wav", long, 413, "longer than"),
    ]
    for what, path, name, data, status, words in cases:
        got, _, answer = post_file(server, path, name, data)
        assert (got, words in answer["error"]) == (status, True), (what, answer)
        assert "\n" not in answer["error"]
    # Bodies that are not a multipart upload, and a Content-Length past the limit (refused before any byte).
    body, content_type = multipart("x.wav", b"abc")
    for headers, chunks, status, words in [
        ({"Content-Type": "audio/wav", "Content-Length": "3"}, [b"abc"], 415, "multipart/form-data"),
        ({"Content-Type": content_type, "Content-Length": str(len(body))}, [body.replace(b'"file"', b'"other"')], 422,
         "no file part named 'file'"),
        ({"Content-Type": content_type, "Content-Length": str(len(body) - 10)}, [body[:-10]], 400, "ended inside"),
        ({"Content-Type": content_type, "Content-Length": str(2**40)}, [], 413, "limit is 16,777,216 bytes"),
    ]:
        got, _, answer, _ = raw_request(server, "POST", "/v1/tag", headers, chunks)
        assert got == status and words in json.loads(answer)["error"], answer
    assert get(server, "/nowhere")[0] == 404
    assert get(server, "/healthz")[2] == {"status": "ok", "models": ["tiny"], "in_progress": 0}


def test_sixteen_concurrent_requests_all_succeed(server, models, recordings):
    data = [(path.name, path.read_bytes()) for path in recordings]
    sequential = {name: post_file(server, "/v1/tag?top_k=5", name, blob)[2] for name, blob in data}
    forwards = models["tiny"].scorer.forwards
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: post_file(server, "/v1/tag?top_k=5", *data[i % len(data)]), range(16)))
    # Each request is one window: fewer forwards than requests means windows of concurrent requests shared them.
    assert models["tiny"].scorer.forwards - forwards < 16
    for status, _, answer in answers:
        assert status == 200, answer
        assert_close(answer, sequential[answer["file"]])


def _rss():
    return psutil.Process().memory_info().rss


def test_a_2_gb_upload_is_refused_while_arriving(server, temp_root):
    post_file(server, "/v1/tag", "warm.wav", soundfile_bytes())  # the steady state: a request served once
    idle = _rss()
    _, content_type = multipart("big.wav", b"")
    head = multipart("big.wav", b"")[0].split(b"\r\n--testboundary1234--")[0]
    block = bytes(MiB)
    peak = [idle]

    def body():  # 2 GiB produced as it is sent, never held
        yield head
        for _ in range(2048):
            peak[0] = max(peak[0], _rss())
            yield block

    status, headers, answer, sent = raw_request(server, "POST", "/v1/tag", {"Content-Type": content_type}, body(),
                                                chunked=True)
    assert status == 413 and "while arriving" in json.loads(answer)["error"]
    assert headers.get("connection") == "close"
    assert sent < 64 * MiB, f"{sent} bytes went out before the refusal"
    assert peak[0] - idle < 100 * MiB, f"RSS grew by {(peak[0] - idle) / MiB:.0f} MiB"
    assert list(pathlib.Path(temp_root).iterdir()) == []  # the partial upload was removed
    assert get(server, "/healthz")[0] == 200


def soundfile_bytes(seconds=1.0):
    import io

    buffer = io.BytesIO()
    soundfile.write(buffer, 0.1 * np.sin(np.arange(int(seconds * 16_000)) * 0.05), 16_000, format="WAV")
    return buffer.getvalue()


def test_an_upload_name_is_a_label_never_a_path(server, temp_root, tmp_path):
    before = {p for p in pathlib.Path(temp_root).parent.rglob("*")}
    names = ["../../x.wav", "/etc/passwd.wav", "..\\..\\y.wav", "a\x00b.wav", "%2e%2e/z.wav"]
    for name in names:
        status, _, answer = post_file(server, "/v1/tag", name, soundfile_bytes())
        assert status == 200, answer
        assert "/" not in answer["file"] and "\\" not in answer["file"] and "\x00" not in answer["file"]
    assert {p for p in pathlib.Path(temp_root).parent.rglob("*")} == before
    assert not pathlib.Path(os.getcwd(), "x.wav").exists() and not (tmp_path.parent.parent / "x.wav").exists()


def test_a_full_queue_answers_503_and_a_slow_request_504(models, tmp_path):
    app = app_with(models, max_queue=1, time_limit=1e-3, temp_root=str(tmp_path))
    body, content_type = multipart("a.wav", soundfile_bytes())
    with running(app) as port:
        release = threading.Event()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            # A request in progress: its body stops half-way until released.
            first = pool.submit(raw_request, port, "POST", "/v1/tag", {"Content-Type": content_type},
                                [body[:100], None, body[100:]], chunked=True, hold=release)
            for _ in range(200):
                if get(port, "/healthz")[2]["in_progress"] == 1:
                    break
                threading.Event().wait(0.02)
            status, headers, answer = post_file(port, "/v1/tag", "b.wav", soundfile_bytes())
            assert status == 503 and headers["retry-after"] == "1" and "busy" in answer["error"]
            release.set()
            status, _, answer, _ = first.result(30)
            assert status == 504 and "limit of 0.001 s" in json.loads(answer)["error"]
        assert get(port, "/healthz")[2]["in_progress"] == 0
    assert list(tmp_path.iterdir()) == []


def test_a_slow_upload_answers_408_and_frees_its_place(models, tmp_path):
    app = app_with(models, upload_time_limit=0.5, temp_root=str(tmp_path))
    body, content_type = multipart("a.wav", soundfile_bytes())
    with running(app) as port:
        release = threading.Event()
        threading.Timer(3.0, release.set).start()  # the body stops half-way for 3 s
        status, headers, answer, _ = raw_request(port, "POST", "/v1/tag", {"Content-Type": content_type},
                                                 [body[:100], None, body[100:]], chunked=True, hold=release)
        assert status == 408 and "limit of 0.5 s" in json.loads(answer)["error"]
        assert headers.get("connection") == "close"
        assert get(port, "/healthz")[2]["in_progress"] == 0
    assert list(tmp_path.iterdir()) == []


def test_cors_is_closed_unless_an_origin_is_allowed(server, models, tmp_path):
    status, headers, answer = post_file(server, "/v1/tag", "a.wav", soundfile_bytes(),
                                        {"Origin": "https://evil.example"})
    assert status == 403 and "https://evil.example" in answer["error"]
    status, headers, _ = get(server, "/v1/models", {"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in {k.lower() for k in headers}
    app = app_with(models, allow_origins=("https://lab.example",), temp_root=str(tmp_path))
    with running(app) as port:
        status, headers, _ = post_file(port, "/v1/tag", "a.wav", soundfile_bytes(), {"Origin": "https://lab.example"})
        assert status == 200 and headers["access-control-allow-origin"] == "https://lab.example"
        assert post_file(port, "/v1/tag", "a.wav", soundfile_bytes(), {"Origin": "https://evil.example"})[0] == 403
