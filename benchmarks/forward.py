"""Forward throughput, waveform → probabilities, ours vs the PyTorch reference, in one process.

    python benchmarks/forward.py [--batch 8] [--models convnext_tiny cnn14] [--repeats 5] [--dtype float32]

For each registered model: clips/s on a batch of 10 s clips (median of ``--repeats`` timed runs
after a warm-up), compile time, and, where a PyTorch reference exists (the paper's model from
timm's ConvNeXt blocks + torchlibrosa, PANNs' CNN14/CNN6), torch eager clips/s on the same batch
and the ratio ours / torch. Prints a Markdown table. Needs the ``[test]`` extra for torch.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.common import median_seconds  # noqa: E402
from convnext_audio_jax.models import (  # noqa: E402
    count_params,
    create_model,
    get_spec,
    init_variables,
    list_models,
)
from convnext_audio_jax.runtime import xla  # noqa: E402


def bench_ours(name: str, waveform: np.ndarray, repeats: int, dtype) -> dict:
    model = create_model(name, dtype=dtype)
    variables = init_variables(model, jax.random.key(0))
    forward = xla.jit(lambda v, x: model.apply(v, x)["probs"])
    x = jnp.asarray(waveform)
    start = time.perf_counter()
    compiled = forward.lower(variables, x).compile()
    compile_s = time.perf_counter() - start
    seconds = median_seconds(lambda: compiled(variables, x).block_until_ready(), repeats)
    return {"params": count_params(variables["params"]), "compile_s": compile_s, "clips_per_s": len(waveform) / seconds}


def bench_torch(name: str, waveform: np.ndarray, repeats: int) -> float | None:
    try:
        import torch

        from convnext_audio_jax.convert.torch_reference import build_reference
    except ImportError:
        return None
    try:
        model = build_reference(name)
    except ValueError:  # no reference for this model
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    x = torch.from_numpy(waveform)

    def run():
        with torch.inference_mode():
            model(x)

    return len(waveform) / median_seconds(run, repeats)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None, help="registered model names (default: every audio model)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    args = parser.parse_args(argv)

    names = args.models or [n for n in list_models() if get_spec(n).takes_waveform]
    waveform = (0.1 * np.random.default_rng(0).standard_normal((args.batch, 320_000))).astype(np.float32)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else None
    print(f"# forward, waveform → probs, batch {args.batch} × 10 s, {args.dtype}; {jax.devices()[0].device_kind} "
          f"({jax.default_backend()}), {os.cpu_count()} CPU threads, {platform.processor() or platform.machine()}")
    print("| model | params | compile s | ours clips/s | torch eager clips/s | ours / torch |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in names:
        ours = bench_ours(name, waveform, args.repeats, dtype)
        torch_rate = None if args.no_torch else bench_torch(name, waveform, args.repeats)
        ratio = f"{ours['clips_per_s'] / torch_rate:.2f}×" if torch_rate else "-"
        torch_cell = f"{torch_rate:.2f}" if torch_rate else "-"
        print(f"| {name} | {ours['params']:,} | {ours['compile_s']:.1f} | {ours['clips_per_s']:.2f} | {torch_cell} | {ratio} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
