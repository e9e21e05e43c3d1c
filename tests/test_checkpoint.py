"""Model directories: resolving a model directory or a training workdir, and saving that never loses a model."""

import json
import os
import pathlib
import stat

import jax
import numpy as np
import pytest

from convnext_audio_jax.artifacts import model_dir as checkpoint
from convnext_audio_jax.artifacts.model_dir import (
    CheckpointError,
    load_model,
    resolve_model_dir,
    save_model,
)
from convnext_audio_jax.models import create_model, init_variables

TINY = dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), num_classes=3)
NAMES = ["Speech", "Dog", "Music"]


def tiny_variables(seed: int) -> dict:
    """Random variables of the right shapes (no compilation: shapes from eval_shape)."""
    model = create_model("convnext_tiny", **TINY)
    shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)


def save(directory, seed: int = 0, **kwargs) -> pathlib.Path:
    return save_model(directory, "convnext_tiny", tiny_variables(seed), {"class_names": NAMES, "seed": seed}, TINY,
                      **kwargs)


def leftovers(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> pathlib.Path:
    return save(tmp_path_factory.mktemp("models") / "tiny", seed=1)


def test_a_model_directory_resolves_to_itself_silently(model_dir, capsys):
    assert resolve_model_dir(model_dir) == model_dir
    assert capsys.readouterr().err == ""
    model, variables, metadata = load_model(model_dir)
    assert model.num_classes == 3 and metadata["class_names"] == NAMES and metadata["seed"] == 1
    np.testing.assert_array_equal(variables["params"]["head"]["bias"], tiny_variables(1)["params"]["head"]["bias"])


def test_a_workdir_resolves_to_best_else_last_and_says_which(tmp_path, capsys):
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "200").mkdir(parents=True)
    save(workdir / "model" / "last", seed=2)
    assert resolve_model_dir(workdir) == workdir / "model" / "last"
    assert f"using {workdir / 'model' / 'last'}" in capsys.readouterr().err
    save(workdir / "model" / "best", seed=3)
    assert resolve_model_dir(workdir) == workdir / "model" / "best"
    err = capsys.readouterr().err
    assert f"using {workdir / 'model' / 'best'} (best validation mAP so far)" in err and err.count("\n") == 1
    # load_model (and so every tool) takes the workdir.
    _, variables, metadata = load_model(workdir)
    assert metadata["seed"] == 3 and "model/best" in capsys.readouterr().err
    np.testing.assert_array_equal(variables["params"]["head"]["kernel"], tiny_variables(3)["params"]["head"]["kernel"])
    assert resolve_model_dir(workdir, announce=False) == workdir / "model" / "best"
    assert capsys.readouterr().err == ""


def test_a_workdir_without_a_model_lists_its_orbax_steps(tmp_path):
    workdir = tmp_path / "run"
    for step in ("100", "200", "300.orbax-checkpoint-tmp-1700000000"):  # the last one never finished
        (workdir / "checkpoints" / step).mkdir(parents=True)
    (workdir / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(CheckpointError) as error:
        load_model(workdir)
    message = str(error.value)
    assert "\n" not in message
    assert message == (f"{workdir} is a training workdir with no model yet (no model/best or model/last); "
                       f"orbax steps under checkpoints/: 100, 200")
    empty = tmp_path / "fresh"
    (empty / "model").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no model yet .*no orbax step under checkpoints/ either"):
        resolve_model_dir(empty)


def test_what_is_neither_is_a_one_line_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such model directory, training workdir or pretrained name"):
        resolve_model_dir(tmp_path / "absent")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(CheckpointError, match="neither a model directory .* nor a training workdir"):
        resolve_model_dir(tmp_path / "notes")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_model_dir(tmp_path / "file.bin")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "metadata.json").write_text(json.dumps({"format": "something-else/2"}))
    with pytest.raises(CheckpointError, match="is not a convnext-audio-jax/1 metadata file"):
        load_model(foreign)


