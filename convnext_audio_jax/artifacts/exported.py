"""An exported model file (``convnext-audio export``) and the metadata written beside it as ``FILE.json``."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from convnext_audio_jax.runtime.errors import UserError

METADATA_FORMAT = "convnext-audio-jax-export/1"


def metadata_path(path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    return path.with_name(path.name + ".json")


def read_export_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``FILE.json`` written beside an exported file."""
    meta_path = metadata_path(path)
    if not pathlib.Path(path).is_file():
        raise UserError(f"{path} is not a file; expected an .onnx file written by `convnext-audio export --format onnx`")
    if not meta_path.is_file():
        raise UserError(f"{path} has no metadata file {meta_path} beside it (written by `convnext-audio export`)")
    metadata = json.loads(meta_path.read_text())
    if metadata.get("format") != METADATA_FORMAT:
        raise UserError(f"{meta_path} is not a {METADATA_FORMAT} metadata file")
    return metadata
