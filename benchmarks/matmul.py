"""GFLOP/s of ConvNeXt-Tiny's pointwise (Dense) products in bfloat16 at its four stage shapes (batch 8 of 10 s
clips): the AMX tile kernel (``matmul_impl="native"``, needs a CPU with AMX-BF16), XLA's dot as the models compile
it (``matmul_impl="xla"``), XLA's dot with YNNPACK's dot fusions on, and torch's bfloat16 ``F.linear``; each with
the bias, rounded to bfloat16; run one after another in rounds (median), plus each one's largest difference from
float64 relative to the largest value.

    python benchmarks/matmul.py [--batch 8] [--rounds 5]

"per forward" weights the stages by their blocks (3, 3, 9, 3), both products of a block (C → 4C and 4C → C).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repository: the package

from benchmarks.depthwise import STAGES, timed  # noqa: E402

YNN_DOT = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torch.nn.functional as F

    from benchmarks.common import cpu_model_name, cpu_speed_flags
    from convnext_audio_jax import native, xla
    from convnext_audio_jax.models.dense import matmul_xla

    if not native.amx_available():
        raise SystemExit("this CPU has no AMX-BF16 (flags " + ", ".join(native.AMX_CPU_FLAGS) + "): nothing to compare")
    products = {
        "native": xla.jit(native.bf16_matmul),
        "xla": xla.jit(matmul_xla),
        "xla + ynnpack dot": jax.jit(matmul_xla, compiler_options=YNN_DOT),
    }
    print(f"# {cpu_model_name()} ({', '.join(cpu_speed_flags())}), batch {args.batch}, bfloat16, GFLOP/s "
          f"(median of {args.rounds} rounds)")
    names = [*products, "torch"]
    print("| product (rows × K → N) | " + " | ".join(names) + " | max rel. error native / xla / torch |")
    print("|---|" + "---:|" * (len(names) + 1))
    rng = np.random.default_rng(0)
    totals = dict.fromkeys(names, 0.0)
    flops_total = 0.0
    for height, width, channels, blocks in STAGES:
        rows = args.batch * height * width
        for k, n in ((channels, 4 * channels), (4 * channels, channels)):
            x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
            w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.bfloat16)
            b = jnp.asarray(rng.standard_normal(n), jnp.bfloat16)
            tx, tw, tb = (torch.from_numpy(np.asarray(a, np.float32)).bfloat16() for a in (x, w.T, b))
            runs = {name: (lambda f=f: f(x, w, b).block_until_ready()) for name, f in products.items()}
            runs["torch"] = lambda: F.linear(tx, tw, tb)
            ms = timed(runs, args.rounds)
            flops = 2.0 * rows * k * n
            exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
            scale = np.abs(exact).max()
            errors = [np.abs(np.asarray(out, np.float64) - exact).max() / scale for out in (
                products["native"](x, w, b).astype(jnp.float32), products["xla"](x, w, b).astype(jnp.float32),
                F.linear(tx, tw, tb).float().numpy())]
            print(f"| {rows} × {k} → {n} | " + " | ".join(f"{flops / ms[name] / 1e6:.0f}" for name in names)
                  + " | " + " / ".join(f"{e:.1e}" for e in errors) + " |", flush=True)
            for name in names:
                totals[name] += blocks * ms[name]
            flops_total += blocks * flops
    print("| per forward (3/3/9/3 blocks), ms | " + " | ".join(f"{totals[name]:.0f}" for name in names) + " | |")
    print("| per forward, GFLOP/s | " + " | ".join(f"{flops_total / totals[name] / 1e6:.0f}" for name in names) + " | |")


if __name__ == "__main__":
    main()
