"""serve's POST /v1/search: the answer of `convnext-audio search … --json` for the same index and query, the
index chosen by name, bad queries, unknown indexes and a server without one as 4xx with a JSON error; and the
page's search box in headless Chromium lists the same files."""

import contextlib
import io
import json

import numpy as np
import pytest
import soundfile
from downstream_helpers import save_retrieval_model, tiny_encoder  # noqa: F401  (tiny_encoder: a fixture)
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from serve_helpers import app_with, chromium, raw_request, running, served_models, steady_sound, tiny_model_dir

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
        mic = tmp_path / "mic.wav"
        soundfile.write(mic, steady_sound(), 48_000, subtype="PCM_16")
        driver = chromium(mic)
        try:
            driver.get(f"http://127.0.0.1:{port}/")
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")
            assert driver.find_element(By.ID, "search-panel").is_displayed()
            driver.find_element(By.ID, "top-k").clear()
            driver.find_element(By.ID, "top-k").send_keys("2")
            driver.find_element(By.ID, "search-query").send_keys("a steady tone")
            driver.find_element(By.CSS_SELECTOR, "#search-form button").click()
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-search") in ("done", "error"))
            rows = driver.find_elements(By.CSS_SELECTOR, "#search-results tbody tr")
            assert [row.get_attribute("data-file") for row in rows] == [r["file"] for r in expected]
            assert abs(float(rows[0].get_attribute("data-score")) - expected[0]["score"]) <= 1e-6
            driver.save_screenshot(str(tmp_path / "search.png"))
        finally:
            driver.quit()
    with running(app_with(models)) as port:  # started without --index
        status, error = _post(port, "/v1/search?q=x")
        assert status == 404 and "--index" in error["error"]
