"""`convnext-audio predict`: ensemble-mean logits per clip id, sharded, chunked and resumable; skipped clips."""

import data_helpers
import h5py
import jax
import numpy as np
import pytest

from convnext_audio_jax import cli
from convnext_audio_jax.artifacts.model_dir import save_model
from convnext_audio_jax.data import audio
from convnext_audio_jax.data import teacher as teacher_lib
from convnext_audio_jax.data.demo import SyntheticAudioSet
from convnext_audio_jax.evaluation import predict as predict_lib
from convnext_audio_jax.models import create_model, init_variables
from convnext_audio_jax.models.frontend import FrontendConfig

# 1 s clips at 16 kHz (the demo set) keep the models cheap; the CLI test runs the 10 s AudioSet layout.
DEMO_FRONTEND = FrontendConfig(sample_rate=16_000, n_fft=512, hop_length=160, n_mels=64, fmax=8_000.0, clip_seconds=1.0)
TINY = dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))
NUM_CLIPS = 11
BROKEN_ROW = 5
CHUNK = 4  # three chunks: 4, 4 (one unreadable clip), 3


class DemoWithABrokenClip:
    """The demo set with one clip that cannot be read, as a real source reports it."""

    def __init__(self):
        self._demo = SyntheticAudioSet("train", NUM_CLIPS)

    def __len__(self):
        return len(self._demo)

    targets = property(lambda self: self._demo.targets)
    num_classes = property(lambda self: self._demo.num_classes)

    def clip_id(self, index):
        return self._demo.clip_id(index)

    def __getitem__(self, index):
        if index == BROKEN_ROW:
            raise audio.ClipError(self.clip_id(index), audio.UNREADABLE, "broken on purpose")
        return self._demo[index]


@pytest.fixture(scope="module")
def members():
    model = create_model("convnext_tiny", **TINY, num_classes=10, frontend=DEMO_FRONTEND)
    return [(f"m{seed}", model, init_variables(model, jax.random.key(seed))) for seed in (1, 2)]


@pytest.fixture(scope="module")
def source():
    return DemoWithABrokenClip()


@pytest.fixture(scope="module")
def reference(members, source):
    """Unsharded, all readable clips in one batch per model, the mean of the two models' logits."""
    keep = [i for i in range(NUM_CLIPS) if i != BROKEN_ROW]
    waveforms = audio.int16_to_float(np.stack([source[i]["waveform"] for i in keep]))
    logits = np.mean([np.asarray(jax.jit(model.apply)(variables, waveforms)["logits"]) for _, model, variables in members],
                     axis=0)
    return [source.clip_id(i) for i in keep], logits


def test_ensemble_float32_equals_the_mean_and_lists_the_skipped_clip(members, source, reference, tmp_path):
    output = tmp_path / "teacher.h5"
    result = predict_lib.predict_teacher(members, source, output, source_name="demo", batch_size=8,
                                         chunk_clips=CHUNK, dtype="float32", progress=False)
    assert result["complete"] and result["skipped"] == {audio.UNREADABLE: 1}
    assert result["skipped_ids"][0][:2] == (source.clip_id(BROKEN_ROW), audio.UNREADABLE)
    ids, logits = reference
    teacher = teacher_lib.TeacherPredictions(output)
    assert (len(teacher), teacher.models, teacher.source) == (NUM_CLIPS - 1, ["m1", "m2"], "demo")
    got, _ = teacher.lookup(ids[::-1])
    np.testing.assert_allclose(got, logits[::-1], rtol=0, atol=1e-5)
    with h5py.File(output, "r") as f:
        assert [s.decode() for s in f["skipped/clip_id"][:]] == [source.clip_id(BROKEN_ROW)]
    # One model alone gives a different file: the ensemble really is a mean of both.
    single = predict_lib.predict_teacher(members[:1], source, tmp_path / "one.h5", batch_size=8, chunk_clips=CHUNK,
                                         dtype="float32", progress=False)
    assert single["complete"]
    one, _ = teacher_lib.TeacherPredictions(tmp_path / "one.h5").lookup(ids)
    assert np.abs(one - logits).max() > 1e-3


