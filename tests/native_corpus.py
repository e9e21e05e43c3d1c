"""A seeded corpus of shapes for each float32 kernel of :mod:`convnext_audio_jax.native`, each result against float64
numpy: degenerate shapes (0 and 1 channels, empty batches, 1 × 1 images, kernels larger than the image, negative
and one-sided padding, more than 576 taps) and random ones that hit every register-block tail.

``python tests/native_corpus.py [--seed S] [--random N]`` prints one line per kernel and exits non-zero at the
first mismatch; tests/test_native_sanitizer.py runs it in processes whose library is built with AddressSanitizer
and UBSan, for this CPU and with the x86 vector instruction sets named off."""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np

TOLERANCE = 1e-4  # relative to the largest expected magnitude (at least 1): float32 sums of ≤ ~2000 products


def padded(x: np.ndarray, padding) -> np.ndarray:
    """NHWC ``x`` zero-padded by ``padding``, a negative pad cropping (as lax's padding)."""
    (top, bottom), (left, right) = padding
    height, width = x.shape[1:3]
    x = x[:, max(-top, 0):height - max(-bottom, 0), max(-left, 0):width - max(-right, 0)]
    return np.pad(x, ((0, 0), (max(top, 0), max(bottom, 0)), (max(left, 0), max(right, 0)), (0, 0)))


def out_size(size: int, pads: tuple[int, int], kernel: int) -> int:
    return size + pads[0] + pads[1] - kernel + 1


def windows(xp: np.ndarray, kh: int, kw: int, oh: int, ow: int):
    """(i, j, the (B, oh, ow, C) window of tap (i, j))."""
    for i in range(kh):
        for j in range(kw):
            yield i, j, xp[:, i:i + oh, j:j + ow]


def depthwise_reference(x, kernel, padding, bias):
    kh, kw = kernel.shape[:2]
    oh, ow = out_size(x.shape[1], padding[0], kh), out_size(x.shape[2], padding[1], kw)
    y = np.zeros((x.shape[0], oh, ow, x.shape[3])) + (0 if bias is None else bias)
    for i, j, window in windows(padded(x, padding), kh, kw, oh, ow):
        y += window * kernel[i, j]
    return y


def depthwise_grad_reference(x, dy, kernel_size, padding):
    kh, kw = kernel_size
    dk = np.zeros((kh, kw, x.shape[3]))
    for i, j, window in windows(padded(x, padding), kh, kw, *dy.shape[1:3]):
        dk[i, j] = (window * dy).sum((0, 1, 2))
    return dk


def conv_reference(x, kernel, padding):
    kh, kw, _, co = kernel.shape
    oh, ow = out_size(x.shape[1], padding[0], kh), out_size(x.shape[2], padding[1], kw)
    y = np.zeros((x.shape[0], oh, ow, co))
    for i, j, window in windows(padded(x, padding), kh, kw, oh, ow):
        y += window @ kernel[i, j]
    return y


def conv_grad_reference(x, dy, kernel_size, padding):
    kh, kw = kernel_size
    dk = np.zeros((kh, kw, x.shape[3], dy.shape[3]))
    for i, j, window in windows(padded(x, padding), kh, kw, *dy.shape[1:3]):
        dk[i, j] = np.einsum("bhwc,bhwd->cd", window, dy)
    return dk


def gelu(v: np.ndarray) -> np.ndarray:
    return 0.5 * v * (1.0 + np.vectorize(math.erf, otypes=[np.float64])(v / math.sqrt(2.0)))


def pads_for(rng, size: int, kernel: int, negative: bool) -> tuple[int, int]:
    """Random (before, after) pads with a non-negative output size; with ``negative``, crops no larger than the
    image."""
    while True:
        low = -size if negative else 0
        pads = (int(rng.integers(low, kernel + 2)), int(rng.integers(low, kernel + 2)))
        if out_size(size, pads, kernel) >= 0 and -min(pads[0], 0) - min(pads[1], 0) <= size:
            return pads


def depthwise_cases(rng, count):
    yield (1, 1, 1, 1), (3, 3), ((1, 1), (1, 1))       # a 1 × 1 image
    yield (2, 3, 4, 0), (3, 3), ((1, 1), (1, 1))       # no channels
    yield (0, 4, 4, 8), (3, 3), ((1, 1), (1, 1))       # no images
    yield (1, 2, 2, 5), (7, 7), ((3, 3), (3, 3))       # a kernel larger than the image
    yield (2, 7, 9, 20), (3, 3), ((0, 0), (-1, 1))     # a cropping pad
    yield (1, 6, 8, 16), (3, 3), ((-1, 0), (-2, -1))
    yield (1, 5, 6, 24), (5, 5), ((2, 0), (0, 2))      # one-sided pads
    for _ in range(count):
        b, h, w = int(rng.integers(1, 3)), int(rng.integers(1, 11)), int(rng.integers(1, 13))
        c = int(rng.choice([0, 1, 3, 7, 8, 9, 15, 16, 17, 24, 33]))
        kh, kw = int(rng.choice([1, 2, 3, 5, 7])), int(rng.choice([1, 2, 3, 4, 5, 7]))
        yield (b, h, w, c), (kh, kw), (pads_for(rng, h, kh, True), pads_for(rng, w, kw, True))


