"""Depthwise convolution variants agree (values and gradients); drop path semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from native_marks import NEEDS_COMPILER

from convnext_audio_jax import native
from convnext_audio_jax.models.layers import (
    DepthwiseConv,
    DropPath,
    depthwise_conv,
    depthwise_conv_native,
    depthwise_conv_shift,
    depthwise_conv_xla,
    resolve_depthwise_impl,
)

def normal(seed, shape):
    """Standard-normal float32 test data from numpy: an eager jax.random draw of each new shape compiles a threefry
    program (1-2 s of CPU each)."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def random_variables(module, x, seed):
    """``module``'s variables (shapes from tracing its init, nothing compiled) filled with standard normals."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)
    return jax.tree.map(lambda v: rng.standard_normal(v.shape).astype(np.float32), shapes)


CONVS = [pytest.param(depthwise_conv_shift, id="shift"), pytest.param(depthwise_conv_native, id="native", marks=NEEDS_COMPILER)]

CASES = [
    # (input shape NHWC, kernel size, padding)
    ((2, 13, 9, 6), (7, 7), ((3, 3), (3, 3))),
    ((3, 10, 8, 5), (3, 3), ((1, 1), (1, 1))),
    ((1, 12, 7, 4), (5, 3), ((2, 1), (0, 2))),  # asymmetric kernel and padding
]


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize(("shape", "kernel_size", "padding"), CASES)
def test_shift_and_native_match_grouped_conv_forward_and_gradients(shape, kernel_size, padding, conv):
    """With and without a bias; the reference is XLA's grouped convolution plus a plain bias add, differentiated
    by autodiff."""
    x = normal(0, shape)
    kernel = normal(1, (*kernel_size, shape[-1]))
    bias = normal(2, (shape[-1],))
    out_shape = jax.eval_shape(lambda: depthwise_conv_xla(x, kernel, padding)).shape
    cotangent = normal(3, out_shape)

    def reference(x, kernel, bias):
        return jnp.sum((depthwise_conv_xla(x, kernel, padding) + bias) * cotangent)

    def shift(x, kernel, bias):
        return jnp.sum(conv(x, kernel, padding, bias) * cotangent)

    def everything(x, kernel, bias):
        return (conv(x, kernel, padding), depthwise_conv_xla(x, kernel, padding), conv(x, kernel, padding, bias),
                jax.grad(shift, argnums=(0, 1, 2))(x, kernel, bias), jax.grad(reference, argnums=(0, 1, 2))(x, kernel, bias),
                jax.grad(lambda x, k: jnp.sum(conv(x, k, padding) * cotangent), argnums=(0, 1))(x, kernel))

    # One program for all of it: a third less CPU than dispatching each operation on its own.
    out, out_xla, out_bias, grads_shift, grads_reference, grads_no_bias = jax.jit(everything)(x, kernel, bias)
    np.testing.assert_allclose(out, out_xla, atol=1e-5)
    np.testing.assert_allclose(out_bias, out_xla + bias, atol=1e-5)
    for ours, expected in zip(grads_shift, grads_reference):
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-4)
    for ours, expected in zip(grads_no_bias, grads_reference[:2]):
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-4)


def test_shift_gradient_is_the_custom_vjp_under_jit():
    x = normal(1, (2, 16, 12, 8))
    kernel = normal(2, (7, 7, 8))
    pad = ((3, 3), (3, 3))
    grad = jax.jit(jax.grad(lambda x, k: jnp.sum(depthwise_conv_shift(x, k, pad) ** 2), argnums=(0, 1)))
    reference = jax.grad(lambda x, k: jnp.sum(depthwise_conv_xla(x, k, pad) ** 2), argnums=(0, 1))(x, kernel)
    for ours, ref in zip(grad(x, kernel), reference):
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("conv", CONVS)
def test_bfloat16_accumulates_in_float32(conv):
    x = jnp.asarray(normal(3, (2, 20, 10, 4)))
    kernel = jnp.asarray(normal(4, (7, 7, 4)))
    pad = ((3, 3), (3, 3))
    exact = depthwise_conv_xla(x, kernel, pad)
    ours = conv(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), pad)
    assert ours.dtype == jnp.bfloat16
    # Only the bf16 rounding of inputs and output, not 49 bf16 partial sums.
    np.testing.assert_allclose(np.asarray(ours, np.float32), exact, atol=0.25, rtol=0.03)


@pytest.mark.parametrize("multiplier", [1, 2])
@pytest.mark.parametrize("impl", ["shift", pytest.param("native", marks=NEEDS_COMPILER), "xla"])
def test_depthwise_module_matches_torch_grouped_conv(multiplier, impl):
    """Output and the gradients of input, kernel and bias equal torch's grouped Conv2d (autograd)."""
    import torch
    channels = 3
    module = DepthwiseConv((7, 7), multiplier=multiplier, impl=impl)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 11, 9, channels)).astype(np.float32)
    cotangent = rng.standard_normal((2, 11, 9, channels * multiplier)).astype(np.float32)
    variables = random_variables(module, x, 5)

    def output_and_gradients(variables, x):  # one program, not each operation dispatched on its own
        grads = jax.grad(lambda x, p: jnp.sum(module.apply({"params": p}, x) * cotangent), argnums=(0, 1))(
            x, variables["params"])
        return module.apply(variables, x), grads

    ours, (grad_x, grad_params) = jax.jit(output_and_gradients)(variables, x)

    conv = torch.nn.Conv2d(channels, channels * multiplier, 7, padding=3, groups=channels)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(np.array(variables["params"]["kernel"]).transpose(3, 2, 0, 1)))
        conv.bias.copy_(torch.from_numpy(np.array(variables["params"]["bias"])))
    x_torch = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
    reference = conv(x_torch)
    (reference * torch.from_numpy(cotangent).permute(0, 3, 1, 2)).sum().backward()
    np.testing.assert_allclose(ours, reference.detach().permute(0, 2, 3, 1).numpy(), atol=1e-4)
    np.testing.assert_allclose(grad_x, x_torch.grad.permute(0, 2, 3, 1).numpy(), atol=1e-4)
    np.testing.assert_allclose(grad_params["kernel"], conv.weight.grad.numpy().transpose(2, 3, 1, 0), atol=1e-4)
    np.testing.assert_allclose(grad_params["bias"], conv.bias.grad.numpy(), atol=1e-4)


