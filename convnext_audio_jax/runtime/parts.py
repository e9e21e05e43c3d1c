"""The resumable parts folder: a job that writes its result piece by piece (a file's embeddings, a chunk of teacher
logits, a shard of prepared clips) keeps each finished piece in one folder, so an interrupted job resumes with the
pieces it finished and redoes only the rest.

A part is finished when its file exists: it is written under a temporary name beside it (the part's name, the
writer's pid, a suffix) and renamed into place durably (``runtime.files.publish``), so a part is whole or absent.
A JSON record (``write_record``) is written the same way; a job that marks its parts with one writes it last. A
``manifest`` names the job (its settings): the first run stores it, a later run with other settings is told what the
folder holds and nothing is touched. ``remove`` deletes only the names the job writes (its ``owned`` pattern), then
the folder if that empties it: whatever else a user put there stays.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
from collections.abc import Iterator
from typing import Any

from convnext_audio_jax.runtime import files

MANIFEST = "manifest.json"


class PartsFolder:
    """The parts of one job in ``path`` (see the module doc); ``owned`` is a regular expression matching every name
    the job writes there, temporary names included (what ``remove`` may delete)."""

    def __init__(self, path: files.PathLike, owned: str = ""):
        self.path = pathlib.Path(path)
        self._owned = re.compile(owned) if owned else None

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def exists(self) -> bool:
        return self.path.is_dir()

    def create(self) -> PartsFolder:
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def file(self, name: str) -> pathlib.Path:
        return self.path / name

    def has(self, name: str) -> bool:
        """Whether part ``name`` is finished (its file is in place)."""
        return (self.path / name).is_file()

    def names(self, suffix: str = "") -> list[str]:
        """The finished parts' names ending in ``suffix``, sorted (temporary names end in the writer's own suffix)."""
        return sorted(name for name in os.listdir(self.path) if name.endswith(suffix) and (self.path / name).is_file())

    def temporary(self, name: str, suffix: str = ".tmp") -> pathlib.Path:
        """Where this process writes part ``name`` before it is published: ``NAME.PID{suffix}``."""
        return self.path / f"{name}.{os.getpid()}{suffix}"

    @contextlib.contextmanager
    def replacing(self, name: str, temporary: files.PathLike | None = None) -> Iterator[pathlib.Path]:
        """``with parts.replacing(name) as temporary:`` write ``temporary``; it becomes part ``name`` when the block
        ends, durably (removed if the block fails)."""
        with files.replacing(self.path / name, temporary or self.temporary(name)) as path:
            yield path

    def publish(self, temporary: files.PathLike, name: str) -> pathlib.Path:
        """A finished temporary file becomes part ``name``, durably."""
        return files.publish(temporary, self.path / name)

    def write_record(self, name: str, record: Any, temporary: files.PathLike | None = None) -> pathlib.Path:
        """Part ``name`` holding ``record`` as JSON, written durably."""
        return files.write_text(self.path / name, json.dumps(record), temporary=temporary or self.temporary(name))

    def read_record(self, name: str) -> Any | None:
        """The JSON record of part ``name``; None when it is not finished."""
        path = self.path / name
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def claim(self, manifest: dict) -> dict | None:
        """Creates the folder for the job ``manifest`` names and stores it there; if the folder holds a manifest
        already, returns it when it differs (the caller says what to do), None when it is this job's."""
        self.create()
        found = self.read_record(MANIFEST)
        if found is None:
            files.write_text(self.path / MANIFEST, json.dumps(manifest, indent=2) + "\n")
            return None
        return None if found == manifest else found

    def remove(self) -> None:
        """Deletes the job's own files (the names ``owned`` matches) and then the folder, if that empties it."""
        if not self.exists():
            return
        for name in os.listdir(self.path):
            if self._owned is not None and self._owned.fullmatch(name):
                (self.path / name).unlink()
        if not os.listdir(self.path):
            self.path.rmdir()
