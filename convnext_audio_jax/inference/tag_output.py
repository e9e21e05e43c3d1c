"""Writing tagging results as each file is done: per-file records in table, JSON, JSON lines or CSV, a file's
timeline spooled on disk (never every window × class in memory), and resuming an interrupted output.

A file's record is written, flushed and fsynced as one unit when the file is done, so a crash leaves every
finished file's record whole; `RecordSink` with ``resume`` finds the finished files in a JSON-lines or CSV output
and cuts off a torn last record (bytes this program wrote after the last whole record).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from convnext_audio_jax.inference import windowing
from convnext_audio_jax.inference.tagging import (
    EventMerger,
    FileScored,
    TaggedFile,
    WindowScores,
)
from convnext_audio_jax.runtime import files
from convnext_audio_jax.runtime.errors import UserError

OUTPUT_FORMATS = ("table", "json", "jsonl", "csv")
RESUMABLE_FORMATS = ("jsonl", "csv")
CSV_HEADER = ("file", "kind", "start", "end", "index", "label", "score")
_CHUNK_ROWS = 2048  # segments formatted at a time


def _tags(probs: np.ndarray, names: Sequence[str], top_k: int, threshold: float) -> list[dict]:
    best = np.argsort(-probs, kind="stable")[:top_k]
    return [{"index": int(i), "label": names[i], "score": float(probs[i])} for i in best if probs[i] >= threshold]


def file_report(result: FileScored | TaggedFile, names: Sequence[str], top_k: int, threshold: float,
                all_scores: bool) -> dict:
    """A JSON-ready dict of one file's tags (a FileScored from `Tagger.stream` or a TaggedFile)."""
    source = result.audio
    num_windows = result.num_windows if isinstance(result, FileScored) else len(result.window_starts)
    report: dict[str, Any] = {
        "file": source.name,
        "duration_s": round(source.duration, 4),
        "sample_rate": source.sample_rate,
        "model_sample_rate": source.model_rate,
        "window_s": source.window_seconds,
        "channels": source.channels,
        "downmixed": source.channels > 1,
        "padded": source.duration < source.window_seconds,
        "num_windows": num_windows,
        "clipped_samples": source.clipped,
        "tags": _tags(result.clip_probs, names, top_k, threshold),
    }
    if all_scores:
        report["scores"] = {names[i]: float(p) for i, p in enumerate(result.clip_probs)}
    return report


