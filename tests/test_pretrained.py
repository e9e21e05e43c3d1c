"""Pretrained names, proven against a local HTTP server (this machine has no internet): a random-weight
checkpoint of the smallest registered model, CNN6 in the PANNs layout (``torch.save({"model": state_dict})`` of
the PyTorch reference, 19 MB where a ConvNeXt-Tiny is 118 MB: every download, conversion and load below is
cheaper; the layouts themselves are proven in test_convert), is served from 127.0.0.1 with HTTP Range support;
the registry entry is pointed at it."""

import dataclasses
import hashlib
import http.server
import importlib.machinery
import io
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.parse

import jax
import numpy as np
import pytest
import torch

from convnext_audio_jax import cli
from convnext_audio_jax.artifacts.model_dir import load_model
from convnext_audio_jax.convert import load_torch_state_dict, save_torch_state_dict
from convnext_audio_jax.convert.torch_reference import build_reference, randomize_
from convnext_audio_jax.hub import convert_command as convert_cli
from convnext_audio_jax.hub import pretrained

NAME = "cnn6_mAP343"
FILE = "Cnn6_mAP=0.343.pth"
ROOT = pathlib.Path(__file__).resolve().parents[1]


class FileServer:
    """Serves ``files`` under /files/NAME and /mirror/NAME; records every request (path, Range
    header). ``drop_after`` bytes: the first full-file response stops there and closes the socket;
    ``delay`` seconds are spent in each response (so that concurrent clients overlap)."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests: list[tuple[str, str | None]] = []
        self.drop_after: int | None = None
        self.delay = 0.0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                name = urllib.parse.unquote(self.path.split("?")[0].rsplit("/", 1)[-1])
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name]
                start = 0
                ranged = self.headers.get("Range")
                if ranged:
                    start = int(ranged.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                time.sleep(server.delay)
                if server.drop_after is not None and not ranged:
                    self.wfile.write(data[: server.drop_after])
                    self.wfile.flush()
                    server.drop_after = None
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str, folder: str = "files") -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{folder}/{urllib.parse.quote(name)}?download=1"

    def file_requests(self, name: str) -> list[tuple[str, str | None]]:
        return [r for r in self.requests if urllib.parse.unquote(r[0]).split("?")[0].endswith("/" + name)]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def checkpoint_bytes() -> bytes:
    reference = randomize_(build_reference("cnn6"), seed=3)
    buffer = io.BytesIO()
    torch.save({"model": reference.state_dict()}, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def labels_bytes() -> bytes:
    rows = ["index,mid,display_name"] + [f'{i},/m/{i:05d},"Class {i}"' for i in range(527)]
    return ("\n".join(rows) + "\n").encode()


@pytest.fixture
def server(checkpoint_bytes, labels_bytes):
    served = FileServer({FILE: checkpoint_bytes, "class_labels_indices.csv": labels_bytes})
    yield served
    served.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv(pretrained.CACHE_ENV, str(directory))
    for name in (pretrained.OFFLINE_ENV, pretrained.MIRROR_ENV, pretrained.REGISTRY_ENV):
        monkeypatch.delenv(name, raising=False)
    return directory


def local_entry(server: FileServer, data: bytes, md5: str | None = None) -> pretrained.Pretrained:
    """The real registry entry with its sources replaced by the test server's copy."""
    real = pretrained.REGISTRY[NAME]
    return dataclasses.replace(
        real,
        sources=(pretrained.Source(FILE, url=server.url(FILE), md5=md5 or hashlib.md5(data).hexdigest(), size=len(data)),),
        labels=pretrained.Source("class_labels_indices.csv", url=server.url("class_labels_indices.csv")),
    )


@pytest.fixture
def registered(server, checkpoint_bytes, monkeypatch):
    monkeypatch.setitem(pretrained.REGISTRY, NAME, local_entry(server, checkpoint_bytes))
    return pretrained.REGISTRY[NAME]


