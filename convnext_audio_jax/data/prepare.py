"""`convnext-audio prepare`: decode a folder of clips listed by a CSV into packed shards plus a JSON manifest.

Clips are split, in CSV order, into shards of `--shard-size`. A shard is finished when its summary
`{split}-{k}-of-{n}.json` exists (written after the data file is complete and renamed into place), so re-running
on the same output skips finished shards and redoes the rest. A clip that cannot be used is skipped and listed
in the manifest with its reason; it never stops the run. Only the first 10 s of each file are read.

Several runs may share one output: each holds a lock on its split (`{split}.lock`, an flock that dies with the
process), so a second run of the same split refuses to start, and the manifest is updated under
`manifest.lock` (re-read, this split's entry set, written), so runs of different splits all end up in it.
Temporary files carry the process id; every file is fsynced before its rename into place (a power cut leaves
the old or the new file, never a torn one). A full disk or a dead decoding worker (e.g. killed by the
out-of-memory killer) stops the run with one line; finished shards stay, and a re-run resumes.

Outputs (OUT/):
  manifest.json                    formats, per split: shards, clip counts, per-class counts, skipped clips
  class_labels_indices.csv         the class list the targets refer to
  array_record: {split}-{k}-of-{n}.array_record + .index.npz (ids, targets)    → sources.ArrayRecordSource
  hdf5:         {split}-{k}-of-{n}.h5 (PANN layout) + {split}_index.h5         → PackedHdf5Source.from_index
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import sys

import h5py
import numpy as np
import tqdm

from convnext_audio_jax.data import audio, records, sources
from convnext_audio_jax.data import labels as labels_lib
from convnext_audio_jax.data.workers import WorkerDied, WorkerPool
from convnext_audio_jax.runtime import files
from convnext_audio_jax.runtime.errors import UserError, debugging, one_line
from convnext_audio_jax.runtime.parts import PartsFolder

FORMATS = ("array_record", "hdf5")
MANIFEST = "manifest.json"
LABELS_COPY = "class_labels_indices.csv"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--audio-dir", required=True, help="folder holding the audio files (searched recursively)")
    parser.add_argument("--segments", required=True,
                        help="clip list: an AudioSet segment CSV (YTID, start, end, \"labels\") or a path,labels CSV")
    parser.add_argument("--labels", required=True, help="class_labels_indices.csv (index,mid,display_name)")
    parser.add_argument("--output", required=True, help="output folder (re-running resumes unfinished shards)")
    parser.add_argument("--format", choices=FORMATS, default="array_record", help="shard format (default %(default)s)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="decoding processes (default: all cores, %(default)s)")
    parser.add_argument("--split", default=None,
                        help="split name (default: the CSV's name without '_segments', e.g. balanced_train)")
    parser.add_argument("--shard-size", type=int, default=1000, help="clips per shard (default %(default)s)")
    parser.add_argument("--waveform-encoding", choices=records.ENCODINGS, default="int16",
                        help="array_record only: raw int16 or FLAC-compressed waveforms (default %(default)s)")
    parser.add_argument("--min-seconds", type=float, default=1.0,
                        help="clips shorter than this are skipped as too short (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Exit code: 0 when the split was packed, 1 when no clip could be packed, 2 on bad inputs or a split being
    prepared by another run, 3 when writing failed (e.g. disk full) or a decoding worker died."""
    try:
        split_manifest = prepare_split(
            audio_dir=args.audio_dir, clip_list_csv=args.segments, labels_csv=args.labels, output=args.output,
            split=args.split, output_format=args.format, workers=args.workers, shard_size=args.shard_size,
            waveform_encoding=args.waveform_encoding, min_seconds=args.min_seconds, progress=not args.no_progress,
        )
    except (UserError, FileNotFoundError, FileExistsError) as error:  # LabelFileError, SplitLocked, a bad option
        if debugging(getattr(args, "debug", False)):
            raise
        print(f"prepare: error: {one_line(error)}", file=sys.stderr)
        return 2
    except (OSError, WorkerDied) as error:  # disk full, a dead worker: finished shards stay, a re-run resumes
        print(f"prepare: error: {error}; finished shards are kept, re-run the same command to resume",
              file=sys.stderr)
        return 3
    skipped = split_manifest["skipped_by_reason"]
    print(f"prepare: split {split_manifest['name']}: packed {split_manifest['num_clips']} clips in "
          f"{len(split_manifest['shards'])} shards, skipped {sum(skipped.values())} {dict(skipped)}; "
          f"manifest {pathlib.Path(args.output) / MANIFEST}")
    return 0 if split_manifest["num_clips"] > 0 else 1


