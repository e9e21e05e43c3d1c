"""Teacher files: round trip, memory-mapped lookups, foreign layouts, missing ids, resume after interruption."""

import concurrent.futures
import multiprocessing
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from convnext_audio_jax.data import teacher as teacher_lib
from convnext_audio_jax.data.teacher import (
    MissingTeacherError,
    TeacherFileError,
    TeacherPredictions,
    TeacherWriter,
)

CLASSES = 9


def make_ids(n, seed=0):
    rng = np.random.default_rng(seed)
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
    ids = {"".join(rng.choice(alphabet, rng.integers(3, 14))) for _ in range(n + 50)}
    ids = sorted(ids)[:n]
    rng.shuffle(ids)
    ids[0] = "Yé--ünï"  # non-ASCII ids survive as UTF-8
    return ids


@pytest.fixture
def data():
    ids = make_ids(300)
    logits = np.random.default_rng(1).normal(0, 4, (len(ids), CLASSES)).astype(np.float32)
    return ids, logits


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_memory_mapped(tmp_path, data, dtype):
    ids, logits = data
    path = teacher_lib.write_teacher_file(tmp_path / "t.h5", ids, logits, models=["a", "b"], source="x@y",
                                          dtype=dtype, chunk_rows=64)
    assert not (tmp_path / "t.h5.parts").exists()
    teacher = TeacherPredictions(path)
    assert (len(teacher), teacher.num_classes, teacher.models, teacher.source) == (300, CLASSES, ["a", "b"], "x@y")
    with h5py.File(path, "r") as f:
        assert f["logits"].dtype == np.dtype(dtype) and f["logits"].chunks is None
        assert [i.decode() for i in f["clip_id"][:]] == ids  # rows in write order
    order = np.random.default_rng(2).permutation(len(ids))[:77]
    got, found = teacher.lookup([ids[i] for i in order])
    assert found.all() and got.dtype == np.float32
    np.testing.assert_array_equal(got, logits[order].astype(dtype).astype(np.float32))
    assert teacher._state["logits_map"] is not None and isinstance(teacher._state["index_ids"], np.memmap)
    half, _ = teacher.lookup([ids[i] for i in order], dtype=np.float16)
    assert half.dtype == np.float16
    np.testing.assert_array_equal(half, logits[order].astype(dtype).astype(np.float16))
    # Picklable for loader workers: the copy reopens lazily and answers the same.
    clone = pickle.loads(pickle.dumps(teacher))
    assert clone._state is None
    np.testing.assert_array_equal(clone.lookup([ids[5], ids[0]])[0], logits[[5, 0]].astype(dtype).astype(np.float32))


def _lookup_in_worker(teacher, clip_ids):
    return teacher.lookup(clip_ids)[0]


def test_lookup_from_a_spawned_worker_process(tmp_path, data):
    ids, logits = data
    teacher = TeacherPredictions(teacher_lib.write_teacher_file(tmp_path / "t.h5", ids, logits, dtype="float32"))
    teacher.lookup(ids[:3])  # opened here first: the worker must still open its own handle
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        got = pool.submit(_lookup_in_worker, teacher, ids[10:20]).result(timeout=120)
    np.testing.assert_array_equal(got, logits[10:20])


def test_foreign_file_chunked_vlen_ids_without_index(tmp_path, data):
    ids, logits = data
    path = tmp_path / "foreign.h5"
    with h5py.File(path, "w") as f:  # what a few lines of h5py in another framework would write
        f.create_dataset("clip_id", data=ids, dtype=h5py.string_dtype())
        f.create_dataset("logits", data=logits, chunks=(32, CLASSES), compression="gzip")
    teacher = TeacherPredictions(path)
    query = [ids[7], ids[299], ids[7], ids[0]]  # repeated rows too
    got, found = teacher.lookup(query)
    assert found.all() and teacher._state["logits_map"] is None
    np.testing.assert_array_equal(got, logits[[7, 299, 7, 0]])


