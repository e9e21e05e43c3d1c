import json
import os

import numpy as np
import pytest

from convnext_audio_jax.inference.embed_output import EmbeddingStore


def embed(store, path, rows, seed):
    part = store.begin(path)
    data = np.random.default_rng(seed).standard_normal((rows, 3, 2)).astype(np.float32)
    for first in range(0, rows, 4):
        part.add(data[first : first + 4])
    part.commit(np.arange(rows) * 5.0)
    store.add_done(path)
    return data


def test_parts_resume_and_build_the_npz(tmp_path):
    output = tmp_path / "emb.npz"
    store = EmbeddingStore(output, "frames")
    first = embed(store, "a.wav", 6, 0)
    part = store.begin("b.wav")  # a crash while b.wav is embedded
    part.add(np.ones((2, 3, 2), np.float32))
    del part
    with pytest.raises(ValueError, match="interrupted run: pass --resume"):
        EmbeddingStore(output, "frames")
    with pytest.raises(ValueError, match="holds frames embeddings, not scene"):
        EmbeddingStore(output, "scene", resume=True)

    store = EmbeddingStore(output, "frames", resume=True)
    assert set(store.done) == {"a.wav"}
    second = embed(store, "b.wav", 9, 1)
    files, windows, row_shape = store.finish(["b.wav", "missing.wav", "a.wav"])
    assert files == ["b.wav", "a.wav"] and windows == 15 and row_shape == (3, 2)
    with np.load(output) as npz:
        np.testing.assert_array_equal(npz["embeddings"], np.concatenate([second, first]))
        assert npz["file_index"].tolist() == [0] * 9 + [1] * 6
        assert npz["window_start_s"].tolist() == [*np.arange(9) * 5.0, *np.arange(6) * 5.0]
        assert npz["files"].tolist() == ["b.wav", "a.wav"] and str(npz["kind"]) == "frames"
    assert not os.path.exists(str(output) + ".parts")


def test_a_part_with_non_finite_embeddings_is_refused(tmp_path):
    store = EmbeddingStore(tmp_path / "e.npz", "scene")
    part = store.begin("x.wav")
    with pytest.raises(ValueError, match="NaN/Inf"):
        part.add(np.array([[np.nan, 1.0]], np.float32))
    part.discard()
    assert os.listdir(store.parts) == []


def test_finishing_leaves_files_it_did_not_write(tmp_path):
    output = tmp_path / "e.npz"
    store = EmbeddingStore(output, "scene")
    embed(store, "x.wav", 2, 0)
    (tmp_path / "e.npz.parts" / "notes.txt").write_text("mine")
    store.finish(["x.wav"])
    assert (tmp_path / "e.npz.parts" / "notes.txt").read_text() == "mine"
    assert json.loads(json.dumps(np.load(output)["files"].tolist())) == ["x.wav"]
