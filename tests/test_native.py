"""The compiled depthwise convolution and kernel gradient: torch's numbers at every kernel/padding/channel case, the
same numbers sharded over devices (without gathering the activations); each float32 kernel of the AVX2 build
(tests/test_native_library.py: the build, its cache and the fall-back when it cannot be built)."""

import os
import pathlib
import platform
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from native_marks import require_compiler

from convnext_audio_jax import native
from convnext_audio_jax.models import create_model, init_variables
from convnext_audio_jax.models.layers import _depthwise_kernel_grad
from convnext_audio_jax.runtime import xla

require_compiler()

CASES = [
    # (x shape NHWC, kernel size, padding): the vector paths (kernel width 7, 5, 3 with 16-channel blocks), channel
    # tails (20, 5 channels), a width without a vector path (4), no padding, padding wider than the kernel's half.
    ((2, 13, 9, 32), (7, 7), ((3, 3), (3, 3))),
    ((3, 10, 8, 20), (5, 5), ((2, 2), (2, 2))),
    ((1, 12, 7, 16), (5, 3), ((2, 1), (0, 2))),
    ((2, 9, 11, 5), (3, 3), ((1, 1), (1, 1))),
    ((2, 8, 10, 17), (4, 4), ((1, 2), (2, 1))),
    ((1, 9, 9, 16), (3, 3), ((0, 0), (0, 0))),
    ((2, 6, 5, 16), (3, 3), ((3, 2), (4, 1))),  # the input gradient's padding is negative (a crop)
    ((1, 5, 4, 48), (7, 7), ((3, 3), (3, 3))),  # the image smaller than the kernel
]


def torch_conv(x, kernel, bias, padding):
    """torch's grouped Conv2d of NHWC ``x`` zero-padded by ``padding``, in float64, as NHWC."""
    import torch
    import torch.nn.functional as F
    (top, bottom), (left, right) = padding
    xt = F.pad(torch.from_numpy(np.asarray(x, np.float64)).permute(0, 3, 1, 2), (left, right, top, bottom))
    weight = torch.from_numpy(np.asarray(kernel, np.float64)).permute(2, 0, 1)[:, None]
    out = F.conv2d(xt, weight, None if bias is None else torch.from_numpy(np.asarray(bias, np.float64)),
                   groups=x.shape[-1])
    return out.permute(0, 2, 3, 1).numpy()


def torch_kernel_grad(x, dy, kernel_size, padding):
    """torch's weight gradient of a grouped (depthwise) Conv2d, by autograd, as (kh, kw, C)."""
    import torch
    import torch.nn.functional as F
    (top, bottom), (left, right) = padding
    channels = x.shape[-1]
    xt = F.pad(torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2), (left, right, top, bottom))
    weight = torch.zeros((channels, 1, *kernel_size), dtype=torch.float64, requires_grad=True)
    out = F.conv2d(xt.double(), weight, groups=channels)
    (out * torch.from_numpy(np.asarray(dy)).permute(0, 3, 1, 2).double()).sum().backward()
    return weight.grad[:, 0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize(("shape", "kernel_size", "padding"), CASES)
def test_kernel_gradient_equals_torch(shape, kernel_size, padding):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    out_shape = (shape[0], shape[1] + sum(padding[0]) - kernel_size[0] + 1, shape[2] + sum(padding[1]) - kernel_size[1] + 1,
                 shape[3])
    dy = rng.standard_normal(out_shape).astype(np.float32)
    expected = torch_kernel_grad(x, dy, kernel_size, padding)
    ours = jax.jit(native.depthwise_kernel_grad, static_argnums=(2, 3))(x, dy, kernel_size, padding)
    assert ours.shape == (*kernel_size, shape[-1]) and ours.dtype == jnp.float32
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-4)
    # The XLA form, which 'shift' uses, gives the same numbers.
    np.testing.assert_allclose(_depthwise_kernel_grad(x, dy, kernel_size, padding), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("shape", "kernel_size", "padding"), CASES)