def test_builtin_registry_and_its_documented_table_agree():
    """docs/pretrained.md's registry table is what users check a download against: each built-in name has a row
    naming its model, every file and every checksum the registry verifies (md5 in full, the safetensors sha256
    by its first 8 and last 6 hex digits), and no row names an entry the registry lacks. A checksum, file or model
    changed on one side only fails here. The URLs are built as their publishers give them ("=" quoted)."""
    entries = pretrained.registry()
    rows = {}
    for line in (ROOT / "docs" / "pretrained.md").read_text().split("## Registry", 1)[1].splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells
    assert set(rows) == set(entries)
    for name, entry in entries.items():
        _, model, _, files, checksums = rows[name]
        assert model.split()[0] == f"`{entry.model}`", name
        for source in entry.sources:
            assert f"`{source.file}`" in files or source.url in files, (name, source.file)
            if source.md5:
                assert f"md5 `{source.md5}`" in checksums, (name, source.md5)
            if source.sha256:
                assert f"sha256 `{source.sha256[:8]}…{source.sha256[-6:]}`" in checksums, name
            if source.hf_repo:
                assert f"`{source.hf_repo}`" in files and f"`{source.hf_revision[:8]}…`" in files, name
        if not any(source.md5 or source.sha256 for source in entry.sources):
            assert checksums == "none published", name
    assert entries["cnn14_mAP431"].sources[0].url.endswith("/Cnn14_mAP%3D0.431.pth?download=1")


@pytest.mark.slow
def test_download_convert_and_tag_equal_the_direct_convert_path(cache, server, registered, checkpoint_bytes, tmp_path):
    model, variables, metadata = pretrained.load(NAME)
    assert [r[1] for r in server.file_requests(FILE)] == [None]  # one plain GET
    assert metadata["pretrained"]["md5"] == hashlib.md5(checkpoint_bytes).hexdigest()
    assert metadata["class_names"][:2] == ["Class 0", "Class 1"] and len(metadata["class_names"]) == 527
    assert sorted(p.name for p in (cache / "downloads").iterdir()) == sorted(["class_labels_indices.csv", FILE])

    direct_file = tmp_path / FILE
    direct_file.write_bytes(checkpoint_bytes)
    assert convert_cli.main([str(direct_file), str(tmp_path / "direct")]) == 0
    direct_model, direct_variables, direct_metadata = load_model(tmp_path / "direct")
    assert metadata["model"] == direct_metadata["model"] == "cnn6"
    assert metadata["source"] == direct_metadata["source"]
    jax.tree.map(np.testing.assert_array_equal, variables, direct_variables)
    assert model == direct_model
    waveform = 0.1 * np.random.default_rng(0).standard_normal((1, 64_000)).astype(np.float32)  # 2 s: a quick compile
    forward = jax.jit(lambda v, x: model.apply(v, x)["probs"])
    np.testing.assert_array_equal(np.asarray(forward(variables, waveform)), np.asarray(forward(direct_variables, waveform)))

    before = len(server.requests)
    assert pretrained.resolve(NAME) == cache / "models" / NAME
    assert pretrained.resolve(NAME, offline=True) == cache / "models" / NAME
    assert len(server.requests) == before  # a second use makes no request


def test_interrupted_download_resumes_with_a_range_request(cache, server, registered, checkpoint_bytes):
    server.drop_after = 5_000_000
    model_dir = pretrained.resolve(NAME)
    assert [r[1] for r in server.file_requests(FILE)] == [None, "bytes=5000000-"]
    assert (cache / "downloads" / FILE).read_bytes() == checkpoint_bytes
    assert not (cache / "downloads" / (FILE + ".part")).exists()
    assert pretrained.load(NAME)[2]["pretrained"]["file"] == FILE and model_dir.is_dir()


def test_partial_file_left_by_an_earlier_run_is_resumed(cache, server, registered, checkpoint_bytes):
    (cache / "downloads").mkdir(parents=True)
    (cache / "downloads" / (FILE + ".part")).write_bytes(checkpoint_bytes[:1234])
    pretrained.resolve(NAME)
    assert [r[1] for r in server.file_requests(FILE)] == ["bytes=1234-"]
    assert (cache / "downloads" / FILE).read_bytes() == checkpoint_bytes


