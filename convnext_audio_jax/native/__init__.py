"""Compiled CPU kernels, called from XLA through its FFI: the depthwise convolution and its kernel gradient
(``depthwise.cc``), the PANNs' float32 dense convolution, its input gradient's kernel and its kernel gradient
(``conv.cc``), their float32 3 × 3 and 5 × 5 convolutions by Winograd's F(2 × 2, 3 × 3) and F(2 × 2, 5 × 5)
(``winograd.cc``), their bfloat16 dense convolution on the AMX tile unit or with AVX512-BF16 dot products
(``conv_bf16.cc``), the matrix product of the Dense layers with bias and GELU in its epilogue: float32, and on
CPUs with AMX-BF16 bfloat16 (``matmul.cc``), and the per-channel sums of biases' and BatchNorm's gradients and
statistics (``reduce.cc``).

Written with XLA ops, the depthwise kernel gradient was a third of a ConvNeXt training step on XLA:CPU
(docs/benchmarks.md); the C++ kernels compute it 14× and the convolution 1.4× faster (a 2-core AVX2 CPU;
ConvNeXt-Tiny training 1.2× faster overall). XLA:CPU's bfloat16 dot runs at a fifth of the AMX tile unit's speed;
the tile kernel makes the bfloat16 ConvNeXt-Tiny forward 2.6× faster on a 2-core AMX Xeon (GELU in its epilogue).
XLA:CPU's dense convolution kernel gradient ran at 15-50 GFLOP/s on CNN14's large layers, the compiled one at
160-260; its bfloat16 convolutions took 1.9 s per CNN14 forward of 8 clips, the tile kernel 0.6 s. Winograd's
F(2 × 2, 3 × 3) and F(2 × 2, 5 × 5) do 16 and 36 multiplications where the direct kernel, near the FMA units' peak,
does 36 and 100: CNN14's float32 convolutions 1.3 → 1.0 s per forward of 8 clips with AVX-512, 2.0 → 1.3 s with
AVX2; CNN6's 0.51 → 0.29 s and 0.83 → 0.42 s.

The library is built once per CPU, compiler and jaxlib, never inside a jit trace (:mod:`.library` says where, how
and when); where it cannot be built, or ``CONVNEXT_AUDIO_JAX_NATIVE=0`` is set, :func:`available` is False and the
models use the XLA forms. Each kernel's call lowers to its XLA form (:mod:`.xla_forms`) for any platform but the CPU,
so a model traced on a CPU host runs, or is exported, for a GPU as plain XLA. A kernel checks its operands and
returns an error to XLA for what it does not take, C++ exceptions included, instead of ending the process.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from convnext_audio_jax.native import library, xla_forms

# Re-exported: the targets, the build and load API of the package.
from convnext_audio_jax.native.library import (  # noqa: F401
    BF16_CONV_FORWARD_TARGET,
    BF16_DOT_CONV_FORWARD_TARGET,
    BF16_DOT_MATMUL_TARGET,
    CHANNEL_SUMS_TARGET,
    CONV_FORWARD_TARGET,
    CONV_KERNEL_FLIP_TARGET,
    CONV_KERNEL_GRAD_TARGET,
    CONV_TARGET,
    CONV_WINOGRAD_KERNEL_TARGET,
    CONV_WINOGRAD_TARGET,
    CXX_FLAGS,
    F32_MATMUL_TARGET,
    HANDLERS,
    HEADERS,
    KERNEL_GRAD_TARGET,
    MATMUL_TARGET,
    SOURCES,
    NativeUnavailable,
    available,
    build,
    build_dir,
    find_compiler,
    library_path,
    load,
    prepare,
)
from convnext_audio_jax.native.placement import (  # noqa: F401  rows_per_device: public
    cpu_or_xla,
    matmul_call,
    output_size,
    per_device_rows,
    per_device_sum,
    rows_per_device,
)
from convnext_audio_jax.runtime import xla
from convnext_audio_jax.runtime.errors import UserError

# The CPU flags the bfloat16 tile product needs (and the library must have been built with).
AMX_CPU_FLAGS = ("amx_tile", "amx_bf16", "avx512_bf16")
# The CPU flag of the bfloat16 dot-product kernels (vdpbf16ps), for CPUs without the tile unit.
BF16_DOT_CPU_FLAG = "avx512_bf16"
# Cores with AVX512-FP16 (Sapphire Rapids and later Xeons, all with the tile unit) run vdpbf16ps at half their
# float32 FMAs' multiplications per cycle: with the tile unit hidden (a VM) the dot products lose to float32 there.
# AVX512-BF16 CPUs without it (Zen 4 and 5, Cooper Lake) are the ones the dot products are for.
BF16_DOT_SLOW_CPU_FLAG = "avx512_fp16"


def amx_available() -> bool:
    """Whether the tile kernels (bfloat16 convolution, Dense product) run here: the library loads, this CPU has
    ``AMX_CPU_FLAGS`` and the build has them (and the operating system granted the tile state)."""
    if not all(flag in xla.cpu_flags() for flag in AMX_CPU_FLAGS) or not available():
        return False
    return bool(library.loaded().ConvnextAudioJaxAmxReady())


def bf16_dot_available() -> bool:
    """Whether the AVX512-BF16 kernels (convolution, Dense product) run here: the library loads, this CPU has
    ``BF16_DOT_CPU_FLAG`` and the build has them."""
    if BF16_DOT_CPU_FLAG not in xla.cpu_flags() or not available():
        return False
    return bool(library.loaded().ConvnextAudioJaxBf16DotReady())


def bf16_dot_preferred() -> bool:
    """Whether the dot products are a default bfloat16 unit here (:func:`bf16_unit`): they run, and the CPU has no
    ``BF16_DOT_SLOW_CPU_FLAG``. Asked for by name (``bf16_unit="dots"``) they run wherever they are available."""
    return BF16_DOT_SLOW_CPU_FLAG not in xla.cpu_flags() and bf16_dot_available()


class _Bf16Unit(NamedTuple):
    """One bfloat16 unit of the CPU: its convolution's and its matrix product's FFI targets, whether it runs here and
    whether it is a default (looked up when called), the CPU flags it needs, which input → output channel counts
    (product: K → N) it takes and how to say so."""

    conv_target: str
    matmul_target: str
    ready: Callable[[], bool]
    preferred: Callable[[], bool]
    flags: str
    fits: Callable[[int, int], bool]
    fitting: str


_BF16_UNITS = {
    "tiles": _Bf16Unit(BF16_CONV_FORWARD_TARGET, MATMUL_TARGET, lambda: amx_available(), lambda: amx_available(),
                       ", ".join(AMX_CPU_FLAGS), lambda cin, cout: cin > 0 and cin % 32 == 0 and cout % 32 == 0,
                       "inputs a positive multiple of 32 and outputs a multiple of 32"),
    "dots": _Bf16Unit(BF16_DOT_CONV_FORWARD_TARGET, BF16_DOT_MATMUL_TARGET, lambda: bf16_dot_available(),
                      lambda: bf16_dot_preferred(), BF16_DOT_CPU_FLAG, lambda cin, cout: cin > 0 and cin % 2 == 0 and cout % 16 == 0,
                      "an even, positive number of inputs and outputs a multiple of 16"),
}


def bf16_unit(inputs: int, outputs: int, default: bool = True) -> str | None:
    """Which compiled kernel computes a bfloat16 convolution (``inputs`` = C_in → ``outputs`` = C_out channels) or
    Dense product (K → N) here by default: 'tiles' (AMX; both multiples of 32), else 'dots' (AVX512-BF16 where
    :func:`bf16_dot_preferred`; ``inputs`` even, ``outputs`` a multiple of 16), else None (the models then compute
    in float32 between conversions, as XLA does). ``default=False``: the first unit that runs here and fits."""
    return next((name for name, unit in _BF16_UNITS.items()
                 if unit.fits(inputs, outputs) and (unit.preferred() if default else unit.ready())), None)


def _checked_bf16_unit(what: str, unit: str | None, inputs: int, outputs: int, shapes: str) -> _Bf16Unit:
    """The unit ``unit`` (default: :func:`bf16_unit`, else the CPU's, to say what does not fit) for a bfloat16
    ``what`` of ``inputs`` → ``outputs``; a clear error where it cannot run or does not fit (``shapes``: the
    operands, for the message)."""
    unit = unit or bf16_unit(inputs, outputs) or bf16_unit(inputs, outputs, default=False) or (
        "tiles" if amx_available() else "dots")
    if unit not in _BF16_UNITS:
        raise ValueError(f"bf16_unit must be 'tiles' or 'dots', got {unit!r}")
    if not _BF16_UNITS[unit].ready():
        raise NativeUnavailable(f"the bfloat16 {what} on {unit!r} needs a CPU with {_BF16_UNITS[unit].flags} and "
                                "the native library built for it")
    if not _BF16_UNITS[unit].fits(inputs, outputs):
        raise ValueError(f"bf16 {what} on {unit!r}: {shapes} needs {_BF16_UNITS[unit].fitting}")
    return _BF16_UNITS[unit]


def f32_matmul(x: jax.Array, w: jax.Array, bias: jax.Array | None = None, gelu: bool = False) -> jax.Array:
    """``bias + x @ w`` in float32 by the compiled kernel: x (..., K), w (K, N), bias (N,); each output one
    fixed-order sum, the bias added last (``gelu``: then the exact GELU). K must be positive, N a multiple of 16.

    Under a mesh set for tracing each device multiplies its own rows (split along x's first axis)."""
    load()
    if x.ndim < 2 or w.ndim != 2 or x.shape[-1] != w.shape[0] or w.shape[0] < 1 or w.shape[1] % 16 or (
            bias is not None and bias.shape != (w.shape[1],)):
        raise ValueError(f"f32 matmul: x {tuple(x.shape)}, w {tuple(w.shape)} and bias "
                         f"{None if bias is None else tuple(bias.shape)} do not fit: expected (..., K), (K, N) and "
                         "(N,) with K positive and N a multiple of 16")
    return cpu_or_xla(lambda x, w, bias: matmul_call(F32_MATMUL_TARGET, jnp.float32, x, w, bias, gelu),
                       lambda x, w, bias: xla_forms.f32_matmul(x, w, bias, gelu), x, w, bias)


def bf16_matmul(x: jax.Array, w: jax.Array, bias: jax.Array | None = None, gelu: bool = False,
                bf16_unit: str | None = None) -> jax.Array:
    """``bias + x @ w`` in bfloat16: x (..., K), w (K, N), bias (N,); products and the bias summed in float32
    (``gelu``: then the exact GELU in float32), rounded to bfloat16 once, on ``bf16_unit`` (default
    :func:`bf16_unit`): 'tiles', the AMX tile unit (K and N multiples of 32), or 'dots', AVX512-BF16's dot products
    (K even, N a multiple of 16).

    Under a mesh set for tracing each device multiplies its own rows (split along x's first axis)."""
    shapes = f"x {tuple(x.shape)}, w {tuple(w.shape)} and bias {None if bias is None else tuple(bias.shape)}"
    if x.ndim < 2 or w.ndim != 2 or x.shape[-1] != w.shape[0] or (bias is not None and bias.shape != (w.shape[1],)):
        raise ValueError(f"bf16 matmul: {shapes} do not fit: expected (..., K), (K, N) and (N,)")
    unit = _checked_bf16_unit("matmul", bf16_unit, *w.shape, shapes)
    return cpu_or_xla(lambda x, w, bias: matmul_call(unit.matmul_target, jnp.bfloat16, x, w, bias, gelu),
                       lambda x, w, bias: xla_forms.bf16_matmul(x, w, bias, gelu), x, w, bias)


def resolve(impl: str, field: str) -> str:
    """The models' common rule for an ``impl`` of 'auto', 'xla' or 'native' (``field`` names it in errors): 'xla'
    stays 'xla'; 'native' is an error off the CPU or where the library cannot be built, else 'native'; 'auto' is
    'native' on the CPU where the library loads (:func:`available`, which logs why not once), else 'xla'. Callers
    then fall back to 'xla' for the shapes and dtypes their kernel does not take."""
    if impl not in ("auto", "xla", "native"):
        raise UserError(f"{field} must be 'auto', 'xla' or 'native', got {impl!r}")
    if impl == "native":
        if jax.default_backend() != "cpu":
            raise UserError(f"{field} 'native' runs on the CPU only; the default backend is {jax.default_backend()!r}")
        load()
        return "native"
    return "native" if impl == "auto" and jax.default_backend() == "cpu" and available() else "xla"


def depthwise_conv(x: jax.Array, kernel: jax.Array, padding: tuple[tuple[int, int], tuple[int, int]],
                   bias: jax.Array | None = None) -> jax.Array:
    """y[b, h, w, c] = bias[c] + Σ_{i,j} xpad[b, h+i, w+j, c] · kernel[i, j, c]: the stride-1 depthwise correlation
    of NHWC ``x`` zero-padded by ``padding`` (a negative pad crops) with a (kh, kw, C) kernel, in float32.

    Under a mesh set for tracing (``jax.sharding.use_abstract_mesh``) each device convolves its own rows;
    otherwise XLA gathers a sharded ``x`` to each device before the call."""
    load()
    if x.ndim != 4 or kernel.ndim != 3 or kernel.shape[-1] != x.shape[-1] or (bias is not None and bias.shape != (x.shape[-1],)):
        raise ValueError(f"depthwise convolution: x {tuple(x.shape)}, kernel {tuple(kernel.shape)} and bias "
                         f"{None if bias is None else tuple(bias.shape)} do not fit: expected (B, H, W, C), "
                         "(kh, kw, C) and (C,)")
    (pad_top, pad_bottom), (pad_left, pad_right) = padding
    kh, kw = kernel.shape[:2]
    channels = x.shape[-1]

    def call(x, kernel, bias):
        out = jax.ShapeDtypeStruct((x.shape[0], output_size(x.shape[1], padding[0], kh),
                                    output_size(x.shape[2], padding[1], kw), channels), jnp.float32)
        return jax.ffi.ffi_call(CONV_TARGET, out, vmap_method="sequential")(
            x, kernel, bias, pad_top=np.int64(pad_top), pad_left=np.int64(pad_left), use_bias=use_bias)

    use_bias = bias is not None
    x, kernel = x.astype(jnp.float32), kernel.astype(jnp.float32)
    bias = bias.astype(jnp.float32) if use_bias else jnp.zeros((channels,), jnp.float32)
    return cpu_or_xla(lambda *operands: per_device_rows(call, *operands),
                       lambda x, kernel, bias: xla_forms.depthwise_conv(x, kernel, padding, bias if use_bias else None),
                       x, kernel, bias)


def depthwise_kernel_grad(x: jax.Array, dy: jax.Array, kernel_size: tuple[int, int],
                          padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """dK[i, j, c] = Σ_{b,h,w} xpad[b, h+i, w+j, c] · dy[b, h, w, c] as (kh, kw, C) float32, for NHWC ``x``
    (B, H, W, C) zero-padded by ``padding`` and ``dy`` (B, OH, OW, C) of a stride-1 convolution.

    Under a mesh set for tracing (``jax.sharding.use_abstract_mesh``), the batch is split
    over every mesh axis and each device sums its own rows, then one ``psum``; otherwise XLA gathers sharded
    operands to each device before the call (correct, but each device computes the whole sum)."""
    load()
    (pad_top, pad_bottom), (pad_left, pad_right) = padding
    kh, kw = kernel_size
    expected = (x.shape[0], output_size(x.shape[1], padding[0], kh), output_size(x.shape[2], padding[1], kw),
                x.shape[3]) if x.ndim == 4 else None
    if x.ndim != 4 or tuple(dy.shape) != expected:
        raise ValueError(f"depthwise kernel gradient: dy has shape {tuple(dy.shape)}, expected {expected} for x "
                         f"{tuple(x.shape)}, kernel {kernel_size} and padding {padding}")

    def call(x, dy):
        return jax.ffi.ffi_call(KERNEL_GRAD_TARGET, jax.ShapeDtypeStruct((kh, kw, x.shape[-1]), jnp.float32),
                                vmap_method="sequential")(x, dy, pad_top=np.int64(pad_top), pad_left=np.int64(pad_left))

    x, dy = x.astype(jnp.float32), dy.astype(jnp.float32)
    return cpu_or_xla(lambda x, dy: per_device_sum(call, x, dy),
                       lambda x, dy: xla_forms.depthwise_kernel_grad(x, dy, kernel_size, padding), x, dy)


def conv_kernel_grad(x: jax.Array, dy: jax.Array, kernel_size: tuple[int, int],
                     padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """dK[i, j, ci, co] = Σ_{b,h,w} xpad[b, h+i, w+j, ci] · dy[b, h, w, co] as (kh, kw, C_in, C_out) float32: the
    kernel gradient of a stride-1 dense convolution of NHWC ``x`` (B, H, W, C_in) zero-padded by ``padding``, for
    ``dy`` (B, OH, OW, C_out) with C_out a multiple of 16. Under a mesh set for tracing, each device sums its own
    rows, then one ``psum``."""
    load()
    kh, kw = kernel_size
    expected = (x.shape[0], output_size(x.shape[1], padding[0], kh), output_size(x.shape[2], padding[1], kw),
                dy.shape[-1]) if x.ndim == 4 and dy.ndim == 4 else None
    if (expected is None or tuple(dy.shape) != expected or dy.shape[-1] % 16 or min(padding[0] + padding[1]) < 0
            or padding[0][0] > kh - 1 or padding[1][0] > kw - 1):
        raise ValueError(f"conv kernel gradient: x {tuple(x.shape)} and dy {tuple(dy.shape)} do not fit kernel "
                         f"{kernel_size} and padding {padding}: expected dy {expected} with C_out a multiple of 16, "
                         "no negative padding and top and left pads below the kernel's size")
    out = jax.ShapeDtypeStruct((kh, kw, x.shape[-1], dy.shape[-1]), jnp.float32)

    def call(x, dy):  # the kernel reads x unpadded (a pad here was a copy of x per call)
        return jax.ffi.ffi_call(CONV_KERNEL_GRAD_TARGET, out, vmap_method="sequential")(
            x, dy, pad_top=np.int64(padding[0][0]), pad_left=np.int64(padding[1][0]))

    return cpu_or_xla(lambda x, dy: per_device_sum(call, x, dy),
                       lambda x, dy: xla_forms.conv_kernel_grad(x, dy, kernel_size, padding),
                       x.astype(jnp.float32), dy.astype(jnp.float32))


def conv_forward(x: jax.Array, kernel: jax.Array, padding: tuple[tuple[int, int], tuple[int, int]],
                 bf16_unit: str | None = None) -> jax.Array:
    """y[b, h, w, co] = Σ_{i,j,ci} xpad[b, h+i, w+j, ci] · kernel[i, j, ci, co]: the stride-1 dense convolution of
    NHWC ``x`` zero-padded by ``padding`` (no negative pads) with a (kh, kw, C_in, C_out) kernel, C_out a multiple
    of 16, in ``x``'s dtype: float32, or bfloat16 on ``bf16_unit`` (default :func:`bf16_conv_unit`): 'tiles', the
    AMX tile unit, or 'dots', AVX512-BF16's dot products (a float32 kernel rounded to bfloat16 as it is packed,
    products summed in float32, rounded to bfloat16 once). Under a mesh set for tracing each device convolves its
    own rows."""
    load()
    kh, kw = kernel.shape[:2] if kernel.ndim == 4 else (0, 0)
    if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[2] != x.shape[-1] or kernel.shape[3] % 16 or min(
            padding[0] + padding[1]) < 0:
        raise ValueError(f"conv forward: x {tuple(x.shape)}, kernel {tuple(kernel.shape)} and padding {padding} do "
                         "not fit: expected (B, H, W, C_in), (kh, kw, C_in, C_out) with C_out a multiple of 16 and "
                         "no negative padding")
    half = x.dtype == jnp.bfloat16
    unit = _checked_bf16_unit("convolution", bf16_unit, *kernel.shape[2:], f"kernel {tuple(kernel.shape)}") if half else None
    dtype = jnp.bfloat16 if half else jnp.float32

    def call(x, kernel):
        height, width = (output_size(x.shape[1], padding[0], kh), output_size(x.shape[2], padding[1], kw))
        out = jax.ShapeDtypeStruct((x.shape[0], height, width, kernel.shape[3]), dtype)
        (top, bottom), (left, right) = padding
        if half:  # the kernels read whole padded lines past the image's last output line
            lines = library.loaded().ConvnextAudioJaxBf16ConvRows(*map(ctypes.c_int64, (
                height, kh, kw, x.shape[2] + left + right)))
            bottom = lines - x.shape[1] - top
        target = unit.conv_target if half else CONV_FORWARD_TARGET
        return jax.ffi.ffi_call(target, out, vmap_method="sequential")(
            jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0))), kernel)

    kernel = kernel if half and kernel.dtype in (jnp.bfloat16, jnp.float32) else kernel.astype(dtype)
    return cpu_or_xla(lambda x, kernel: per_device_rows(call, x, kernel),
                       lambda x, kernel: xla_forms.conv_forward(x, kernel, padding), x.astype(dtype), kernel)


def conv_winograd(x: jax.Array, kernel: jax.Array, padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """:func:`conv_forward` of float32 ``x`` with a 3 × 3 or 5 × 5 ``kernel`` by Winograd's F(2 × 2, 3 × 3) or
    F(2 × 2, 5 × 5) (``winograd.cc``): 16 multiplications per 2 × 2 outputs and channel pair instead of 36, or 36
    instead of 100. 3 × 3 results are closer to the exact sums than the direct kernel's, 5 × 5 ones ~3× further
    (``winograd.cc``). Two calls: the kernel transform (u = G k Gᵀ in the forward's packed layout), then the
    convolution. Under a mesh set for tracing each device convolves its own rows."""
    load()
    if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[:2] not in ((3, 3), (5, 5)) or (
            kernel.shape[2] != x.shape[-1] or kernel.shape[3] % 16 or min(padding[0] + padding[1]) < 0):
        raise ValueError(f"conv winograd: x {tuple(x.shape)}, kernel {tuple(kernel.shape)} and padding {padding} do "
                         "not fit: expected (B, H, W, C_in), (k, k, C_in, C_out) with k 3 or 5, C_out a multiple of 16 "
                         "and no negative padding")
    size, cin, cout = kernel.shape[1:]
    block = library.loaded().ConvnextAudioJaxWinogradCoBlock()
    transform = jax.ffi.ffi_call(CONV_WINOGRAD_KERNEL_TARGET,
                                 jax.ShapeDtypeStruct((-(-cout // block), (size + 1) ** 2, cin, block), jnp.float32),
                                 vmap_method="sequential")

    def call(x, u):
        (top, bottom), (left, right) = padding
        height, width = output_size(x.shape[1], padding[0], size), output_size(x.shape[2], padding[1], size)
        # Whole 2 × 2 tiles: one more zero line / column where the output's size is odd.
        x = jnp.pad(x, ((0, 0), (top, bottom + height % 2), (left, right + width % 2), (0, 0)))
        out = jax.ShapeDtypeStruct((x.shape[0], height, width, cout), jnp.float32)
        return jax.ffi.ffi_call(CONV_WINOGRAD_TARGET, out, vmap_method="sequential")(x, u)

    return cpu_or_xla(lambda x, kernel: per_device_rows(call, x, transform(kernel)),
                       lambda x, kernel: xla_forms.conv_winograd(x, kernel, padding), x.astype(jnp.float32),
                       kernel.astype(jnp.float32))


def conv_kernel_flip(kernel: jax.Array) -> jax.Array:
    """``flip(kernel, (0, 1)).swapaxes(2, 3)`` of a (kh, kw, C_in, C_out) kernel, in float32: the kernel of a
    convolution's input gradient."""
    load()
    if kernel.ndim != 4:
        raise ValueError(f"conv kernel flip: kernel has shape {tuple(kernel.shape)}, expected (kh, kw, C_in, C_out)")
    kh, kw, cin, cout = kernel.shape
    flip = jax.ffi.ffi_call(CONV_KERNEL_FLIP_TARGET, jax.ShapeDtypeStruct((kh, kw, cout, cin), jnp.float32),
                            vmap_method="sequential")
    return cpu_or_xla(flip, xla_forms.conv_kernel_flip, kernel.astype(jnp.float32))


def channel_sums(a: jax.Array, b: jax.Array | None = None, mean_a: jax.Array | None = None,
                 mean_b: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(Σ a, Σ (a − mean_a)·(b − mean_b)) over every axis but the last, float32 (C,) each: one pass over ``a`` and
    ``b`` (default: ``a``; means default to 0), summed in float32 per block of rows and in float64 over the blocks,
    in a fixed order. Under a mesh set for tracing, each device sums its own rows, then one ``psum``."""
    load()
    b = a if b is None else b
    channels = a.shape[-1] if a.ndim else 0
    if a.ndim < 1 or b.shape != a.shape or any(m is not None and m.shape != (channels,) for m in (mean_a, mean_b)):
        raise ValueError(f"channel sums: a {tuple(a.shape)}, b {tuple(b.shape)} and means "
                         f"{[None if m is None else tuple(m.shape) for m in (mean_a, mean_b)]} do not fit: expected "
                         f"b shaped as a and means ({channels},)")
    zeros = jnp.zeros((channels,), jnp.float32)
    if channels == 0:  # nothing to sum (and no rows to reshape into)
        return zeros, zeros
    mean_a = zeros if mean_a is None else mean_a.astype(jnp.float32)
    mean_b = zeros if mean_b is None else mean_b.astype(jnp.float32)
    out = jax.ShapeDtypeStruct((channels,), jnp.float32)

    def call(a, b, mean_a, mean_b):
        return tuple(jax.ffi.ffi_call(CHANNEL_SUMS_TARGET, (out, out), vmap_method="sequential")(
            a.reshape(-1, channels), b.reshape(-1, channels), mean_a, mean_b))

    return cpu_or_xla(lambda *operands: per_device_sum(call, *operands), xla_forms.channel_sums,
                       a.astype(jnp.float32), b.astype(jnp.float32), mean_a, mean_b)
