"""GFLOP/s of ConvNeXt-Tiny's pointwise (Dense) products at its four stage shapes (batch 8 of 10 s clips), as the
model runs them (C → 4C with the exact GELU, 4C → C without), in float32 and in bfloat16: the compiled kernels
(float32 on any CPU with a C++ compiler; bfloat16 on each unit that runs here: 'tiles' on a CPU with AMX-BF16,
'dots' on one with AVX512-BF16), XLA's dot as the models compile it (``matmul_impl="xla"``), in bfloat16 also
XLA's dot with YNNPACK's dot fusions on, and torch's ``F.linear`` (+ ``F.gelu``); run one after another in rounds
(median), plus each one's largest difference from float64 relative to the largest value.

    python benchmarks/matmul.py [--batch 8] [--rounds 5] [--dtypes float32 bfloat16]

"per forward" weights the stages by their blocks (3, 3, 9, 3), both products of a block.
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
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"), default=["float32", "bfloat16"])
    args = parser.parse_args()

    from benchmarks.common import cpu_model_name, cpu_speed_flags
    from convnext_audio_jax import native

    print(f"# {cpu_model_name()} ({', '.join(cpu_speed_flags())}), batch {args.batch}")
    for dtype in args.dtypes:
        units = [unit for unit, ready in (("tiles", native.amx_available), ("dots", native.bf16_dot_available))
                 if ready()] if dtype == "bfloat16" else [None]
        if not units:
            print(f"\nbfloat16: this CPU has neither AMX-BF16 ({', '.join(native.AMX_CPU_FLAGS)}) nor "
                  f"{native.BF16_DOT_CPU_FLAG}: no native row")
        table(dtype, args.batch, args.rounds, units)


def table(dtype_name: str, batch: int, rounds: int, units: list) -> None:
    """One table: the compiled kernel (in bfloat16 one column per unit of ``units`` that runs here), XLA's dot,
    torch."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torch.nn.functional as F

    from convnext_audio_jax import native
    from convnext_audio_jax.models.dense import matmul_xla
    from convnext_audio_jax.runtime import xla

    dtype = jnp.dtype(dtype_name)

    def compiled(unit):
        if unit is None:
            return lambda x, w, b, activation: native.f32_matmul(x, w, b, activation == "gelu")
        return lambda x, w, b, activation: native.bf16_matmul(x, w, b, activation == "gelu", bf16_unit=unit)

    products = {("native" if unit is None else f"native {unit}"): xla.jit(compiled(unit), static_argnums=3)
                for unit in units}
    products["xla"] = xla.jit(matmul_xla, static_argnums=3)
    if dtype == jnp.bfloat16:
        products["xla + ynnpack dot"] = jax.jit(matmul_xla, static_argnums=3, compiler_options=YNN_DOT)
    torch_dtype = torch.bfloat16 if dtype == jnp.bfloat16 else torch.float32

    def torch_product(x, w, b, activation):
        y = F.linear(x, w, b)
        return F.gelu(y) if activation == "gelu" else y

    print(f"\n{dtype_name}, GFLOP/s (median of {rounds} rounds)")
    names = [*products, "torch"]
    checked = [name for name in names if name != "xla + ynnpack dot"]
    print("| product (rows × K → N) | " + " | ".join(names) + " | max rel. error " + " / ".join(checked) + " |")
    print("|---|" + "---:|" * (len(names) + 1))
    rng = np.random.default_rng(0)
    totals = dict.fromkeys(names, 0.0)
    flops_total = 0.0
    for height, width, channels, blocks in STAGES:
        rows = batch * height * width
        for k, n, activation in ((channels, 4 * channels, "gelu"), (4 * channels, channels, None)):
            x = jnp.asarray(rng.standard_normal((rows, k)), dtype)
            w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), dtype)
            b = jnp.asarray(rng.standard_normal(n), dtype)
            tx, tw, tb = (torch.from_numpy(np.asarray(a, np.float32)).to(torch_dtype) for a in (x, w.T, b))
            runs = {name: (lambda f=f: f(x, w, b, activation).block_until_ready()) for name, f in products.items()}
            runs["torch"] = lambda: torch_product(tx, tw, tb, activation)
            ms = timed(runs, rounds)
            flops = 2.0 * rows * k * n
            exact = torch_product(*(torch.from_numpy(np.asarray(a, np.float64)) for a in (x, w.T, b)), activation).numpy()
            scale = np.abs(exact).max()
            outputs = [torch_product(tx, tw, tb, activation).float().numpy() if name == "torch"
                       else np.asarray(products[name](x, w, b, activation), np.float32) for name in checked]
            errors = [np.abs(np.asarray(out, np.float64) - exact).max() / scale for out in outputs]
            print(f"| {rows} × {k} → {n}{' + GELU' if activation else ''} | "
                  + " | ".join(f"{flops / ms[name] / 1e6:.0f}" for name in names)
                  + " | " + " / ".join(f"{e:.1e}" for e in errors) + " |", flush=True)
            for name in names:
                totals[name] += blocks * ms[name]
            flops_total += blocks * flops
    print("| per forward (3/3/9/3 blocks), ms | " + " | ".join(f"{totals[name]:.0f}" for name in names) + " | |")
    print("| per forward, GFLOP/s | " + " | ".join(f"{flops_total / totals[name] / 1e6:.0f}" for name in names) + " | |")


if __name__ == "__main__":
    main()
