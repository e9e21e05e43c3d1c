"""GFLOP/s of the PANNs' dense 'same' convolutions at CNN14's and CNN6's layer shapes (batch 8 of 10 s clips):
float32 — the compiled direct kernel (``conv_impl="direct"``), the compiled Winograd one ("winograd": F(2 × 2, 3 × 3)
or F(2 × 2, 5 × 5)), what ``conv_impl="native"`` (and "auto" on the CPU) picks per layer, XLA's
convolution, torch's ``conv2d``; bfloat16 — the AMX
tile kernel ('tiles', needs AMX-BF16), the AVX512-BF16 dot-product kernel ('dots', needs AVX512-BF16), the float32
kernel between conversions (what ``Conv`` runs where neither fits), XLA's bfloat16 convolution, torch's bfloat16
``conv2d`` (on channels-last tensors, NHWC like ours). Run one after another in rounds (median); GFLOP/s count the
H × W outputs only. Last column: each bfloat16 result's largest difference from float64 relative to the largest
value; then the float32 direct and Winograd results' (against torch's float64 ``conv2d``). GFLOP/s are the direct
convolution's multiply-adds × 2 per second for every column (Winograd's count as the same work).

    python benchmarks/conv.py [--batch 8] [--rounds 5] [--models cnn14 cnn6]

"per forward" sums the layers (CNN14's first, 1 → 64 channels, runs XLA's in every case and is left out).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repository: the package

from benchmarks.depthwise import timed  # noqa: E402

# (lines, mel bins, C_in, C_out, kernel) of each dense convolution but the first, 10 s clips (1001 STFT frames).
LAYERS = {
    "cnn14": [(1001, 64, 64, 64, 3), (500, 32, 64, 128, 3), (500, 32, 128, 128, 3), (250, 16, 128, 256, 3),
              (250, 16, 256, 256, 3), (125, 8, 256, 512, 3), (125, 8, 512, 512, 3), (62, 4, 512, 1024, 3),
              (62, 4, 1024, 1024, 3), (31, 2, 1024, 2048, 3), (31, 2, 2048, 2048, 3)],
    "cnn6": [(500, 32, 64, 128, 5), (250, 16, 128, 256, 5), (125, 8, 256, 512, 5)],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", nargs="+", choices=sorted(LAYERS), default=["cnn14", "cnn6"])
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torch.nn.functional as F

    from benchmarks.common import cpu_model_name, cpu_speed_flags
    from convnext_audio_jax import native
    from convnext_audio_jax.models.conv import conv_same
    from convnext_audio_jax.runtime import xla

    native.load()
    units = [unit for unit, ready in (("tiles", native.amx_available), ("dots", native.bf16_dot_available)) if ready()]

    def ours(unit: str):
        return xla.jit(lambda x, k: native.conv_forward(x, k, ((k.shape[0] // 2,) * 2, (k.shape[1] // 2,) * 2),
                                                        bf16_unit=unit))

    float32 = {impl: xla.jit(lambda x, k, impl=impl: conv_same(x, k, impl)) for impl in ("direct", "winograd", "native", "xla")}
    bfloat16 = {**{unit: ours(unit) for unit in units},
                "fp32 kernel": xla.jit(lambda x, k: conv_same(x.astype(jnp.float32), k.astype(jnp.bfloat16), "native")
                                       .astype(jnp.bfloat16)),
                "xla": xla.jit(lambda x, k: conv_same(x, k, "xla"))}
    print(f"# {cpu_model_name()} ({', '.join(cpu_speed_flags())}), batch {args.batch}, GFLOP/s (median of "
          f"{args.rounds} rounds)")
    columns = [*(f"fp32 {name}" for name in float32), "fp32 torch",
               *(f"bf16 {name}" for name in bfloat16), "bf16 torch"]
    print("| model | layer (lines × mels, C_in → C_out, k) | " + " | ".join(columns) + " | bf16 max rel. error "
          + " / ".join([*bfloat16, "torch"]) + " | fp32 max rel. error direct / winograd |")
    print("|---|---|" + "---:|" * (len(columns) + 2))
    rng = np.random.default_rng(0)
    for model in args.models:
        totals, flops_total = dict.fromkeys(columns, 0.0), 0.0
        for lines, mels, cin, cout, k in LAYERS[model]:
            x32 = jnp.asarray(rng.standard_normal((args.batch, lines, mels, cin)), jnp.float32)
            k32 = jnp.asarray(rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin), jnp.float32)
            x16 = x32.astype(jnp.bfloat16)
            tx = torch.from_numpy(np.asarray(x32)).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
            tk = torch.from_numpy(np.asarray(k32)).permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)
            tx16, tk16 = tx.bfloat16(), tk.bfloat16()
            runs = {f"fp32 {name}": (lambda f=f: f(x32, k32).block_until_ready()) for name, f in float32.items()}
            runs["fp32 torch"] = lambda: F.conv2d(tx, tk, padding=k // 2)
            runs.update({f"bf16 {name}": (lambda f=f: f(x16, k32).block_until_ready()) for name, f in bfloat16.items()})
            runs["bf16 torch"] = lambda: F.conv2d(tx16, tk16, padding=k // 2)
            with torch.no_grad():
                ms = timed(runs, args.rounds)
                torch_out = F.conv2d(tx16, tk16, padding=k // 2).float().permute(0, 2, 3, 1).numpy()
            flops = 2.0 * args.batch * lines * mels * k * k * cin * cout
            exact = np.asarray(jax.lax.conv_general_dilated(
                x16.astype(jnp.float32), k32.astype(jnp.bfloat16).astype(jnp.float32), (1, 1), "SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest"), np.float64)
            scale = np.abs(exact).max()
            errors = [np.abs(np.asarray(f(x16, k32), np.float64) - exact).max() / scale for f in bfloat16.values()]
            errors.append(np.abs(torch_out - exact).max() / scale)
            with torch.no_grad():  # torch's float64 convolution
                exact32 = F.conv2d(tx.double(), tk.double(), padding=k // 2).permute(0, 2, 3, 1).numpy()
            scale32 = np.abs(exact32).max()
            errors32 = [np.abs(np.asarray(float32[impl](x32, k32), np.float64) - exact32).max() / scale32
                        for impl in ("direct", "winograd")]
            print(f"| {model} | {lines} × {mels}, {cin} → {cout}, {k} | "
                  + " | ".join(f"{flops / ms[name] / 1e6:.0f}" for name in columns)
                  + " | " + " / ".join(f"{e:.1e}" for e in errors)
                  + " | " + " / ".join(f"{e:.1e}" for e in errors32) + " |", flush=True)
            for name in columns:
                totals[name] += ms[name]
            flops_total += flops
        print(f"| {model} | per forward, ms | " + " | ".join(f"{totals[name]:.0f}" for name in columns) + " | | |")


if __name__ == "__main__":
    main()
