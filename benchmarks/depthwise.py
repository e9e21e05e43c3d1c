"""Milliseconds of the depthwise 7×7 convolution and its kernel gradient at ConvNeXt-Tiny's four stage shapes
(batch 8 of 10 s clips): the compiled kernels (``depthwise_impl="native"``), the same sums in XLA ops
(``"shift"``) and torch (``F.conv2d`` with ``groups = C``, and its kernel gradient by ``torch.autograd.grad`` of
that output, as a training step's backward computes it), run one after another in rounds (median of the rounds),
plus each one's largest difference from torch in float64.

    python benchmarks/depthwise.py [--batch 8] [--rounds 5]

The input gradient is the forward of the output gradient with the flipped kernel: the same cost as the forward.
"per step" weights the stages by their blocks (3, 3, 9, 3): what one ConvNeXt-Tiny step spends there.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repository: the package

# (height, width, channels, blocks) of ConvNeXt-Tiny's stages for a 1001 × 224 log-mel input.
STAGES = ((252, 56, 96, 3), (126, 28, 192, 3), (63, 14, 384, 9), (31, 7, 768, 3))
PADDING = ((3, 3), (3, 3))


def timed(runs: dict, rounds: int) -> dict[str, float]:
    """Median milliseconds of each run, the runs alternating round by round (after one warm-up call each)."""
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import jax
    import numpy as np
    import torch
    import torch.nn.functional as F

    from benchmarks.common import cpu_model_name, cpu_speed_flags
    from convnext_audio_jax import native
    from convnext_audio_jax.models.layers import (
        _depthwise_kernel_grad,
        _depthwise_shift_fwd,
    )
    from convnext_audio_jax.runtime import xla

    native.load()
    forward = {
        "native": xla.jit(lambda x, k: native.depthwise_conv(x, k, PADDING)),
        "xla": xla.jit(lambda x, k: _depthwise_shift_fwd(x, k, PADDING, None)[0]),
    }
    kernel_grad = {
        "native": xla.jit(lambda x, dy: native.depthwise_kernel_grad(x, dy, (7, 7), PADDING)),
        "xla": xla.jit(lambda x, dy: _depthwise_kernel_grad(x, dy, (7, 7), PADDING)),
    }

    def torch_forward(x, k):
        return F.conv2d(x, k, padding=3, groups=x.shape[1])

    def torch_kernel_grad(x, dy):
        """dK by autograd; the timed part is the backward alone (the graph is kept)."""
        weight = torch.zeros((x.shape[1], 1, 7, 7), dtype=x.dtype, requires_grad=True)
        out = torch_forward(x, weight)
        return lambda: torch.autograd.grad(out, weight, dy, retain_graph=True)[0]

    def relative_error(ours, reference):
        return float(np.abs(np.asarray(ours, np.float64) - reference).max() / np.abs(reference).max())

    rng = np.random.default_rng(0)
    tables = {"forward": [], "kernel gradient": []}
    for height, width, channels, blocks in STAGES:
        x = rng.standard_normal((args.batch, height, width, channels)).astype(np.float32)
        dy = rng.standard_normal((args.batch, height, width, channels)).astype(np.float32)
        kernel = rng.standard_normal((7, 7, channels)).astype(np.float32)
        xt, dyt = (torch.from_numpy(a).permute(0, 3, 1, 2).contiguous() for a in (x, dy))
        kt = torch.from_numpy(kernel).permute(2, 0, 1)[:, None].contiguous()
        # On the device before timing: a numpy argument would be copied in on every call.
        x, dy, kernel = (jax.device_put(a) for a in (x, dy, kernel))
        shape = (height, width, channels, blocks)

        reference = torch_forward(xt.double(), kt.double()).permute(0, 2, 3, 1).numpy()
        runs = {name: (lambda f=f: f(x, kernel).block_until_ready()) for name, f in forward.items()}
        runs["torch"] = lambda: torch_forward(xt, kt)
        errors = {name: relative_error(f(x, kernel), reference) for name, f in forward.items()}
        errors["torch"] = relative_error(torch_forward(xt, kt).permute(0, 2, 3, 1).numpy(), reference)
        tables["forward"].append((shape, timed(runs, args.rounds), errors))

        reference = torch_kernel_grad(xt.double(), dyt.double())()[:, 0].permute(1, 2, 0).numpy()
        runs = {name: (lambda f=f: f(x, dy).block_until_ready()) for name, f in kernel_grad.items()}
        runs["torch"] = torch_kernel_grad(xt, dyt)
        errors = {name: relative_error(f(x, dy), reference) for name, f in kernel_grad.items()}
        errors["torch"] = relative_error(runs["torch"]()[:, 0].permute(1, 2, 0).numpy(), reference)
        tables["kernel gradient"].append((shape, timed(runs, args.rounds), errors))

    print(f"{cpu_model_name()} ({os.cpu_count()} cores; {' '.join(cpu_speed_flags())}), torch {torch.__version__} "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    names = ["native", "xla", "torch"]
    for title, table in tables.items():
        print(f"\ndepthwise 7×7 {title}, batch {args.batch}, median of {args.rounds} rounds (ms); "
              "err: max |Δ| / max |value| vs torch in float64")
        print(f"{'stage (H×W×C)':<20} " + " ".join(f"{n:>8}" for n in names)
              + " " + " ".join(f"{'err ' + n:>11}" for n in names) + f" {'xla/native':>11} {'torch/native':>13}")
        for (height, width, channels, _), ms, errors in table:
            print(f"{f'{height}×{width}×{channels}':<20} " + " ".join(f"{ms[n]:8.1f}" for n in names)
                  + " " + " ".join(f"{errors[n]:11.1e}" for n in names)
                  + f" {ms['xla'] / ms['native']:10.1f}× {ms['torch'] / ms['native']:12.1f}×")
        per_step = {n: sum(ms[n] * shape[3] for shape, ms, _ in table) for n in names}
        print(f"{'per step (3/3/9/3)':<20} " + " ".join(f"{per_step[n]:8.0f}" for n in names) + " " * (12 * len(names))
              + f" {per_step['xla'] / per_step['native']:10.1f}× {per_step['torch'] / per_step['native']:12.1f}×")


if __name__ == "__main__":
    main()
