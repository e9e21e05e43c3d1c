"""A served tiny model for the serve tests: the model folder, an in-process uvicorn server on a free port, and a raw
HTTP client that can stream a body a chunk at a time and read an answer that arrives before the body ends."""

from __future__ import annotations

import contextlib
import json
import select
import shutil
import socket
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import uvicorn
from conftest import synthetic_sound

from convnext_audio_jax.artifacts.model_dir import save_model
from convnext_audio_jax.models import create_model, example_input
from convnext_audio_jax.serve.app import Limits, build_app
from convnext_audio_jax.serve.engine import load_models

TINY = dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), num_classes=5)
CLASS_NAMES = ["Speech", "Bell", "Beep", "Music", "Silence"]


def steady_sound(seconds=10.0, rate=48_000):
    """A chord over a noise floor, the same all through (so any stretch of it sounds alike): the "Music" class."""
    t = np.arange(int(seconds * rate)) / rate
    signal = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate([220.0, 440.0, 660.0, 1320.0], 1))
    signal = 0.25 * signal / np.abs(signal).max() + 0.02 * np.random.default_rng(0).standard_normal(t.size)
    return signal.astype(np.float32)


def prototypes(rate: int) -> np.ndarray:
    """(5, 10 s) clips, one per class of CLASS_NAMES: voice, bell, beeps, a chord, near silence."""
    rng = np.random.default_rng(0)
    clips = [synthetic_sound(kind, rate, 10.0, rng) for kind in ("voice", "bell", "beeps")]
    clips += [steady_sound(10.0, rate), 1e-4 * rng.standard_normal(10 * rate).astype(np.float32)]
    return np.stack(clips)


def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny ConvNeXt with a random trunk whose head points each class of CLASS_NAMES at the scene embedding of
    its prototype clip (away from the mean of the five), saved as a model folder named ``tiny``: its top class
    tells sounds apart. The trunk's variables are drawn from their shapes (``jax.eval_shape`` traces the model
    without compiling its init, which costs most of a minute on a loaded 2-core machine): norms at scale 1 /
    shift 0, kernels N(0, 1/fan-in). Made once per test process (the serve tests' modules share it)."""
    folder = tmp_path_factory.getbasetemp() / "serve_model"
    if (folder / "tiny").exists():
        return str(folder / "tiny")
    model = create_model("convnext_tiny", **TINY)
    dummy = jnp.zeros(example_input(model, 1).shape, jnp.float32)
    shapes = nn.unbox(jax.eval_shape(lambda key: model.init({"params": key}, dummy, train=False), jax.random.key(0)))
    rng = np.random.default_rng(7)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith(("['scale']", "['var']", "['gamma']")):
            return np.ones(leaf.shape, np.float32)
        if name.endswith(("['mean']", "['bias']")):
            return np.zeros(leaf.shape, np.float32)
        return (rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))).astype(np.float32)

    variables = jax.tree_util.tree_map_with_path(draw, shapes)
    clips = prototypes(model.frontend.sample_rate)
    scenes = np.asarray(jax.jit(model.apply)(variables, clips)["scene_embedding"], np.float64)  # eager: 3× slower
    centred = scenes - scenes.mean(axis=0)
    directions = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    own = np.sum(centred * directions, axis=1)  # each prototype's distance from the mean along its direction
    scale = 8.0 / own  # logit +4 at the prototype, -4 at the mean
    variables["params"]["head"]["kernel"] = (directions * scale[:, None]).T.astype(np.float32)
    variables["params"]["head"]["bias"] = (-scale * (directions @ scenes.mean(axis=0) + own / 2)).astype(np.float32)
    return str(save_model(folder / "tiny", "convnext_tiny", variables, {"class_names": CLASS_NAMES}, TINY))


@contextlib.contextmanager
def running(app):
    """The app served by uvicorn in a thread on 127.0.0.1 and a free port; yields the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def served_models(sources, batching=True):
    return load_models(sources, batch_size=8, batching=batching, max_wait_s=0.01)


def app_with(models, **limits):
    """An app over already loaded models (their compiled forwards are shared) with these `Limits`."""
    return build_app(models, Limits(**limits))


def multipart(filename: str, data: bytes, boundary: str = "testboundary1234") -> tuple[bytes, str]:
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _read_answer(sock: socket.socket) -> tuple[int, dict, bytes]:
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            break
        data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:] if ": " in line)
        headers = {k.lower(): v for k, v in headers.items()}
        if "content-length" in headers and len(body) >= int(headers["content-length"]):
            break
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:] if ": " in line)}
    return int(lines[0].split()[1]), headers, body


def raw_request(port: int, method: str, path: str, headers: dict, chunks, *, chunked: bool = False,
                hold: threading.Event | None = None) -> tuple[int, dict, bytes, int]:
    """Sends a request, its body from the iterable ``chunks`` (chunked transfer encoding when ``chunked``),
    checking before each chunk whether the server has answered already (it may answer and close before the body
    ends). With ``hold``, waits for that event before the last chunk. (status, headers, body, bytes sent)."""
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if chunked:
            lines.append("Transfer-Encoding: chunked")
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        sent = 0
        for chunk in chunks:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:  # answered before the end of the body
                return (*_read_answer(sock), sent)
            if hold is not None and chunk is None:
                hold.wait(30)
                continue
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            except (BrokenPipeError, ConnectionResetError):
                return (*_read_answer(sock), sent)
            sent += len(chunk)
        if chunked:
            sock.sendall(b"0\r\n\r\n")
        return (*_read_answer(sock), sent)
    finally:
        sock.close()


def post_file(port: int, path: str, filename: str, data: bytes, headers: dict | None = None):
    """POST ``data`` as the multipart field ``file``: (status, headers, parsed JSON or raw body)."""
    body, content_type = multipart(filename, data)
    status, answer_headers, answer, _ = raw_request(
        port, "POST", path, {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})},
        [body])
    if answer_headers.get("content-type", "").startswith("application/json"):
        return status, answer_headers, json.loads(answer)
    return status, answer_headers, answer


def chromium(mic_file):
    """Headless Chromium driven by selenium, its fake microphone playing ``mic_file``."""
    from selenium import webdriver

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.fail("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver; "
                    ".ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,1300",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-audio-capture={mic_file}", "--autoplay-policy=no-user-gesture-required"]:
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
