"""A model named the way every tool takes one: a model directory, a training workdir, or a registered pretrained
name (downloaded and converted into the cache on first use). Paths win over names."""

from __future__ import annotations

import argparse
import os
import pathlib
from typing import Any

import flax.linen as nn

from convnext_audio_jax.artifacts import model_dir
from convnext_audio_jax.hub import pretrained


def offline_flag(args: argparse.Namespace) -> bool | None:
    """A command's ``--offline`` (the ``convnext-audio`` global flag) as the ``offline`` argument below: True when
    given, else None, which leaves the decision to ``CONVNEXT_AUDIO_OFFLINE``."""
    return True if getattr(args, "offline", False) else None


def resolve_model_dir(path: str | os.PathLike, announce: bool = True, *, offline: bool | None = None) -> pathlib.Path:
    """The model directory ``path`` names (``artifacts.model_dir.resolve_model_dir``), or, when nothing exists at
    ``path``, the cached directory of the pretrained name ``path`` (``offline``: no network, None:
    ``CONVNEXT_AUDIO_OFFLINE`` decides). Raises a one-line CheckpointError otherwise."""
    if not os.path.exists(path):
        cached = pretrained.resolve(pathlib.Path(path).as_posix(), offline=offline)
        if cached is not None:
            return cached
    return model_dir.resolve_model_dir(path, announce)


def load_model(path: str | os.PathLike, *, offline: bool | None = None,
               **overrides: Any) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """(model, variables, metadata) of the model ``path`` names (see :func:`resolve_model_dir`); ``overrides`` as in
    ``artifacts.model_dir.load_model``."""
    return model_dir.load_model(resolve_model_dir(path, offline=offline), **overrides)
