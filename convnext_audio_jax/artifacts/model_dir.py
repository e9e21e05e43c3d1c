"""Model directories: the one model artifact every tool reads, how it is written, and how a path finds it.

Layout of a model directory::

    DIR/metadata.json   {"format": ..., "model": name, "model_config": {...}, "class_names": [...], ...}
    DIR/variables/      orbax StandardCheckpointer: {'params': ..., 'batch_stats': ...}

``save_model`` writes one (``convnext-audio convert`` and training's ``model/best`` and ``model/last`` do). ``load_model`` reads one through
``resolve_model_dir``, which also accepts a training workdir (``WORKDIR/model/best``, else
``WORKDIR/model/last``). ``hub.resolve`` adds registered pretrained names on top: every tool (``evaluate``, ``tag``,
``embed``, ``predict``, ``export``, ``convert --to-torch``, ``init_from``, the HEAR API's ``hear.load_model``)
goes through it.

A directory appears only complete: it is written under a temporary name beside the target, fsynced, and
renamed into place. Replacing a model directory renames the old one aside, the new one in, then deletes
the old one, so that a complete model is on disk at every moment; a non-empty folder that is not a model
directory is never replaced.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
import uuid
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from convnext_audio_jax.models import create_model, init_variables
from convnext_audio_jax.runtime import files
from convnext_audio_jax.runtime.errors import UserError

FORMAT = "convnext-audio-jax/1"
METADATA_FILE = "metadata.json"
VARIABLES_DIR = "variables"

# A training workdir holds its model directories under model/ and its orbax train states under checkpoints/.
WORKDIR_MODELS = "model"
BEST_MODEL = "best"  # best validation mAP so far
LAST_MODEL = "last"  # latest evaluation / end of training
WORKDIR_CHECKPOINTS = "checkpoints"
_PREVIOUS_INFIX = ".previous-"  # .NAME.previous-XXXXXXXX: the old directory while a replace is under way


class CheckpointError(UserError):
    """A model directory that cannot be written or read; the message is one line naming the path."""


def _as_numpy_tree(variables: Any) -> dict:
    """Plain nested dicts of numpy arrays (flax FrozenDicts and jax arrays accepted)."""
    if hasattr(variables, "unfreeze"):
        variables = variables.unfreeze()
    return jax.tree.map(np.asarray, dict(variables))


def is_model_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by ``save_model`` (holds a metadata.json of this format)."""
    try:
        read_metadata(path)
    except (CheckpointError, OSError, ValueError):
        return False
    return True


def check_model_output(directory: str | os.PathLike, overwrite: bool = False) -> bool:
    """Raises CheckpointError unless ``save_model(directory, …, overwrite=overwrite)`` may write there: a
    non-empty folder that is not a model directory is refused even with ``overwrite``. Returns whether a
    model directory is there (and will be replaced)."""
    target = pathlib.Path(directory)
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"output {target} exists and is not a directory")
    if not target.is_dir() or not any(target.iterdir()):
        return False
    if not is_model_dir(target):
        raise CheckpointError(f"output {target} is a non-empty folder that is not a model directory (no {FORMAT} "
                              f"{METADATA_FILE}); it is never replaced: choose a new or empty folder")
    if not overwrite:
        raise CheckpointError(f"output {target} exists and is not an empty directory: it holds a model "
                              f"(overwrite / --overwrite replaces it)")
    return True


def _check_class_names(model_name: str, model_config: dict[str, Any], document: dict[str, Any]) -> None:
    names = document.get("class_names")
    if names is None:
        return
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise CheckpointError("metadata class_names must be a list of strings")
    num_classes = getattr(create_model(model_name, **model_config), "num_classes", None)
    if num_classes is not None and len(names) != num_classes:
        raise CheckpointError(f"metadata lists {len(names)} class names, model {model_name!r} has {num_classes} classes")
    ids = document.get("class_ids")
    if ids is not None and len(ids) != len(names):
        raise CheckpointError(f"metadata lists {len(ids)} class ids for {len(names)} class names")


