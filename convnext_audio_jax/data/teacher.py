"""Teacher predictions for knowledge distillation: one HDF5 file of per-clip logits, keyed by clip id.

On-disk layout (``FORMAT`` version 1). Only ``clip_id`` and ``logits`` are required, so files from other
frameworks convert with a few lines of h5py (or with :func:`write_teacher_file`)::

    /clip_id        (N,) clip ids: fixed-length UTF-8 bytes (|S w) or h5py variable-length strings; unique.
                    They must equal the ids the data source gives (``source.clip_id(i)``: the YouTube id
                    for AudioSet segment CSVs and ``prepare`` output, the stored ``audio_name`` for PANN
                    packed HDF5 files).
    /logits         (N, C) float16 (default) or float32, row i = clip_id[i]; pre-sigmoid scores (for an
                    ensemble: the mean of the members' logits).
    /index_clip_id  optional (N,) |S w: clip_id sorted ascending (byte order) ...
    /index_row      optional (N,) int64: ... and the row of each, so a lookup is a binary search.
    /skipped/{clip_id,reason,detail}  optional (K,) strings: clips the predictor could not read.
    attrs: format = "convnext-audio-teacher", version = 1, num_classes = C, models = JSON list of the
           checkpoints averaged, source = the data SPEC, dtype = "float16" | "float32".

Files written here store ``logits``, ``index_clip_id`` and ``index_row`` contiguous (no chunking, no
compression), so :class:`TeacherPredictions` memory-maps them: a lookup reads only the pages it touches
(the OS page cache is shared by every worker process), nothing is loaded whole. Chunked or compressed
foreign files are read with h5py row reads instead; without the index datasets the reader builds the
index in memory (N × (w + 8) bytes per process) and logs it.

:class:`TeacherWriter` writes resumably (a ``runtime.parts.PartsFolder``): chunk k of the work goes to ``OUTPUT.parts/chunk-k.npz``
(written under a temporary name and renamed, so a chunk file is complete or absent); a re-run with the
same settings continues after the chunks already there; ``finish()`` assembles the HDF5 file inside the
parts folder and renames it to OUTPUT (so OUTPUT appears only complete), then removes the files it wrote there and
the folder, if nothing else is in it.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import h5py
import numpy as np

from convnext_audio_jax.runtime import files
from convnext_audio_jax.runtime import parts as parts_lib
from convnext_audio_jax.runtime.errors import UserError

logger = logging.getLogger(__name__)

FORMAT = "convnext-audio-teacher"
VERSION = 1
DTYPES = ("float16", "float32")
MANIFEST = parts_lib.MANIFEST
# What a job writes in OUTPUT.parts/: its manifest, the chunks, a chunk's temporary name and the assembly.
_OWNED = r"manifest\.json|chunk-[0-9]{6}\.npz|\.chunk-[0-9]{6}\.tmp\.npz|assembly\.h5\.tmp"
MISSING_IDS_SHOWN = 10


class TeacherFileError(UserError):
    """A teacher file (or parts folder) that cannot be written or read; the message names the path."""


class MissingTeacherError(TeacherFileError):
    """Clips without a teacher row; ``missing`` lists (the first) missing ids."""

    def __init__(self, path: str, missing: Sequence[str], total_missing: int, total: int):
        shown = ", ".join(missing[:MISSING_IDS_SHOWN])
        more = f" (and {total_missing - MISSING_IDS_SHOWN} more)" if total_missing > MISSING_IDS_SHOWN else ""
        super().__init__(f"{path}: no teacher row for {total_missing} of {total} clips, first: {shown}{more} "
                         f"(set distill.allow_missing to skip and count them instead)")
        self.missing = list(missing)


def ensemble_mean(logits: Sequence[np.ndarray]) -> np.ndarray:
    """The ensemble's logits: the mean of the members' (N, C) logits, computed in float32."""
    if not logits:
        raise ValueError("an ensemble needs at least one member")
    shapes = {np.shape(x) for x in logits}
    if len(shapes) != 1:
        raise ValueError(f"ensemble members disagree on the shape of their logits: {sorted(shapes)}")
    return np.mean(np.stack([np.asarray(x, np.float32) for x in logits]), axis=0)


def _encode_ids(clip_ids: Iterable[str]) -> np.ndarray:
    encoded = [str(i).encode("utf-8") for i in clip_ids]
    return np.array(encoded, dtype=f"S{max((len(e) for e in encoded), default=1) or 1}")


# --------------------------------------------------------------------------------------------- writer


class TeacherWriter:
    """Resumable writer of a teacher file, chunk by chunk.

    ``settings`` (JSON-serialisable: models, source, chunking, ...) identify the job: a re-run with the
    same ``settings`` resumes, different ones are an error naming the path (nothing is deleted). A chunk
    is ``(clip_ids, logits)`` of up to any number of rows; chunks are assembled in chunk-number order.
    """

    def __init__(self, output: str | os.PathLike, num_chunks: int, num_classes: int, settings: Mapping[str, Any],
                 dtype: str = "float16"):
        if dtype not in DTYPES:
            raise ValueError(f"teacher dtype {dtype!r}: expected one of {DTYPES}")
        if num_chunks < 1 or num_classes < 1:
            raise ValueError(f"need ≥ 1 chunk and ≥ 1 class, got {num_chunks} chunks, {num_classes} classes")
        self.output = pathlib.Path(output)
        self.parts = self.output.with_name(self.output.name + ".parts")
        self.folder = parts_lib.PartsFolder(self.parts, owned=_OWNED)
        self.num_chunks, self.num_classes, self.dtype = num_chunks, num_classes, dtype
        self.manifest = {"format": FORMAT, "version": VERSION, "num_chunks": num_chunks, "num_classes": num_classes,
                         "dtype": dtype, "settings": json.loads(json.dumps(dict(settings)))}
        if self.output.exists():
            if self.is_complete():
                return
            raise TeacherFileError(f"{self.output} exists and is not a teacher file made with these settings; "
                                   f"choose another output path")
        found = self.folder.claim(self.manifest)
        if found is not None:
            raise TeacherFileError(f"{self.parts} holds an unfinished run with other settings ({found}); finish it "
                                   f"with those settings, or move the folder away")

    def is_complete(self) -> bool:
        """Whether OUTPUT already holds the finished file of this job."""
        if not self.output.is_file():
            return False
        try:
            with h5py.File(self.output, "r") as f:
                return f.attrs.get("format") == FORMAT and json.loads(f.attrs.get("job", "null")) == self.manifest
        except (OSError, ValueError):
            return False

    @staticmethod
    def _chunk_name(k: int) -> str:
        return f"chunk-{k:06d}.npz"

    def _chunk_path(self, k: int) -> pathlib.Path:
        return self.folder.file(self._chunk_name(k))

    def done_chunks(self) -> set[int]:
        """The chunk numbers already written (complete: each file appears by rename)."""
        if self.is_complete():
            return set(range(self.num_chunks))
        return {k for k in range(self.num_chunks) if self.folder.has(self._chunk_name(k))}

    def write_chunk(self, k: int, clip_ids: Sequence[str], logits: np.ndarray,
                    skipped: Sequence[tuple[str, str, str]] = ()) -> None:
        """Stores chunk ``k``: ``logits`` (len(clip_ids), C) and the (id, reason, detail) of clips it skipped."""
        if not 0 <= k < self.num_chunks:
            raise ValueError(f"chunk {k} out of range [0, {self.num_chunks})")
        logits = np.asarray(logits)
        if logits.shape != (len(clip_ids), self.num_classes):
            raise ValueError(f"chunk {k}: logits of shape {logits.shape}, expected ({len(clip_ids)}, {self.num_classes})")
        if not np.isfinite(logits).all():
            raise ValueError(f"chunk {k}: non-finite logits")
        skipped = np.array([list(s) for s in skipped], dtype=str).reshape(-1, 3)
        with self.folder.replacing(self._chunk_name(k), self.parts / f".chunk-{k:06d}.tmp.npz") as temporary, \
                open(temporary, "wb") as f:
            np.savez(f, clip_id=np.array(list(clip_ids), dtype=str), logits=logits.astype(self.dtype), skipped=skipped)

    def finish(self) -> pathlib.Path:
        """Assembles every chunk into OUTPUT (atomically) and removes the parts folder; returns OUTPUT."""
        if self.is_complete():
            return self.output
        missing = sorted(set(range(self.num_chunks)) - self.done_chunks())
        if missing:
            raise TeacherFileError(f"{self.parts}: chunks {missing[:10]} are not written yet")
        ids, skipped = [], []
        for k in range(self.num_chunks):
            with np.load(self._chunk_path(k)) as chunk:
                ids.extend(chunk["clip_id"].tolist())
                skipped.extend(chunk["skipped"].tolist())
        # Assembled inside the parts folder (removed with it below), published only whole.
        with files.replacing(self.output, self.parts / "assembly.h5.tmp") as temporary, h5py.File(temporary, "w") as f:
            logits = f.create_dataset("logits", shape=(len(ids), self.num_classes), dtype=self.dtype)
            row = 0
            for k in range(self.num_chunks):
                with np.load(self._chunk_path(k)) as chunk:
                    block = chunk["logits"]
                if len(block):
                    logits[row:row + len(block)] = block
                row += len(block)
            _write_ids_and_index(f, ids, str(temporary))
            group = f.create_group("skipped")
            for column, name in enumerate(("clip_id", "reason", "detail")):
                group.create_dataset(name, data=[s[column] for s in skipped], dtype=h5py.string_dtype())
            f.attrs.update(format=FORMAT, version=VERSION, num_classes=self.num_classes, dtype=self.dtype,
                           models=json.dumps(self.manifest["settings"].get("models", [])),
                           source=str(self.manifest["settings"].get("source", "")), job=json.dumps(self.manifest))
        self.folder.remove()
        return self.output


def _write_ids_and_index(f: h5py.File, ids: Sequence[str], name: str) -> None:
    encoded = _encode_ids(ids)
    order = np.argsort(encoded, kind="stable")
    ordered = encoded[order]
    duplicated = np.flatnonzero(ordered[1:] == ordered[:-1])
    if len(duplicated):
        raise TeacherFileError(f"{name}: clip ids occur twice, first: "
                               f"{[ordered[i].decode() for i in duplicated[:MISSING_IDS_SHOWN]]}")
    f.create_dataset("clip_id", data=encoded)
    f.create_dataset("index_clip_id", data=ordered)
    f.create_dataset("index_row", data=order.astype(np.int64))


def write_teacher_file(output: str | os.PathLike, clip_ids: Sequence[str], logits: np.ndarray,
                       models: Sequence[str] = (), source: str = "", dtype: str = "float16",
                       chunk_rows: int = 65_536) -> pathlib.Path:
    """A teacher file from logits already computed elsewhere (e.g. converted from another framework).

    ``logits`` may be a ``np.load(..., mmap_mode="r")`` array: it is read ``chunk_rows`` rows at a time,
    so a 2 M × 527 float32 array never sits in memory whole. Resumable like :class:`TeacherWriter`."""
    logits_shape = np.shape(logits)
    if len(logits_shape) != 2 or logits_shape[0] != len(clip_ids):
        raise ValueError(f"logits of shape {logits_shape}, expected ({len(clip_ids)}, C) for {len(clip_ids)} clip ids")
    num_chunks = max(1, -(-len(clip_ids) // chunk_rows))
    writer = TeacherWriter(output, num_chunks, logits_shape[1], {"models": list(models), "source": source,
                                                                 "rows": len(clip_ids), "chunk_rows": chunk_rows},
                           dtype)
    done = writer.done_chunks()
    for k in range(num_chunks):
        if k not in done:
            rows = slice(k * chunk_rows, (k + 1) * chunk_rows)
            writer.write_chunk(k, clip_ids[rows], np.asarray(logits[rows], np.float32))
    return writer.finish()


# --------------------------------------------------------------------------------------------- reader


def _as_list(models) -> list[str]:
    """The ``models`` attribute: a JSON list here; other writers may store a plain string."""
    try:
        value = json.loads(models)
    except (TypeError, ValueError):
        value = models
    return [str(m) for m in value] if isinstance(value, list) else [str(value)]


def _memory_map(path: str, dataset: h5py.Dataset) -> np.ndarray | None:
    """A read-only memory map of a contiguous, uncompressed dataset; None when it is not one."""
    if dataset.chunks is not None or dataset.compression is not None or dataset.dtype.kind not in "fiuS":
        return None
    offset = dataset.id.get_offset()
    if offset is None or dataset.size == 0:
        return None
    return np.memmap(path, mode="r", dtype=dataset.dtype, offset=offset, shape=dataset.shape)


class TeacherPredictions:
    """Reads a teacher file by clip id. Picklable: each process opens the file lazily on its first lookup.

    ``lookup(clip_ids)`` → (logits (B, C) float32 by default, found (B,) bool). A clip without a row
    raises :class:`MissingTeacherError` naming the first missing ids, unless ``allow_missing``: then its
    row is zeros, ``found`` is False there, and ``num_missing`` counts it (per process).
    """

    def __init__(self, path: str | os.PathLike, allow_missing: bool = False):
        self.path = os.fspath(path)
        self.allow_missing = allow_missing
        self.num_missing = 0
        self._state: dict | None = None
        try:  # validate now, in the constructing process, so a bad file fails before training starts
            with h5py.File(self.path, "r") as f:
                for key in ("clip_id", "logits"):
                    if key not in f:
                        raise TeacherFileError(f"{self.path}: no dataset {key!r}; a teacher file holds clip_id (N,) "
                                               f"and logits (N, C)")
                logits, ids = f["logits"], f["clip_id"]
                if logits.ndim != 2 or ids.ndim != 1 or ids.shape[0] != logits.shape[0]:
                    raise TeacherFileError(f"{self.path}: clip_id {ids.shape} and logits {logits.shape} do not match: "
                                           f"expected (N,) and (N, C)")
                if logits.dtype.kind != "f":
                    raise TeacherFileError(f"{self.path}: logits of dtype {logits.dtype}, expected float16/float32")
                self.num_rows, self.num_classes = logits.shape
                declared = f.attrs.get("num_classes")
                if declared is not None and int(declared) != self.num_classes:
                    raise TeacherFileError(f"{self.path}: num_classes attribute {declared}, logits have {self.num_classes}")
                self.models = _as_list(f.attrs.get("models", "[]"))
                self.source = str(f.attrs.get("source", ""))
        except OSError as error:
            raise TeacherFileError(f"{self.path}: not a readable HDF5 file ({error})") from None

    def __len__(self) -> int:
        return self.num_rows

    def __getstate__(self):
        return {**self.__dict__, "_state": None}  # handles and maps are per process

    def _open(self) -> dict:
        if self._state is None:
            f = h5py.File(self.path, "r")
            if "index_clip_id" in f and "index_row" in f:
                index_ids = _memory_map(self.path, f["index_clip_id"])
                index_ids = f["index_clip_id"][:] if index_ids is None else index_ids
                index_rows = _memory_map(self.path, f["index_row"])
                index_rows = f["index_row"][:] if index_rows is None else index_rows
            else:
                logger.info("%s has no index datasets: building the clip id index in memory", self.path)
                ids = f["clip_id"]
                ids = _encode_ids(ids.asstr()[:] if h5py.check_string_dtype(ids.dtype) else
                                  [i.decode("utf-8") for i in ids[:]])
                index_rows = np.argsort(ids, kind="stable")
                index_ids = ids[index_rows]
            self._state = {"file": f, "index_ids": index_ids, "index_rows": index_rows,
                           "logits_map": _memory_map(self.path, f["logits"]), "logits": f["logits"]}
        return self._state

    def find_rows(self, clip_ids: Sequence[str]) -> np.ndarray:
        """The row of each clip id, -1 where the file has none (vectorised binary search)."""
        state = self._open()
        index_ids = state["index_ids"]
        if len(clip_ids) == 0 or len(index_ids) == 0:
            return np.full(len(clip_ids), -1, np.int64)
        width = index_ids.dtype.itemsize
        encoded = [str(i).encode("utf-8") for i in clip_ids]
        fits = np.array([len(e) <= width for e in encoded])  # longer ids cannot be in the file
        query = np.array([e if ok else b"" for e, ok in zip(encoded, fits)], dtype=index_ids.dtype)
        position = np.minimum(np.searchsorted(index_ids, query), len(index_ids) - 1)
        found = fits & (np.asarray(index_ids[position]) == query)
        return np.where(found, np.asarray(state["index_rows"][position]), -1)

    def missing_ids(self, clip_ids: Sequence[str]) -> list[str]:
        """The ids among ``clip_ids`` without a teacher row, in their order."""
        rows = self.find_rows(clip_ids)
        return [clip_ids[i] for i in np.flatnonzero(rows < 0)]

    def require(self, clip_ids: Sequence[str]) -> None:
        """Raises :class:`MissingTeacherError` naming the first ids of ``clip_ids`` without a row."""
        missing = self.missing_ids(clip_ids)
        if missing:
            raise MissingTeacherError(self.path, missing[:MISSING_IDS_SHOWN], len(missing), len(clip_ids))

    def lookup(self, clip_ids: Sequence[str], dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
        """(logits (B, C), found (B,) bool) of a batch of clip ids (see the class docstring). ``dtype``
        float16 halves the host → device transfer of float16 files without changing their values."""
        clip_ids = [str(i) for i in clip_ids]
        rows = self.find_rows(clip_ids)
        found = rows >= 0
        if not found.all():
            if not self.allow_missing:
                missing = [clip_ids[i] for i in np.flatnonzero(~found)]
                raise MissingTeacherError(self.path, missing, len(missing), len(clip_ids))
            self.num_missing += int((~found).sum())
        out = np.zeros((len(clip_ids), self.num_classes), dtype)
        if found.any():
            state = self._open()
            wanted = rows[found]
            if state["logits_map"] is not None:
                out[found] = state["logits_map"][wanted]
            else:  # h5py reads need increasing, unique indices
                unique, inverse = np.unique(wanted, return_inverse=True)
                out[found] = state["logits"][unique][inverse]
        return out, found

    def close(self) -> None:
        if self._state is not None:
            self._state["file"].close()
            self._state = None
