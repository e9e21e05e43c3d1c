"""``convnext-audio index`` and ``search``: the index holds each window's projection by the retrieval model (as
computed directly), an interrupted run resumes without redoing finished files, search ranks files by their best
window, and bad input is one line."""

import json

import numpy as np
import pytest
import soundfile
from downstream_helpers import save_retrieval_model, tiny_encoder  # noqa: F401  (tiny_encoder: a fixture)

from convnext_audio_jax import cli
from convnext_audio_jax.downstream import features, search

pytest.importorskip("sentence_transformers", reason="text embeddings need the [downstream] extra")


class Interrupted(BaseException):
    """A kill in the middle of a run (BaseException, as KeyboardInterrupt: nothing catches it on the way)."""


def test_index_resume_and_search(tmp_path, monkeypatch, capsys, tiny_encoder):  # noqa: F811
    model = save_retrieval_model(tmp_path / "model", tiny_encoder)
    folder = tmp_path / "recordings"
    folder.mkdir()
    rng = np.random.default_rng(1)
    waves = {"a.wav": rng.normal(0, 0.1, 16_000), "b.flac": np.sin(np.arange(40_000) / 3.0) * 0.3,
             "c.wav": rng.normal(0, 0.3, 8_000)}
    for name, wave in waves.items():
        soundfile.write(folder / name, wave.astype(np.float32), 16_000)
    (folder / "broken.wav").write_bytes(b"not audio")
    output = tmp_path / "index.h5"

    calls, interrupt_at = [], [2]
    real = search._embed_file

    def interrupted(path, *args):
        calls.append(path)
        if len(calls) == interrupt_at[0]:
            raise Interrupted
        return real(path, *args)

    monkeypatch.setattr(search, "_embed_file", interrupted)
    with pytest.raises(Interrupted):
        cli.main(["index", str(folder), "--model", str(tmp_path / "model"), "--output", str(output), "--no-progress"])
    assert cli.main(["index", str(folder), "--model", str(tmp_path), "--output", str(output)]) == 2  # no model there
    assert "no retrieval model" in capsys.readouterr().err
    calls.clear()
    interrupt_at[0] = None
    assert cli.main(["index", str(folder), "--model", str(tmp_path / "model"), "--output", str(output), "--resume",
                     "--no-progress"]) == 0
    assert sorted(p.rsplit("/", 1)[1] for p in calls) == ["b.flac", "broken.wav", "c.wav"]  # a.wav was finished
    assert "skipped" in capsys.readouterr().err and not (tmp_path / "index.h5.parts").exists()

    index = search.load_index(str(output))
    assert [f.rsplit("/", 1)[1] for f in index["files"]] == ["a.wav", "b.flac", "c.wav"]
    encoder = features.AudioEncoder(str(tiny_encoder), 0.5)
    rows = index["file_index"] == 1
    starts, windows = encoder.windows(waves["b.flac"].astype(np.float32))
    np.testing.assert_allclose(index["window_start_s"][rows], starts / 16_000)
    expected = model.embed_audio(encoder.forward(windows)["logits"])
    np.testing.assert_allclose(index["embeddings"][rows], expected, atol=1e-4)  # batched differently

    query = model.embed_text(["a steady tone"])[0]
    results = search.search(index, query, top_k=2)
    best = [max(index["embeddings"][index["file_index"] == f] @ query) for f in range(3)]
    assert [r["file"] for r in results] == [index["files"][f] for f in np.argsort(best)[::-1][:2]]
    assert results[0]["score"] == pytest.approx(max(best), abs=1e-6)
    assert cli.main(["search", "a steady tone", "--index", str(output), "--top-k", "3", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["rank"] for line in lines] == [1, 2, 3] and lines[0]["score"] == pytest.approx(max(best), abs=1e-5)
    b = next(line for line in lines if line["file"].endswith("b.flac"))
    assert b["windows"] == len(starts) and b["end_s"] - b["start_s"] == pytest.approx(1.0)

    for argv, expected in [(["search", "x", "--index", str(tmp_path / "none.h5")], "no such file"),
                           (["search", " ", "--index", str(output)], "the query is empty"),
                           (["search", "x", "--index", str(folder / "a.wav")], "not an HDF5 file")]:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1
