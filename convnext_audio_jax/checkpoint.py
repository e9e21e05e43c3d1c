"""Model checkpoints on disk: an orbax directory of variables plus a metadata JSON.

Layout of a checkpoint directory::

    DIR/metadata.json   {"format": ..., "model": name, "model_config": {...}, ...}
    DIR/variables/      orbax StandardCheckpointer: {'params': ..., 'batch_stats': ...}

Written by the converter and by training, read by tagging, embedding, evaluation and
``train.py``'s ``init_from``. A directory appears only complete: it is written under a temporary
name beside the target and renamed at the end.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from convnext_audio_jax.models import create_model, init_variables

FORMAT = "convnext-audio-jax/1"
METADATA_FILE = "metadata.json"
VARIABLES_DIR = "variables"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be written or read."""


def _as_numpy_tree(variables: Any) -> dict:
    """Plain nested dicts of numpy arrays (flax FrozenDicts and jax arrays accepted)."""
    if hasattr(variables, "unfreeze"):
        variables = variables.unfreeze()
    return jax.tree.map(np.asarray, dict(variables))


def save_model(
    directory: str | os.PathLike,
    model_name: str,
    variables: Any,
    metadata: dict[str, Any] | None = None,
    model_config: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes ``variables`` of registered model ``model_name`` (created with ``model_config``
    overrides) and ``metadata`` (JSON-serialisable) to ``directory``, atomically."""
    target = pathlib.Path(directory).absolute()
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"output {target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise CheckpointError(f"output directory {target} is not empty; choose a new directory")
    document = {"format": FORMAT, "model": model_name, "model_config": dict(model_config or {}), **(metadata or {})}
    text = json.dumps(document, indent=2, sort_keys=False)  # fails early on non-JSON metadata
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(staging / VARIABLES_DIR, _as_numpy_tree(variables))
        checkpointer.wait_until_finished()
        (staging / METADATA_FILE).write_text(text + "\n")
        if target.is_dir():
            shutil.rmtree(target)  # empty, or overwrite requested
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    path = pathlib.Path(directory) / METADATA_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a model checkpoint directory (no {METADATA_FILE})")
    metadata = json.loads(path.read_text())
    if metadata.get("format") != FORMAT or "model" not in metadata:
        raise CheckpointError(f"{path} is not a {FORMAT} metadata file")
    return metadata


def load_model(directory: str | os.PathLike, **overrides: Any) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """(model, variables, metadata) from a directory written by ``save_model``. ``overrides``
    change model fields that do not affect parameter shapes (``dtype``, ``drop_path_rate``, …)."""
    directory = pathlib.Path(directory).absolute()
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
