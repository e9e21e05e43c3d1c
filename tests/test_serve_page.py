"""The page of ``convnext-audio serve`` in a real browser: headless Chromium (Debian's chromium and
chromium-driver, installed by .ci/run) driven by selenium uploads a recording and shows the CLI's top class and
score, loads nothing from outside the server, and in live mode tags Chromium's fake microphone (a file).
Screenshots of each state are saved under the test's folder."""

import json
import os
import time
import urllib.request

import numpy as np
import pytest
import soundfile
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from serve_helpers import app_with, chromium, running, served_models, steady_sound, tiny_model_dir

from convnext_audio_jax import cli


@pytest.fixture(scope="module")
def setup(tmp_path_factory, freedesktop_recordings):
    folder = tmp_path_factory.mktemp("serve_page")
    model_dir = tiny_model_dir(tmp_path_factory)
    mic = folder / "mic.wav"
    soundfile.write(mic, steady_sound(), 48_000, subtype="PCM_16")
    with running(app_with(served_models([model_dir]), temp_root=str(folder))) as port:
        driver = chromium(mic)
        try:
            yield {"port": port, "driver": driver, "model_dir": model_dir, "mic": mic, "folder": folder}
        finally:
            driver.quit()


@pytest.fixture(scope="module")
def cli_tops(setup, freedesktop_recordings):
    """The top class of ``convnext-audio tag --format jsonl`` (one run) per file the tests compare with: the
    uploaded recording, the microphone's file and three seconds of silence, by name."""
    silence = setup["folder"] / "silence.wav"
    soundfile.write(silence, np.zeros(48_000 * 3, np.float32), 48_000)
    paths = [recording(freedesktop_recordings), setup["mic"], silence]
    output = setup["folder"] / "tags.jsonl"
    assert cli.main(["tag", *map(str, paths), "--checkpoint", setup["model_dir"], "--format", "jsonl",
                     "--no-progress", "--top-k", "5", "--output", str(output)]) == 0
    records = [json.loads(line) for line in output.read_text().splitlines()]
    return {os.path.basename(record["file"]): record["tags"][0] for record in records}


def recording(freedesktop_recordings):
    return next(p for p in freedesktop_recordings if p.name == "alarm-clock-elapsed.oga")  # the longest: 6 s


def test_upload_shows_the_cli_top_class_and_loads_nothing_from_outside(setup, freedesktop_recordings, cli_tops):
    driver, port = setup["driver"], setup["port"]
    uploaded = recording(freedesktop_recordings)
    driver.get(f"http://127.0.0.1:{port}/")
    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")
    driver.find_element(By.ID, "file").send_keys(str(uploaded))
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("tagged", "error"))
    assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "tagged", \
        driver.find_element(By.ID, "status").text
    driver.save_screenshot(str(setup["folder"] / "upload.png"))
    first = driver.find_element(By.CSS_SELECTOR, "#tags tbody tr")
    expected = cli_tops[uploaded.name]
    assert first.get_attribute("data-label") == expected["label"]
    assert abs(float(first.get_attribute("data-score")) - expected["score"]) <= 1e-5
    assert driver.find_element(By.ID, "result-title").text == uploaded.name
    # Offline: every resource the page loaded came from the server itself (no CDN, no font service).
    resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(url.startswith(f"http://127.0.0.1:{port}/") for url in resources), resources
    # …and the page's Content-Security-Policy would block any other (the browser reports a violation if so).
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/") as page:
        assert page.headers["Content-Security-Policy"].startswith("default-src 'self'")
    assert not [entry for entry in driver.get_log("browser") if "Content Security Policy" in entry["message"]]


def test_live_mode_tags_the_fake_microphone(setup, cli_tops):
    driver, port = setup["driver"], setup["port"]
    driver.get(f"http://127.0.0.1:{port}/")
    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")
    driver.find_element(By.ID, "live").click()
    # Until a whole window (10 s) of the microphone has been heard and tagged: then the live window is the
    # microphone's file looped, and tags like the file.
    latency = driver.find_element(By.ID, "live-latency")
    wait.until(lambda d: "10.0 s of audio" in latency.text or "error" in d.find_element(By.ID, "status")
               .get_attribute("class"))
    assert "10.0 s of audio" in latency.text, driver.find_element(By.ID, "status").text
    driver.save_screenshot(str(setup["folder"] / "live.png"))
    # Read at once: the rows are replaced at each hop.
    shown = driver.execute_script("""const row = document.querySelector('#live-tags tbody tr');
        return [row.dataset.label, Number(row.dataset.score),
                Number(document.getElementById('live-latency').dataset.latencyMs)];""")
    expected = cli_tops["mic.wav"]
    assert shown[0] == expected["label"] and abs(shown[1] - expected["score"]) < 0.05, (shown, expected)
    assert shown[2] > 0
    # The model tells the microphone's sound from silence: the page's class is not what any input would give.
    assert cli_tops["silence.wav"]["label"] != shown[0]
    driver.find_element(By.ID, "live").click()


def test_a_recording_from_the_microphone_is_tagged(setup):
    driver, port = setup["driver"], setup["port"]
    driver.get(f"http://127.0.0.1:{port}/")
    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")
    driver.find_element(By.ID, "record").click()
    wait.until(lambda d: "Recording" in d.find_element(By.ID, "status").text)
    time.sleep(2.0)
    driver.find_element(By.ID, "record").click()  # stop: the recording is sent as microphone.wav
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("tagged", "error"))
    driver.save_screenshot(str(setup["folder"] / "record.png"))
    assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "tagged", \
        driver.find_element(By.ID, "status").text
    assert driver.find_element(By.ID, "result-title").text == "microphone.wav"
    seconds = float(driver.find_element(By.ID, "result-info").text.split(" s,")[0])
    assert 1.5 <= seconds <= 4.0, seconds
    assert driver.find_element(By.CSS_SELECTOR, "#tags tbody tr").get_attribute("data-label")
