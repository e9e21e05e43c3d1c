"""Benchmarks: ours vs the PyTorch reference vs Audax, side by side in one process.

    python benchmarks/run.py                      # every audio model, fp32 + bf16, batch 64 and 8
    python benchmarks/run.py --quick              # convnext_tiny + cnn6, fp32, batch 2, 2 repeats (< 5 min on 2 CPU cores)
    python benchmarks/run.py --models convnext_tiny --dtypes bfloat16 --batch 64

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
- **onnxruntime** (float32): ONNX Runtime's CPU execution provider on the ONNX export
  (``convnext_audio_jax.export``, jax2onnx) of the same weights; parity against torch fp32 and against ours.
- **training step** clips/s, when ``benchmarks/train_step.py`` provides ``benchmark_train_step``
  (see ``train_step_rows``); skipped, with the reason recorded, otherwise.

Prints Markdown tables (with the paper's and Audax's published accuracy and speed, labelled so)
and writes ``benchmarks/results/<machine>.json`` plus a bar chart ``<machine>.png`` beside it
(``<machine>-quick.*`` for ``--quick``, so a smoke run never overwrites a measurement).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import json
import os
import pathlib
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

# JAX and torch share the GPU in this process: JAX must not grab 75 % of it up front (and its
# peak_bytes_in_use then means what this run used).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.common import RssPeak, machine_description, timed_runs  # noqa: E402
from convnext_audio_jax import xla  # noqa: E402
from convnext_audio_jax.frontend import log_mel_spectrogram  # noqa: E402
from convnext_audio_jax.models import (  # noqa: E402
    AudioConvNeXt,
    count_params,
    create_model,
    get_spec,
    init_variables,
    list_models,
)

SCHEMA_VERSION = 1
PARITY_CLIPS = 2
QUICK_MODELS = ("convnext_tiny", "cnn6")
# A smoke test of the machinery, not a benchmark: an audio ConvNeXt a few hundred times smaller.
TINY_CONVNEXT = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}
# Audax's AudioSet setting (its configs): 16 kHz, n_fft 1024, window 400, hop 160, 64 mels in 60–7800 Hz.
AUDAX_AUDIO = {"sample_rate": 16_000, "n_fft": 1024, "win_length": 400, "hop_length": 160, "n_mels": 64,
               "f_min": 60.0, "f_max": 7800.0}
AUDAX_HEAD_DROPOUT = 0.4

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


@dataclasses.dataclass(frozen=True)
class Case:
    """One registered model at one clip length, with field overrides (``--tiny``)."""

    model: str
    seconds: float
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.overrides)


# ----------------------------------------------------------------------------- memory


@contextlib.contextmanager
def peak_memory(torch_cuda: bool = False) -> Iterator[dict]:
    """Yields a dict that holds ``peak_memory_mb`` and ``memory_method`` after the block."""
    result: dict[str, Any] = {}
    if torch_cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()
        yield result
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["memory_method"] = "torch.cuda.max_memory_allocated"
    elif jax.default_backend() == "cpu":
        with RssPeak() as rss:
            yield result
        result["peak_memory_mb"] = rss.peak_delta_bytes / 2**20
        result["memory_method"] = "peak RSS increase during the timed runs (psutil, sampled every 10 ms)"
    else:
        yield result
        stats = jax.devices()[0].memory_stats() or {}
        result["peak_memory_mb"] = stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None
        result["memory_method"] = "device peak_bytes_in_use (process high-water mark)"


def error_summary(error: BaseException) -> str:
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


# ----------------------------------------------------------------------------- JAX (ours, Audax)


def measure_jax(forward: Callable, args: tuple, batch: int, repeats: int) -> tuple[dict, np.ndarray]:
    """Lowers, cost-analyses, compiles and times ``forward(*args)``; returns the row figures and its output.

    Ours and Audax are compiled alike, with the project's XLA options (``convnext_audio_jax.xla``), so the
    ratio between them measures the implementations, not the compiler settings."""
    lowered = xla.jit(forward).lower(*args)
    flops = (lowered.cost_analysis() or {}).get("flops")
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    with peak_memory() as memory:
        times = timed_runs(lambda: jax.block_until_ready(compiled(*args)), repeats)
    output = np.asarray(compiled(*args), np.float32)
    row = {
        "gflops_per_clip": None if flops is None else flops / batch / 1e9,
        "compile_s": compile_s,
        "times_s": times,
        "clips_per_s": batch / statistics.median(times),
        **memory,
        "xla_temp_mb": None if analysis is None else analysis.temp_size_in_bytes / 2**20,
    }
    return row, output


def jax_dtype(name: str):
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def ours_row(case: Case, dtype: str, variables: dict, waveform: np.ndarray, repeats: int) -> tuple[dict, np.ndarray]:
    model = create_model(case.model, dtype=jax_dtype(dtype), **case.config)
    row, probs = measure_jax(lambda v, x: model.apply(v, x)["probs"], (variables, jnp.asarray(waveform)), len(waveform), repeats)
    return {"implementation": "ours", "params": count_params(variables["params"]), **row}, probs


def audax_classifier(case: Case, dtype: str):
    """Audax's AudioSet classifier: its ConvNeXt-Tiny encoder (no head of its own), mean-pooled,
    then dropout and a dense layer (``audax.models.Classifier``), at the case's size."""
    from audax.models import Classifier, convnext_tiny

    encoder = functools.partial(convnext_tiny, **case.config) if case.config else convnext_tiny
    return Classifier(model_cls=encoder, num_classes=527, drop_rate=AUDAX_HEAD_DROPOUT, dtype=jax_dtype(dtype))