class FileSpool:
    """One file's window (and, with ``steps``, time-step) scores in unnamed temporary files as float64 rows [start, probs...], read
    back a chunk at a time when the file is done; ``window_seconds`` is the model's window."""

    def __init__(self, directory: str | None, steps: bool, window_seconds: float):
        self._window_seconds = window_seconds
        self._windows = tempfile.TemporaryFile(dir=directory)
        self._steps = tempfile.TemporaryFile(dir=directory) if steps else None
        self._window_width = self._step_shape = None

    def add(self, scores: WindowScores) -> None:
        row = np.concatenate([[scores.start], scores.probs]).astype(np.float64)
        self._window_width = row.size
        self._windows.write(row.tobytes())
        if self._steps is not None:
            self._step_shape = scores.frame_probs.shape
            self._steps.write(np.concatenate([[scores.start], scores.frame_probs.ravel()]).astype(np.float64).tobytes())

    @property
    def has_steps(self) -> bool:
        return self._steps is not None and self._step_shape is not None

    def _rows(self, file, width: int, chunk: int) -> Iterator[np.ndarray]:
        file.seek(0)
        while data := file.read(chunk * width * 8):
            yield np.frombuffer(data, np.float64).reshape(-1, width)

    def windows(self, duration: float) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(starts, ends, probs) chunks of the windows, ends clipped to the audio."""
        for rows in self._rows(self._windows, self._window_width, _CHUNK_ROWS):
            yield (*windowing.window_segments(rows[:, 0], duration, self._window_seconds), rows[:, 1:])

    def steps(self, bounds: np.ndarray, duration: float) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(starts, ends, probs) chunks of the time steps (`windowing.step_segments`)."""
        steps, classes = self._step_shape
        for rows in self._rows(self._steps, 1 + steps * classes, max(1, _CHUNK_ROWS // steps)):
            yield windowing.step_segments(rows[:, 0], rows[:, 1:].reshape(-1, steps, classes), bounds, duration)

    def segments(self, bounds: np.ndarray | None, duration: float):
        """The segments events are merged from: time steps when there are step scores, else windows."""
        return self.steps(bounds, duration) if self.has_steps else self.windows(duration)

    def close(self) -> None:
        self._windows.close()
        if self._steps is not None:
            self._steps.close()


def _rows_json(segments, names, reported) -> Iterator[str]:
    for starts, ends, probs in segments:
        for start, end, p in zip(starts, ends, probs):
            yield json.dumps({"start": round(float(start), 4), "end": round(float(end), 4),
                              "scores": {names[i]: float(p[i]) for i in reported}}, allow_nan=False)


def _joined(items: Iterator[str]) -> Iterator[str]:
    for number, item in enumerate(items):
        yield item if number == 0 else ", " + item


def record_chunks(fmt: str, scored: FileScored, spool: FileSpool | None, names: Sequence[str], top_k: int,
                  threshold: float, all_scores: bool) -> Iterator[str]:
    """The text of one file's record in ``fmt``, a piece at a time; with a spool (``--frames``) the record
    holds the windows, the time steps (under ``frames``: docs/glossary.md) and merged events. JSON never holds NaN
    (scores are checked finite upstream; ``allow_nan=False`` makes a slip an error, not a ``NaN`` token)."""
    report = file_report(scored, names, top_k, threshold, all_scores)
    reported = np.arange(len(names)) if all_scores else np.array([t["index"] for t in report["tags"]], dtype=int)
    duration, bounds = scored.audio.duration, scored.frame_bounds
    events = None
    if spool is not None:
        merger = EventMerger(threshold)
        for segments in spool.segments(bounds, duration):
            merger.add(*segments)
        events = [{"label": names[e["index"]], **e, "onset": round(e["onset"], 4), "offset": round(e["offset"], 4)}
                  for e in merger.events()]
    if fmt in ("json", "jsonl"):
        yield json.dumps(report, allow_nan=False)[:-1]
        if spool is not None:
            yield ', "windows": ['
            yield from _joined(_rows_json(spool.windows(duration), names, reported))
            yield "]"
            if spool.has_steps:
                yield ', "frames": ['
                yield from _joined(_rows_json(spool.steps(bounds, duration), names, reported))
                yield "]"
            yield ', "events": ' + json.dumps(events, allow_nan=False)
        yield "}"
    elif fmt == "csv":
        yield from _csv_record(report, spool, events, names, reported, bounds, duration)
    else:
        yield from _table_record(report, threshold, events)


def _csv_text(rows) -> str:
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    return text.getvalue()


def _csv_record(report, spool, events, names, reported, bounds, duration) -> Iterator[str]:
    """Long format: clip rows, window rows, frame rows, event rows (score = peak), then one ``file`` row (start 0,
    end = duration) that closes the file's record."""
    name = report["file"]
    clip_scores = report.get("scores") or {t["label"]: t["score"] for t in report["tags"]}
    index_of = {label: i for i, label in enumerate(names)}
    yield _csv_text([name, "clip", 0.0, report["duration_s"], index_of[label], label, f"{score:.6f}"]
                    for label, score in clip_scores.items())
    if spool is not None:
        chunks = [("window", spool.windows(duration))]
        if spool.has_steps:
            chunks.append(("frame", spool.steps(bounds, duration)))
        for kind, segments in chunks:
            for starts, ends, probs in segments:
                yield _csv_text([name, kind, round(float(s), 4), round(float(e), 4), i, names[i], f"{p[i]:.6f}"]
                                for s, e, p in zip(starts, ends, probs) for i in reported)
        yield _csv_text([name, "event", e["onset"], e["offset"], e["index"], e["label"], f"{e['peak']:.6f}"]
                        for e in events)
    yield _csv_text([[name, "file", 0.0, report["duration_s"], "", "", ""]])


def _describe(report: dict) -> str:
    details = [f"{report['duration_s']:.2f} s", f"{report['sample_rate']} Hz"]
    if report["sample_rate"] != report["model_sample_rate"]:
        details[-1] += f" resampled to {report['model_sample_rate']} Hz"
    if report["downmixed"]:
        details.append(f"{report['channels']} channels downmixed to mono")
    if report["clipped_samples"]:
        details.append(f"{report['clipped_samples']} samples outside [-1, 1] clipped")
    details.append(f"zero-padded to {report['window_s']:g} s" if report["padded"] else f"{report['num_windows']} windows")
    return f"{report['file']} ({', '.join(details)})"


def _table_record(report: dict, threshold: float, events: list[dict] | None) -> Iterator[str]:
    lines = [_describe(report)]
    if not report["tags"]:
        lines.append(f"  no class scores ≥ {threshold:g}")
    lines += [f"  {tag['score']:.3f}  {tag['label']}" for tag in report["tags"]]
    lines += [f"  event {e['onset']:8.2f} – {e['offset']:8.2f} s  peak {e['peak']:.3f}  {e['label']}"
              for e in events or []]
    yield "\n".join(lines) + "\n"


class RecordSink:
    """Where records go: standard output, or ``path`` (replaced, or with ``resume`` appended to after the files
    it already holds whole). Each record is flushed and, in a file, fsynced before the next file starts."""

    def __init__(self, path: str | os.PathLike | None, fmt: str, resume: bool = False):
        if fmt not in OUTPUT_FORMATS:
            raise UserError(f"format {fmt!r}: expected one of {OUTPUT_FORMATS}")
        if resume and (path is None or fmt not in RESUMABLE_FORMATS):
            raise UserError(f"--resume needs --output and --format {' or '.join(RESUMABLE_FORMATS)}")
        self.fmt, self.path, self.done, self._records = fmt, path, set(), 0
        if path is None:
            self._file = None
        elif resume and os.path.exists(path):
            self.done, valid_end = scan_output(path, fmt)
            self._file = open(path, "r+b")
            self._file.truncate(valid_end)
            self._file.seek(valid_end)
        else:
            self._file = open(path, "wb")
        if fmt == "csv" and (self._file is None or self._file.tell() == 0):
            self._write(_csv_text([CSV_HEADER]))
        elif fmt == "json":
            self._write("[\n")

    def _write(self, text: str) -> None:
        if self._file is None:
            sys.stdout.write(text)
        else:
            self._file.write(text.encode("utf-8"))

    def _commit(self) -> None:
        if self._file is None:
            sys.stdout.flush()
        else:
            files.sync_file(self._file)

    def write(self, chunks: Iterator[str]) -> None:
        if self.fmt == "json" and self._records:
            self._write(",\n")
        for chunk in chunks:
            self._write(chunk)
        if self.fmt == "jsonl":
            self._write("\n")
        self._records += 1
        self._commit()

    def close(self) -> None:
        if self.fmt == "json":
            self._write("\n]\n")
        self._commit()
        if self._file is not None:
            self._file.close()


def _lines(file, keep: int = 65_536) -> Iterator[tuple[int, bytes]]:
    """(byte position just past the line, its first ``keep`` bytes) for every newline-terminated line, reading
    1 MiB at a time (a line of a long file's timeline can be large)."""
    prefix, position = b"", 0
    while data := file.read(1 << 20):
        start = 0
        while (newline := data.find(b"\n", start)) >= 0:
            if len(prefix) < keep:
                prefix += data[start:newline][: keep - len(prefix)]
            position += newline + 1 - start
            yield position, prefix
            prefix, start = b"", newline + 1
        if len(prefix) < keep:
            prefix += data[start:][: keep - len(prefix)]
        position += len(data) - start


def scan_output(path: str | os.PathLike, fmt: str) -> tuple[set[str], int]:
    """(files with a whole record, byte position just past the last whole record) of a JSON-lines or CSV output
    written by `RecordSink`; ValueError for a file that is not one."""
    done, valid_end = set(), 0
    decoder = json.JSONDecoder()
    with open(path, "rb") as file:
        for number, (end, prefix) in enumerate(_lines(file), start=1):
            text = prefix.decode("utf-8", errors="replace")
            try:
                if fmt == "jsonl":
                    if not text.startswith('{"file": '):
                        raise ValueError
                    done.add(decoder.raw_decode(text, len('{"file": '))[0])
                    valid_end = end
                    continue
                row = next(csv.reader([text]))
                if number == 1:
                    if tuple(row) != CSV_HEADER:
                        raise ValueError
                    valid_end = end
                elif len(row) != len(CSV_HEADER):
                    raise ValueError
                elif row[1] == "file":
                    done.add(row[0])
                    valid_end = end
            except (ValueError, StopIteration):
                raise UserError(f"{path}: line {number} is not a tag {fmt} record; not resuming into it") from None
    return done, valid_end
