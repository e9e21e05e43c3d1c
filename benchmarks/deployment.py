"""The CPU deployment routes benchmarks/run.py compares us with: an ONNX file — ours (``convnext_audio_jax.export``)
or the PyTorch reference's own ``torch.onnx.export`` of the same weights — run in ONNX Runtime or OpenVINO, fp32.
Also the per-operator profile of each (``python benchmarks/deployment.py --profile``), which is how the gap
between the two exports was found.

    python benchmarks/deployment.py --models convnext_tiny cnn14 cnn6 --batch 8          # clips/s table
    python benchmarks/deployment.py --models cnn14 --batch 8 --profile                   # where the time goes
"""

from __future__ import annotations

import argparse
import collections
import copy
import io
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_description, timed_runs  # noqa: E402
from benchmarks.implementations import Case, error_summary, peak_memory, torch_reference  # noqa: E402
from convnext_audio_jax.models import count_params, create_model  # noqa: E402

RUNTIMES = ("ort", "openvino")
TORCH_ONNX_OPSET = 17  # torch.onnx.export's TorchScript exporter default


def ours_onnx(case: Case, variables: dict, samples: int) -> bytes:
    from convnext_audio_jax import export as export_lib

    return export_lib.export_onnx(create_model(case.model, **case.config), variables, samples=samples).SerializeToString()


def torch_onnx(reference, samples: int) -> bytes:
    """``torch.onnx.export`` of the reference's probabilities, batch dynamic, as a PyTorch user would export it."""
    import torch

    class Probabilities(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, waveform):
            return self.model(waveform)["clipwise_output"]

    buffer = io.BytesIO()
    torch.onnx.export(Probabilities(copy.deepcopy(reference)).eval().cpu(), (torch.zeros(1, samples),), buffer, input_names=["waveform"],
                      output_names=["probs"], dynamic_axes={"waveform": {0: "batch"}, "probs": {0: "batch"}},
                      opset_version=TORCH_ONNX_OPSET, dynamo=False)
    return buffer.getvalue()


def ort_runner(data: bytes, waveform: np.ndarray, profile_dir: str | None = None) -> tuple[Callable[[], np.ndarray], Any]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    if profile_dir:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(profile_dir, "ort")
    session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return (lambda: session.run(["probs"], {"waveform": waveform})[0]), session


def openvino_runner(data: bytes, waveform: np.ndarray, profile: bool = False) -> tuple[Callable[[], np.ndarray], Any]:
    """OpenVINO's CPU plugin, fp32 (no bf16 down-conversion on CPUs that have it), shapes made static as a
    deployment with a fixed batch would."""
    import openvino as ov

    core = ov.Core()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        pathlib.Path(path).write_bytes(data)
        model = core.read_model(path)
        model.reshape({"waveform": list(waveform.shape)})
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERF_COUNT": profile}
        compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    output = compiled.output("probs")
    return (lambda: request.infer({"waveform": waveform})[output].copy()), request


RUNNERS = {"ort": ort_runner, "openvino": openvino_runner}


def deployment_rows(case: Case, reference, variables: dict, waveform: np.ndarray, repeats: int,
                    runtimes=RUNTIMES) -> list[tuple[dict, np.ndarray | None]]:
    """Rows ``onnx-<runtime>`` (our export) and ``torch-onnx-<runtime>`` (torch's export of the reference, when
    there is one), each with its probabilities; ``compile_s`` is the export plus the runtime's model compilation.

    Per runtime, the two exports' timed runs alternate (one call each per round, the order reversed every other
    round), so a change of load on a shared machine falls on both alike and their ratio holds (timing all four
    rows round-robin did not: one runtime's worker threads slow the other's next call); ``peak_memory_mb`` is
    measured over each row's untimed warm-up call."""
    exporters = {"onnx": lambda: ours_onnx(case, variables, waveform.shape[1])}
    if reference is not None:
        exporters["torch-onnx"] = lambda: torch_onnx(reference, waveform.shape[1])
    rows, runs = [], {}
    for exporter, export in exporters.items():
        try:
            start = time.perf_counter()
            data, export_s = export(), time.perf_counter() - start
        except Exception as error:  # noqa: BLE001 — a failed export is a result
            rows += [{"implementation": f"{exporter}-{rt}", "error": error_summary(error)} for rt in runtimes]
            continue
        for runtime in runtimes:
            row: dict[str, Any] = {"implementation": f"{exporter}-{runtime}", "params": count_params(variables["params"]),
                                   "onnx_mb": len(data) / 2**20}
            rows.append(row)
            try:
                start = time.perf_counter()
                run, _ = RUNNERS[runtime](data, waveform)
                row["compile_s"] = export_s + time.perf_counter() - start
                with peak_memory() as memory:
                    run()
                row.update(memory, memory_method=str(memory.get("memory_method", "")).replace("the timed runs", "the warm-up call"))
                runs[row["implementation"]] = run
            except Exception as error:  # noqa: BLE001 — a missing runtime is a result
                row["error"] = error_summary(error)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for runtime in runtimes:
        pair = [name for name in runs if name.endswith(f"-{runtime}")]
        for round_ in range(repeats):
            for name in pair if round_ % 2 == 0 else pair[::-1]:
                times[name] += timed_runs(runs[name], 1, warmup=0)
    result = []
    for row in rows:
        name = row["implementation"]
        if name in runs:
            row.update(times_s=times[name], clips_per_s=len(waveform) / statistics.median(times[name]))
        result.append((row, runs[name]() if name in runs else None))
    return result