def audax_log_mel(waveform: jax.Array) -> jax.Array:
    """Audax's front end (its feature_helper, as its training code composes it): power STFT → mel → log."""
    from audax import feature_helper

    a = AUDAX_AUDIO
    spectrogram = feature_helper.spectrogram_helper(pad=0, n_fft=a["n_fft"], hop_length=a["hop_length"], win_length=a["win_length"])
    mel = feature_helper.melscale_helper(n_mels=a["n_mels"], n_fft=a["n_fft"], sample_rate=a["sample_rate"],
                                         f_min=a["f_min"], f_max=a["f_max"], precision=jax.lax.Precision.HIGHEST)
    return jnp.log(jnp.clip(mel(spectrogram(waveform)), 1e-8, 1e8))


def audax_rows(case: Case, dtype: str, waveform_32k: np.ndarray, repeats: int) -> list[dict]:
    """(a) Audax at its own input; (b) its model on our 1001 × 224 log-mel (the paper's input)."""
    classifier = audax_classifier(case, dtype)
    ours_frontend = create_model(case.model, **case.config).frontend
    batch = len(waveform_32k)
    waveform_16k = (0.1 * np.random.default_rng(1).standard_normal((batch, int(case.seconds * AUDAX_AUDIO["sample_rate"])))).astype(np.float32)
    inputs = {
        "audax-own-input": (waveform_16k, audax_log_mel, "16 kHz, 64-mel natural-log front end (audax.feature_helper)"),
        "audax-paper-input": (waveform_32k, functools.partial(log_mel_spectrogram, config=ours_frontend),
                              f"our {ours_frontend.n_mels}-mel dB log-mel (the paper's input)"),
    }
    rows = []
    for implementation, (waveform, front_end, input_note) in inputs.items():
        row: dict[str, Any] = {"implementation": implementation, "input": input_note}
        try:
            features = jax.eval_shape(front_end, jax.ShapeDtypeStruct(waveform.shape, jnp.float32))
            row["input_frames"] = list(features.shape[1:])
            variables = jax.jit(lambda key, s=features.shape: classifier.init({"params": key}, jnp.zeros((*s, 1)), train=False))(jax.random.key(0))

            def forward(v, x, front_end=front_end):
                return jax.nn.sigmoid(classifier.apply(v, front_end(x)[..., None], train=False))

            measured, _ = measure_jax(forward, (variables, jnp.asarray(waveform)), batch, repeats)
            row.update(params=count_params(variables["params"]), **measured)
        except Exception as error:  # noqa: BLE001 — a failing baseline is a result, not a crash
            row["error"] = error_summary(error)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- PyTorch reference