def test_impl_resolution():
    # On CPU 'auto' is the compiled kernels where they build, the XLA form where no compiler is found.
    cpu = "native" if native.find_compiler() else "shift"
    assert resolve_depthwise_impl("auto") == (cpu if jax.default_backend() == "cpu" else "xla")
    assert resolve_depthwise_impl("xla") == "xla"
    assert resolve_depthwise_impl("platform") == "platform"
    if native.find_compiler():
        assert resolve_depthwise_impl("native") == "native"
    with pytest.raises(ValueError, match="depthwise_impl must be"):
        resolve_depthwise_impl("cudnn")
    with pytest.raises(ValueError, match="depthwise_impl must be"):
        depthwise_conv(jnp.zeros((1, 8, 8, 2)), jnp.zeros((3, 3, 2)), ((1, 1), (1, 1)), impl="fast")


def test_platform_impl_lowers_each_platform_to_its_own_convolution():
    """'platform' is the shift-sum where the program is compiled for CPU and XLA's grouped convolution on
    CUDA: one export lowered for both carries both (lowering for CUDA needs no GPU)."""
    x = normal(0, (2, 13, 9, 6))
    kernel = normal(1, (7, 7, 6))
    padding = ((3, 3), (3, 3))
    ours = jax.jit(lambda x, k: depthwise_conv(x, k, padding, impl="platform"))(x, kernel)
    np.testing.assert_allclose(ours, depthwise_conv_xla(x, kernel, padding), atol=1e-5)
    spec = [jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(kernel.shape, kernel.dtype)]
    fn = jax.jit(lambda x, k: depthwise_conv(x, k, padding, impl="platform"))
    cpu_only = jax.export.export(fn, platforms=("cpu",))(*spec).mlir_module()
    cuda_only = jax.export.export(fn, platforms=("cuda",))(*spec).mlir_module()
    both = jax.export.export(fn, platforms=("cpu", "cuda"))(*spec)
    assert "stablehlo.convolution" not in cpu_only and "stablehlo.convolution" in cuda_only
    assert both.platforms == ("cpu", "cuda") and "stablehlo.convolution" in both.mlir_module()
    np.testing.assert_allclose(both.call(x, kernel), ours, atol=1e-5)