def test_missing_ids_error_or_skip_and_count(tmp_path, data):
    ids, logits = data
    teacher = TeacherPredictions(teacher_lib.write_teacher_file(tmp_path / "t.h5", ids, logits, dtype="float32"))
    query = [ids[1], "not-there", ids[2], "a-much-longer-id-than-any-in-the-file", "zz"]
    with pytest.raises(MissingTeacherError, match=r"t\.h5: no teacher row for 3 of 5 clips, first: not-there, "
                                                  r"a-much-longer-id-than-any-in-the-file, zz"):
        teacher.lookup(query)
    with pytest.raises(MissingTeacherError) as info:
        teacher.require([f"missing{i}" for i in range(25)] + ids)
    assert info.value.missing == [f"missing{i}" for i in range(10)] and "and 15 more" in str(info.value)
    assert teacher.missing_ids(query) == ["not-there", "a-much-longer-id-than-any-in-the-file", "zz"]
    lenient = TeacherPredictions(tmp_path / "t.h5", allow_missing=True)
    got, found = lenient.lookup(query)
    np.testing.assert_array_equal(found, [True, False, True, False, False])
    np.testing.assert_array_equal(got[[0, 2]], logits[[1, 2]])
    assert not got[[1, 3, 4]].any() and lenient.num_missing == 3


def test_bad_files_and_duplicates(tmp_path, data):
    ids, logits = data
    with pytest.raises(TeacherFileError, match="occur twice"):
        teacher_lib.write_teacher_file(tmp_path / "dup.h5", [ids[0], ids[1], ids[0]], logits[:3])
    path = tmp_path / "wrong.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("clip_id", data=ids[:4], dtype=h5py.string_dtype())
        f.create_dataset("logits", data=logits[:5])
    with pytest.raises(TeacherFileError, match=r"wrong\.h5: clip_id \(4,\) and logits \(5, 9\)"):
        TeacherPredictions(path)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(TeacherFileError, match="not a readable HDF5"):
        TeacherPredictions(tmp_path / "text.h5")
    # An existing file that is not this job's output is an error, and is left untouched.
    with pytest.raises(TeacherFileError, match="exists"):
        teacher_lib.write_teacher_file(path, ids, logits)
    with h5py.File(path, "r") as f:
        assert f["logits"].shape == (5, CLASSES)


def test_resume_after_an_exception_mid_write(tmp_path, data, monkeypatch):
    ids, logits = data
    reference = teacher_lib.write_teacher_file(tmp_path / "ref.h5", ids, logits, chunk_rows=50)
    written = []
    original = TeacherWriter.write_chunk

    def failing(self, k, *args, **kwargs):
        if k == 3:
            raise KeyboardInterrupt("interrupted")
        written.append(k)
        return original(self, k, *args, **kwargs)

    monkeypatch.setattr(TeacherWriter, "write_chunk", failing)
    with pytest.raises(KeyboardInterrupt):
        teacher_lib.write_teacher_file(tmp_path / "t.h5", ids, logits, chunk_rows=50)
    assert written == [0, 1, 2] and not (tmp_path / "t.h5").exists()
    # Other settings cannot resume this folder.
    with pytest.raises(TeacherFileError, match="other settings"):
        teacher_lib.write_teacher_file(tmp_path / "t.h5", ids, logits, chunk_rows=60)
    monkeypatch.setattr(TeacherWriter, "write_chunk", lambda self, k, *a, **kw: (written.append(k), original(self, k, *a, **kw)))
    teacher_lib.write_teacher_file(tmp_path / "t.h5", ids, logits, chunk_rows=50)
    assert written == [0, 1, 2, 3, 4, 5]  # chunks 0-2 were not redone
    _assert_same_file(tmp_path / "t.h5", reference)
    # Finished: a third run does nothing and keeps the file.
    teacher_lib.write_teacher_file(tmp_path / "t.h5", ids, logits, chunk_rows=50)
    assert written == [0, 1, 2, 3, 4, 5]


