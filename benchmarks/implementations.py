"""The implementations benchmarks/run.py puts side by side, each measured into a row dict: ours and Audax
(JAX, compiled with the project's XLA options), the PyTorch reference (eager, ``torch.compile``), and the
training step (``benchmarks/train_step.py``)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import RssPeak, time_limit, timed_runs
from convnext_audio_jax.models import count_params, create_model, with_xla_ops
from convnext_audio_jax.models.frontend import log_mel_spectrogram
from convnext_audio_jax.runtime import xla

# Audax's AudioSet setting (its configs): 16 kHz, n_fft 1024, window 400, hop 160, 64 mels in 60–7800 Hz.
AUDAX_AUDIO = {"sample_rate": 16_000, "n_fft": 1024, "win_length": 400, "hop_length": 160, "n_mels": 64,
               "f_min": 60.0, "f_max": 7800.0}
AUDAX_HEAD_DROPOUT = 0.4


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


def measure_jax(forward: Callable, args: tuple, batch: int, repeats: int,
                counted: Callable | None = None) -> tuple[dict, np.ndarray]:
    """Lowers, cost-analyses, compiles and times ``forward(*args)``; returns the row figures and its output.
    FLOPs are counted on ``counted`` (the same function in XLA's own ops) where given.

    Ours and Audax are compiled alike, with the project's XLA options (``convnext_audio_jax.runtime.xla``), so the
    ratio between them measures the implementations, not the compiler settings."""
    lowered = xla.jit(forward).lower(*args)
    flops = ((xla.jit(counted).lower(*args) if counted else lowered).cost_analysis() or {}).get("flops")
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
    counted = with_xla_ops(model)
    row, probs = measure_jax(lambda v, x: model.apply(v, x)["probs"], (variables, jnp.asarray(waveform)), len(waveform),
                             repeats, counted=lambda v, x: counted.apply(v, x)["probs"])
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
        from convnext_audio_jax.convert.torch_reference import (
            build_reference,
            randomize_,
        )
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
                with time_limit(compile_timeout, f"torch.compile took longer than {compile_timeout} s"):
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