def save_model(
    directory: str | os.PathLike,
    model_name: str,
    variables: Any,
    metadata: dict[str, Any] | None = None,
    model_config: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes ``variables`` of registered model ``model_name`` (created with ``model_config`` overrides) and
    ``metadata`` (JSON-serialisable; ``class_names``, and optionally ``class_ids``, in output order) to
    ``directory``, atomically.

    ``overwrite`` replaces an existing model directory, never any other non-empty folder: the new directory
    is written and fsynced beside it, the old one renamed aside, the new one renamed in, the old one deleted.
    It writes from the calling process alone (orbax does not wait for other processes), so a multi-process
    run calls it on one process."""
    target = pathlib.Path(directory).absolute()
    model_config = dict(model_config or {})
    document = {"format": FORMAT, "model": model_name, "model_config": model_config, **(metadata or {})}
    _check_class_names(model_name, model_config, document)
    text = json.dumps(document, indent=2, sort_keys=False)  # fails early on non-JSON metadata
    replacing = check_model_output(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = files.make_temporary_dir(target)  # the umask's mode, not mkdtemp's 0700: colleagues may read models
    aside = None
    try:
        this_process = jax.process_index()
        checkpointer = ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=this_process, active_processes={this_process}))
        checkpointer.save(staging / VARIABLES_DIR, _as_numpy_tree(variables))
        checkpointer.wait_until_finished()
        (staging / METADATA_FILE).write_text(text + "\n")
        files.fsync_tree(staging)  # before any rename: the old model stays until the new one is whole on disk
        if replacing:
            aside = target.parent / f".{target.name}{_PREVIOUS_INFIX}{uuid.uuid4().hex[:8]}"
            os.rename(target, aside)
        elif target.is_dir():
            target.rmdir()  # empty
        os.rename(staging, target)
        files.fsync_path(target.parent)
    except BaseException:
        if aside is not None and not target.exists():
            os.rename(aside, target)  # the old model back in place
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside)
    return target


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The metadata.json of a model directory (not resolved: see ``resolve_model_dir``)."""
    path = pathlib.Path(directory) / METADATA_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a model directory (no {METADATA_FILE})")
    try:
        metadata = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT or "model" not in metadata:
        raise CheckpointError(f"{path} is not a {FORMAT} metadata file")
    return metadata


def orbax_steps(checkpoints_dir: str | os.PathLike) -> list[int]:
    """The finished orbax steps in a training workdir's checkpoints/ (integer-named folders, sorted)."""
    folder = pathlib.Path(checkpoints_dir)
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def _steps_text(steps: list[int], shown: int = 8) -> str:
    listed = ", ".join(str(s) for s in steps[-shown:])
    return ("… " if len(steps) > shown else "") + listed


def _interrupted_replace(path: pathlib.Path) -> pathlib.Path | None:
    """A previous model directory left aside by a replace that was interrupted between its two renames."""
    candidates = sorted(path.parent.glob(f".{path.name}{_PREVIOUS_INFIX}*")) if path.parent.is_dir() else []
    return next((c for c in candidates if is_model_dir(c)), None)


def _missing(path: pathlib.Path) -> CheckpointError:
    """The error for a ``path`` that does not exist on disk (``hub.resolve`` has already tried it as a
    registered pretrained name)."""
    previous = _interrupted_replace(path)
    note = f" (an interrupted replace left the previous model in {previous})" if previous is not None else ""
    return CheckpointError(f"no such model directory, training workdir or pretrained name: {path}{note} "
                           f"(names: convnext-audio models --pretrained)")


def find_task_model(path: str | os.PathLike, marker: str, what: str) -> pathlib.Path:
    """The folder of a downstream task's model (its ``marker`` file written last): ``path`` itself, else the
    training workdir's ``model/best``, else ``model/last``; a one-line UserError naming ``what`` otherwise."""
    path = pathlib.Path(path)
    for candidate in (path, path / WORKDIR_MODELS / BEST_MODEL, path / WORKDIR_MODELS / LAST_MODEL):
        if (candidate / marker).is_file():
            return candidate
    raise UserError(f"{path}: no {what} ({marker}) here nor in its {WORKDIR_MODELS}/{BEST_MODEL} or "
                    f"{WORKDIR_MODELS}/{LAST_MODEL}")


def resolve_model_dir(path: str | os.PathLike, announce: bool = True) -> pathlib.Path:
    """The model directory ``path`` names: a model directory as is; a training workdir (has ``model/`` or
    ``checkpoints/``) resolves to ``model/best``, else ``model/last``, saying which on stderr (``announce``).
    A workdir with no model yet, or anything else, raises a one-line CheckpointError (for a workdir, listing
    the orbax steps under ``checkpoints/``)."""
    path = pathlib.Path(path)
    if (path / METADATA_FILE).is_file():
        return path
    if not path.exists():
        raise _missing(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file: expected a model directory ({METADATA_FILE} + {VARIABLES_DIR}/) "
                              f"or a training workdir")
    if not (path / WORKDIR_MODELS).is_dir() and not (path / WORKDIR_CHECKPOINTS).is_dir():
        raise CheckpointError(f"{path} is neither a model directory (no {METADATA_FILE}) nor a training workdir "
                              f"(no {WORKDIR_MODELS}/ or {WORKDIR_CHECKPOINTS}/)")
    for name, meaning in ((BEST_MODEL, "best validation mAP so far"), (LAST_MODEL, "latest; there is no model/best")):
        candidate = path / WORKDIR_MODELS / name
        if (candidate / METADATA_FILE).is_file():
            if announce:
                print(f"{path} is a training workdir: using {candidate} ({meaning})", file=sys.stderr)
            return candidate
    steps = orbax_steps(path / WORKDIR_CHECKPOINTS)
    found = (f"orbax steps under {WORKDIR_CHECKPOINTS}/: {_steps_text(steps)}" if steps
             else f"no orbax step under {WORKDIR_CHECKPOINTS}/ either")
    raise CheckpointError(f"{path} is a training workdir with no model yet (no {WORKDIR_MODELS}/{BEST_MODEL} or "
                          f"{WORKDIR_MODELS}/{LAST_MODEL}); {found}")


def load_model(path: str | os.PathLike, **overrides: Any) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """(model, variables, metadata) from a model directory or a training workdir (``resolve_model_dir``).
    ``overrides`` change model fields that do not affect parameter shapes (``dtype``, ``drop_path_rate``, …)."""
    directory = resolve_model_dir(path).absolute()
    metadata = read_metadata(directory)
    model = create_model(metadata["model"], **{**metadata["model_config"], **overrides})
    expected = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
    restored = ocp.StandardCheckpointer().restore(directory / VARIABLES_DIR)
    variables = jax.tree.map(np.asarray, restored)
    got_shapes = jax.tree.map(lambda a: a.shape, variables)
    want_shapes = jax.tree.map(lambda a: a.shape, expected)
    if got_shapes != want_shapes:
        raise CheckpointError(f"variables in {directory} do not fit model {metadata['model']!r} with config {metadata['model_config']}")
    return model, variables, metadata
