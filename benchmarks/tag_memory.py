"""Tagging throughput and peak memory against file length: the streamed reader keeps memory flat.

    python benchmarks/tag_memory.py [--minutes 1 10 60 120] [--rate 48000] [--channels 2] [--hop 5]
                                    [--model convnext_tiny] [--tiny] [--frames] [--batch-size 8] [--workdir DIR]

For each length a WAV of quiet noise (``--rate`` Hz, ``--channels``, 16-bit) is written to ``--workdir``, then
tagged in a fresh process the way ``convnext-audio tag --format jsonl --output`` does it (streamed read,
resampling, windows in batches, per-file record with the timeline spooled on disk with ``--frames``), after a
warm-up on a 10 s file (compilation). Per length: windows, seconds, times real time, windows/s, peak RSS of
the process and its growth over the RSS after the warm-up. Random weights (``--tiny``: a 4-stage ConvNeXt with
dims 8-64, for a check of the memory figures without the model's cost). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import soundfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

_CHILD = r"""
import json, resource, sys, time
import jax, numpy as np, psutil
sys.path.insert(0, sys.argv[1])
from benchmarks.common import RssPeak
from convnext_audio_jax.inference import tag_output
from convnext_audio_jax.inference import tagging
from convnext_audio_jax.models import create_model, init_variables

options = json.loads(sys.argv[2])
overrides = dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)) if options["tiny"] else {}
model = create_model(options["model"], **overrides)
variables = init_variables(model, jax.random.key(0))
tagger = tagging.Tagger(model, variables, options["batch_size"], options["hop"], frames=options["frames"])
names = [str(i) for i in range(model.num_classes)]

def tag(path, output):
    sink, spool, windows = tag_output.RecordSink(output, "jsonl"), None, 0
    for event in tagger.stream([path]):
        if isinstance(event, tagging.FileStarted) and options["frames"]:
            spool = tag_output.FileSpool(None, tagger.frames)
        elif isinstance(event, tagging.WindowScores):
            windows += 1
            if spool is not None:
                spool.add(event)
        elif isinstance(event, tagging.FileScored):
            sink.write(tag_output.record_chunks("jsonl", event, spool, names, 10, 0.25, options["frames"]))
        elif isinstance(event, tagging.TagError):
            raise SystemExit(event.line())
    sink.close()
    return windows

tag(options["warmup"], options["output"])
start_rss = psutil.Process().memory_info().rss
with RssPeak() as peak:
    start = time.perf_counter()
    windows = tag(options["path"], options["output"])
    seconds = time.perf_counter() - start
print(json.dumps({"windows": windows, "seconds": seconds, "start_rss": start_rss,
                  "peak_growth": peak.peak_delta_bytes,
                  "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def write_noise(path: pathlib.Path, minutes: float, rate: int, channels: int) -> None:
    rng = np.random.default_rng(0)
    with soundfile.SoundFile(path, "w", rate, channels, "PCM_16") as file:
        left = int(round(minutes * 60 * rate))
        while left:
            frames = min(left, 60 * rate)
            file.write((1e-2 * rng.standard_normal((frames, channels))).astype(np.float32))
            left -= frames


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 10, 60, 120])
    parser.add_argument("--rate", type=int, default=48_000)
    parser.add_argument("--channels", type=int, default=2)
    parser.add_argument("--hop", type=float, default=5.0)
    parser.add_argument("--model", default="convnext_tiny")
    parser.add_argument("--tiny", action="store_true", help="a tiny random ConvNeXt (memory figures only)")
    parser.add_argument("--frames", action="store_true", help="frame scores and the spooled timeline")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workdir", help="folder for the generated files (default: a temporary folder)")
    args = parser.parse_args(argv)
    from benchmarks.common import cpu_model_name

    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        workdir = pathlib.Path(workdir)
        warmup = workdir / "warmup.wav"
        write_noise(warmup, 10 / 60, args.rate, args.channels)
        rows = []
        for minutes in args.minutes:
            path = workdir / f"{minutes:g}min.wav"
            write_noise(path, minutes, args.rate, args.channels)
            options = {"model": args.model, "tiny": args.tiny, "frames": args.frames, "hop": args.hop,
                       "batch_size": args.batch_size, "path": str(path), "warmup": str(warmup),
                       "output": str(workdir / "tags.jsonl")}
            child = subprocess.run([sys.executable, "-c", _CHILD, str(pathlib.Path(__file__).resolve().parents[1]),
                                    json.dumps(options)], capture_output=True, text=True, check=False)
            if child.returncode:
                print(child.stderr[-3000:], file=sys.stderr)
                return 1
            result = json.loads(child.stdout.strip().splitlines()[-1])
            path.unlink()
            rows.append((minutes, result))
    print(f"Tagging {args.rate} Hz {args.channels}-channel 16-bit WAV, hop {args.hop:g} s, "
          f"{'tiny ' if args.tiny else ''}{args.model}{', --frames' if args.frames else ''}, batch {args.batch_size}; "
          f"{cpu_model_name()}\n")
    print("| file | windows | seconds | × real time | windows/s | peak RSS (MiB) | growth after warm-up (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for minutes, r in rows:
        print(f"| {minutes:g} min | {r['windows']} | {r['seconds']:.1f} | {minutes * 60 / r['seconds']:.1f} | "
              f"{r['windows'] / r['seconds']:.1f} | {r['max_rss'] / 2**20:.0f} | {r['peak_growth'] / 2**20:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
