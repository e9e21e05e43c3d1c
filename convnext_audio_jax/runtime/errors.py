"""Errors the user can fix, told apart from bugs.

A :class:`UserError` is a problem the user can fix — a path, a flag, a config key, a file's content — and the
commands show it as one line without a traceback (``convnext-audio`` exits 2, ``train.py`` and ``python -m convert``
exit 1). Every other exception is a bug or an environment failure and keeps its traceback. ``--debug`` (or
``CONVNEXT_AUDIO_DEBUG=1``) shows the traceback of user errors too.

Defined here, in the lowest layer, so that every layer's domain errors (``CheckpointError``, ``ConfigError``,
``SpecError``, ...) can subclass it.
"""

from __future__ import annotations

import os

DEBUG_ENV = "CONVNEXT_AUDIO_DEBUG"


class UserError(ValueError):
    """A problem the user can fix — a path, a flag, a file's content — shown as one line (``convnext-audio``: exit 2).

    A ValueError, so that code and tests that catch bad input as ValueError still do."""


def debugging(flag: bool = False) -> bool:
    """Whether user errors should show their traceback: ``--debug`` given or ``CONVNEXT_AUDIO_DEBUG`` set true."""
    return bool(flag) or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (a message with line breaks would read as several errors)."""
    return str(error).replace("\n", " ")
