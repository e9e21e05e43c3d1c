"""Input-pipeline throughput: clips/s from a packed dataset through the grain loader.

Writes a packed dataset of --clips synthetic 10 s clips (PANN HDF5 and/or ArrayRecord via the same layout
`prepare` writes) into --workdir (a temporary folder by default), then times the loader for each setting and
prints a table. Run: python benchmarks/input_pipeline.py [--clips 2000] [--batch-size 64] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import grain
import h5py
import numpy as np
from array_record.python import array_record_module

from convnext_audio_jax.data import audio, pipeline, records, sources

NUM_CLASSES = 527


def write_datasets(folder: pathlib.Path, clips: int) -> None:
    rng = np.random.default_rng(0)
    targets = rng.random((clips, NUM_CLASSES)) < 0.005
    targets[np.arange(clips), rng.integers(0, NUM_CLASSES, clips)] = True
    base = rng.integers(-8000, 8000, size=(audio.CLIP_SAMPLES,), dtype=np.int16)
    ids = [f"Y{i:07d}" for i in range(clips)]
    writer = array_record_module.ArrayRecordWriter(str(folder / "bench-00000-of-00001.array_record"), "group_size:1")
    with h5py.File(folder / "bench.h5", "w") as f:
        f.create_dataset("audio_name", data=np.array([i.encode() for i in ids], dtype="S20"))
        waveforms = f.create_dataset("waveform", (clips, audio.CLIP_SAMPLES), dtype=np.int16)
        f.create_dataset("target", data=targets)
        f.attrs["sample_rate"] = audio.SAMPLE_RATE
        for i in range(clips):
            waveform = np.roll(base, i)  # distinct clips without paying for random generation
            waveforms[i] = waveform
            writer.write(records.encode_record(ids[i], np.flatnonzero(targets[i]), waveform))
    writer.close()
    np.savez(folder / "bench-00000-of-00001.index.npz", ids=np.array(ids), targets=targets)
    (folder / "manifest.json").write_text(json.dumps({
        "format": "array_record", "num_classes": NUM_CLASSES, "splits": {"bench": {"shards": [
            {"data": "bench-00000-of-00001.array_record", "index": "bench-00000-of-00001.index.npz"}]}}}))


def measure(source, config: pipeline.LoaderConfig, steps: int, warmup: int = 5) -> float:
    loader = pipeline.make_loader(source, config, grain.sharding.ShardOptions(0, 1))
    try:
        for _ in range(warmup):
            next(loader)
        start = time.perf_counter()
        rows = sum(next(loader)["waveform"].shape[0] for _ in range(steps))
        return rows / (time.perf_counter() - start)
    finally:
        loader.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
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
            "hdf5": sources.PackedHdf5Source.from_files([folder / "bench.h5"]),
            "array_record": sources.ArrayRecordSource(folder, "bench"),
        }
        settings = [
            ("shuffle", "int16", 0), ("balanced", "int16", 0), ("shuffle", "float32", 0), ("shuffle", "int16", 2),
        ]
        print(f"\n| format | sampling | waveform | workers | clips/s (batch {args.batch_size}) |")
        print("|---|---|---|---|---|")
        for name, source in formats.items():
            for sampling, dtype, workers in settings:
                config = pipeline.LoaderConfig(batch_size=args.batch_size, sampling=sampling, seed=0,
                                               waveform_dtype=dtype, worker_count=workers)
                rate = measure(source, config, args.steps)
                print(f"| {name} | {sampling} | {dtype} | {workers} | {rate:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
