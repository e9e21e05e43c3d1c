"""Writing embeddings as each file is done, and building the ``.npz`` from them at the end.

An ``.npz`` cannot be appended to, so each finished file goes to its own part in ``OUT.npz.parts/`` (a ``runtime.parts.PartsFolder``):
``<id>.npy`` (the file's windows' embeddings, written, fsynced and renamed into place) then ``<id>.json``
(``file``, ``kind``, ``window_start_s``, ``shape``; written the same way, it marks the part finished). ``<id>`` is
a hash of the path as given. At the end the parts of the files asked for, in input order, are copied a chunk
at a time into ``OUT.npz`` (a temporary name, fsynced, renamed), and the parts folder is removed. A crash
leaves the finished parts; ``--resume`` keeps them and embeds only the other files.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Sequence

import numpy as np

from convnext_audio_jax.runtime.errors import UserError
from convnext_audio_jax.runtime.files import publish
from convnext_audio_jax.runtime.parts import PartsFolder

_CHUNK_BYTES = 64 << 20
# A part's names: <id>.npy and <id>.json, and this module's temporary <id>.<pid>.raw / .npy.tmp / .json.tmp.
_OWNED = r"[0-9a-f]{24}(\.[0-9]+)?\.(npy|json|raw|npy\.tmp|json\.tmp)"


class PartWriter:
    """One file's embeddings, appended a batch at a time to a raw temporary file (nothing held in memory)."""

    def __init__(self, store: EmbeddingStore, path: str):
        self.store, self.path = store, path
        self.id = store.part_id(path)
        self._raw_name = store.folder.temporary(self.id, ".raw")
        self._raw = open(self._raw_name, "wb")
        self.rows, self.row_shape, self.dtype = 0, None, None

    def add(self, embeddings: np.ndarray) -> None:
        embeddings = np.ascontiguousarray(embeddings)
        if not np.isfinite(embeddings).all():
            # The user's model on this file, not a bug here: embed skips the file as it does an unreadable one.
            raise UserError("the model gave NaN/Inf embeddings")
        self.row_shape, self.dtype = embeddings.shape[1:], embeddings.dtype
        self._raw.write(embeddings.tobytes())
        self.rows += embeddings.shape[0]

    def commit(self, window_start_s: Sequence[float]) -> None:
        self._raw.close()
        shape = (self.rows, *self.row_shape)
        folder = self.store.folder
        temporary = folder.temporary(self.id, ".npy.tmp")
        array = np.lib.format.open_memmap(temporary, mode="w+", dtype=self.dtype, shape=shape)
        flat = array.reshape(-1).view(np.uint8)
        with open(self._raw_name, "rb") as raw:
            offset = 0
            while data := raw.read(_CHUNK_BYTES):
                flat[offset : offset + len(data)] = np.frombuffer(data, np.uint8)
                offset += len(data)
        array.flush()
        del array, flat
        folder.publish(temporary, self.id + ".npy")
        os.remove(self._raw_name)
        record = {"file": self.path, "kind": self.store.kind, "shape": list(shape),
                  "window_start_s": [float(s) for s in window_start_s]}
        folder.write_record(self.id + ".json", record, temporary=folder.temporary(self.id, ".json.tmp"))

    def discard(self) -> None:
        self._raw.close()
        os.remove(self._raw_name)


class EmbeddingStore:
    """The parts folder of ``output`` (see the module doc); ``done`` holds the files finished by an earlier run
    when ``resume``."""

    def __init__(self, output: str | os.PathLike, kind: str, resume: bool = False):
        self.output, self.kind = os.fspath(output), kind
        self.parts = self.output + ".parts"
        self.folder = PartsFolder(self.parts, owned=_OWNED)
        self.done: dict[str, dict] = {}
        if self.folder.exists():
            if not resume:
                raise UserError(f"{self.parts} holds the finished files of an interrupted run: pass --resume to "
                                 "continue it, or remove the folder")
            for name in self.folder.names(".json"):
                record = self.folder.read_record(name)
                if record["kind"] != kind:
                    raise UserError(f"{self.parts} holds {record['kind']} embeddings, not {kind}")
                self.done[record["file"]] = record
        self.folder.create()

    @staticmethod
    def part_id(path: str) -> str:
        return hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:24]

    def begin(self, path: str) -> PartWriter:
        return PartWriter(self, path)

    def add_done(self, path: str) -> None:
        self.done[path] = self.folder.read_record(self.part_id(path) + ".json")

    def finish(self, files: Sequence[str], extra: dict[str, np.ndarray] | None = None) -> tuple[list[str], int, tuple]:
        """Write ``output`` from the parts of ``files`` (in that order) that are finished: ``embeddings``,
        ``file_index``, ``window_start_s``, ``files``, ``kind`` and the ``extra`` arrays (e.g. ``class_names``).
        Returns (files embedded, windows, row shape)."""
        embedded = [path for path in files if path in self.done]
        records = [self.done[path] for path in embedded]
        arrays = [np.load(self.folder.file(self.part_id(p) + ".npy"), mmap_mode="r") for p in embedded]
        rows = sum(a.shape[0] for a in arrays)
        row_shape = tuple(arrays[0].shape[1:])
        file_index = np.concatenate([np.full(a.shape[0], i, np.int32) for i, a in enumerate(arrays)])
        window_start = np.concatenate([np.array(r["window_start_s"], np.float64) for r in records])
        temporary = f"{self.output}.{os.getpid()}.tmp"
        with zipfile.ZipFile(temporary, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("embeddings.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_2_0(member, {"descr": np.lib.format.dtype_to_descr(arrays[0].dtype),
                                                              "fortran_order": False, "shape": (rows, *row_shape)})
                for array in arrays:
                    flat = array.reshape(-1)
                    step = max(1, _CHUNK_BYTES // array.itemsize)
                    for first in range(0, flat.size, step):
                        member.write(np.ascontiguousarray(flat[first : first + step]).tobytes())
            for name, value in [("file_index", file_index), ("window_start_s", window_start),
                                ("files", np.array(embedded)), ("kind", np.array(self.kind)),
                                *(extra or {}).items()]:
                with archive.open(name + ".npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, value, allow_pickle=False)
        del arrays
        publish(temporary, self.output)
        self.remove_parts()
        return embedded, rows, row_shape

    def remove_parts(self) -> None:
        """Remove the parts folder: only the names this module writes, and the folder only if that empties it."""
        self.folder.remove()