def _assert_same_file(path, reference):
    with h5py.File(path, "r") as a, h5py.File(reference, "r") as b:
        for key in ("clip_id", "logits", "index_clip_id", "index_row"):
            np.testing.assert_array_equal(a[key][:], b[key][:])


WRITER_SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np
    from convnext_audio_jax.data import teacher
    ids = [f"clip{i:05d}" for i in range(4000)]
    logits = np.arange(4000 * 3, dtype=np.float32).reshape(4000, 3) / 7
    original = teacher.TeacherWriter.write_chunk
    def slow(self, k, *args):
        original(self, k, *args)
        print(k, flush=True)
        time.sleep(float(sys.argv[2]))
    teacher.TeacherWriter.write_chunk = slow
    teacher.write_teacher_file(sys.argv[1], ids, logits, chunk_rows=100, dtype="float32")
""")


def test_resume_after_the_writer_process_is_killed(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    output = tmp_path / "t.h5"
    process = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(output), "0.05"], stdout=subprocess.PIPE,
                               text=True, env=env)
    for _ in range(5):  # wait until a few chunks are stored, then kill it without warning
        process.stdout.readline()
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not output.exists()
    parts = sorted(p.name for p in (tmp_path / "t.h5.parts").iterdir())
    assert "manifest.json" in parts and 5 <= sum(p.startswith("chunk-") for p in parts) < 40
    finished = subprocess.run([sys.executable, "-c", WRITER_SCRIPT, str(output), "0"], capture_output=True, text=True,
                              env=env, timeout=300)
    assert finished.returncode == 0, finished.stderr
    redone = [int(line) for line in finished.stdout.split()]
    assert redone == sorted(redone) and len(redone) == 40 - (sum(p.startswith("chunk-") for p in parts))
    teacher = TeacherPredictions(output)
    got, _ = teacher.lookup([f"clip{i:05d}" for i in (0, 1234, 3999)])
    np.testing.assert_array_equal(got, np.arange(4000 * 3, dtype=np.float32).reshape(4000, 3)[[0, 1234, 3999]] / 7)


def test_ensemble_mean():
    a, b = np.array([[1.0, -2.0]], np.float16), np.array([[3.0, 4.0]], np.float32)
    np.testing.assert_array_equal(teacher_lib.ensemble_mean([a, b]), [[2.0, 1.0]])
    with pytest.raises(ValueError, match="disagree"):
        teacher_lib.ensemble_mean([a, np.zeros((2, 2))])
    with pytest.raises(ValueError, match="at least one"):
        teacher_lib.ensemble_mean([])


def test_the_documented_efficientat_conversion(tmp_path, monkeypatch):
    """docs/train.md's script, run as written on files in EfficientAT's layout (logits .npy + name → row pickle)."""
    doc = (pathlib.Path(__file__).parent.parent / "docs" / "train.md").read_text()
    script = doc.split("### EfficientAT's PaSST ensemble as the teacher", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    ytids = ["--4gqARaEJE", "-0RWZT-miFs", "zzzzzzzzzzz", "a_b-c_d-e_f"]
    names = ["Y--4gqARaEJE.mp3", "00/Y-0RWZT-miFs.mp3", "40/Yzzzzzzzzzzz.mp3", "Ya_b-c_d-e_f.mp3"]
    rows = [2, 0, 3, 1]
    logits = np.random.default_rng(0).normal(0, 3, (4, 527)).astype(np.float32)
    monkeypatch.chdir(tmp_path)
    np.save("passt_enemble_logits_mAP_495.npy", logits)
    with open("fname_to_index.pkl", "wb") as f:
        pickle.dump(dict(zip(names, rows)), f)
    exec(compile(script, "docs/train.md", "exec"), {})
    teacher = TeacherPredictions(tmp_path / "passt_teacher.h5")
    got, found = teacher.lookup(ytids)
    assert found.all() and teacher.num_classes == 527
    np.testing.assert_array_equal(got, logits[rows].astype(np.float16).astype(np.float32))
