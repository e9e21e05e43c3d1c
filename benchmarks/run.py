"""Benchmarks: ours vs the PyTorch reference vs Audax, side by side in one process.

    python benchmarks/run.py                      # every audio model, fp32 + bf16, batch 64 and 8
    python benchmarks/run.py --quick              # convnext_tiny + cnn6, fp32, batch 2, 2 repeats (< 5 min on 2 CPU cores)
    python benchmarks/run.py --models convnext_tiny --dtypes bfloat16 --batch 64
    python benchmarks/run.py --dtypes float32 bfloat16 --torch-dtypes float32   # no torch autocast rows

Per model, dtype and batch, waveform → probabilities:
- **ours** (every registered audio model): parameters, GFLOPs per clip (XLA cost analysis of the
  lowered function), compile time, clips/s (median of ``--repeats`` timed runs after one warm-up),
  peak memory (CPU: peak RSS increase during the timed runs, sampled; GPU: the device's
  ``peak_bytes_in_use``, a process high-water mark) and XLA's own memory analysis (temporaries).
- **torch eager** / **torch compile**: the PyTorch reference (the authors' audio ConvNeXt from timm
  blocks + torchlibrosa; PANNs' CNN14 / CNN6) with the *same* random weights as ours (converted by
  ``convert.conversion.convert_state_dict``), so the run also measures parity: max |Δ| of the
  probabilities against torch fp32 on the first clips. bf16 runs torch under ``torch.autocast``.
  ``torch.compile``'s first call is time-boxed (``--compile-timeout``); a failure is recorded.
- **Audax** (``pip install --no-deps audax==0.0.3``), ConvNeXt-Tiny only: (a) at its own input —
  16 kHz, its log-mel front end from ``audax.feature_helper`` (n_fft 1024, window 400, hop 160,
  64 mels, 60–7800 Hz, natural log), 1004 × 64 frames for 10 s, its mean-pool + dropout + dense
  head (``audax.models.Classifier``) — and (b) its ConvNeXt-Tiny body and head on our 1001 × 224
  log-mel, the paper's input: the same FLOPs as ours, so the ratio compares implementations.
- **onnx-ort / onnx-openvino** (float32): our ONNX export (``convnext_audio_jax.export``) of the same weights
  in ONNX Runtime's CPU execution provider and in OpenVINO's CPU plugin; **torch-onnx-ort / torch-onnx-openvino**:
  the PyTorch reference's own ``torch.onnx.export`` in the same two runtimes — the routes a user deploying on
  CPU would pick (``benchmarks/deployment.py``). Parity of each against torch fp32 and against ours; the ratios
  ``onnx_<runtime>_over_torch_onnx_<runtime>`` compare the two exports.
- **training step** clips/s, when ``benchmarks/train_step.py`` provides ``benchmark_train_step``
  (see ``train_step_rows``); skipped, with the reason recorded, otherwise.

Prints Markdown tables (with the paper's and Audax's published accuracy and speed, labelled so)
and writes ``benchmarks/results/<machine>.json`` plus a bar chart ``<machine>.png`` beside it
(``<machine>-quick.*`` for ``--quick``, so a smoke run never overwrites a measurement). The JSON is
rewritten after every model and batch (``"complete": false`` until the run ends), so a run stopped
part-way keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import pathlib
import sys
import time

# JAX and torch share the GPU in this process: JAX must not grab 75 % of it up front (and its
# peak_bytes_in_use then means what this run used).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_description  # noqa: E402
from benchmarks.deployment import RUNTIMES, deployment_rows  # noqa: E402
from benchmarks.implementations import (  # noqa: E402
    Case,
    audax_rows,
    error_summary,
    ours_row,
    torch_reference,
    torch_rows,
    train_step_rows,
)
from benchmarks.report import TABLE_HEADER, format_report, format_row, plot  # noqa: E402
from convnext_audio_jax.models import (  # noqa: E402
    AudioConvNeXt,
    create_model,
    get_spec,
    init_variables,
    list_models,
)
from convnext_audio_jax.runtime import files  # noqa: E402

SCHEMA_VERSION = 1
PARITY_CLIPS = 2
QUICK_MODELS = ("convnext_tiny", "cnn6")
# A smoke test of the machinery, not a benchmark: an audio ConvNeXt a few hundred times smaller.
TINY_CONVNEXT = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}

# Figures we cannot measure here (no AudioSet, no V100): the paper's Table 1 and Audax's release.
PUBLISHED = {
    "convnext_tiny": {"source": "paper", "params_m": 28.2, "mAP": 0.471, "AUC": 0.973, "d_prime": 3.071,
                      "v100_clips_per_s": 153.6, "gflops_macs": 21.1},
    "convnext_small": {"source": "paper", "params_m": 49.9, "mAP": 0.458},
    "cnn14": {"source": "paper (PANN)", "params_m": 80.8, "mAP": 0.431, "AUC": 0.973, "d_prime": 2.732,
              "v100_clips_per_s": 378.2},
    "cnn14sep": {"source": "paper", "params_m": 30.5, "mAP": 0.436, "AUC": 0.973, "d_prime": 2.984},
    "cnn6": {"source": "paper (PANN / reproduced)", "params_m": 4.8, "mAP": 0.343, "AUC": 0.965, "d_prime": 2.568},
    "cnn6next": {"source": "paper", "params_m": 3.3, "mAP": 0.427, "AUC": 0.972, "d_prime": 2.957},
    "passt_s": {"source": "paper", "params_m": 87.0, "mAP": 0.471, "v100_clips_per_s": 88.7},
    "audax_convnext_tiny": {"source": "published (Audax)", "params_m": 28.2, "mAP": 0.4016, "AUC": 0.9733,
                            "d_prime": 2.7317, "tpu_v3_8_training_clips_per_s": 4450},
}


# ----------------------------------------------------------------------------- the run


def benchmark(cases: list[Case], batches: list[int], dtypes: list[str], repeats: int, *, with_torch: bool,
              train_dtypes: list[str] | None = None, torch_dtypes: list[str] | None = None,
              compile_timeout: int | None, with_audax: bool, with_train: bool, with_onnx: bool = True, log=print,
              on_progress=None) -> dict:
    """The measured part of the result; ``on_progress(partial)`` gets it after every (model, batch) and every
    model's training rows, so a long run that is stopped keeps what it measured. Torch's forward rows are run for
    ``torch_dtypes`` (default: ``dtypes``)."""
    rows: list[dict] = []
    notes: dict[str, str] = {}
    parity: dict[str, dict] = {}
    torch_dtypes = dtypes if torch_dtypes is None else torch_dtypes
    for dtype in sorted(set(dtypes) - set(torch_dtypes)):
        notes[f"torch/{dtype}"] = "forward rows skipped (--torch-dtypes)"

    def measured() -> dict:
        return {"rows": rows, "ratios": ratios(rows), "parity_max_abs_probs": parity, "notes": notes}

    def progress() -> None:
        if on_progress is not None:
            on_progress(measured())
    if with_audax:
        try:
            import audax.models  # noqa: F401
        except ImportError as error:
            with_audax = False
            notes["audax"] = f"skipped: {error} (pip install --no-deps audax==0.0.3)"
    for case in cases:
        reference, variables, reason = torch_reference(case) if with_torch else (None, None, "torch skipped (--no-torch)")
        if reason:
            notes[f"torch/{case.model}"] = reason
        if variables is None:
            variables = init_variables(create_model(case.model, **case.config), jax.random.key(0))
        samples = int(round(case.seconds * create_model(case.model, **case.config).frontend.sample_rate))
        for batch in batches:
            waveform = (0.1 * np.random.default_rng(0).standard_normal((batch, samples))).astype(np.float32)
            torch_fp32_probs = None
            for dtype in dtypes:
                group = {"mode": "forward", "model": case.model, "dtype": dtype, "batch": batch, "clip_seconds": case.seconds}
                try:
                    ours, ours_probs = ours_row(case, dtype, variables, waveform, repeats)
                except Exception as error:  # noqa: BLE001 — e.g. out of memory at batch 64: recorded, the run goes on
                    ours, ours_probs = {"implementation": "ours", "error": error_summary(error)}, None
                added = [ours]
                if reference is not None and dtype in torch_dtypes:
                    torch_measured, torch_probs = torch_rows(reference, dtype, waveform, repeats, compile_timeout)
                    added += torch_measured
                    if dtype == "float32":
                        torch_fp32_probs = torch_probs
                if torch_fp32_probs is not None and ours_probs is not None:
                    diff = float(np.max(np.abs(ours_probs[:PARITY_CLIPS] - torch_fp32_probs[:PARITY_CLIPS])))
                    ours["max_abs_diff_vs_torch_fp32"] = diff
                    parity.setdefault(case.model, {})[f"{dtype}/batch{batch}"] = diff
                if with_onnx and dtype == "float32":
                    for onnx_row, onnx_probs in deployment_rows(case, reference, variables, waveform, repeats):
                        if onnx_probs is not None and ours_probs is not None:
                            onnx_row["max_abs_diff_vs_ours"] = float(np.max(np.abs(onnx_probs - ours_probs)))
                        if onnx_probs is not None and torch_fp32_probs is not None:
                            onnx_row["max_abs_diff_vs_torch_fp32"] = float(np.max(np.abs(
                                onnx_probs[:PARITY_CLIPS] - torch_fp32_probs[:PARITY_CLIPS])))
                        added.append(onnx_row)
                if with_audax and case.model == "convnext_tiny":
                    added += audax_rows(case, dtype, waveform, repeats)
                for row in added:
                    rows.append({**group, **row})
                    log(format_row(rows[-1]))
            progress()
    if with_train:
        for case in cases:
            train_rows, reason = train_step_rows([case], batches, train_dtypes or dtypes, repeats)
            rows += train_rows
            if reason:
                notes["train_step"] = reason
                break
            progress()
    return measured()


def ratios(rows: list[dict]) -> list[dict]:
    """clips/s of ours over each other implementation on the same model, mode, dtype and batch; and of our ONNX
    export over torch's in each runtime (``onnx_ort_over_torch_onnx_ort``, …)."""
    measured = [r for r in rows if r.get("clips_per_s")]
    result = []
    for ours in (r for r in measured if r["implementation"] == "ours"):
        key = (ours["mode"], ours["model"], ours["dtype"], ours["batch"])
        entry = {"mode": key[0], "model": key[1], "dtype": key[2], "batch": key[3]}
        same = {other["implementation"]: other for other in measured
                if (other["mode"], other["model"], other["dtype"], other["batch"]) == key}
        for name, other in same.items():
            if other is not ours:
                entry[f"ours_over_{name.replace('-', '_')}"] = ours["clips_per_s"] / other["clips_per_s"]
        for runtime in RUNTIMES:
            if f"onnx-{runtime}" in same and f"torch-onnx-{runtime}" in same:
                entry[f"onnx_{runtime}_over_torch_onnx_{runtime}"] = (same[f"onnx-{runtime}"]["clips_per_s"]
                                                                      / same[f"torch-onnx-{runtime}"]["clips_per_s"])
        if len(entry) > 4:
            result.append(entry)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"{' + '.join(QUICK_MODELS)}, float32, batch 2, 2 repeats, no torch.compile, no training step")
    parser.add_argument("--models", nargs="+", help="registered audio models (default: all; --quick: " + ", ".join(QUICK_MODELS) + ")")
    parser.add_argument("--batch", nargs="+", type=int, help="batch sizes (default: 64 8; --quick: 2)")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], help="default: float32 bfloat16; --quick: float32")
    parser.add_argument("--repeats", type=int, help="timed runs after one warm-up (default 5; --quick 2)")
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length (default 10)")
    parser.add_argument("--tiny", action="store_true", help="audio ConvNeXt at depths 1-1-1-1, dims 8-16-32-64: a smoke test, not a benchmark")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--compile-timeout", type=int, default=900, help="seconds allowed for torch.compile's first call")
    parser.add_argument("--no-audax", action="store_true")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX rows (ours and torch's export in ONNX Runtime "
                        "and OpenVINO; float32 only)")
    parser.add_argument("--no-train", action="store_true", help="skip the training-step benchmark")
    parser.add_argument("--train-dtypes", nargs="+", choices=["float32", "bfloat16"],
                        help="dtypes of the training-step rows (default: --dtypes)")
    parser.add_argument("--torch-dtypes", nargs="+", choices=["float32", "bfloat16"],
                        help="dtypes of torch's forward rows (default: --dtypes; e.g. float32 alone on a CPU without "
                             "native bf16, where torch's autocast forward takes minutes per batch)")
    parser.add_argument("--out-dir", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)

    audio_models = [n for n in list_models() if get_spec(n).takes_waveform]
    names = args.models or (list(QUICK_MODELS) if args.quick else audio_models)
    unknown = sorted(set(names) - set(audio_models))
    if unknown:
        parser.error(f"not registered audio models: {unknown}; choose from {audio_models}")
    batches = args.batch or ([2] if args.quick else [64, 8])
    # float32 first: the torch fp32 output it leaves is what the bf16 rows' parity is measured against.
    dtypes = sorted(args.dtypes or (["float32"] if args.quick else ["float32", "bfloat16"]), key=lambda d: d != "float32")
    repeats = args.repeats or (2 if args.quick else 5)
    if args.torch_dtypes and not set(args.torch_dtypes) <= set(dtypes):
        parser.error(f"--torch-dtypes {args.torch_dtypes} must be among the run's dtypes {dtypes}")
    cases = [Case(n, args.seconds, tuple(TINY_CONVNEXT.items()) if args.tiny and get_spec(n).module is AudioConvNeXt else ())
             for n in names]

    machine = machine_description()
    print(f"# {machine['slug']}: models {names}, batches {batches}, dtypes {dtypes}, {repeats} repeats", flush=True)
    print(TABLE_HEADER, flush=True)
    start = time.perf_counter()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = machine["slug"] + ("-quick" if args.quick else "") + ("-tiny" if args.tiny else "")
    json_path = args.out_dir / f"{stem}.json"

    def result_of(measured: dict, complete: bool) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "date": date,
            "complete": complete,  # false in the copies written while the run is going
            "machine": machine,
            "settings": {"quick": args.quick, "models": names, "batches": batches, "dtypes": dtypes,
                         "train_dtypes": args.train_dtypes or dtypes, "torch_dtypes": args.torch_dtypes or dtypes,
                         "repeats": repeats,
                         "clip_seconds": args.seconds, "tiny": args.tiny, "parity_clips": PARITY_CLIPS},
            **measured,
            "published": PUBLISHED,
            "wall_s": time.perf_counter() - start,
        }

    def write(result: dict) -> None:  # durable: a stopped run (or a power cut) leaves the previous copy whole
        files.write_text(json_path, json.dumps(result, indent=1) + "\n")

    measured = benchmark(cases, batches, dtypes, repeats, with_torch=not args.no_torch, train_dtypes=args.train_dtypes,
                         torch_dtypes=args.torch_dtypes,
                         compile_timeout=None if args.quick or args.no_compile or args.no_torch else args.compile_timeout,
                         with_audax=not args.no_audax, with_train=not (args.quick or args.no_train),
                         with_onnx=not args.no_onnx,
                         log=functools.partial(print, flush=True),
                         on_progress=lambda partial: write(result_of(partial, complete=False)))
    result = result_of(measured, complete=True)
    print("\n" + format_report(result))
    write(result)
    plot(result, json_path.with_suffix(".png"))
    print(f"\nwrote {json_path} and {json_path.with_suffix('.png').name} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