class SplitLocked(UserError):
    """Another process is preparing the same split into the same output."""


@contextlib.contextmanager
def _locked(path: pathlib.Path, blocking: bool, message: str):
    """The one file lock (``runtime.files.FileLock``) on ``path``, held for the block; SplitLocked when another
    process holds it and ``blocking`` is False. The kernel drops it when the process dies."""
    try:
        lock = files.FileLock(path).acquire(blocking)
    except files.LockHeld as held:
        raise SplitLocked(f"{message} (lock {held.path} held by {held.holder})") from None
    try:
        yield
    finally:
        lock.release()


def default_split_name(clip_list_csv: str | os.PathLike) -> str:
    stem = pathlib.Path(clip_list_csv).stem
    return stem[: -len("_segments")] if stem.endswith("_segments") else stem


def prepare_split(*, audio_dir, clip_list_csv, labels_csv, output, split=None, output_format="array_record",
                  workers=1, shard_size=1000, waveform_encoding="int16", min_seconds=1.0, progress=True) -> dict:
    """Pack one split; returns its manifest entry (also written into OUT/manifest.json)."""
    if output_format not in FORMATS:
        raise UserError(f"format {output_format!r}: expected one of {FORMATS}")
    if output_format == "hdf5" and waveform_encoding != "int16":
        raise UserError("--waveform-encoding flac is only available with --format array_record")
    if shard_size < 1 or workers < 1:
        raise UserError(f"--shard-size and --workers must be ≥ 1, got {shard_size} and {workers}")
    split = split or default_split_name(clip_list_csv)
    output = pathlib.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    with _locked(output / f"{split}.lock", blocking=False,
                 message=f"split {split!r} of {output} is being prepared by another run"):
        return _prepare_locked(audio_dir, clip_list_csv, labels_csv, output, split, output_format, workers,
                               shard_size, waveform_encoding, min_seconds, progress)