# ----------------------------------------------------------------------------- per-operator profile


def ort_profile(data: bytes, waveform: np.ndarray, repeats: int) -> dict[str, float]:
    """Milliseconds per run by ONNX Runtime node type (its profiler's ``Node`` events)."""
    with tempfile.TemporaryDirectory() as folder:
        run, session = ort_runner(data, waveform, profile_dir=folder)
        for _ in range(repeats + 1):
            run()
        events = json.loads(pathlib.Path(session.end_profiling()).read_text())
    by_op: dict[str, float] = collections.defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"] / 1000.0 / (repeats + 1)
    return dict(by_op)


def openvino_profile(data: bytes, waveform: np.ndarray, repeats: int) -> dict[str, float]:
    """Milliseconds per run by OpenVINO executed layer type (its per-layer performance counters)."""
    run, request = openvino_runner(data, waveform, profile=True)
    run()
    by_op: dict[str, float] = collections.defaultdict(float)
    for _ in range(repeats):
        run()
        for info in request.profiling_info:
            by_op[info.exec_type.split("_")[0] + ":" + info.node_type] += info.real_time.total_seconds() * 1000.0 / repeats
    return dict(by_op)


def print_profile(name: str, profiles: dict[str, dict[str, float]], top: int = 12) -> None:
    for label, by_op in profiles.items():
        total = sum(by_op.values())
        print(f"\n{name}, {label}: {total:.0f} ms per batch in operators")
        print("| operator | ms | share |\n|---|---|---|")
        for op, ms in sorted(by_op.items(), key=lambda item: -item[1])[:top]:
            print(f"| {op} | {ms:.1f} | {ms / total:.0%} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["convnext_tiny", "cnn14", "cnn6"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    parser.add_argument("--profile", action="store_true", help="per-operator times of both exports in each runtime")
    args = parser.parse_args(argv)
    machine = machine_description()
    print(f"# {machine['cpu']} ({machine['cpu_flags']}), load {machine['load_average']}: batch {args.batch} × {args.seconds:g} s, fp32, {args.repeats} repeats")
    print("| model | implementation | clips/s | compile s | max |Δ| vs torch eager |\n|---|---|---|---|---|")
    for name in args.models:
        case = Case(name, args.seconds)
        reference, variables, reason = torch_reference(case)
        if reference is None:
            print(f"| {name} | – | {reason} | | |")
            continue
        import torch

        samples = int(round(args.seconds * create_model(name).frontend.sample_rate))
        waveform = (0.1 * np.random.default_rng(0).standard_normal((args.batch, samples))).astype(np.float32)
        with torch.inference_mode():
            expected = reference(torch.from_numpy(waveform))["clipwise_output"].numpy()
        if args.profile:
            exports = {"ours": ours_onnx(case, variables, samples), "torch.onnx.export": torch_onnx(reference, samples)}
            print_profile(name, {f"{label} in {rt}": (ort_profile if rt == "ort" else openvino_profile)(data, waveform, args.repeats)
                                 for label, data in exports.items() for rt in args.runtimes})
            continue
        for row, probs in deployment_rows(case, reference, variables, waveform, args.repeats, args.runtimes):
            diff = f"{np.abs(probs - expected).max():.1e}" if probs is not None else row.get("error", "")
            print(f"| {name} | {row['implementation']} | {row.get('clips_per_s', 0):.2f} | {row.get('compile_s', 0):.1f} | {diff} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
