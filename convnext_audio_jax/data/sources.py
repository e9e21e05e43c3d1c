"""Random-access clip sources feeding grain: packed HDF5 (PANN layout, incl. index files), ArrayRecord shards
written by `prepare`, the TFDS `audioset` builder's ArrayRecord output, and a folder of audio files + a CSV.

Every source has the same interface (`ClipSource`): `len(source)`, `source[i]` → {"waveform": int16 (320000,),
"target": float32 (C,), "id": str} or a raised `ClipError` naming the reason, `source.targets` (N, C) bool read
without touching audio (for the balanced sampler), and `source.clip_id(i)`. Sources are picklable: file handles
are opened lazily in each process (grain worker processes receive a pickled copy).
"""

from __future__ import annotations

import abc
import copy
import json
import os
import pathlib
from collections.abc import Sequence

import grain
import h5py
import numpy as np

from convnext_audio_jax.data import audio, records
from convnext_audio_jax.data import labels as labels_lib
from convnext_audio_jax.runtime.errors import UserError


class ClipSource(abc.ABC):
    """Interface shared by every source; see the module docstring."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @property
    @abc.abstractmethod
    def targets(self) -> np.ndarray:
        """(N, C) bool label matrix, available without reading audio."""

    @abc.abstractmethod
    def clip_id(self, index: int) -> str: ...

    @abc.abstractmethod
    def _read_waveform(self, index: int) -> np.ndarray:
        """The int16 (CLIP_SAMPLES,) waveform of clip `index`; raises ClipError or an I/O error."""

    @property
    def num_classes(self) -> int:
        return self.targets.shape[1]

    @property
    def description(self) -> str:
        """Where the clips come from, for messages (a folder, files)."""
        return type(self).__name__

    def read_waveform(self, index: int) -> np.ndarray:
        """The checked int16 waveform of clip ``index``, without its labels; raises ClipError naming the reason."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"clip index {index} out of range for a source of {len(self)} clips")
        clip_id = self.clip_id(index)
        try:
            waveform = self._read_waveform(index)
        except audio.ClipError:
            raise
        except (OSError, RuntimeError, KeyError, ValueError, records.RecordError) as error:
            # A truncated HDF5 chunk, a damaged record, ...: the clip is unreadable, the run goes on.
            raise audio.ClipError(clip_id, audio.UNREADABLE, f"{type(error).__name__}: {error}") from None
        audio.check_waveform(waveform, clip_id)
        return waveform

    def __getitem__(self, index: int) -> dict:
        waveform = self.read_waveform(index)
        return {"waveform": waveform, "target": self.targets[int(index)].astype(np.float32), "id": self.clip_id(index)}

    def without_labels(self) -> ClipSource:
        """A copy that reads waveforms (:meth:`read_waveform`) but holds no label matrix: what worker processes
        are sent (an AudioSet label matrix is ~1 GB). Sources whose audio depends on their labels keep them."""
        return self


class IndexedClipSource(ClipSource):
    """A source whose clip ids and label matrix are read up front into ``_clip_ids`` and ``_targets``."""

    _clip_ids: list[str]
    _targets: np.ndarray

    def __len__(self) -> int:
        return len(self._clip_ids)

    @property
    def targets(self) -> np.ndarray:
        return self._targets

    def clip_id(self, index: int) -> str:
        return self._clip_ids[index]

    def without_labels(self) -> ClipSource:
        reader = copy.copy(self)
        reader._targets = np.zeros((len(self._clip_ids), 0), dtype=bool)  # shape-only: no bytes per clip
        return reader


def decode_names(names: np.ndarray) -> list[str]:
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