def test_drop_path_drops_whole_samples_and_rescales():
    x = jnp.ones((4096, 3, 2))
    dropped = DropPath(0.25).apply({}, x, deterministic=False, rngs={"drop_path": jax.random.key(0)})
    per_sample = np.asarray(dropped).reshape(4096, -1)
    np.testing.assert_allclose(np.unique(per_sample), [0.0, 1.0 / 0.75], rtol=1e-6)
    assert np.all(per_sample.min(axis=1) == per_sample.max(axis=1))  # all-or-nothing per sample
    assert abs((per_sample[:, 0] == 0).mean() - 0.25) < 0.03
    np.testing.assert_array_equal(DropPath(0.25).apply({}, x, deterministic=True), x)


def test_gelu_is_torch_exact_gelu():
    import torch

    from convnext_audio_jax.models.layers import gelu

    x = np.linspace(-8, 8, 4001, dtype=np.float32)
    np.testing.assert_allclose(gelu(x), torch.nn.functional.gelu(torch.from_numpy(x)).numpy(), atol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda v: gelu(v).sum())(x), jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x), atol=1e-6)


def test_depthwise_convolution_is_written_once_before_a_layer_norm():
    """On XLA:CPU the block's convolution output feeds the LayerNorm's statistics product directly, so it is
    computed by one fusion; a reduction there let XLA recompute its 49 taps inside each of three consumers."""
    from convnext_audio_jax.models.norm import LayerNorm
    from convnext_audio_jax.runtime import xla

    x = jnp.zeros((2, 16, 12, 8))
    conv, norm = DepthwiseConv((7, 7), impl="shift"), LayerNorm()
    # Only the compiled program is read: abstract variables (nothing initialised) are enough.
    variables = {"conv": jax.eval_shape(conv.init, jax.random.key(0), x),
                 "norm": jax.eval_shape(norm.init, jax.random.key(1), x)}
    forward = lambda v, x: norm.apply(v["norm"], conv.apply(v["conv"], x))  # noqa: E731
    hlo = xla.jit(forward).lower(variables, x).compile().as_text()
    fusions = [line for line in hlo.split("ENTRY")[1].splitlines() if " fusion(" in line]
    # Each tap reads a slice of the padded input: only the fusion computing the convolution reads that.
    padded = [line.split(" = ")[0].strip() for line in fusions if "pad" in line.split(" = ")[0]]
    readers = [line for line in fusions if any(f"{name}," in line or f"{name})" in line for name in padded)]
    assert len(padded) == 1 and len(readers) == 1, "\n".join(fusions)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_channels_first_is_an_exact_transpose(dtype):
    from convnext_audio_jax.models.layers import _channels_first

    x = jnp.asarray(normal(0, (2, 5, 3, 7)) * 1e4, dtype)
    got = jax.jit(_channels_first)(x)
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(jnp.transpose(x, (3, 0, 1, 2)), np.float32))


@NEEDS_COMPILER
@pytest.mark.parametrize(("module", "shape"), [
    ("DepthwiseConv((3, 3), padding=((0, 0), (-1, 1)), impl={impl})", (2, 7, 9, 20)),  # a cropping (negative) pad
    ("DepthwiseConv((3, 3), padding=((-1, 0), (-2, -1)), impl={impl})", (1, 6, 8, 16)),
    ("DepthwiseConv((3, 3), impl={impl})", (2, 5, 6, 0)),  # no channels
])
def test_native_depthwise_equals_xla_on_shapes_that_crashed_it(module, shape):
    """Shapes the module accepts on which the kernel gradient read outside dy (issue 33), each in its own process:
    outputs and gradients equal XLA's form."""
    from native_marks import native_equals_xla_in_a_subprocess

    assert native_equals_xla_in_a_subprocess(module, shape).count("compared") == 4
