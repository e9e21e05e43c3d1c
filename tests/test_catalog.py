"""The models table's rows: computed from the model itself, then read from the cache folder until the model code,
JAX or Flax changes."""

import json

import jax
import pytest

from convnext_audio_jax import models
from convnext_audio_jax.models import catalog
from convnext_audio_jax.runtime.files import CACHE_ENV


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    return tmp_path / catalog.TABLE_FOLDER


def test_rows_are_cached_per_code_version_and_counted_once(cache, monkeypatch):
    model = models.create_model("cnn6")
    expected = models.count_params(models.init_variables(model, jax.random.key(0))["params"])
    (row,) = catalog.table(["cnn6"], flops=False)
    assert row == {"params": expected, "input": "32 kHz, 64 mels, 1001 frames", "gflops": None}
    (written,) = cache.glob("*.json")
    assert written.stem == catalog.code_key() and json.loads(written.read_text())["cnn6"] == row

    computed = []
    describe = catalog.describe
    monkeypatch.setattr(catalog, "describe", lambda name, flops: computed.append((name, flops)) or describe(name, flops))
    assert catalog.table(["cnn6"], flops=False) == [row] and computed == []  # read from the cache
    (with_flops,) = catalog.table(["cnn6"], flops=True)  # not counted yet: computed, then kept
    assert computed == [("cnn6", True)] and with_flops["params"] == expected and with_flops["gflops"] > 1
    assert catalog.table(["cnn6"], flops=False) == [with_flops] and len(computed) == 1

    monkeypatch.setattr(catalog, "code_key", lambda: "another-version")  # model code, JAX or Flax changed
    catalog.table(["cnn6"], flops=False)
    assert computed[-1] == ("cnn6", False) and (cache / "another-version.json").is_file()


def test_an_unreadable_cache_is_recomputed_and_a_read_only_one_still_prints(cache, monkeypatch):
    cache.mkdir(parents=True)
    (cache / f"{catalog.code_key()}.json").write_text("{not json")
    (row,) = catalog.table(["cnn6"], flops=False)
    assert row["params"] > 0 and json.loads((cache / f"{catalog.code_key()}.json").read_text())["cnn6"] == row

    def read_only(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(catalog.files, "write_text", read_only)
    assert catalog.table(["cnn14sep"], flops=False)[0]["params"] > 0