class PackedHdf5Source(IndexedClipSource):
    """Clips stored in PANN-layout HDF5 files (`audio_name`, `waveform` int16 (N, 320000), `target` bool (N, C)).

    Build it with `from_files` (one or more packed files, concatenated in order) or `from_index` (a PANN index
    file whose rows `audio_name, target, hdf5_path, index_in_hdf5` point into several packed files).
    """

    def __init__(self, hdf5_paths: Sequence[str], file_of_clip: np.ndarray, row_of_clip: np.ndarray,
                 targets: np.ndarray, clip_ids: Sequence[str]):
        self._hdf5_paths = [os.fspath(p) for p in hdf5_paths]
        self._file_of_clip = np.asarray(file_of_clip, dtype=np.int32)
        self._row_of_clip = np.asarray(row_of_clip, dtype=np.int64)
        self._targets = np.asarray(targets, dtype=bool)
        self._clip_ids = list(clip_ids)
        self._open_files: dict[int, h5py.File] = {}
        n = len(self._clip_ids)
        if not (len(self._file_of_clip) == len(self._row_of_clip) == self._targets.shape[0] == n):
            raise ValueError(
                f"inconsistent clip tables: {n} ids, {len(self._file_of_clip)} file entries, "
                f"{len(self._row_of_clip)} rows, targets {self._targets.shape}"
            )

    @classmethod
    def from_files(cls, paths: Sequence[str | os.PathLike]) -> PackedHdf5Source:
        file_of_clip, row_of_clip, targets, ids = [], [], [], []
        for file_number, path in enumerate(paths):
            with h5py.File(path, "r") as f:
                for key in ("audio_name", "waveform", "target"):
                    if key not in f:
                        raise KeyError(f"{path}: no dataset {key!r}; a packed file holds audio_name, waveform, target")
                if f["waveform"].ndim != 2 or f["waveform"].shape[1] != audio.CLIP_SAMPLES:
                    raise UserError(
                        f"{path}: waveform has shape {f['waveform'].shape}, expected (N, {audio.CLIP_SAMPLES})"
                    )
                n = f["waveform"].shape[0]
                if f["target"].shape[0] != n or len(f["audio_name"]) != n:
                    raise UserError(f"{path}: {n} waveforms but target {f['target'].shape}, {len(f['audio_name'])} names")
                sample_rate = f.attrs.get("sample_rate", audio.SAMPLE_RATE)
                if int(sample_rate) != audio.SAMPLE_RATE:
                    raise UserError(f"{path}: sample_rate attribute {sample_rate}, expected {audio.SAMPLE_RATE}")
                ids.extend(decode_names(f["audio_name"][:]))
                targets.append(f["target"][:].astype(bool))
                file_of_clip.append(np.full(n, file_number))
                row_of_clip.append(np.arange(n))
        if not targets:
            raise UserError("no HDF5 files given")
        return cls([os.fspath(p) for p in paths], np.concatenate(file_of_clip), np.concatenate(row_of_clip),
                   np.concatenate(targets), ids)

    @classmethod
    def from_index(cls, index_path: str | os.PathLike) -> PackedHdf5Source:
        """Read a PANN index file. Its `hdf5_path` entries may be absolute paths from the machine that wrote it:
        a path that does not exist is looked up relative to the index file's folder, then by file name there."""
        index_path = pathlib.Path(index_path)
        with h5py.File(index_path, "r") as f:
            for key in ("audio_name", "target", "hdf5_path", "index_in_hdf5"):
                if key not in f:
                    raise KeyError(f"{index_path}: no dataset {key!r}; an index file holds audio_name, target, "
                                   "hdf5_path, index_in_hdf5")
            ids = decode_names(f["audio_name"][:])
            targets = f["target"][:].astype(bool)
            stored_paths = decode_names(f["hdf5_path"][:])
            rows = f["index_in_hdf5"][:].astype(np.int64)
        unique_paths, file_of_clip = np.unique(np.array(stored_paths, dtype=object), return_inverse=True)
        resolved = [_resolve_packed_path(p, index_path) for p in unique_paths]
        return cls(resolved, file_of_clip, rows, targets, ids)

    @property
    def description(self) -> str:
        return "packed HDF5 " + ", ".join(self._hdf5_paths[:3]) + (" …" if len(self._hdf5_paths) > 3 else "")

    def _read_waveform(self, index: int) -> np.ndarray:
        file_number = int(self._file_of_clip[index])
        handle = self._open_files.get(file_number)
        if handle is None:
            handle = h5py.File(self._hdf5_paths[file_number], "r")
            self._open_files[file_number] = handle
        return handle["waveform"][self._row_of_clip[index]]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_open_files"] = {}  # h5py handles cannot cross processes; each process reopens
        return state