def test_save_refuses_a_folder_that_is_not_a_model_even_with_overwrite(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"\xff\xd8 precious")
    for overwrite in (False, True):
        with pytest.raises(CheckpointError, match="not a model directory .* never replaced"):
            save(folder, overwrite=overwrite)
    assert sorted(p.name for p in folder.iterdir()) == ["holiday.jpg"]
    assert (folder / "holiday.jpg").read_bytes() == b"\xff\xd8 precious"
    assert leftovers(tmp_path) == []
    (tmp_path / "empty").mkdir()
    assert save(tmp_path / "empty").name == "empty"  # an empty folder is fine
    assert load_model(tmp_path / "empty")[2]["seed"] == 0


def test_replacing_a_model_needs_overwrite_and_leaves_nothing_behind(tmp_path):
    target = save(tmp_path / "m", seed=1)
    with pytest.raises(CheckpointError, match="exists and is not an empty directory: it holds a model"):
        save(target, seed=2)
    assert load_model(target)[2]["seed"] == 1
    save(target, seed=2, overwrite=True)
    assert load_model(target)[2]["seed"] == 2
    assert leftovers(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_replace_fsyncs_before_publishing_and_always_keeps_a_model(tmp_path, monkeypatch):
    target = save(tmp_path / "m", seed=1)
    events = []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])

    def rename(source, destination):
        events.append(("rename", str(source), str(destination)))
        return real_rename(source, destination)

    monkeypatch.setattr(os, "rename", rename)
    save(target, seed=2, overwrite=True)
    renames = [e for e in events if e[0] == "rename" and pathlib.Path(e[1]).parent == tmp_path]  # not orbax's own
    assert len(renames) == 2
    (_, old, aside), (_, staging, published) = renames
    assert old == str(target) and ".m.previous-" in aside and published == str(target) and ".m." in staging
    synced_before = {e[1] for e in events[: events.index(renames[0])] if e[0] == "fsync"}
    written = {str(pathlib.Path(staging) / p.relative_to(target)) for p in target.rglob("*")}
    assert written and written <= synced_before  # every file and folder of the new model, before any rename
    assert ("fsync", str(tmp_path)) in events[events.index(renames[1]):]  # the rename itself is made durable

    # A failure between the two renames puts the old model back; nothing else is left.
    def failing_rename(source, destination):
        if pathlib.Path(source).parent == tmp_path and str(source).endswith(".tmp"):  # publishing the new one
            raise OSError(28, "No space left on device")
        return real_rename(source, destination)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="No space left"):
        save(target, seed=3, overwrite=True)
    monkeypatch.undo()
    assert load_model(target)[2]["seed"] == 2
    assert leftovers(tmp_path) == []


def test_a_model_directory_is_readable_as_the_umask_allows(tmp_path):
    """Not mkdtemp's 0700: colleagues read a model directory as the umask lets them."""
    old = os.umask(0o027)
    try:
        target = save(tmp_path / "m")
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o750
    assert stat.S_IMODE((target / checkpoint.METADATA_FILE).stat().st_mode) == 0o640


def test_an_interrupted_replace_is_named(tmp_path):
    aside = save(tmp_path / ".m.previous-0123abcd", seed=4)  # as a crash between the two renames leaves it
    with pytest.raises(CheckpointError, match=f"an interrupted replace left the previous model in {aside}"):
        resolve_model_dir(tmp_path / "m")


def test_class_names_must_fit_the_model(tmp_path):
    with pytest.raises(CheckpointError, match="2 class names, model 'convnext_tiny' has 3 classes"):
        save_model(tmp_path / "m", "convnext_tiny", tiny_variables(0), {"class_names": NAMES[:2]}, TINY)
    with pytest.raises(CheckpointError, match="2 class ids for 3 class names"):
        save_model(tmp_path / "m", "convnext_tiny", tiny_variables(0),
                   {"class_names": NAMES, "class_ids": ["/m/1", "/m/2"]}, TINY)
    assert not (tmp_path / "m").exists() and leftovers(tmp_path) == []


def test_orbax_steps_ignores_unfinished_ones(tmp_path):
    for name in ("5", "40", "12", "7.orbax-checkpoint-tmp-3", "notes"):
        (tmp_path / name).mkdir()
    assert checkpoint.orbax_steps(tmp_path) == [5, 12, 40]
    assert checkpoint.orbax_steps(tmp_path / "absent") == []