def _prepare_locked(audio_dir, clip_list_csv, labels_csv, output, split, output_format, workers, shard_size,
                    waveform_encoding, min_seconds, progress) -> dict:
    class_labels = labels_lib.read_class_labels(labels_csv)
    with _locked(output / "manifest.lock", blocking=True, message="manifest"):
        _adopt_labels(output, labels_csv, class_labels)
        _read_manifest(output, output_format, class_labels.num_classes)  # checks the format before any work

    entries = labels_lib.read_clip_list(clip_list_csv, class_labels)
    folder_index = sources.index_audio_folder(audio_dir)
    paths = [sources.find_clip_file(e, folder_index) for e in entries]
    num_shards = max(1, -(-len(entries) // shard_size))
    stale = sorted(p.name for p in output.glob(f"{split}-*-of-*.json") if not p.name.endswith(f"-of-{num_shards:05d}.json"))
    if stale:
        raise FileExistsError(
            f"{output} holds shards of split {split!r} cut differently ({stale[0]}, ...), from another clip list or "
            f"--shard-size; use a new output folder or the same CSV and --shard-size"
        )
    plans = [
        _ShardPlan(output, split, k, num_shards, output_format, entries[k * shard_size : (k + 1) * shard_size],
                   paths[k * shard_size : (k + 1) * shard_size])
        for k in range(num_shards)
    ]

    summaries = [plan.finished_summary() for plan in plans]
    done_clips = sum(len(plan.entries) for plan, s in zip(plans, summaries) if s is not None)
    bar = tqdm.tqdm(total=len(entries), initial=done_clips, unit="clip", desc=f"prepare {split}",
                    disable=not progress)
    needs_pool = workers > 1 and any(s is None for s in summaries)
    with bar, (WorkerPool(workers, name="decoding worker") if needs_pool else contextlib.nullcontext()) as pool:
        for k, plan in enumerate(plans):
            if summaries[k] is None:
                summaries[k] = plan.write(pool, class_labels, waveform_encoding, min_seconds, bar)

    if output_format == "hdf5":
        _write_pann_index(output, split, summaries, class_labels.num_classes)
    split_manifest = _split_manifest(split, clip_list_csv, summaries, class_labels, output_format)
    with _locked(output / "manifest.lock", blocking=True, message="manifest"):
        # Re-read under the lock: another split's run may have written the manifest since this one started.
        manifest = _read_manifest(output, output_format, class_labels.num_classes)
        manifest["splits"][split] = split_manifest
        files.write_text(output / MANIFEST, json.dumps(manifest, indent=1))
    return split_manifest


def _adopt_labels(output: pathlib.Path, labels_csv, class_labels: labels_lib.ClassLabels) -> None:
    """Copy the class list into OUT, or check it is the one already there (targets of all splits must agree)."""
    copy = output / LABELS_COPY
    if copy.is_file():
        existing = labels_lib.read_class_labels(copy)
        if existing.mids != class_labels.mids:
            raise UserError(f"{labels_csv} differs from {copy} already in the output; use a new output folder")
    else:
        with files.replacing(copy, copy.with_name(f"{copy.name}.{os.getpid()}.partial")) as temporary:
            shutil.copyfile(labels_csv, temporary)


def _read_manifest(output: pathlib.Path, output_format: str, num_classes: int) -> dict:
    path = output / MANIFEST
    if not path.is_file():
        return {"format": output_format, "sample_rate": audio.SAMPLE_RATE, "clip_samples": audio.CLIP_SAMPLES,
                "num_classes": num_classes, "labels": LABELS_COPY, "splits": {}}
    manifest = json.loads(path.read_text())
    if manifest["format"] != output_format:
        raise UserError(f"{path} is a {manifest['format']} output; asked for {output_format}")
    return manifest


def _decode(task: tuple[str, str | None, float]) -> tuple[str, np.ndarray | None, str, str]:
    clip_id, path, min_seconds = task
    if path is None:
        return clip_id, None, audio.MISSING, "no matching file in the audio folder"
    try:
        return clip_id, audio.load_clip(path, clip_id, min_seconds=min_seconds), "", ""
    except audio.ClipError as error:
        return clip_id, None, error.reason, error.detail


class _ShardPlan:
    """Shard ``number`` of ``count``: a part of the output folder (``runtime.parts``), finished when its summary
    record is there (written after the data file) and the data file with it."""

    def __init__(self, output, split, number, count, output_format, entries, paths):
        self.entries = entries
        self.paths = paths
        stem = f"{split}-{number:05d}-of-{count:05d}"
        self.folder = PartsFolder(output)
        self.summary_name = f"{stem}.json"
        self.summary_path = output / self.summary_name
        self.data_name = f"{stem}.array_record" if output_format == "array_record" else f"{stem}.h5"
        self.index_name = f"{stem}.index.npz" if output_format == "array_record" else None
        self.output_format = output_format
        # Identifies the clip list of this shard, so a changed CSV or shard size is not mistaken for finished work.
        self.plan_hash = hashlib.sha1("\n".join(e.clip_id for e in entries).encode()).hexdigest()

    def finished_summary(self) -> dict | None:
        summary = self.folder.read_record(self.summary_name)
        if summary is None:
            return None
        if summary["plan_hash"] != self.plan_hash:
            raise FileExistsError(
                f"{self.summary_path} was written for a different clip list or shard size; "
                "use a new output folder or the same CSV and --shard-size"
            )
        if not self.folder.has(self.data_name):
            return None
        return summary

    def write(self, pool, class_labels, waveform_encoding, min_seconds, bar) -> dict:
        tasks = [(e.clip_id, p, min_seconds) for e, p in zip(self.entries, self.paths)]
        results = pool.map(_decode, tasks) if pool is not None else map(_decode, tasks)
        class_indices = {e.clip_id: e.class_indices for e in self.entries}
        kept_ids, kept_targets, skipped = [], [], []
        temporary = self.folder.temporary(self.data_name, ".partial")
        try:
            with _ShardWriter(temporary, self.output_format, waveform_encoding, class_labels.num_classes) as writer:
                for clip_id, waveform, reason, detail in results:
                    bar.update(1)
                    if waveform is None:
                        skipped.append({"id": clip_id, "reason": reason, "detail": detail})
                        continue
                    writer.add(clip_id, class_indices[clip_id], waveform)
                    kept_ids.append(clip_id)
                    kept_targets.append(class_indices[clip_id])
        except WorkerDied as error:
            temporary.unlink(missing_ok=True)
            raise WorkerDied(f"{error} while packing {self.data_name} (e.g. killed by the out-of-memory "
                             "killer)") from None
        except BaseException:
            temporary.unlink(missing_ok=True)  # ours, and unfinished (e.g. the disk filled up)
            raise
        self.folder.publish(temporary, self.data_name)
        targets = labels_lib.multi_hot_matrix(
            [labels_lib.ClipEntry(i, t) for i, t in zip(kept_ids, kept_targets)], class_labels.num_classes)
        if self.index_name is not None:
            index_temporary = self.folder.temporary(self.index_name, ".partial.npz")  # np.savez keeps .npz
            with self.folder.replacing(self.index_name, index_temporary):
                np.savez(index_temporary, ids=np.array(kept_ids, dtype=str), targets=targets)
        summary = {
            "data": self.data_name, "index": self.index_name, "num_clips": len(kept_ids),
            "class_counts": targets.sum(axis=0).tolist(), "skipped": skipped, "plan_hash": self.plan_hash,
        }
        self.folder.write_record(self.summary_name, summary)
        return summary


class _ShardWriter:
    """Appends clips to one shard file: an ArrayRecord file, or a PANN-layout HDF5 file."""

    def __init__(self, path: pathlib.Path, output_format: str, waveform_encoding: str, num_classes: int):
        self._path = path
        self._format = output_format
        self._encoding = waveform_encoding
        self._num_classes = num_classes

    def __enter__(self):
        if self._format == "array_record":
            from array_record.python import array_record_module

            self._writer = array_record_module.ArrayRecordWriter(os.fspath(self._path), records.WRITER_OPTIONS)
        else:
            self._file = h5py.File(self._path, "w")
            self._file.attrs["sample_rate"] = audio.SAMPLE_RATE
            self._names = self._file.create_dataset("audio_name", (0,), maxshape=(None,), dtype=h5py.string_dtype())
            self._waveforms = self._file.create_dataset(
                "waveform", (0, audio.CLIP_SAMPLES), maxshape=(None, audio.CLIP_SAMPLES), dtype=np.int16,
                chunks=(1, audio.CLIP_SAMPLES))
            self._targets = self._file.create_dataset(
                "target", (0, self._num_classes), maxshape=(None, self._num_classes), dtype=bool)
        return self

    def add(self, clip_id: str, class_indices, waveform: np.ndarray) -> None:
        if self._format == "array_record":
            self._writer.write(records.encode_record(clip_id, class_indices, waveform, self._encoding))
            return
        n = self._waveforms.shape[0]
        for dataset in (self._names, self._waveforms, self._targets):
            dataset.resize(n + 1, axis=0)
        self._names[n] = clip_id
        self._waveforms[n] = waveform
        target = np.zeros(self._num_classes, dtype=bool)
        target[list(class_indices)] = True
        self._targets[n] = target

    def __exit__(self, *exc_info):
        if self._format == "array_record":
            self._writer.close()
        else:
            self._file.close()
        return False


def _write_pann_index(output: pathlib.Path, split: str, summaries: list[dict], num_classes: int) -> None:
    """A PANN-style index over the split's shards; `hdf5_path` holds names relative to the index file."""
    names, targets, shard_files, rows = [], [], [], []
    for summary in summaries:
        with h5py.File(output / summary["data"], "r") as f:
            n = f["waveform"].shape[0]
            names.extend(sources.decode_names(f["audio_name"][:]))
            targets.append(f["target"][:])
        shard_files.extend([summary["data"]] * n)
        rows.extend(range(n))
    final = output / f"{split}_index.h5"
    with files.replacing(final, final.with_name(f"{final.name}.{os.getpid()}.partial")) as temporary, \
            h5py.File(temporary, "w") as f:
        f.create_dataset("audio_name", data=np.array(names, dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("target", data=np.concatenate(targets) if targets else np.zeros((0, num_classes), bool))
        f.create_dataset("hdf5_path", data=np.array(shard_files, dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("index_in_hdf5", data=np.array(rows, dtype=np.int64))


def _split_manifest(split, clip_list_csv, summaries, class_labels, output_format) -> dict:
    class_counts = np.sum([s["class_counts"] for s in summaries], axis=0).astype(int).tolist()
    skipped = [item for s in summaries for item in s["skipped"]]
    return {
        "name": split,
        "clip_list": pathlib.Path(clip_list_csv).name,
        "num_clips": sum(s["num_clips"] for s in summaries),
        "shards": [{"data": s["data"], "index": s["index"], "num_clips": s["num_clips"]} for s in summaries],
        "pann_index": f"{split}_index.h5" if output_format == "hdf5" else None,
        "class_counts": [
            {"index": i, "mid": mid, "display_name": name, "clips": count}
            for i, (mid, name, count) in enumerate(zip(class_labels.mids, class_labels.display_names, class_counts))
        ],
        "skipped_by_reason": dict(collections.Counter(item["reason"] for item in skipped)),
        "skipped": skipped,
    }
