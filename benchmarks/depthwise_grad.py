"""Milliseconds of the depthwise convolution's kernel gradient at ConvNeXt-Tiny's four stage shapes (batch 8 of
10 s clips, 7×7 kernel): the compiled kernel (``depthwise_impl="native"``), the XLA form (``"shift"``) and torch's
weight gradient of a grouped Conv2d, run one after another in rounds (median of the rounds), plus each one's
largest difference from torch.

    python benchmarks/depthwise_grad.py [--batch 8] [--rounds 5]

"per step" weights the stages by their blocks (3, 3, 9, 3): what one ConvNeXt-Tiny training step spends there.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import jax
    import numpy as np
    import torch

    from benchmarks.common import cpu_model_name, cpu_speed_flags
    from convnext_audio_jax import native, xla
    from convnext_audio_jax.models.layers import _depthwise_kernel_grad

    native.load()
    variants = {
        "native": xla.jit(lambda x, dy: native.depthwise_kernel_grad(x, dy, (7, 7), PADDING)),
        "xla": xla.jit(lambda x, dy: _depthwise_kernel_grad(x, dy, (7, 7), PADDING)),
    }

    def torch_grad(x, dy):
        return torch.nn.grad.conv2d_weight(x, (x.shape[1], 1, 7, 7), dy, padding=3, groups=x.shape[1])

    rng = np.random.default_rng(0)
    table = []
    for height, width, channels, blocks in STAGES:
        x = rng.standard_normal((args.batch, height, width, channels)).astype(np.float32)
        dy = rng.standard_normal((args.batch, height, width, channels)).astype(np.float32)
        xt, dyt = (torch.from_numpy(a).permute(0, 3, 1, 2).contiguous() for a in (x, dy))
        runs = {name: (lambda f=f: f(x, dy).block_until_ready()) for name, f in variants.items()}
        runs["torch"] = lambda: torch_grad(xt, dyt)
        reference = torch_grad(xt.double(), dyt.double())[:, 0].permute(1, 2, 0).numpy()
        errors = {name: float(np.abs(np.asarray(f(x, dy)) - reference).max() / np.abs(reference).max())
                  for name, f in variants.items()}
        errors["torch"] = float(np.abs(torch_grad(xt, dyt)[:, 0].permute(1, 2, 0).numpy() - reference).max()
                                / np.abs(reference).max())
        times = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        table.append(((height, width, channels, blocks), {n: 1e3 * statistics.median(t) for n, t in times.items()}, errors))

    print(f"{cpu_model_name()} ({os.cpu_count()} cores; {' '.join(cpu_speed_flags())}), torch {torch.__version__} "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"depthwise 7×7 kernel gradient, batch {args.batch}, median of {args.rounds} rounds (ms); "
          "error: max |Δ| / max |dK| vs torch in float64")
    names = list(table[0][1])
    print(f"{'stage shape (H×W×C)':<22} " + " ".join(f"{n:>9}" for n in names)
          + " " + " ".join(f"{'err ' + n:>12}" for n in names) + f" {'xla/native':>11} {'torch/native':>13}")
    for (height, width, channels, _), ms, errors in table:
        print(f"{f'{height}×{width}×{channels}':<22} " + " ".join(f"{ms[n]:9.1f}" for n in names)
              + " " + " ".join(f"{errors[n]:12.1e}" for n in names)
              + f" {ms['xla'] / ms['native']:10.1f}× {ms['torch'] / ms['native']:12.1f}×")
    per_step = {n: sum(ms[n] * shape[3] for shape, ms, _ in table) for n in names}
    print(f"{'per step (3/3/9/3)':<22} " + " ".join(f"{per_step[n]:9.0f}" for n in names)
          + " " * (13 * len(names)) + f" {per_step['xla'] / per_step['native']:10.1f}× "
          f"{per_step['torch'] / per_step['native']:12.1f}×")


if __name__ == "__main__":
    main()
