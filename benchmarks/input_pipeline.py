"""Input-pipeline throughput: clips/s from a packed dataset through the loader, per worker process.

Writes a packed dataset of --clips synthetic 10 s clips (PANN HDF5, and ArrayRecord shards of raw int16 and of
FLAC via the same layout `prepare` writes) into --workdir (a temporary folder by default), then times the loader
for each format and setting: reader threads in the training process (workers 0) and 1, 2, … --max-workers worker
processes (data/parallel_read.py), and prints a table with clips/s, and the CPU time per clip of the loader's
process and of its workers (from /proc): on a host with fewer cores than processes the wall-clock rate cannot
scale, but the CPU per clip says what each added core buys (1000 / worker ms = clips/s per worker core) and
where the loader's own process tops out (1000 / loader ms), whatever the machine's load.
Run: python benchmarks/input_pipeline.py [--clips 2000] [--batch-size 64] [--steps 60] [--max-workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time

import grain
import h5py
import numpy as np
from array_record.python import array_record_module

from convnext_audio_jax.data import audio, pipeline, records, sources

NUM_CLASSES = 527


def write_hdf5(folder: pathlib.Path, clips: int) -> pathlib.Path:
    """``folder/bench.h5``: ``clips`` synthetic 10 s int16 clips in the PANN HDF5 layout (gpu_suite's input part)."""
    rng = np.random.default_rng(0)
    targets = rng.random((clips, NUM_CLASSES)) < 0.005
    base = rng.integers(-8000, 8000, size=(audio.CLIP_SAMPLES,), dtype=np.int16)
    with h5py.File(folder / "bench.h5", "w") as f:
        f.create_dataset("audio_name", data=np.array([f"Y{i:07d}".encode() for i in range(clips)], dtype="S20"))
        waveforms = f.create_dataset("waveform", (clips, audio.CLIP_SAMPLES), dtype=np.int16)
        f.create_dataset("target", data=targets)
        f.attrs["sample_rate"] = audio.SAMPLE_RATE
        for i in range(clips):
            waveforms[i] = np.roll(base, i)
    return folder / "bench.h5"


def write_datasets(folder: pathlib.Path, clips: int) -> None:
    rng = np.random.default_rng(0)
    targets = rng.random((clips, NUM_CLASSES)) < 0.005
    targets[np.arange(clips), rng.integers(0, NUM_CLASSES, clips)] = True
    base = rng.integers(-8000, 8000, size=(audio.CLIP_SAMPLES,), dtype=np.int16)
    ids = [f"Y{i:07d}" for i in range(clips)]
    writer = array_record_module.ArrayRecordWriter(str(folder / "bench-00000-of-00001.array_record"),
                                                   records.WRITER_OPTIONS)
    flac_writer = array_record_module.ArrayRecordWriter(str(folder / "flac-00000-of-00001.array_record"),
                                                        records.WRITER_OPTIONS)
    with h5py.File(folder / "bench.h5", "w") as f:
        f.create_dataset("audio_name", data=np.array([i.encode() for i in ids], dtype="S20"))
        waveforms = f.create_dataset("waveform", (clips, audio.CLIP_SAMPLES), dtype=np.int16)
        f.create_dataset("target", data=targets)
        f.attrs["sample_rate"] = audio.SAMPLE_RATE
        for i in range(clips):
            waveform = np.roll(base, i)  # distinct clips without paying for random generation
            waveforms[i] = waveform
            writer.write(records.encode_record(ids[i], np.flatnonzero(targets[i]), waveform))
            flac_writer.write(records.encode_record(ids[i], np.flatnonzero(targets[i]), waveform, "flac"))
    writer.close()
    flac_writer.close()
    for split in ("bench", "flac"):
        np.savez(folder / f"{split}-00000-of-00001.index.npz", ids=np.array(ids), targets=targets)
    (folder / "manifest.json").write_text(json.dumps({
        "format": "array_record", "num_classes": NUM_CLASSES, "splits": {split: {"shards": [
            {"data": f"{split}-00000-of-00001.array_record", "index": f"{split}-00000-of-00001.index.npz"}]}
            for split in ("bench", "flac")}}))


def children_cpu_s() -> float:
    """CPU seconds (user + system) so far of this process's live child processes (the loader's workers)."""
    me, total = os.getpid(), 0.0
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except (OSError, IndexError):
            continue  # exited meanwhile
        if int(fields[1]) == me:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def measure(source, config: pipeline.LoaderConfig, steps: int, warmup: int = 5) -> dict:
    """clips/s, and CPU ms per clip of this process (``loader_cpu_ms``) and of its workers (``worker_cpu_ms``,
    None where /proc cannot say)."""
    loader = pipeline.make_loader(source, config, grain.sharding.ShardOptions(0, 1))
    has_proc = pathlib.Path("/proc/self/stat").exists()
    try:
        for _ in range(warmup):
            next(loader)
        children, own, start = children_cpu_s() if has_proc else 0.0, time.process_time(), time.perf_counter()
        rows = sum(next(loader)["waveform"].shape[0] for _ in range(steps))
        wall = time.perf_counter() - start
        own, children = time.process_time() - own, (children_cpu_s() - children if has_proc else None)
    finally:
        loader.close()
    return {"clips_per_s": rows / wall, "loader_cpu_ms": 1e3 * own / rows,
            "worker_cpu_ms": None if children is None else 1e3 * children / rows}


def row_text(name: str, sampling: str, workers: int, result: dict) -> str:
    worker_ms = result["worker_cpu_ms"]
    per_core = f"{1e3 / worker_ms:,.0f}" if workers and worker_ms else "–"
    return (f"| {name} | {sampling} | {workers or '0 (threads)'} | {result['clips_per_s']:,.0f} "
            f"| {result['loader_cpu_ms']:.3f} | {'–' if not workers or worker_ms is None else f'{worker_ms:.3f}'} "
            f"| {per_core} | {1e3 / result['loader_cpu_ms']:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--max-workers", type=int, default=2, help="time 1 … N worker processes (default 2)")
    parser.add_argument("--workdir", default=None, help="where to write the packed data (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        folder = pathlib.Path(args.workdir or temporary)
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        write_datasets(folder, args.clips)
        print(f"wrote {args.clips} clips ({args.clips * audio.CLIP_SAMPLES * 2 / 1e9:.2f} GB per format) "
              f"in {time.perf_counter() - start:.1f} s")
        formats = {
            "hdf5 int16": sources.PackedHdf5Source.from_files([folder / "bench.h5"]),
            "array_record int16": sources.ArrayRecordSource(folder, "bench"),
            "array_record flac": sources.ArrayRecordSource(folder, "flac"),
        }
        settings = [("shuffle", workers) for workers in range(args.max_workers + 1)]
        settings.insert(1, ("balanced", 0))
        print(f"\nint16 batches of {args.batch_size}; CPU ms per clip of the loader's process and of its workers; "
              "per worker core = 1000 / worker ms; loader ceiling = 1000 / loader ms (clips/s)")
        print("\n| format | sampling | workers | clips/s | loader CPU ms | worker CPU ms | per worker core "
              "| loader ceiling |")
        print("|---|---|---|---:|---:|---:|---:|---:|")
        for name, source in formats.items():
            for sampling, workers in settings:
                config = pipeline.LoaderConfig(batch_size=args.batch_size, sampling=sampling, seed=0,
                                               waveform_dtype="int16", worker_count=workers)
                print(row_text(name, sampling, workers, measure(source, config, args.steps)), flush=True)


if __name__ == "__main__":
    main()