def _resolve_packed_path(stored: str, index_path: pathlib.Path) -> str:
    candidates = [pathlib.Path(stored), index_path.parent / stored, index_path.parent / pathlib.PurePath(stored).name]
    for candidate in candidates:
        if candidate.is_file():
            return os.fspath(candidate)
    raise FileNotFoundError(
        f"{index_path}: packed file {stored!r} not found (tried {', '.join(os.fspath(c) for c in candidates)})"
    )


class ArrayRecordSource(IndexedClipSource):
    """The ArrayRecord shards of one split written by `prepare --format array_record` (see docs/data.md)."""

    def __init__(self, directory: str | os.PathLike, split: str):
        directory = pathlib.Path(directory)
        manifest_path = directory / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path}: no manifest; is {directory} a `prepare` output folder?")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != "array_record":
            raise UserError(f"{manifest_path}: format is {manifest.get('format')!r}, expected 'array_record'")
        if split not in manifest["splits"]:
            raise KeyError(f"{manifest_path}: no split {split!r}; it has {sorted(manifest['splits'])}")
        shards = manifest["splits"][split]["shards"]
        self._num_classes = int(manifest["num_classes"])
        ids, targets = [], []
        for shard in shards:
            with np.load(directory / shard["index"], allow_pickle=False) as index:
                ids.extend(str(i) for i in index["ids"])
                targets.append(index["targets"].astype(bool))
        self._clip_ids = ids
        self._targets = (np.concatenate(targets) if targets else np.zeros((0, self._num_classes), dtype=bool))
        self._records = grain.sources.ArrayRecordDataSource([os.fspath(directory / s["data"]) for s in shards])
        self._description = f"ArrayRecord split {split} of {directory}"
        if len(self._records) != len(ids):
            raise UserError(f"{directory}, split {split}: {len(self._records)} records but {len(ids)} index rows")

    @property
    def description(self) -> str:
        return self._description

    def _read_waveform(self, index: int) -> np.ndarray:
        clip_id, _, waveform = records.decode_record(self._records[index])
        if clip_id != self._clip_ids[index]:
            raise records.RecordError(f"record {index} holds clip {clip_id!r}, the index says {self._clip_ids[index]!r}")
        return waveform


class TfdsSource(IndexedClipSource):
    """One split of the TFDS `audioset` builder (ArrayRecord files, read without TensorFlow).

    The label matrix needs one pass over the records (TFDS stores labels inside each record); it is cached in
    `cache_path` (default: beside the split's files) so the pass happens once per split.
    """

    def __init__(self, builder, split: str, num_classes: int, cache_path: str | os.PathLike | None = None):
        self._records = builder.as_data_source(split=split)
        self._description = f"TFDS split {split} in {builder.data_dir}"
        self._num_classes = int(num_classes)
        if cache_path is None:
            cache_path = pathlib.Path(builder.data_dir) / f"{split}-label-cache.npz"
        cache_path = pathlib.Path(cache_path)
        if cache_path.is_file():
            with np.load(cache_path, allow_pickle=False) as cache:
                self._clip_ids = [str(i) for i in cache["ids"]]
                self._targets = cache["targets"].astype(bool)
            if len(self._clip_ids) != len(self._records) or self._targets.shape[1] != num_classes:
                raise UserError(
                    f"{cache_path}: cached labels for {len(self._clip_ids)} clips × {self._targets.shape[1]} classes, "
                    f"the split has {len(self._records)} clips × {num_classes} classes; delete the stale cache"
                )
        else:
            self._clip_ids, self._targets = self._scan_labels()
            np.savez(cache_path, ids=np.array(self._clip_ids), targets=self._targets)

    @property
    def description(self) -> str:
        return self._description

    def _scan_labels(self) -> tuple[list[str], np.ndarray]:
        ids = []
        targets = np.zeros((len(self._records), self._num_classes), dtype=bool)
        for i in range(len(self._records)):
            example = self._records[i]
            ids.append(_as_text(example["clip_id"]))
            targets[i, example["label_indices"]] = True
        return ids, targets

    def _read_waveform(self, index: int) -> np.ndarray:
        waveform = self._records[index]["waveform"]
        if isinstance(waveform, bytes | np.bytes_):  # the `flac` config stores FLAC files
            waveform = audio.decode_flac(waveform)
        return np.asarray(waveform, dtype=np.int16)


def _as_text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes | np.bytes_) else str(value)