def test_bad_checksum_is_refused_and_leaves_no_file(cache, server, checkpoint_bytes, monkeypatch, capsys):
    monkeypatch.setitem(pretrained.REGISTRY, NAME, local_entry(server, checkpoint_bytes, md5="0" * 32))
    with pytest.raises(pretrained.PretrainedError, match=r"md5 [0-9a-f]{32}, 0{32} published.*download was deleted"):
        pretrained.resolve(NAME)
    assert list((cache / "downloads").iterdir()) == []
    assert not (cache / "models").exists()


def test_offline_fails_fast_naming_the_file_and_the_command(cache, server, registered, monkeypatch):
    monkeypatch.setenv(pretrained.OFFLINE_ENV, "1")
    start = time.monotonic()
    with pytest.raises(pretrained.PretrainedError, match=rf"offline.*missing {FILE}.*convnext-audio download {NAME}"):
        pretrained.load(NAME)
    assert time.monotonic() - start < 5 and server.requests == []


def test_cli_offline_flag_and_download_command(cache, server, registered, capsys, monkeypatch):
    monkeypatch.setenv(pretrained.OFFLINE_ENV, "0")  # the flag makes these offline, not the environment
    assert cli.main(["--offline", "download", NAME]) == 2
    assert f"missing {FILE}" in capsys.readouterr().err and server.requests == []
    assert cli.main(["download", NAME, "--offline"]) == 2
    assert f"missing {FILE}" in capsys.readouterr().err and server.requests == []
    monkeypatch.setenv(pretrained.OFFLINE_ENV, "0")
    assert cli.main(["download", NAME]) == 0
    assert capsys.readouterr().out.strip() == str(cache / "models" / NAME)
    assert cli.main(["models", "--pretrained"]) == 0
    table = capsys.readouterr().out
    assert NAME in table and "mAP .471" in table and "cnn14_mAP431" in table


def test_no_network_says_what_to_do_and_claims_no_partial_file(cache, checkpoint_bytes, server, monkeypatch):
    entry = local_entry(server, checkpoint_bytes)
    unreachable = "http://127.0.0.1:9/nowhere/"  # port 9 (discard): connection refused at once
    entry = dataclasses.replace(entry, sources=(dataclasses.replace(entry.sources[0], url=unreachable + FILE),))
    monkeypatch.setitem(pretrained.REGISTRY, NAME, entry)
    monkeypatch.delenv(pretrained.MIRROR_ENV, raising=False)
    with pytest.raises(pretrained.PretrainedError) as error:
        pretrained.resolve(NAME)
    message = str(error.value)
    assert "nothing was received" in message and "bytes kept" not in message
    assert f"copy {FILE} into {cache / 'downloads'}" in message
    assert pretrained.MIRROR_ENV in message and "--offline" in message
    assert not (cache / "downloads" / (FILE + ".part")).exists()


def test_a_host_name_that_does_not_resolve_is_tried_once(cache, checkpoint_bytes, server, monkeypatch, capsys):
    entry = local_entry(server, checkpoint_bytes)
    nowhere = "http://convnext-audio-test.invalid/"  # RFC 6761: .invalid never resolves
    entry = dataclasses.replace(entry, sources=(dataclasses.replace(entry.sources[0], url=nowhere + FILE),))
    monkeypatch.setitem(pretrained.REGISTRY, NAME, entry)
    with pytest.raises(pretrained.PretrainedError, match=rf"downloading {nowhere}{FILE} failed once .*nothing was received"):
        pretrained.resolve(NAME)
    assert "trying again" not in capsys.readouterr().err


def test_mirror_serves_every_file_by_its_name(cache, server, checkpoint_bytes, monkeypatch):
    entry = local_entry(server, checkpoint_bytes)
    unreachable = "http://127.0.0.1:9/nowhere/"
    entry = dataclasses.replace(entry, sources=(dataclasses.replace(entry.sources[0], url=unreachable + FILE),),
                                labels=dataclasses.replace(entry.labels, url=unreachable + "labels.csv"))
    monkeypatch.setitem(pretrained.REGISTRY, NAME, entry)
    monkeypatch.setenv(pretrained.MIRROR_ENV, server.url("", folder="mirror").split("?")[0])
    pretrained.resolve(NAME)
    assert sorted(urllib.parse.unquote(p) for p, _ in server.requests) == sorted([
        "/mirror/class_labels_indices.csv", f"/mirror/{FILE}"])


