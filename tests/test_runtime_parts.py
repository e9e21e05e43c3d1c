"""The one resumable parts folder (embed's OUT.npz.parts, the teacher writer's OUT.parts, prepare's shards)."""

from __future__ import annotations

import os

import pytest

from convnext_audio_jax.runtime.parts import MANIFEST, PartsFolder


def test_a_part_is_whole_or_absent_and_a_failed_write_leaves_nothing(tmp_path):
    folder = PartsFolder(tmp_path / "out.parts").create()
    with folder.replacing("a.bin") as temporary:
        assert temporary.name == f"a.bin.{os.getpid()}.tmp" and not folder.has("a.bin")
        temporary.write_bytes(b"done")
    assert folder.has("a.bin") and folder.file("a.bin").read_bytes() == b"done"
    with pytest.raises(RuntimeError), folder.replacing("b.bin") as temporary:
        temporary.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert not folder.has("b.bin") and sorted(os.listdir(folder)) == ["a.bin"]


def test_records_mark_finished_parts(tmp_path):
    folder = PartsFolder(tmp_path / "p").create()
    assert folder.read_record("x.json") is None
    folder.write_record("x.json", {"file": "x.wav", "rows": 3})
    folder.file("y.json.123.tmp").write_text("{")  # a killed writer's temporary is no finished part
    assert folder.names(".json") == ["x.json"] and folder.read_record("x.json") == {"file": "x.wav", "rows": 3}


def test_the_manifest_names_the_job_and_another_job_is_told_what_is_there(tmp_path):
    folder = PartsFolder(tmp_path / "p")
    assert folder.claim({"chunks": 4}) is None and folder.claim({"chunks": 4}) is None
    assert folder.claim({"chunks": 5}) == {"chunks": 4}
    assert PartsFolder(tmp_path / "p").read_record(MANIFEST) == {"chunks": 4}


def test_remove_deletes_only_what_the_job_writes(tmp_path):
    folder = PartsFolder(tmp_path / "p", owned=r"chunk-[0-9]+\.npz|manifest\.json").create()
    folder.claim({"job": 1})
    folder.file("chunk-1.npz").write_bytes(b"x")
    folder.file("notes.txt").write_text("mine")
    folder.remove()
    assert sorted(os.listdir(folder)) == ["notes.txt"]
    folder.file("notes.txt").unlink()
    folder.remove()
    assert not folder.exists()
    folder.remove()  # nothing there: nothing to do
