"""Teacher-file lookups: time and memory of reading the teacher rows of a training batch by clip id.

Writes a teacher file of --clips synthetic AudioSet-like ids × 527 float16 logits into --workdir (a
temporary folder by default; 2 000 000 clips is the full AudioSet, 2.1 GB), then, for the memory-mapped
reader and for h5py row reads of the same file copied chunked and compressed, times --batches lookups of
--batch-size random ids and reports the process's resident memory growth. Prints a table.
Run: python benchmarks/teacher_lookup.py [--clips 200000] [--batch-size 512] [--batches 200]
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import h5py
import numpy as np

from convnext_audio_jax.data import teacher as teacher_lib

NUM_CLASSES = 527
ALPHABET = np.array(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"))


def youtube_like_ids(count: int) -> list[str]:
    rng = np.random.default_rng(0)
    ids = ["".join(row) for row in ALPHABET[rng.integers(0, len(ALPHABET), (count, 11))]]
    return list(dict.fromkeys(ids))  # 64^11 ids: duplicates are (almost) impossible, drop them if any


def resident_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def time_lookups(teacher: teacher_lib.TeacherPredictions, ids: list[str], batch_size: int, batches: int) -> dict:
    rng = np.random.default_rng(1)
    before = resident_mib()
    start = time.perf_counter()
    teacher.lookup(ids[:1])  # open + first page faults
    opened = time.perf_counter() - start
    seconds = []
    for _ in range(batches):
        batch = [ids[i] for i in rng.integers(0, len(ids), batch_size)]
        start = time.perf_counter()
        logits, found = teacher.lookup(batch)
        seconds.append(time.perf_counter() - start)
        assert found.all() and logits.shape == (batch_size, NUM_CLASSES)
    return {"open_s": opened, "median_ms": 1e3 * float(np.median(seconds)), "p90_ms": 1e3 * float(np.quantile(seconds, 0.9)),
            "rss_growth_mib": resident_mib() - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--workdir", help="where to write the files (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        folder = pathlib.Path(args.workdir or temporary)
        folder.mkdir(parents=True, exist_ok=True)
        ids = youtube_like_ids(args.clips)
        logits = np.lib.format.open_memmap(folder / "logits.npy", mode="w+", dtype=np.float32,
                                           shape=(len(ids), NUM_CLASSES))
        for start in range(0, len(ids), 65_536):  # filled in slices: never the whole array in memory
            block = logits[start:start + 65_536]
            block[:] = np.random.default_rng(start).normal(0, 3, block.shape)
        start = time.perf_counter()
        mapped = teacher_lib.write_teacher_file(folder / "teacher.h5", ids, logits)
        write_s = time.perf_counter() - start
        chunked = folder / "chunked.h5"
        with h5py.File(mapped, "r") as src, h5py.File(chunked, "w") as dst:
            dst.create_dataset("clip_id", data=src["clip_id"][:])
            out = dst.create_dataset("logits", shape=src["logits"].shape, dtype=np.float16,
                                     chunks=(64, NUM_CLASSES), compression="gzip")
            for start in range(0, len(ids), 65_536):
                out[start:start + 65_536] = src["logits"][start:start + 65_536]
        rows = [("memory-mapped (written here)", time_lookups(teacher_lib.TeacherPredictions(mapped), ids,
                                                              args.batch_size, args.batches)),
                ("h5py rows (chunked gzip, no index)", time_lookups(teacher_lib.TeacherPredictions(chunked), ids,
                                                                    args.batch_size, args.batches))]
        size_gb = mapped.stat().st_size / 1e9
    print(f"{len(ids):,} clips × {NUM_CLASSES} float16 logits: {size_gb:.2f} GB, written in {write_s:.1f} s; "
          f"lookups of {args.batch_size} random ids")
    print(f"{'reader':38} {'open (s)':>9} {'median (ms)':>12} {'p90 (ms)':>9} {'RSS growth (MiB)':>17}")
    for name, r in rows:
        print(f"{name:38} {r['open_s']:9.2f} {r['median_ms']:12.2f} {r['p90_ms']:9.2f} {r['rss_growth_mib']:17.1f}")


if __name__ == "__main__":
    main()