def conv_cases(rng, count):
    yield (1, 3, 40, 16), (1, 601), 16, ((0, 0), (300, 300))   # more taps than the weight panel (576)
    yield (1, 2, 3, 5), (25, 25), 16, ((12, 12), (12, 12))     # 625 taps, a kernel larger than the image
    yield (2, 3, 4, 0), (3, 3), 16, ((1, 1), (1, 1))           # no input channels
    yield (1, 4, 4, 16), (3, 3), 0, ((1, 1), (1, 1))           # no output channels
    yield (1, 1, 1, 1), (3, 3), 32, ((1, 1), (1, 1))           # a 1 × 1 image
    yield (1, 5, 6, 17), (3, 3), 48, ((2, 0), (0, 1))          # one-sided pads
    for _ in range(count):
        b, h, w = int(rng.integers(1, 3)), int(rng.integers(1, 10)), int(rng.integers(1, 12))
        ci, co = int(rng.choice([1, 2, 5, 16, 17, 33])), int(rng.choice([16, 32, 48, 80]))
        kh, kw = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        yield (b, h, w, ci), (kh, kw), co, (pads_for(rng, h, kh, False), pads_for(rng, w, kw, False))


def winograd_cases(rng, count):
    yield (1, 1, 1, 3), 5, 16, ((2, 2), (2, 2))                # a 1 × 1 image, a larger kernel
    yield (2, 3, 4, 0), 3, 16, ((1, 1), (1, 1))                # no input channels
    yield (1, 4, 5, 8), 3, 0, ((1, 1), (1, 1))                 # no output channels
    yield (1, 7, 6, 9), 3, 48, ((0, 2), (1, 0))                # one-sided pads, odd outputs
    for _ in range(count):
        b, h, w = int(rng.integers(1, 3)), int(rng.integers(1, 12)), int(rng.integers(1, 12))
        ci, co, k = int(rng.choice([1, 3, 8, 17, 40])), int(rng.choice([16, 48, 80])), int(rng.choice([3, 5]))
        yield (b, h, w, ci), k, co, (pads_for(rng, h, k, False), pads_for(rng, w, k, False))


def conv_grad_cases(rng, count):
    yield (1, 2, 10, 16), (1, 601), 16, ((0, 0), (300, 300))   # more taps than 576
    yield (1, 1, 1, 1), (3, 3), 16, ((1, 1), (1, 1))           # a 1 × 1 image
    yield (2, 3, 4, 0), (3, 3), 16, ((1, 1), (1, 1))           # no input channels
    yield (1, 4, 4, 16), (3, 3), 0, ((1, 1), (1, 1))           # no output channels
    yield (0, 4, 4, 8), (3, 3), 16, ((1, 1), (1, 1))           # no images
    yield (1, 3, 5, 65), (3, 3), 48, ((2, 0), (0, 1))          # a CI block's tail (64 + 1), one-sided pads
    for _ in range(count):
        b, h, w = int(rng.integers(1, 3)), int(rng.integers(1, 10)), int(rng.integers(1, 12))
        ci, co = int(rng.choice([1, 5, 16, 33, 70])), int(rng.choice([16, 32, 48, 80]))
        kh, kw = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        top, left = int(rng.integers(0, kh)), int(rng.integers(0, kw))
        bottom, right = int(rng.integers(0, kh + 1)), int(rng.integers(0, kw + 1))
        if out_size(h, (top, bottom), kh) >= 0 and out_size(w, (left, right), kw) >= 0:
            yield (b, h, w, ci), (kh, kw), co, ((top, bottom), (left, right))


def matmul_cases(rng, count):
    yield 0, 3, 16
    yield 5, 1, 16
    yield 4, 8, 0
    for _ in range(count):
        yield int(rng.choice([1, 5, 6, 7, 13, 37])), int(rng.choice([1, 2, 3, 72])), int(rng.choice([16, 48, 80]))


def sums_cases(rng, count):
    yield from ((0, 5), (3, 0), (1, 1), (70_000, 1), (2000, 70))  # the last two: several row blocks
    for _ in range(count):
        yield int(rng.choice([1, 7, 100])), int(rng.choice([1, 7, 8, 9, 17, 70]))


