"""Everything the GPU table of docs/benchmarks.md needs, in one command (budget: < 8 min on one H100/H200).

    python benchmarks/gpu_suite.py                  # ConvNeXt-Tiny + CNN14, bf16 + fp32, batch 64
    python benchmarks/gpu_suite.py --quick          # tiny models, 1 s clips, batch 2: a smoke run (any backend)

Rows, all in one process with the same random weights on both sides (``benchmarks/run.py``'s machinery):
- communication: the collectives of the train step, the eval step and the sharded forward per step, from their
  compiled HLO, beside the gradient's bytes (on two or more devices);
- forward, waveform → probabilities: ours and torch eager (``--torch-compile``: also torch.compile, whose
  compile alone may take minutes per model), fp32 and bf16 (torch: autocast), batch 64, with parity
  against torch fp32;
- training step (all augmentations, AdamW; ``benchmarks/train_step.py``): ours in fp32 and bf16, and the
  PyTorch reference's step for ConvNeXt-Tiny in fp32, on the GPU where torch has CUDA (no ONNX rows: ONNX
  Runtime's CPU provider says nothing about the GPU);
- scaling of ours' ConvNeXt-Tiny bf16 training step over 1, 2, 4, … devices at a fixed batch per device
  (weak scaling: clips/s and efficiency against the 1-device row).

- input: the loader's clips/s from packed int16 HDF5 (synthetic clips in a temporary folder), with reader threads
  and with worker processes, beside the ConvNeXt-Tiny train step's clips/s: whether one host feeds its devices.

Each part is skipped, with the reason recorded, once ``--budget-s`` (default 450 s) is spent, and a part that runs
past ``--part-limit-s`` (default 180 s) is stopped there (SIGALRM, where Python regains control: a compile in
progress ends first) and recorded as timed out, so a slow machine still writes its JSON. Writes ``benchmarks/results/<machine>-gpu-suite.json`` (``-quick`` for
``--quick``) and prints the Markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from benchmarks import (  # noqa: E402
    implementations,
    report,
    run,  # noqa: E402  (sets XLA_PYTHON_CLIENT_PREALLOCATE before JAX starts a GPU)
)
from benchmarks import common  # noqa: E402
from benchmarks.common import TimeLimitExceeded as PartTimeout  # noqa: E402
from benchmarks.common import machine_description  # noqa: E402

MODELS = ("convnext_tiny", "cnn14")
QUICK_OVERRIDES = {"convnext_tiny": tuple(run.TINY_CONVNEXT.items()), "cnn14": (("channels", (8, 8, 16, 16, 16, 16)),)}
SCALING_MODEL = "convnext_tiny"
PARTS = ("communication", "forward", "train", "scaling", "input")


def time_limit(seconds: float | None):
    """A part's limit: raises PartTimeout (common.TimeLimitExceeded) in the main thread after ``seconds``."""
    return common.time_limit(seconds, f"stopped after the {seconds or 0:.0f} s part limit")


def input_rates(clips: int, batch: int, steps: int, workers: list[int], log=print) -> list[dict]:
    """Loader clips/s over packed int16 HDF5 for each worker count (0: reader threads in this process)."""
    from benchmarks import input_pipeline
    from convnext_audio_jax.data import pipeline, sources

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        source = sources.PackedHdf5Source.from_files([input_pipeline.write_hdf5(pathlib.Path(folder), clips)])
        for count in workers:
            config = pipeline.LoaderConfig(batch_size=batch, sampling="shuffle", seed=0, waveform_dtype="int16",
                                           worker_count=count)
            rows.append({"format": "hdf5 int16", "workers": count, "batch": batch,
                         **input_pipeline.measure(source, config, steps, warmup=2)})
            log(f"# input: {rows[-1]}")
    return rows


def device_counts(available: int) -> list[int]:
    """1, 2, 4, … up to ``available``, and ``available`` itself."""
    counts = [1]
    while counts[-1] * 2 <= available:
        counts.append(counts[-1] * 2)
    return counts if counts[-1] == available else counts + [available]


