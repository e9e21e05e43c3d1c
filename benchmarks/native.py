"""Each compiled CPU kernel (convnext_audio_jax.native) against its XLA form (native.xla_forms: the same operation,
operands and result in XLA ops, what a kernel lowers to off the CPU) at the models' layer shapes, 10 s clips:
ConvNeXt-Tiny's depthwise 7 × 7 convolutions, their kernel gradients and its Dense products (GELU in the first);
CNN14's and CNN6's dense convolutions (direct, and Winograd for 3 × 3 and 5 × 5), their kernel gradients, the
input gradient's kernel flip; the per-channel sums of BatchNorm. float32, and bfloat16 where the CPU has a bfloat16
unit (AMX tiles, AVX512-BF16 dot products). Medians of alternating rounds (benchmarks/depthwise.timed), one jitted
call each; the ratio is XLA's time over the kernel's (> 1: the kernel is faster).

    python benchmarks/native.py [--batch 2] [--rounds 5] [--kinds depthwise dense conv sums]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repository: the package

from benchmarks.depthwise import timed  # noqa: E402

# ConvNeXt-Tiny's stages: (lines, mel bins, channels) after the stem and each downsampling, 10 s clips.
CONVNEXT_STAGES = [(250, 32, 96), (125, 16, 192), (62, 8, 384), (31, 4, 768)]
# (lines, mel bins, C_in, C_out, kernel) of dense convolutions: CNN14's blocks (the second of each) and CNN6's.
CONV_LAYERS = [(500, 32, 128, 128, 3), (250, 16, 256, 256, 3), (125, 8, 512, 512, 3), (62, 4, 1024, 1024, 3),
               (31, 2, 2048, 2048, 3), (500, 32, 64, 128, 5), (250, 16, 128, 256, 5), (125, 8, 256, 512, 5)]


def cases(kinds, batch: int, bf16: bool):
    """(kind, layer, the kernel's call, the XLA form's call, operands), operands made by numpy."""
    import jax.numpy as jnp
    import numpy as np

    from convnext_audio_jax import native
    from convnext_audio_jax.native import xla_forms

    rng = np.random.default_rng(0)

    def array(*shape, dtype=jnp.float32):
        return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)

    same7 = ((3, 3), (3, 3))
    if "depthwise" in kinds:
        for h, w, c in CONVNEXT_STAGES:
            x, k, b = array(batch, h, w, c), array(7, 7, c), array(c)
            layer = f"{h}x{w}x{c} 7x7"
            yield ("depthwise_conv", layer, lambda x, k, b: native.depthwise_conv(x, k, same7, b),
                   lambda x, k, b: xla_forms.depthwise_conv(x, k, same7, b), (x, k, b))
            yield ("depthwise_kernel_grad", layer, lambda x, dy: native.depthwise_kernel_grad(x, dy, (7, 7), same7),
                   lambda x, dy: xla_forms.depthwise_kernel_grad(x, dy, (7, 7), same7), (x, array(batch, h, w, c)))
    if "dense" in kinds:
        for h, w, c in CONVNEXT_STAGES:
            rows = batch * h * w
            for cin, cout, gelu in ((c, 4 * c, True), (4 * c, c, False)):
                for dtype, kernel, form in ((jnp.float32, native.f32_matmul, xla_forms.f32_matmul),
                                            (jnp.bfloat16, native.bf16_matmul, xla_forms.bf16_matmul)):
                    if dtype == jnp.bfloat16 and not bf16:
                        continue
                    operands = (array(rows, cin, dtype=dtype), array(cin, cout, dtype=dtype), array(cout))
                    yield (f"{jnp.dtype(dtype).name} matmul", f"{rows}x{cin} -> {cout}{' gelu' if gelu else ''}",
                           lambda x, w, b, kernel=kernel, gelu=gelu: kernel(x, w, b, gelu=gelu),
                           lambda x, w, b, form=form, gelu=gelu: form(x, w, b, gelu=gelu), operands)
    if "conv" in kinds:
        for h, w, cin, cout, k in CONV_LAYERS:
            pad = ((k // 2, k // 2), (k // 2, k // 2))
            x, kernel, dy = array(batch, h, w, cin), array(k, k, cin, cout), array(batch, h, w, cout)
            layer = f"{h}x{w}x{cin} -> {cout} {k}x{k}"
            form = lambda x, kernel, pad=pad: xla_forms.conv_forward(x, kernel, pad)  # noqa: E731
            yield ("conv_forward", layer, lambda x, kernel, pad=pad: native.conv_forward(x, kernel, pad), form,
                   (x, kernel))
            yield ("conv_winograd", layer, lambda x, kernel, pad=pad: native.conv_winograd(x, kernel, pad), form,
                   (x, kernel))
            if bf16:
                yield ("bf16 conv_forward", layer, lambda x, kernel, pad=pad: native.conv_forward(x, kernel, pad),
                       form, (x.astype(jnp.bfloat16), kernel))
            yield ("conv_kernel_grad", layer,
                   lambda x, dy, k=k, pad=pad: native.conv_kernel_grad(x, dy, (k, k), pad),
                   lambda x, dy, k=k, pad=pad: xla_forms.conv_kernel_grad(x, dy, (k, k), pad), (x, dy))
            yield ("conv_kernel_flip", f"{k}x{k}x{cin}x{cout}", native.conv_kernel_flip, xla_forms.conv_kernel_flip,
                   (kernel,))
    if "sums" in kinds:
        for h, w, cin, _, _ in CONV_LAYERS[:3]:
            a, b, mean = array(batch, h, w, cin), array(batch, h, w, cin), array(cin)
            yield ("channel_sums", f"{batch * h * w}x{cin}", lambda a, b, m: native.channel_sums(a, b, None, m),
                   lambda a, b, m: xla_forms.channel_sums(a, b, None, m), (a, b, mean))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--kinds", nargs="+", choices=("depthwise", "dense", "conv", "sums"),
                        default=["depthwise", "dense", "conv", "sums"])
    args = parser.parse_args()

    import jax

    from benchmarks.common import cpu_model_name, cpu_speed_flags
    from convnext_audio_jax import native
    from convnext_audio_jax.runtime import xla

    native.prepare()
    bf16 = native.amx_available() or native.bf16_dot_available()
    print(f"{cpu_model_name()} ({', '.join(cpu_speed_flags()) or 'no AVX-512/AMX'}), {jax.device_count()} device, "
          f"batch {args.batch} of 10 s clips, median of {args.rounds} rounds; ratio: XLA form / kernel")
    print(f"{'kernel':<24}{'layer':<30}{'kernel ms':>11}{'XLA ms':>10}{'ratio':>8}")
    for kind, layer, kernel, form, operands in cases(args.kinds, args.batch, bf16):
        runs = {name: (lambda f=xla.jit(f), operands=operands: jax.block_until_ready(f(*operands)))
                for name, f in (("kernel", kernel), ("xla", form))}
        ms = timed(runs, args.rounds)
        print(f"{kind:<24}{layer:<30}{ms['kernel']:>11.2f}{ms['xla']:>10.2f}{ms['xla'] / ms['kernel']:>8.2f}",
              flush=True)


if __name__ == "__main__":
    main()