def run(seed: int, count: int) -> None:
    import jax

    from convnext_audio_jax import native

    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape)  # noqa: E731
    worst: dict[str, list] = {}

    def check(name, got, want, case):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        if got.shape != want.shape:
            sys.exit(f"{name} {case}: shape {got.shape}, expected {want.shape}")
        error = float(np.abs(got - want).max()) / max(1.0, float(np.abs(want).max())) if want.size else 0.0
        if not error <= TOLERANCE:
            sys.exit(f"{name} {case}: relative error {error:.2e} > {TOLERANCE:.0e}")
        entry = worst.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] = max(entry[1], error)

    # The operands as float32 numpy arrays (jnp.asarray compiles a conversion per shape) into one jit per kernel and
    # case: one XLA program per case instead of an eager one per op (the kernel's placement and pads), as a model
    # calls it.
    native.prepare()  # built outside the traces below (a trace does not build it)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    depthwise_conv = jax.jit(native.depthwise_conv, static_argnums=2)
    depthwise_kernel_grad = jax.jit(native.depthwise_kernel_grad, static_argnums=(2, 3))
    conv_forward = jax.jit(native.conv_forward, static_argnums=2)
    conv_kernel_flip = jax.jit(native.conv_kernel_flip)
    conv_winograd = jax.jit(native.conv_winograd, static_argnums=2)
    conv_kernel_grad = jax.jit(native.conv_kernel_grad, static_argnums=(2, 3))
    f32_matmul = jax.jit(native.f32_matmul, static_argnames="gelu")
    channel_sums = jax.jit(native.channel_sums)
    for shape, (kh, kw), padding in depthwise_cases(rng, count):
        x, kernel, bias = normal(*shape), normal(kh, kw, shape[3]), normal(shape[3])
        case = (shape, (kh, kw), padding)
        check("depthwise_conv", depthwise_conv(f32(x), f32(kernel), padding, f32(bias)),
              depthwise_reference(x, kernel, padding, bias), case)
        dy = normal(shape[0], out_size(shape[1], padding[0], kh), out_size(shape[2], padding[1], kw), shape[3])
        check("depthwise_kernel_grad", depthwise_kernel_grad(f32(x), f32(dy), (kh, kw), padding),
              depthwise_grad_reference(x, dy, (kh, kw), padding), case)
    for shape, (kh, kw), co, padding in conv_cases(rng, count):
        x, kernel = normal(*shape), normal(kh, kw, shape[3], co)
        check("conv_forward", conv_forward(f32(x), f32(kernel), padding), conv_reference(x, kernel, padding),
              (shape, (kh, kw), co, padding))
        check("conv_kernel_flip", conv_kernel_flip(f32(kernel)), np.flip(kernel, (0, 1)).swapaxes(2, 3),
              kernel.shape)
    for shape, k, co, padding in winograd_cases(rng, count):
        x, kernel = normal(*shape), normal(k, k, shape[3], co)
        check("conv_winograd", conv_winograd(f32(x), f32(kernel), padding), conv_reference(x, kernel, padding),
              (shape, k, co, padding))
    for shape, (kh, kw), co, padding in conv_grad_cases(rng, count):
        x = normal(*shape)
        dy = normal(shape[0], out_size(shape[1], padding[0], kh), out_size(shape[2], padding[1], kw), co)
        check("conv_kernel_grad", conv_kernel_grad(f32(x), f32(dy), (kh, kw), padding),
              conv_grad_reference(x, dy, (kh, kw), padding), (shape, (kh, kw), co, padding))
    for m, k, n in matmul_cases(rng, count):
        x, w, b = normal(m, k), normal(k, n), normal(n)
        for activation in (False, True):
            want = gelu(x @ w + b) if activation else x @ w + b
            check("f32_matmul", f32_matmul(f32(x), f32(w), f32(b), gelu=activation), want, (m, k, n, activation))
    for n, c in sums_cases(rng, count):
        a, b, ma, mb = normal(n, c), normal(n, c), normal(c), normal(c)
        sums = channel_sums(f32(a), f32(b), f32(ma), f32(mb))
        check("channel_sums", sums[0], a.sum(0), (n, c))
        check("channel_sums", sums[1], ((a - ma) * (b - mb)).sum(0), (n, c))
    jax.effects_barrier()
    for name, (cases, error) in worst.items():
        print(f"{name}: {cases} cases, largest relative error {error:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random", type=int, default=12, help="random shapes per kernel, after the fixed ones")
    args = parser.parse_args()
    run(args.seed, args.random)


if __name__ == "__main__":
    main()