def test_unknown_names_and_existing_paths_are_not_resolved(cache, tmp_path, monkeypatch):
    assert pretrained.resolve("no_such_model") is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / NAME).mkdir()
    assert pretrained.resolve(NAME) is None  # an existing path wins over a name
    with pytest.raises(pretrained.PretrainedError, match="is an existing path"):
        pretrained.load(NAME)
    with pytest.raises(pretrained.PretrainedError, match="not a registered pretrained name"):
        pretrained.load("no_such_model")


@pytest.mark.slow
def test_two_processes_starting_together_download_once(cache, server, checkpoint_bytes, tmp_path, monkeypatch, capsys):
    """This process and one subprocess (two processes are what the lock is for; a second subprocess would only
    add its imports) load the name at the same moment: one downloads and converts, the other waits for it."""
    entry = local_entry(server, checkpoint_bytes)
    registry_file = tmp_path / "registry.json"
    registry_file.write_text(json.dumps({NAME: {
        "model": entry.model, "sources": [dataclasses.asdict(entry.sources[0])], "labels": dataclasses.asdict(entry.labels)}}))
    monkeypatch.setenv(pretrained.REGISTRY_ENV, str(registry_file))
    server.delay = 1.0  # the first process holds the lock this long at least, so the second arrives while it does
    # No native kernels: they would be built anew (~30 s of CPU) into the fresh cache folder, and the lock on the
    # download does not depend on them.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "CONVNEXT_AUDIO_JAX_NATIVE": "0"}
    # The subprocess imports first, then both start on the "go" line.
    script = ("import sys; from convnext_audio_jax import pretrained; print('ready', flush=True); sys.stdin.readline(); "
              "m, v, meta = pretrained.load(sys.argv[1]); print(meta['pretrained']['md5'])")
    process = subprocess.Popen([sys.executable, "-c", script, NAME], env=env, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "ready", process.stderr.read()[-2000:]
        process.stdin.write("go\n")
        process.stdin.flush()
        here = pretrained.load(NAME)[2]["pretrained"]["md5"]
        out, err = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 0, err[-2000:]
    assert {out.strip(), here} == {hashlib.md5(checkpoint_bytes).hexdigest()}
    assert len(server.file_requests(FILE)) == 1
    errors = [err, capsys.readouterr().err]
    assert sum("converted" in e for e in errors) == 1
    assert sum("another process is fetching it" in e for e in errors) == 1  # they did overlap


def fake_hub(monkeypatch, files: dict[str, pathlib.Path], calls: list, endpoint: str) -> None:
    """A stand-in ``huggingface_hub`` module (the tests must not need the real one, nor the network) whose server
    is ``endpoint``."""
    module = types.ModuleType("huggingface_hub")
    module.__spec__ = importlib.machinery.ModuleSpec("huggingface_hub", None)
    constants = types.ModuleType("huggingface_hub.constants")
    constants.ENDPOINT = endpoint
    module.constants = constants
    monkeypatch.setitem(sys.modules, "huggingface_hub.constants", constants)

    def hf_hub_download(repo_id, filename, revision=None, local_files_only=False):
        calls.append((repo_id, filename, revision, local_files_only))
        return str(files[filename])

    module.hf_hub_download = hf_hub_download
    monkeypatch.setitem(sys.modules, "huggingface_hub", module)


def test_safetensors_copy_on_the_hub_is_preferred(cache, server, checkpoint_bytes, tmp_path, monkeypatch):
    pth = tmp_path / FILE
    pth.write_bytes(checkpoint_bytes)
    hub_file = save_torch_state_dict(load_torch_state_dict(pth), tmp_path / "hub" / "model.safetensors")
    calls = []
    fake_hub(monkeypatch, {"model.safetensors": hub_file}, calls, f"http://127.0.0.1:{server.httpd.server_address[1]}")
    entry = local_entry(server, checkpoint_bytes)
    hub = pretrained.Source("model.safetensors", hf_repo="someone/some-model", hf_revision="abc123",
                            sha256=hashlib.sha256(hub_file.read_bytes()).hexdigest())
    monkeypatch.setitem(pretrained.REGISTRY, NAME, dataclasses.replace(entry, sources=(entry.sources[0], hub)))
    _, variables, metadata = pretrained.load(NAME)
    assert calls == [("someone/some-model", "model.safetensors", "abc123", False)]
    assert server.file_requests(FILE) == []  # the .pth was not downloaded
    assert metadata["pretrained"]["hf_repo"] == "someone/some-model" and metadata["source"]["file"] == "model.safetensors"
    assert convert_cli.main([str(pth), str(tmp_path / "direct")]) == 0
    jax.tree.map(np.testing.assert_array_equal, variables, load_model(tmp_path / "direct")[1])

    changed = hub_file.read_bytes()
    hub_file.write_bytes(changed[:-1] + bytes([changed[-1] ^ 1]))  # the hub cache's copy changed: refused, not used
    monkeypatch.setitem(pretrained.REGISTRY, NAME, dataclasses.replace(entry, name=NAME, sources=(hub,)))
    (cache / "models" / NAME / "metadata.json").unlink()
    with pytest.raises(pretrained.PretrainedError, match=r"someone/some-model/model.safetensors.*sha256 .* published; not used"):
        pretrained.resolve(NAME)


def test_unreachable_hub_is_not_retried_and_the_next_source_is_tried(cache, server, checkpoint_bytes, tmp_path,
                                                                      monkeypatch):
    calls = []
    fake_hub(monkeypatch, {}, calls, "http://127.0.0.1:9")  # port 9 (discard): connection refused at once
    entry = local_entry(server, checkpoint_bytes)
    hub = pretrained.Source("model.safetensors", hf_repo="someone/some-model", sha256="0" * 64)
    monkeypatch.setitem(pretrained.REGISTRY, NAME, dataclasses.replace(entry, sources=(hub, entry.sources[0])))
    assert pretrained.resolve(NAME) == cache / "models" / NAME  # the URL source, after one probe of the hub
    assert calls == [] and len(server.file_requests(FILE)) == 1

    unreachable = dataclasses.replace(entry.sources[0], url="http://127.0.0.1:9/nowhere/" + FILE)
    monkeypatch.setitem(pretrained.REGISTRY, NAME, dataclasses.replace(entry, sources=(hub, unreachable)))
    shutil.rmtree(cache)
    with pytest.raises(pretrained.PretrainedError) as error:
        pretrained.resolve(NAME)
    message = str(error.value)
    assert "someone/some-model/model.safetensors via huggingface_hub: http://127.0.0.1:9 cannot be reached" in message
    assert f"copy model.safetensors or {FILE} into {cache / 'downloads'}" in message and "--offline" in message
    assert calls == [] and "\n" not in message


def test_pth_without_torch_says_which_extra_to_install(cache, server, registered, monkeypatch):
    real = pretrained.importlib.util.find_spec
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None if name == "torch" else real(name))
    with pytest.raises(pretrained.PretrainedError, match=r"needs torch: pip install 'convnext-audio-jax\[torch\]'"):
        pretrained.resolve(NAME)
    assert server.requests == []


def test_wrong_file_put_in_the_cache_is_refused_not_deleted(cache, server, registered, checkpoint_bytes):
    (cache / "downloads").mkdir(parents=True)
    wrong = cache / "downloads" / FILE
    damaged = checkpoint_bytes[:-1] + bytes([checkpoint_bytes[-1] ^ 1])
    wrong.write_bytes(damaged)
    with pytest.raises(pretrained.PretrainedError, match=rf"{FILE}: md5 .* published.*not used: delete it"):
        pretrained.resolve(NAME)
    assert wrong.read_bytes() == damaged and server.requests == []