def index_audio_folder(audio_dir: str | os.PathLike) -> dict[str, str]:
    """Map every audio file's relative path and its stem (name without extension) to its path, walking once."""
    audio_dir = pathlib.Path(audio_dir)
    if not audio_dir.is_dir():
        raise FileNotFoundError(f"audio folder {audio_dir} does not exist")
    found: dict[str, str] = {}
    for root, _, files in os.walk(audio_dir):
        for name in files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, audio_dir)] = path
            found.setdefault(os.path.splitext(name)[0], path)
    return found


def segment_file_stems(entry: labels_lib.ClipEntry) -> list[str]:
    """File names (without extension) that downloaders give an AudioSet segment: `{YTID}_{start}_{end}` as written
    in the CSV, with seconds as integers or milliseconds, and PANNs' `Y{YTID}`."""
    stems = [f"{entry.ytid}_{entry.start}_{entry.end}"]
    try:
        start, end = float(entry.start), float(entry.end)
        stems += [f"{entry.ytid}_{start:g}_{end:g}", f"{entry.ytid}_{round(start * 1000)}_{round(end * 1000)}"]
    except (TypeError, ValueError):
        pass  # non-numeric bounds: only the literal form can match
    return stems + [f"Y{entry.ytid}", str(entry.ytid)]


def find_clip_file(entry: labels_lib.ClipEntry, folder_index: dict[str, str]) -> str | None:
    """Path of the entry's audio file in an `index_audio_folder` map, or None when it is missing."""
    if entry.relative_path is not None:
        return folder_index.get(os.path.normpath(entry.relative_path))
    for stem in segment_file_stems(entry):
        if stem in folder_index:
            return folder_index[stem]
    return None


class FolderSource(IndexedClipSource):
    """Audio files in a folder listed by a CSV (AudioSet segment layout or `path,labels`); decoded at read time,
    so missing and corrupt files surface as ClipError when read."""

    def __init__(self, audio_dir: str | os.PathLike, clip_list_csv: str | os.PathLike,
                 class_labels: labels_lib.ClassLabels, *, min_seconds: float = 1.0):
        entries = labels_lib.read_clip_list(clip_list_csv, class_labels)
        folder_index = index_audio_folder(audio_dir)
        self._clip_ids = [e.clip_id for e in entries]
        self._paths = [find_clip_file(e, folder_index) for e in entries]
        self._targets = labels_lib.multi_hot_matrix(entries, class_labels.num_classes)
        self._min_seconds = min_seconds
        self._audio_dir = os.fspath(audio_dir)

    @property
    def description(self) -> str:
        return f"audio folder {self._audio_dir}"

    @property
    def missing_ids(self) -> list[str]:
        return [i for i, p in zip(self._clip_ids, self._paths) if p is None]

    def _read_waveform(self, index: int) -> np.ndarray:
        path = self._paths[index]
        if path is None:
            raise audio.ClipError(self._clip_ids[index], audio.MISSING, "no matching file in the audio folder")
        return audio.load_clip(path, self._clip_ids[index], min_seconds=self._min_seconds)


def open_prepared(output: str | os.PathLike, split: str) -> ClipSource:
    """The source for one split of a `prepare` output folder, whichever format it was written in."""
    manifest_path = pathlib.Path(output) / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: no manifest; is {output} a `prepare` output folder?")
    manifest = json.loads(manifest_path.read_text())
    if split not in manifest["splits"]:
        raise KeyError(f"{manifest_path}: no split {split!r}; it has {sorted(manifest['splits'])}")
    if manifest["format"] == "hdf5":
        return PackedHdf5Source.from_index(pathlib.Path(output) / manifest["splits"][split]["pann_index"])
    return ArrayRecordSource(output, split)


def read_waveform(source, index: int) -> np.ndarray:
    """Clip ``index``'s int16 waveform from any source: its ``read_waveform`` (no labels touched), else the
    waveform of ``source[index]`` (the demo's clips are made from their labels)."""
    reader = getattr(source, "read_waveform", None)
    return reader(index) if reader is not None else source[index]["waveform"]


def without_labels(source):
    """``source.without_labels()`` where the source has it (a copy without its label matrix), else ``source``."""
    strip = getattr(source, "without_labels", None)
    return strip() if strip is not None else source