def test_convolution_equals_torch(shape, kernel_size, padding):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    kernel = rng.standard_normal((*kernel_size, shape[-1])).astype(np.float32)
    bias = rng.standard_normal(shape[-1]).astype(np.float32)
    conv = jax.jit(native.depthwise_conv, static_argnums=2)
    np.testing.assert_allclose(conv(x, kernel, padding, bias), torch_conv(x, kernel, bias, padding), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(conv(x, kernel, padding), torch_conv(x, kernel, None, padding), rtol=1e-5, atol=1e-5)


def test_bfloat16_operands_are_summed_in_float32():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 20, 12, 16)).astype(np.float32)
    dy = rng.standard_normal((2, 20, 12, 16)).astype(np.float32)
    padding = ((3, 3), (3, 3))
    ours = native.depthwise_kernel_grad(jnp.asarray(x, jnp.bfloat16), jnp.asarray(dy, jnp.bfloat16), (7, 7), padding)
    rounded = [np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32) for a in (x, dy)]
    np.testing.assert_allclose(ours, torch_kernel_grad(*rounded, (7, 7), padding), rtol=1e-5, atol=1e-4)


def test_a_wrong_shape_is_one_line_naming_the_shapes():
    with pytest.raises(ValueError, match=r"dy has shape \(2, 9, 9, 4\), expected \(2, 10, 10, 4\) for x \(2, 10, 10, 4\)"):
        native.depthwise_kernel_grad(jnp.zeros((2, 10, 10, 4)), jnp.zeros((2, 9, 9, 4)), (3, 3), ((1, 1), (1, 1)))
    with pytest.raises(ValueError, match=r"x \(2, 10, 10, 4\), kernel \(3, 3, 5\) and bias None do not fit"):
        native.depthwise_conv(jnp.zeros((2, 10, 10, 4)), jnp.zeros((3, 3, 5)), ((1, 1), (1, 1)))


def test_under_a_mesh_each_device_sums_its_rows_and_nothing_is_gathered():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = NamedSharding(mesh, P("data"))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((16, 12, 10, 32)).astype(np.float32)
    dy = rng.standard_normal((16, 12, 10, 32)).astype(np.float32)
    padding = ((3, 3), (3, 3))

    def under_mesh(x, dy):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return native.depthwise_kernel_grad(x, dy, (7, 7), padding)

    step = jax.jit(under_mesh, in_shardings=(rows, rows))
    ours = step(x, dy)
    np.testing.assert_allclose(ours, torch_kernel_grad(x, dy, (7, 7), padding), rtol=1e-5, atol=1e-4)
    compiled = step.lower(x, dy).compile().as_text()
    assert "all-gather" not in compiled and "all-reduce" in compiled
    # The convolution: each device its own rows, no collective at all, the output still split by rows.
    kernel = rng.standard_normal((7, 7, 32)).astype(np.float32)

    def conv_under_mesh(x, kernel):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return native.depthwise_conv(x, kernel, padding)

    conv = jax.jit(conv_under_mesh, in_shardings=(rows, None))
    out = conv(x, kernel)
    np.testing.assert_allclose(out, torch_conv(x, kernel, None, padding), rtol=1e-5, atol=1e-4)
    assert out.sharding.spec == P("data")
    compiled = conv.lower(x, kernel).compile().as_text()
    assert not any(op in compiled for op in ("all-gather", "all-reduce", "all-to-all"))
    # Without the mesh as context XLA gathers the rows to every device first: the same numbers.
    gathered = jax.jit(lambda x, dy: native.depthwise_kernel_grad(x, dy, (7, 7), padding), in_shardings=(rows, rows))
    np.testing.assert_allclose(gathered(x, dy), ours, rtol=1e-6, atol=1e-5)


def test_model_gradients_are_the_same_with_each_depthwise_variant():
    """A small ConvNeXt's outputs and parameter gradients with the compiled kernels, the shifted multiply-add in XLA
    ops, and XLA's grouped convolution."""
    # tests/test_dense.py's small ConvNeXt: in one run the XLA cache holds its initialiser once for both files.
    tiny = dict(depths=(1, 1, 1, 1), dims=(32, 64, 96, 128), num_classes=5)
    waveform = (0.1 * np.random.default_rng(3).standard_normal((2, 16_000))).astype(np.float32)
    grads = {}
    # The implementation adds no variables: one initialisation serves the three models.
    variables = init_variables(create_model("convnext_tiny", **tiny), jax.random.key(0))
    for impl in ("native", "shift", "xla"):
        model = create_model("convnext_tiny", depthwise_impl=impl, **tiny)

        def loss(params, model=model):
            out, _ = model.apply({**variables, "params": params}, waveform, train=True, mutable=["batch_stats"],
                                 rngs={"drop_path": jax.random.key(1), "dropout": jax.random.key(2)})
            return jnp.sum(jnp.square(out["logits"]))

        # Run once: LLVM -O1 compiles it faster; the kernels' numbers are their own.
        grads[impl] = xla.jit(jax.grad(loss), compiler_options=xla.RUN_ONCE_COMPILER_OPTIONS)(variables["params"])
    for impl in ("shift", "xla"):
        for (path, ours), theirs in zip(jax.tree_util.tree_leaves_with_path(grads["native"]), jax.tree.leaves(grads[impl])):
            scale = float(np.abs(theirs).max()) or 1.0
            np.testing.assert_allclose(ours, theirs, atol=1e-4 * scale, rtol=1e-4,
                                       err_msg=f"{impl} vs native at {jax.tree_util.keystr(path)}")