def torch_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_reference(case: Case):
    """The reference with randomized weights (every tensor exercised) and ours converted from it,
    or (None, reason) where there is no reference or torch is missing."""
    try:
        from convnext_audio_jax.convert.conversion import convert_state_dict
        from convnext_audio_jax.torch_reference import build_reference, randomize_
    except ImportError as error:
        return None, None, f"torch reference unavailable: {error}"
    try:
        reference = build_reference(case.model, **case.config)
    except ValueError as error:
        return None, None, str(error)
    randomize_(reference, seed=0)
    state_dict = {k: v.detach().numpy().copy() for k, v in reference.state_dict().items()}
    conversion = convert_state_dict(state_dict, case.model, model_config=case.config)
    return reference.to(torch_device()), conversion.variables, None


class CompileTimeout(Exception):
    pass


@contextlib.contextmanager
def time_box(seconds: int):
    """Raises CompileTimeout in the main thread after ``seconds`` (torch.compile cannot be cancelled otherwise)."""

    def expire(signum, frame):
        raise CompileTimeout(f"torch.compile took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def torch_rows(reference, dtype: str, waveform: np.ndarray, repeats: int, compile_timeout: int | None) -> tuple[list[dict], np.ndarray | None]:
    """Eager (and, with ``compile_timeout``, ``torch.compile``) rows, and the eager probabilities."""
    import torch

    device = torch_device()
    torch.set_num_threads(os.cpu_count() or 1)
    x = torch.from_numpy(waveform).to(device)
    params = sum(p.numel() for p in reference.parameters() if p.requires_grad)
    on_cuda = device.type == "cuda"

    def runner(module):
        def run():
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                probs = module(x)["clipwise_output"]
            if on_cuda:
                torch.cuda.synchronize()
            return probs

        return run

    modes: dict[str, Callable[[], Any]] = {"torch-eager": lambda: reference}
    if compile_timeout:
        modes["torch-compile"] = lambda: torch.compile(reference)
    rows, eager_probs = [], None
    for implementation, build in modes.items():
        row: dict[str, Any] = {"implementation": implementation, "params": params}
        try:
            run = runner(build())
            if implementation == "torch-compile":
                start = time.perf_counter()
                with time_box(compile_timeout):
                    run()
                row["compile_s"] = time.perf_counter() - start
            with peak_memory(torch_cuda=on_cuda) as memory:
                times = timed_runs(run, repeats)
            row.update(times_s=times, clips_per_s=len(waveform) / statistics.median(times), **memory)
            if implementation == "torch-eager":
                eager_probs = run().float().cpu().numpy()
        except Exception as error:  # noqa: BLE001 — torch.compile failing here is a finding, recorded
            row["error"] = error_summary(error)
        rows.append(row)
    if on_cuda:  # hand torch's cached blocks back before JAX's next model
        torch.cuda.empty_cache()
    return rows, eager_probs


# ----------------------------------------------------------------------------- ONNX Runtime


def onnxruntime_row(case: Case, variables: dict, waveform: np.ndarray, repeats: int) -> tuple[dict, np.ndarray | None]:
    """ONNX Runtime (CPU execution provider, float32) on the ONNX export (``convnext_audio_jax.export``) of the
    same weights; ``compile_s`` is the export plus the session's graph optimisation."""
    row: dict[str, Any] = {"implementation": "onnxruntime", "params": count_params(variables["params"])}
    try:
        import onnxruntime

        from convnext_audio_jax import export as export_lib

        start = time.perf_counter()
        proto = export_lib.export_onnx(create_model(case.model, **case.config), variables, samples=waveform.shape[1])
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 1
        session = onnxruntime.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        row["compile_s"] = time.perf_counter() - start

        def run():
            return session.run(["probs"], {export_lib.INPUT_NAME: waveform})[0]

        with peak_memory() as memory:
            times = timed_runs(run, repeats)
        row.update(times_s=times, clips_per_s=len(waveform) / statistics.median(times), **memory)
        return row, run()
    except Exception as error:  # noqa: BLE001 — a missing runtime or a failed export is a result
        row["error"] = error_summary(error)
        return row, None


# ----------------------------------------------------------------------------- training step


def train_step_rows(cases: list[Case], batches: list[int], dtypes: list[str], repeats: int) -> tuple[list[dict], str | None]:
    """Training-step rows from ``benchmarks.train_step.benchmark_train_step(model, batch=, dtype=,
    repeats=, overrides=)``, which returns row dicts (``implementation``, ``clips_per_s``, …), when
    that module exists; otherwise no rows and the reason."""
    try:
        from benchmarks.train_step import benchmark_train_step
    except ImportError as error:
        return [], f"training-step benchmark not available ({error})"
    rows = []
    for case in cases:
        for dtype in dtypes:
            for batch in batches:
                group = {"mode": "train", "model": case.model, "dtype": dtype, "batch": batch}
                try:
                    measured = benchmark_train_step(case.model, batch=batch, dtype=dtype, repeats=repeats, overrides=case.config)
                except Exception as error:  # noqa: BLE001 — keep the forward results of a long run
                    measured = [{"implementation": "ours", "error": error_summary(error)}]
                rows += [{**group, **row} for row in measured]
    return rows, None


# ----------------------------------------------------------------------------- the run


def benchmark(cases: list[Case], batches: list[int], dtypes: list[str], repeats: int, *, with_torch: bool,
              compile_timeout: int | None, with_audax: bool, with_train: bool, with_onnx: bool = True, log=print) -> dict:
    rows: list[dict] = []
    notes: dict[str, str] = {}
    parity: dict[str, dict] = {}
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
                if reference is not None:
                    torch_measured, torch_probs = torch_rows(reference, dtype, waveform, repeats, compile_timeout)
                    added += torch_measured
                    if dtype == "float32":
                        torch_fp32_probs = torch_probs
                if torch_fp32_probs is not None and ours_probs is not None:
                    diff = float(np.max(np.abs(ours_probs[:PARITY_CLIPS] - torch_fp32_probs[:PARITY_CLIPS])))
                    ours["max_abs_diff_vs_torch_fp32"] = diff
                    parity.setdefault(case.model, {})[f"{dtype}/batch{batch}"] = diff
                if with_onnx and dtype == "float32":
                    onnx_row, onnx_probs = onnxruntime_row(case, variables, waveform, repeats)
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
    if with_train:
        train_rows, reason = train_step_rows(cases, batches, dtypes, repeats)
        rows += train_rows
        if reason:
            notes["train_step"] = reason
    return {"rows": rows, "ratios": ratios(rows), "parity_max_abs_probs": parity, "notes": notes}


def ratios(rows: list[dict]) -> list[dict]:
    """clips/s of ours over each other implementation on the same model, mode, dtype and batch."""
    measured = [r for r in rows if r.get("clips_per_s")]
    result = []
    for ours in (r for r in measured if r["implementation"] == "ours"):
        key = (ours["mode"], ours["model"], ours["dtype"], ours["batch"])
        entry = {"mode": key[0], "model": key[1], "dtype": key[2], "batch": key[3]}
        for other in measured:
            if other is not ours and (other["mode"], other["model"], other["dtype"], other["batch"]) == key:
                entry[f"ours_over_{other['implementation'].replace('-', '_')}"] = ours["clips_per_s"] / other["clips_per_s"]
        if len(entry) > 4:
            result.append(entry)
    return result


# ----------------------------------------------------------------------------- output


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


TABLE_HEADER = ("| mode | model | implementation | dtype | batch | params | GFLOPs/clip | compile s | clips/s "
                "| peak mem MiB | XLA temp MiB | max abs Δ vs torch fp32 |\n" + "|---" * 4 + "|---:" * 8 + "|")


def format_row(row: dict) -> str:
    if "error" in row:
        figures = f"failed: {row['error']} |" + " |" * 7
    else:
        params = row.get("params")
        figures = " | ".join([
            "-" if params is None else f"{params:,}",
            _cell(row.get("gflops_per_clip"), ".2f"),
            _cell(row.get("compile_s"), ".1f"),
            _cell(row.get("clips_per_s"), ".2f"),
            _cell(row.get("peak_memory_mb"), ".0f"),
            _cell(row.get("xla_temp_mb"), ".0f"),
            _cell(row.get("max_abs_diff_vs_torch_fp32"), ".1e"),
        ]) + " |"
    return f"| {row['mode']} | {row['model']} | {row['implementation']} | {row['dtype']} | {row['batch']} | {figures}"


def format_report(result: dict) -> str:
    lines = [f"# {result['machine']['slug']}: {result['machine']['device_kind']} ({result['machine']['backend']}), "
             f"{result['machine']['cpu_count']} CPU threads, {result['machine']['cpu']}; {result['date']}", "", TABLE_HEADER]
    lines += [format_row(r) for r in result["rows"]]
    lines += ["", "| mode | model | dtype | batch | ratios (ours / other, clips/s) |", "|---|---|---|---:|---|"]
    for entry in result["ratios"]:
        pairs = ", ".join(f"{k.removeprefix('ours_over_')}: {v:.2f}×" for k, v in entry.items() if k.startswith("ours_over_"))
        lines.append(f"| {entry['mode']} | {entry['model']} | {entry['dtype']} | {entry['batch']} | {pairs} |")
    lines += ["", "| model | mAP | AUC | d' | V100 clips/s | source |", "|---|---:|---:|---:|---:|---|"]
    for name, pub in result["published"].items():
        lines.append(f"| {name} | {_cell(pub.get('mAP'), '.4g')} | {_cell(pub.get('AUC'), '.4g')} | {_cell(pub.get('d_prime'), '.4g')} "
                     f"| {_cell(pub.get('v100_clips_per_s'), '.1f')} | {pub['source']} (not measured here) |")
    if result["notes"]:
        lines += [""] + [f"- {key}: {note}" for key, note in result["notes"].items()]
    return "\n".join(lines)


def plot(result: dict, path: pathlib.Path) -> None:
    """Forward clips/s per model, one bar per implementation, one panel per (dtype, batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    forward = [r for r in result["rows"] if r["mode"] == "forward" and r.get("clips_per_s")]
    panels = sorted({(r["dtype"], r["batch"]) for r in forward})
    fig, axes = plt.subplots(len(panels) or 1, 1, figsize=(10, 3.2 * max(len(panels), 1)), squeeze=False)
    for ax, (dtype, batch) in zip(axes[:, 0], panels):
        panel = [r for r in forward if (r["dtype"], r["batch"]) == (dtype, batch)]
        models = list(dict.fromkeys(r["model"] for r in panel))
        implementations = list(dict.fromkeys(r["implementation"] for r in panel))
        width = 0.8 / len(implementations)
        for i, implementation in enumerate(implementations):
            values = [next((r["clips_per_s"] for r in panel if r["model"] == m and r["implementation"] == implementation), 0.0)
                      for m in models]
            ax.bar(np.arange(len(models)) + i * width, values, width, label=implementation)
        ax.set_xticks(np.arange(len(models)) + 0.4 - width / 2, models, rotation=20, ha="right")
        ax.set_ylabel("clips/s")
        ax.set_title(f"{result['machine']['slug']}: forward, {dtype}, batch {batch}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime row (float32 only)")
    parser.add_argument("--no-train", action="store_true", help="skip the training-step benchmark")
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
    cases = [Case(n, args.seconds, tuple(TINY_CONVNEXT.items()) if args.tiny and get_spec(n).module is AudioConvNeXt else ())
             for n in names]

    machine = machine_description()
    print(f"# {machine['slug']}: models {names}, batches {batches}, dtypes {dtypes}, {repeats} repeats", flush=True)
    print(TABLE_HEADER, flush=True)
    start = time.perf_counter()
    measured = benchmark(cases, batches, dtypes, repeats, with_torch=not args.no_torch,
                         compile_timeout=None if args.quick or args.no_compile or args.no_torch else args.compile_timeout,
                         with_audax=not args.no_audax, with_train=not (args.quick or args.no_train),
                         with_onnx=not args.no_onnx,
                         log=functools.partial(print, flush=True))
    result = {
        "schema_version": SCHEMA_VERSION,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "settings": {"quick": args.quick, "models": names, "batches": batches, "dtypes": dtypes, "repeats": repeats,
                     "clip_seconds": args.seconds, "tiny": args.tiny, "parity_clips": PARITY_CLIPS},
        **measured,
        "published": PUBLISHED,
        "wall_s": time.perf_counter() - start,
    }
    print("\n" + format_report(result))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = machine["slug"] + ("-quick" if args.quick else "") + ("-tiny" if args.tiny else "")
    json_path = args.out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, json_path.with_suffix(".png"))
    print(f"\nwrote {json_path} and {json_path.with_suffix('.png').name} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
