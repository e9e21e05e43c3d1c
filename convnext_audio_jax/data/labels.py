"""Class lists and clip lists: AudioSet's `class_labels_indices.csv`, its segment CSVs, and `path,labels` CSVs.

AudioSet's own class list ships with the package (`audioset_class_labels()`); any other class list is a
`class_labels_indices.csv`-style file (`index,mid,display_name`) the user supplies.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import importlib.resources
import os
from collections.abc import Iterable, Sequence

import numpy as np

from convnext_audio_jax.runtime.errors import UserError


class LabelFileError(UserError):
    """A label or segment CSV does not have the expected layout; the message names the file and the row."""


@dataclasses.dataclass(frozen=True)
class ClassLabels:
    """The ordered class list: row `i` of the target vector is class `mids[i]`."""

    mids: tuple[str, ...]
    display_names: tuple[str, ...]

    def __post_init__(self):
        index_of = {}
        for i, mid in enumerate(self.mids):
            if mid in index_of:
                raise LabelFileError(f"class id {mid!r} appears twice (indices {index_of[mid]} and {i})")
            index_of[mid] = i
        object.__setattr__(self, "_index_of_mid", index_of)
        object.__setattr__(self, "_index_of_name", {name: i for i, name in enumerate(self.display_names)})

    @property
    def num_classes(self) -> int:
        return len(self.mids)

    def index(self, label: str) -> int:
        """Index of a class given its mid (`/m/09x0r`) or its display name (`Speech`)."""
        if label in self._index_of_mid:
            return self._index_of_mid[label]
        if label in self._index_of_name:
            return self._index_of_name[label]
        raise KeyError(f"unknown class {label!r}: neither a mid nor a display name of the {self.num_classes} classes")

    def indices(self, labels: Iterable[str]) -> np.ndarray:
        return np.array(sorted({self.index(label) for label in labels}), dtype=np.int32)

    def multi_hot(self, class_indices: Sequence[int]) -> np.ndarray:
        target = np.zeros(self.num_classes, dtype=np.float32)
        target[np.asarray(class_indices, dtype=np.int64)] = 1.0
        return target


def read_class_labels(path: str | os.PathLike) -> ClassLabels:
    """Parse `class_labels_indices.csv`: a header `index,mid,display_name`, then rows with indices 0..C-1 in order.
    Every problem, a missing file included, is a one-line LabelFileError naming the file."""
    if not os.path.isfile(path):
        raise LabelFileError(f"labels file not found: {path} (expected class_labels_indices.csv with "
                             "index,mid,display_name)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = [row for row in csv.reader(f) if row]
    if not rows or [c.strip() for c in rows[0]] != ["index", "mid", "display_name"]:
        raise LabelFileError(f"{path}: expected the header 'index,mid,display_name', found {rows[:1]}")
    mids, names = [], []
    for line_number, row in enumerate(rows[1:], start=2):
        if len(row) != 3:
            raise LabelFileError(f"{path}, line {line_number}: expected 3 fields index,mid,display_name, got {row}")
        if row[0].strip() != str(len(mids)):
            raise LabelFileError(
                f"{path}, line {line_number}: expected index {len(mids)} (indices must count up from 0), got {row[0]!r}"
            )
        mids.append(row[1].strip())
        names.append(row[2].strip())
    if not mids:
        raise LabelFileError(f"{path}: no classes after the header")
    return ClassLabels(tuple(mids), tuple(names))


@dataclasses.dataclass(frozen=True)
class ClipEntry:
    """One clip to read: an id unique within its list, where to find the audio, and its class indices."""

    clip_id: str
    class_indices: tuple[int, ...]
    # For AudioSet segment rows: the YouTube id and the segment bounds as written in the CSV.
    ytid: str | None = None
    start: str | None = None
    end: str | None = None
    # For `path,labels` rows: the path relative to the audio folder.
    relative_path: str | None = None


def read_segments_csv(path: str | os.PathLike, labels: ClassLabels) -> list[ClipEntry]:
    """Parse an AudioSet segment CSV (`YTID, start_seconds, end_seconds, "positive_labels"`).

    Lines starting with `#` (the three header comments) are skipped. The labels field is quoted and holds
    comma-separated mids; an unknown mid is an error naming the file, line and mid.
    """
    entries = []
    seen = set()
    with open(path, newline="", encoding="utf-8") as f:
        for line_number, row in enumerate(csv.reader(f, skipinitialspace=True), start=1):
            if not row or row[0].startswith("#"):
                continue
            if len(row) != 4:
                raise LabelFileError(
                    f"{path}, line {line_number}: expected 4 fields YTID, start, end, \"labels\", got {len(row)}: {row}"
                )
            ytid, start, end, label_field = (field.strip() for field in row)
            mids = [m.strip() for m in label_field.split(",") if m.strip()]
            try:
                class_indices = labels.indices(mids)
            except KeyError as error:
                raise LabelFileError(f"{path}, line {line_number}: {error.args[0]}") from None
            if ytid in seen:
                raise LabelFileError(f"{path}, line {line_number}: YTID {ytid!r} appears twice")
            seen.add(ytid)
            entries.append(ClipEntry(ytid, tuple(int(i) for i in class_indices), ytid=ytid, start=start, end=end))
    return entries


def read_path_labels_csv(path: str | os.PathLike, labels: ClassLabels) -> list[ClipEntry]:
    """Parse a simple `path,labels` CSV (header required); labels are mids or display names separated by `;`.

    Commas are also accepted as separators when the field contains no `;` (e.g. `"/m/09x0r,/m/05zppz"`), which
    is safe for mids; display names with commas in them ("Male speech, man speaking") need `;`.
    """
    entries = []
    seen = set()
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, skipinitialspace=True)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != ["path", "labels"]:
            raise LabelFileError(f"{path}: expected the header 'path,labels', found {header}")
        for line_number, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != 2:
                raise LabelFileError(f"{path}, line {line_number}: expected 2 fields path,labels, got {row}")
            relative_path, label_field = row[0].strip(), row[1].strip()
            separator = ";" if ";" in label_field else ","
            names = [n.strip() for n in label_field.split(separator) if n.strip()]
            if separator == "," and not all(_is_known(labels, n) for n in names) and _is_known(labels, label_field):
                names = [label_field]  # one display name that contains commas
            try:
                class_indices = labels.indices(names)
            except KeyError as error:
                raise LabelFileError(f"{path}, line {line_number}: {error.args[0]}") from None
            if relative_path in seen:
                raise LabelFileError(f"{path}, line {line_number}: path {relative_path!r} appears twice")
            seen.add(relative_path)
            entries.append(
                ClipEntry(relative_path, tuple(int(i) for i in class_indices), relative_path=relative_path)
            )
    return entries


def _is_known(labels: ClassLabels, label: str) -> bool:
    try:
        labels.index(label)
    except KeyError:
        return False
    return True


def read_clip_list(path: str | os.PathLike, labels: ClassLabels) -> list[ClipEntry]:
    """Read either CSV layout, told apart by the first non-comment line (`path,labels` header or a segment row)."""
    with open(path, newline="", encoding="utf-8") as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                first = line
                break
        else:
            raise LabelFileError(f"{path}: no clip rows")
    if [h.strip() for h in first.split(",")] == ["path", "labels"]:
        return read_path_labels_csv(path, labels)
    return read_segments_csv(path, labels)


def multi_hot_matrix(entries: Sequence[ClipEntry], num_classes: int) -> np.ndarray:
    """(N, C) bool matrix of the entries' labels."""
    matrix = np.zeros((len(entries), num_classes), dtype=bool)
    for row, entry in enumerate(entries):
        matrix[row, list(entry.class_indices)] = True
    return matrix


AUDIOSET_CLASS_LABELS = "class_labels_indices.csv"  # in the package folder audioset_classes/, see its README


@functools.cache
def audioset_class_labels() -> ClassLabels:
    """AudioSet's 527 classes (mids and display names, in ``class_labels_indices.csv`` order), shipped with the
    package: ``audioset_class_labels().display_names[0] == "Speech"``."""
    resource = importlib.resources.files("convnext_audio_jax.data").joinpath("audioset_classes", AUDIOSET_CLASS_LABELS)
    with importlib.resources.as_file(resource) as path:
        return read_class_labels(path)