def test_resume_across_processes_and_after_interruption(members, source, tmp_path, monkeypatch):
    paths = members[:1]  # one model: the resume logic does not depend on the ensemble size
    output = tmp_path / "teacher.h5"
    run = dict(batch_size=8, chunk_clips=CHUNK, progress=False)
    # Process 1 of 2 does chunk 1 only: no file yet.
    partial = predict_lib.predict_teacher(paths, source, output, process_index=1, process_count=2, **run)
    assert not partial["complete"] and partial["chunks_done"] == 1 and not output.exists()
    # Process 0 of 2 is interrupted after its first chunk (chunk 0) ...
    original = teacher_lib.TeacherWriter.write_chunk
    written = []

    def interrupted(self, k, *args):
        if written:
            raise KeyboardInterrupt
        written.append(k)
        original(self, k, *args)

    monkeypatch.setattr(teacher_lib.TeacherWriter, "write_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        predict_lib.predict_teacher(paths, source, output, process_index=0, process_count=2, **run)
    assert written == [0] and not output.exists()
    # ... and its re-run does only chunk 2, then assembles the file.
    monkeypatch.setattr(teacher_lib.TeacherWriter, "write_chunk",
                        lambda self, k, *args: (written.append(k), original(self, k, *args)))
    result = predict_lib.predict_teacher(paths, source, output, process_index=0, process_count=2, **run)
    assert result["complete"] and written == [0, 2]
    monkeypatch.undo()
    full = predict_lib.predict_teacher(paths, source, tmp_path / "full.h5", **run)  # one uninterrupted run
    assert full["complete"]
    with h5py.File(output, "r") as f, h5py.File(tmp_path / "full.h5", "r") as g:
        assert f["logits"].dtype == np.float16
        for key in ("clip_id", "logits", "index_clip_id", "index_row"):
            np.testing.assert_array_equal(f[key][:], g[key][:])
    # A finished file: running again writes nothing.
    monkeypatch.setattr(teacher_lib.TeacherWriter, "write_chunk", lambda *args: pytest.fail("rewrote a chunk"))
    assert predict_lib.predict_teacher(paths, source, output, **run)["complete"]


def test_cli_predict_end_to_end(tmp_path, capsys):
    """Checkpoints of the 10 s AudioSet layout on a PANN packed file, as the command is used."""
    classes = len(data_helpers.CLASSES)
    model = create_model("convnext_tiny", **TINY, num_classes=classes)
    variables = init_variables(model, jax.random.key(1))
    checkpoint = str(save_model(tmp_path / "m1", "convnext_tiny", variables, {}, {**TINY, "num_classes": classes}))
    waveforms = data_helpers.random_waveforms(3)
    waveforms[1] = 0  # read as "empty" and skipped
    names = ["Y--4gqARaEJE", "Ybroken00000", "Yzz00000000"]
    packed = str(data_helpers.write_packed_hdf5(tmp_path / "train.h5", waveforms, np.ones((3, classes), bool), names))
    output = tmp_path / "t.h5"
    rc = cli.main(["predict", "--checkpoint", checkpoint, "--data", packed, "--output", str(output),
                   "--batch-size", "8", "--chunk-clips", "2", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f"predict: 2 clips × {classes} classes from 1 model(s)" in captured.out
    assert f"skipped Ybroken00000: {audio.EMPTY}" in captured.err
    expected = np.asarray(jax.jit(model.apply)(variables, audio.int16_to_float(waveforms[[0, 2]]))["logits"])
    got, found = teacher_lib.TeacherPredictions(output).lookup(["Yzz00000000", "Y--4gqARaEJE"])
    assert found.all()
    np.testing.assert_allclose(got, expected[::-1], rtol=0, atol=4e-3 * np.abs(expected).max())  # float16
    # Another job cannot reuse the output path: an error, and the file stays.
    rc = cli.main(["predict", "--checkpoint", checkpoint, checkpoint, "--data", packed, "--output", str(output),
                   "--no-progress"])
    assert rc == 2 and "exists" in capsys.readouterr().err and output.is_file()


@pytest.mark.slow
def test_cli_predict_over_two_processes(tmp_path):
    """``convnext-audio predict`` with the multi-process flags (train.py's spelling): 2 real processes of 2 CPU
    devices each take chunks 0, 2 and 1 of 3 (the Python-level split is proven above), process 0 assembles the file
    once every chunk is there, and the file holds every clip's logits, as one process computes them."""
    from multiprocess import run_jax_processes

    classes = len(data_helpers.CLASSES)
    model = create_model("convnext_tiny", **TINY, num_classes=classes)
    variables = init_variables(model, jax.random.key(3))
    checkpoint = save_model(tmp_path / "m", "convnext_tiny", variables, {}, {**TINY, "num_classes": classes})
    waveforms = data_helpers.random_waveforms(5)
    names = [f"Yclip{i:07d}" for i in range(len(waveforms))]
    packed = data_helpers.write_packed_hdf5(tmp_path / "train.h5", waveforms, np.ones((5, classes), bool), names)
    output = tmp_path / "t.h5"
    args = ["-m", "convnext_audio_jax.cli", "predict", f"--model={checkpoint}", f"--data={packed}",
            f"--output={output}", "--batch-size=2", "--chunk-clips=2", "--dtype=float32", "--no-progress"]
    outputs = run_jax_processes(args, 2, 2, timeout=600, use_flags=True)
    assert f"predict: 5 clips × {classes} classes from 1 model(s)" in outputs[0].stdout
    expected = np.asarray(jax.jit(model.apply)(variables, audio.int16_to_float(waveforms))["logits"])
    got, found = teacher_lib.TeacherPredictions(output).lookup(names)
    assert found.all()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