def suite(cases: list[implementations.Case], batch: int, dtypes: list[str], repeats: int, *, compile_timeout: int | None,
          budget_s: float, max_devices: int | None = None, parts: tuple[str, ...] = PARTS, log=print,
          part_limit_s: float | None = None, input_clips: int = 512, input_workers: list[int] | None = None) -> dict:
    start = time.perf_counter()
    skipped: dict[str, str] = {}

    def over_budget(part: str) -> bool:
        if time.perf_counter() - start > budget_s:
            skipped[part] = f"skipped: the {budget_s:.0f} s budget was spent"
            log(f"# {part}: {skipped[part]}")
            return True
        return False

    @contextlib.contextmanager
    def limited(part: str):
        try:
            with time_limit(part_limit_s):
                yield
        except PartTimeout as timeout:
            skipped[part] = str(timeout)
            log(f"# {part}: {timeout}")

    rows: list[dict] = []
    notes: dict[str, str] = {}
    parity: dict[str, dict] = {}
    communication: list[dict] = []
    for case in cases if "communication" in parts else []:
        # What the train step sends between the devices per step, from its compiled HLO (benchmarks/collectives.py).
        if over_budget(f"communication/{case.model}") or jax.device_count() < 2:
            continue
        from benchmarks.collectives import programs
        from convnext_audio_jax.models import create_model
        from convnext_audio_jax.runtime import collectives
        from convnext_audio_jax.runtime.sharding import data_mesh

        texts = {}
        with limited(f"communication/{case.model}"):
            texts, grad_bytes = programs(create_model(case.model, **dict(case.config)), batch, 1, data_mesh(),
                                         case.seconds)
        for program, text in texts.items():
            for op, row in collectives.summary(collectives.collectives(text)).items():
                communication.append({"model": case.model, "program": program, "op": op, **row,
                                      "grad_bytes": grad_bytes})
                log(f"# communication: {communication[-1]}")
    for case in cases if "forward" in parts else []:
        if over_budget(f"forward/{case.model}"):
            continue
        # No ONNX rows: ONNX Runtime's CPU provider says nothing about the GPU.
        measured = {"rows": [], "notes": {}, "parity_max_abs_probs": {}}
        with limited(f"forward/{case.model}"):
            measured = run.benchmark([case], [batch], dtypes, repeats, with_torch=True, compile_timeout=compile_timeout,
                                     with_audax=False, with_train=False, with_onnx=False, log=log)
        rows += measured["rows"]
        notes.update(measured["notes"])
        parity.update(measured["parity_max_abs_probs"])

    from benchmarks.train_step import benchmark_train_step

    for case in cases if "train" in parts else []:
        for dtype in dtypes:
            if over_budget(f"train/{case.model}/{dtype}"):
                continue
            group = {"mode": "train", "model": case.model, "dtype": dtype, "batch": batch, "devices": 1}
            measured = []
            try:
                with limited(f"train/{case.model}/{dtype}"):
                    measured = benchmark_train_step(case.model, batch=batch, dtype=dtype, repeats=repeats,
                                                    overrides=case.config, seconds=case.seconds)
            except Exception as error:  # noqa: BLE001 — e.g. out of memory: recorded, the suite goes on
                measured = [{"implementation": "ours", "error": implementations.error_summary(error)}]
            for row in measured:
                rows.append({**group, **row})
                log(report.format_row(rows[-1]))

    scaling: list[dict] = []
    case = next((c for c in cases if c.model == SCALING_MODEL), None) if "scaling" in parts else None
    dtype = "bfloat16" if "bfloat16" in dtypes else dtypes[0]
    for count in device_counts(min(jax.device_count(), max_devices or jax.device_count())) if case else []:
        if over_budget(f"scaling/{count}"):
            break
        row: dict = {"model": case.model, "dtype": dtype, "devices": count, "batch_per_device": batch,
                     "batch": batch * count}
        try:
            with time_limit(part_limit_s):
                measured = benchmark_train_step(case.model, batch=batch * count, dtype=dtype, repeats=repeats,
                                                overrides=case.config, seconds=case.seconds, devices=count,
                                                with_torch=False)
            row.update({k: v for k, v in measured[0].items() if k != "implementation"})
            row["clips_per_s_per_device"] = row["clips_per_s"] / count
            if scaling and "clips_per_s" in scaling[0]:
                row["efficiency"] = row["clips_per_s_per_device"] / scaling[0]["clips_per_s"]
        except (Exception, PartTimeout) as error:  # noqa: BLE001
            row["error"] = implementations.error_summary(error)
        scaling.append(row)
        log(f"# scaling: {row}")

    feeding: list[dict] = []
    if "input" in parts and not over_budget("input"):
        with limited("input"):
            # Reader threads, then worker processes up to one per core (the host's cores feed every device).
            counts = input_workers if input_workers is not None else sorted({0, 1, max(1, (os.cpu_count() or 2) // 2),
                                                                             os.cpu_count() or 1})
            feeding = input_rates(input_clips, batch * max(1, jax.local_device_count()), 10, counts, log=log)
    step_rates = [r["clips_per_s"] for r in rows if r.get("mode") == "train" and r.get("implementation") == "ours"
                  and "clips_per_s" in r]
    step_rates += [r["clips_per_s"] * jax.local_device_count() / r["devices"] for r in scaling if "clips_per_s" in r]
    for row in feeding:  # > 1: this host reads clips faster than its devices train on them
        row["over_train_step"] = row["clips_per_s"] / max(step_rates) if step_rates else None
    return {"rows": rows, "ratios": run.ratios(rows), "parity_max_abs_probs": parity, "scaling": scaling,
            "communication": communication, "input": feeding, "notes": {**notes, **skipped}}


def format_tables(result: dict) -> str:
    lines = [f"# {result['machine']['slug']}: {result['machine']['device_kind']} × {result['machine']['device_count']}; "
             f"{result['date']}; {result['wall_s']:.0f} s", "", report.TABLE_HEADER]
    lines += [report.format_row(r) for r in result["rows"]]
    lines += ["", "| mode | model | dtype | batch | ratios (ours / other, clips/s) |", "|---|---|---|---:|---|"]
    for entry in result["ratios"]:
        pairs = ", ".join(f"{k.removeprefix('ours_over_')}: {v:.2f}×" for k, v in entry.items() if k.startswith("ours_over_"))
        lines.append(f"| {entry['mode']} | {entry['model']} | {entry['dtype']} | {entry['batch']} | {pairs} |")
    lines += ["", "| devices | batch | train clips/s | per device | efficiency |", "|---:|---:|---:|---:|---:|"]
    for row in result["scaling"]:
        if "error" in row:
            lines.append(f"| {row['devices']} | {row['batch']} | failed: {row['error']} | | |")
        else:
            lines.append(f"| {row['devices']} | {row['batch']} | {row['clips_per_s']:.1f} | {row['clips_per_s_per_device']:.1f} "
                         f"| {row.get('efficiency', 1.0):.2f} |")
    lines += ["", "| model | program | op | count | MiB per step | / gradient |", "|---|---|---|---:|---:|---:|"]
    for row in result.get("communication", []):
        lines.append(f"| {row['model']} | {row['program']} | {row['op']} | {row['count']} | {row['bytes'] / 2**20:.1f} "
                     f"| {row['bytes'] / row['grad_bytes']:.3f} |")
    lines += ["", "| input | workers | batch | clips/s | / fastest train step | loader CPU ms/clip | worker CPU ms/clip |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for row in result.get("input", []):
        ratio, worker_ms = row.get("over_train_step"), row.get("worker_cpu_ms")
        lines.append(f"| {row['format']} | {row['workers'] or '0 (threads)'} | {row['batch']} | {row['clips_per_s']:,.0f} "
                     f"| {'–' if ratio is None else f'{ratio:.2f}'} | {row['loader_cpu_ms']:.3f} "
                     f"| {'–' if not row['workers'] or worker_ms is None else f'{worker_ms:.3f}'} |")
    # The docs' GPU table: ours and torch in bf16 at the suite's batch, beside the paper's V100 figure.
    lines += ["", "| model | ours (bf16) | torch eager / compile (bf16) | ours train (bf16) | V100 (paper) |", "|---|---:|---:|---:|---:|"]

    def rate(mode, model, implementation, dtype="bfloat16"):
        hit = [r for r in result["rows"] if (r["mode"], r["model"], r["implementation"], r["dtype"]) == (mode, model, implementation, dtype)]
        return report._cell(hit[0].get("clips_per_s") if hit else None, ".1f")

    for model in result["settings"]["models"]:
        v100 = run.PUBLISHED.get(model, {}).get("v100_clips_per_s")
        lines.append(f"| {model} | {rate('forward', model, 'ours')} | {rate('forward', model, 'torch-eager')} / "
                     f"{rate('forward', model, 'torch-compile')} | {rate('train', model, 'ours')} | {report._cell(v100, '.1f')} |")
    if result["notes"]:
        lines += [""] + [f"- {key}: {note}" for key, note in result["notes"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models, 1 s clips, batch 2, 1 repeat: tests the machinery")
    parser.add_argument("--batch", type=int, help="batch (per device in the scaling rows; default 64, --quick 2)")
    parser.add_argument("--dtypes", nargs="+", choices=["bfloat16", "float32"], default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, help="timed runs after one warm-up (default 5, --quick 1)")
    parser.add_argument("--torch-compile", action="store_true", help="also time torch.compile (its compile is time-boxed)")
    parser.add_argument("--compile-timeout", type=int, default=120)
    parser.add_argument("--budget-s", type=float, default=450.0, help="skip the remaining parts after this many seconds")
    parser.add_argument("--part-limit-s", type=float, default=180.0, help="stop any one part after this many seconds")
    parser.add_argument("--input-clips", type=int, help="synthetic clips for the input part (default 512, --quick 32)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to run (default: all)")
    parser.add_argument("--max-devices", type=int, help="largest mesh in the scaling rows (default: every device)")
    parser.add_argument("--out-dir", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)

    batch = args.batch or (2 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 5)
    dtypes = sorted(args.dtypes, key=lambda d: d != "float32")  # torch fp32 first: bf16 parity is against it
    seconds = 1.0 if args.quick else 10.0
    cases = [implementations.Case(m, seconds, QUICK_OVERRIDES[m] if args.quick else ()) for m in MODELS]
    # Restarts of the suite load its compiled programs instead of compiling them again.
    from convnext_audio_jax.runtime import files, xla

    xla.enable_compilation_cache("auto", files.cache_root())
    machine = machine_description()
    print(f"# {machine['slug']}: gpu suite, models {list(MODELS)}, batch {batch}, dtypes {dtypes}, {repeats} repeats", flush=True)
    print(report.TABLE_HEADER, flush=True)
    start = time.perf_counter()
    measured = suite(cases, batch, dtypes, repeats, compile_timeout=args.compile_timeout if args.torch_compile else None,
                     budget_s=args.budget_s, max_devices=args.max_devices, parts=tuple(args.parts),
                     log=lambda line: print(line, flush=True), part_limit_s=args.part_limit_s,
                     input_clips=args.input_clips or (32 if args.quick else 512),
                     input_workers=[0, 1] if args.quick else None)
    result = {
        "schema_version": run.SCHEMA_VERSION,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "settings": {"suite": "gpu", "quick": args.quick, "models": list(MODELS), "batches": [batch], "dtypes": dtypes,
                     "repeats": repeats, "clip_seconds": seconds, "torch_compile": args.torch_compile,
                     "max_devices": args.max_devices, "parts": args.parts, "part_limit_s": args.part_limit_s},
        **measured,
        "published": run.PUBLISHED,
        "wall_s": time.perf_counter() - start,
    }
    print("\n" + format_tables(result))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"{machine['slug']}-gpu-suite{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {path} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
