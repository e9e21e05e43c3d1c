"""serve's POST /v1/search: the answer of `convnext-audio search … --json` for the same index and query, the
index chosen by name, and bad queries, unknown indexes and a server without one as 4xx with a JSON error."""

import contextlib
import io
import json

import numpy as np
import pytest
import soundfile
from downstream_helpers import save_retrieval_model, tiny_encoder  # noqa: F401  (tiny_encoder: a fixture)
from serve_helpers import app_with, raw_request, running, served_models, tiny_model_dir

from convnext_audio_jax import cli
from convnext_audio_jax.serve.app import Limits, build_app
from convnext_audio_jax.serve.search import load_indexes

pytest.importorskip("sentence_transformers", reason="text embeddings need the [downstream] extra")


def _post(port: int, path: str):
    status, headers, body, _ = raw_request(port, "POST", path, {"Content-Length": "0"}, [])
    return status, json.loads(body)


def test_search_answers_what_the_cli_prints(tmp_path, tmp_path_factory, tiny_encoder):  # noqa: F811
    save_retrieval_model(tmp_path / "model", tiny_encoder)
    folder = tmp_path / "recordings"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for name, wave in {"noise.wav": rng.normal(0, 0.2, 24_000), "tone.wav": np.sin(np.arange(16_000) / 2.0) * 0.4,
                       "quiet.wav": rng.normal(0, 0.01, 16_000)}.items():
        soundfile.write(folder / name, wave.astype(np.float32), 16_000)
    index = tmp_path / "recordings.h5"
    assert cli.main(["index", str(folder), "--model", str(tmp_path / "model"), "--output", str(index),
                     "--no-progress"]) == 0
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["search", "a steady tone", "--index", str(index), "--top-k", "2", "--json"]) == 0
    expected = [json.loads(line) for line in printed.getvalue().splitlines()]

    models = served_models([tiny_model_dir(tmp_path_factory)])
    with running(build_app(models, Limits(), load_indexes([index]))) as port:
        status, answer = _post(port, "/v1/search?q=a+steady+tone&top_k=2")
        assert status == 200 and answer["query"] == "a steady tone" and answer["index"] == "recordings"
        assert [r["file"] for r in answer["results"]] == [r["file"] for r in expected]
        for got, want in zip(answer["results"], expected):
            assert got["rank"] == want["rank"] and got["score"] == pytest.approx(want["score"], abs=1e-6)
            assert (got["start_s"], got["end_s"], got["windows"]) == (want["start_s"], want["end_s"], want["windows"])
        assert _post(port, "/v1/search?q=a+steady+tone&index=recordings")[0] == 200
        for path, code, words in [("/v1/search?q=+", 400, "empty"), ("/v1/search?q=x&top_k=0", 400, "top_k"),
                                  ("/v1/search?q=x&index=other", 404, "no index named 'other'")]:
            status, error = _post(port, path)
            assert status == code and words in error["error"], (path, error)
    with running(app_with(models)) as port:  # started without --index
        status, error = _post(port, "/v1/search?q=x")
        assert status == 404 and "--index" in error["error"]