# Run in a fresh process with AVX-512 and AMX named off (see test_the_library_builds_for_cpus_without_avx512_or_amx):
# each float32 kernel of the AVX2 build against XLA's form of the same operation, with tails of rows, channels and
# register blocks. A CPU kind met in another session (an AVX2-only EPYC) runs exactly these code paths.
AVX2_KERNELS_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
from convnext_audio_jax import native
from convnext_audio_jax.runtime import xla
assert "avx512f" not in xla.cpu_flags() and native.available() and not native.bf16_dot_available()
rng = np.random.default_rng(0)
def close(name, got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    error = np.abs(got - want).max() / np.abs(want).max()
    assert error < 2e-5, (name, error)
    print(name, f"{error:.1e}")
dn = ("NHWC", "HWIO", "NHWC")
# Tails of the register blocks (6 rows or positions × 2 vectors of 8; the kernel gradient's 3 × 4): 37 rows and 154
# positions (6k + 1, 6k + 4), 48 columns (the kernel gradient: 4 vectors and 2).
x = jnp.asarray(rng.standard_normal((37, 72)), jnp.float32)
w = jnp.asarray(rng.standard_normal((72, 48)), jnp.float32)
b = jnp.asarray(rng.standard_normal(48), jnp.float32)
close("f32_matmul", native.f32_matmul(x, w, b, gelu=True), jax.nn.gelu(x @ w + b, approximate=False))
xi = jnp.asarray(rng.standard_normal((2, 11, 7, 20)), jnp.float32)
k = jnp.asarray(rng.standard_normal((3, 3, 20, 48)), jnp.float32)
pad = ((1, 1), (1, 1))
close("conv_forward", native.conv_forward(xi, k, pad), jax.lax.conv_general_dilated(xi, k, (1, 1), pad, dimension_numbers=dn))
# Winograd: CI with a vector tail (20), CO 48 (three 16-channel blocks: a group of 64 with a tail), 300 tiles.
xw = jnp.asarray(rng.standard_normal((2, 30, 20, 20)), jnp.float32)
close("conv_winograd", native.conv_winograd(xw, k, pad), jax.lax.conv_general_dilated(xw, k, (1, 1), pad, dimension_numbers=dn))
k5 = jnp.asarray(rng.standard_normal((5, 5, 20, 48)), jnp.float32)
pad5 = ((2, 2), (2, 2))
close("conv_winograd 5x5", native.conv_winograd(xw, k5, pad5),
      jax.lax.conv_general_dilated(xw, k5, (1, 1), pad5, dimension_numbers=dn))
dy = jnp.asarray(rng.standard_normal((2, 11, 7, 48)), jnp.float32)
grad = jax.vjp(lambda k: jax.lax.conv_general_dilated(xi, k, (1, 1), pad, dimension_numbers=dn), k)[1](dy)[0]
close("conv_kernel_grad", native.conv_kernel_grad(xi, dy, (3, 3), pad), grad)
c = jnp.asarray(rng.standard_normal((2, 13, 10, 24)), jnp.float32)
dk = jnp.asarray(rng.standard_normal((7, 7, 24)), jnp.float32)
pad7 = ((3, 3), (3, 3))
grouped = lambda c, dk: jax.lax.conv_general_dilated(c, dk[:, :, None, :], (1, 1), pad7, dimension_numbers=dn,
                                                     feature_group_count=24)
close("depthwise_conv", native.depthwise_conv(c, dk, pad7), grouped(c, dk))
dyd = jnp.asarray(rng.standard_normal((2, 13, 10, 24)), jnp.float32)
close("depthwise_kernel_grad", native.depthwise_kernel_grad(c, dyd, (7, 7), pad7),
      jax.vjp(lambda dk: grouped(c, dk), dk)[1](dyd)[0])
sums = native.channel_sums(c, dyd, jnp.mean(c, (0, 1, 2)), jnp.mean(dyd, (0, 1, 2)))
c64, d64 = np.asarray(c, np.float64), np.asarray(dyd, np.float64)
close("channel_sums", sums[0], c64.sum((0, 1, 2)))
close("channel_sums products", sums[1], ((c64 - c64.mean((0, 1, 2))) * (d64 - d64.mean((0, 1, 2)))).sum((0, 1, 2)))
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the instruction sets named off are x86-64 ones")
def test_the_avx2_build_of_each_float32_kernel_gives_xlas_numbers():
    import subprocess
    import sys

    from convnext_audio_jax.runtime import xla

    env = {**os.environ, xla.CPU_FLAGS_OFF_ENV: "avx512f avx512_bf16 avx512_fp16 amx_tile amx_bf16 amx_int8",
           "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", AVX2_KERNELS_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=600, cwd=pathlib.Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.stdout.splitlines()) == 9, result.stdout  # every comparison ran


# A kernel gradient whose partial sums (one per image: 10⁶ × 10⁴ taps × 16 floats, 640 GB) cannot be allocated.
OUT_OF_MEMORY_SCRIPT = r"""
import jax.numpy as jnp
from convnext_audio_jax import native
x = jnp.ones((1_000_000, 1, 1, 1))
try:
    native.depthwise_kernel_grad(x, x, (100, 100), ((50, 49), (50, 49))).block_until_ready()
except Exception as error:
    print(type(error).__name__, str(error).splitlines()[0])
"""


def test_a_kernel_out_of_memory_is_an_error_not_the_end_of_the_process():
    """std::bad_alloc inside a handler comes back to Python as XLA's RESOURCE_EXHAUSTED (its own process: before the
    handlers caught it, it terminated the process)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", OUT_OF_MEMORY_SCRIPT], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=pathlib.Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RESOURCE_EXHAUSTED: convnext_audio_jax native kernel: out of memory" in result.stdout, result.stdout


def _our_custom_calls(text: str) -> set[str]:
    return set(re.findall(r"custom_call @(convnext_audio_jax_\w+)", text))


def test_a_model_and_its_training_step_lowered_for_cuda_hold_no_custom_call_of_ours():
    """Traced on this CPU host, where 'auto' picks the compiled kernels, a ConvNeXt's and a CNN6's forward and the
    sharded training step exported for CUDA (jax.export needs no GPU) are plain XLA: each kernel's call lowers to its
    XLA form off the CPU (native.xla_forms). Lowered for the CPU, the kernels are there."""
    from training_helpers import tiny_config

    from convnext_audio_jax.data import demo
    from convnext_audio_jax.runtime.forward import data_mesh
    from convnext_audio_jax.training import config as config_lib
    from convnext_audio_jax.training import optimizer
    from convnext_audio_jax.training import step as step_lib

    waveform = jax.ShapeDtypeStruct((2, 16_000), jnp.float32)
    for model in (create_model("convnext_tiny", depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), num_classes=5),
                  create_model("cnn6", num_classes=5)):
        variables = jax.eval_shape(lambda model=model: init_variables(model, jax.random.key(0)))
        forward = jax.jit(lambda v, x, model=model: model.apply(v, x)["logits"])
        exported = jax.export.export(forward, platforms=("cuda",))(variables, waveform)
        assert not _our_custom_calls(exported.mlir_module()), type(model).__name__
        assert not _our_custom_calls(jax.export.deserialize(exported.serialize()).mlir_module())
        assert _our_custom_calls(forward.lower(variables, waveform).as_text())  # the CPU's lowering keeps them

    config = tiny_config()
    model = config_lib.build_model(config, num_classes=demo.NUM_CLASSES)
    mesh = data_mesh()
    tx = optimizer.make_optimizer(config.optimizer, config.total_steps)
    state = jax.eval_shape(lambda: step_lib.init_train_state(model, tx, 0, mesh))
    step = step_lib.make_train_step(model, tx, config_lib.augment_config(config), 1, mesh)
    rows = 2 * mesh.size
    batch = {"waveform": jax.ShapeDtypeStruct((rows, 16_000), jnp.float32),
             "target": jax.ShapeDtypeStruct((rows, demo.NUM_CLASSES), jnp.float32)}
    exported = jax.export.export(step, platforms=("cuda",))(state, batch)
    assert not _our_custom_calls(exported.mlir_module())
    assert _our_custom_calls(step.lower(state, batch).as_text())
