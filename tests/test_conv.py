"""Dense 2-D convolutions (models/conv.py): Conv equals nn.Conv and torch's conv2d in values and gradients, its
gradients stay canonical convolutions inside a loop body, the compiled kernels (float32; bfloat16 on the AMX tile
unit and with AVX512-BF16 dot products; float32 by Winograd's F(2 × 2, 3 × 3) and F(2 × 2, 5 × 5)) equal float64
sums, and which one a layer runs follows the CPU and its shapes; PatchConv equals a strided convolution."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convnext_audio_jax import native
from convnext_audio_jax.models.conv import Conv, PatchConv, conv_same, resolve_conv_impl
from native_marks import NEEDS_AMX, NEEDS_BF16_DOT, NEEDS_COMPILER


def normal(seed, shape, scale=1.0):
    """Normal float32 test data from numpy: an eager jax.random draw of each new shape compiles a threefry program
    (1-2 s of CPU each)."""
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def random_variables(module, x, seed, fan_in_scaled=False):
    """``module``'s variables (shapes from tracing its init, nothing compiled) filled with standard normals, or
    with a kernel's LeCun-normal scale (1 / √fan-in, as its initialiser) where ``fan_in_scaled``."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)
    scale = lambda v: 1 / np.sqrt(np.prod(v.shape[:-1])) if fan_in_scaled and v.ndim > 1 else 1.0  # noqa: E731
    return jax.tree.map(lambda v: (scale(v) * rng.standard_normal(v.shape)).astype(np.float32), shapes)


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
@pytest.mark.parametrize(("kernel", "shape"), [((3, 3), (2, 11, 8, 4)), ((5, 5), (3, 9, 12, 3)), ((5, 3), (1, 7, 6, 2))])
def test_conv_equals_flax_conv_values_and_gradients(kernel, shape, dtype):
    from flax_parity import outputs_and_gradients_against

    x = jnp.asarray(normal(0, shape))
    reference = nn.Conv(6, kernel, padding=(kernel[0] // 2, kernel[1] // 2), use_bias=False, dtype=dtype)
    got, expected = outputs_and_gradients_against(Conv(6, kernel, dtype=dtype), reference, x, dtype)
    # The same XLA convolution where the layer is too narrow for the compiled one (fewer than 16 input channels).
    np.testing.assert_array_equal(got, expected)


def test_conv_gradients_equal_torch_conv2d_in_float64():
    """Outside code: torch's conv2d (padding k // 2) and its autograd in float64 against ours in float32."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 10, 7, 5))
    kernel = rng.standard_normal((3, 3, 5, 8)) * 0.2
    dy = rng.standard_normal((2, 10, 7, 8))
    y, pullback = jax.vjp(conv_same, jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32))
    dx, dk = pullback(jnp.asarray(dy, jnp.float32))

    tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    tk = torch.tensor(kernel.transpose(3, 2, 0, 1), requires_grad=True)
    ty = torch.nn.functional.conv2d(tx, tk, padding=1)
    ty.backward(torch.tensor(dy.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(y, ty.detach().numpy().transpose(0, 2, 3, 1), atol=1e-5)
    np.testing.assert_allclose(dx, tx.grad.numpy().transpose(0, 2, 3, 1), atol=1e-5)
    np.testing.assert_allclose(dk, tk.grad.numpy().transpose(2, 3, 1, 0), atol=1e-4)


def test_gradients_inside_a_scan_are_canonical_convolutions():
    """The training step runs the model inside lax.scan, where XLA:CPU does not rewrite autodiff's convolutions
    into the batch-major, (h, w, in, out) form it runs fast; ours are written in that form, so every convolution
    of the compiled loop is (and autodiff's of lax.conv are not: the check sees the difference)."""
    x = jnp.asarray(normal(0, (2, 12, 8, 4)))
    kernel = jnp.asarray(normal(1, (3, 3, 4, 6)))

    def scanned(conv):
        def body(total, xs):
            return total + jax.grad(lambda k: (conv(xs, k) ** 2).sum())(kernel), jax.grad(lambda v: (conv(v, kernel) ** 2).sum())(xs)
        return jax.jit(lambda xs: jax.lax.scan(body, jnp.zeros_like(kernel), xs[None]))

    def layouts(fn):
        return set(re.findall(r"convolution\(.*dim_labels=(\S+?),", fn.lower(x).compile().as_text()))

    autodiff = lambda v, k: jax.lax.conv_general_dilated(v, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert layouts(scanned(conv_same)) == {"b01f_01io->b01f"}
    assert layouts(scanned(autodiff)) - {"b01f_01io->b01f"}, "XLA now canonicalises loop bodies: the workaround may go"
    ours, theirs = scanned(conv_same)(x), scanned(autodiff)(x)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_even_kernel_is_an_error():
    with pytest.raises(ValueError, match="odd kernel, got 2×2"):
        conv_same(jnp.zeros((1, 4, 4, 1)), jnp.zeros((2, 2, 1, 1)))


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "shape"),
    [((4, 4), (4, 4), ((4, 4), (0, 0)), (2, 37, 16, 1)),  # the audio stem: floor of 45/4 rows
     ((2, 2), (2, 2), ((0, 0), (0, 0)), (2, 7, 5, 6)),  # downsampling with odd sizes
     ((4, 8), (2, 8), ((5, 5), (0, 0)), (1, 20, 16, 1))],  # an overlapping stem: the conv path
)
def test_patch_conv_equals_strided_convolution(kernel, stride, padding, shape):
    x = normal(0, shape)
    ours = PatchConv(5, kernel, stride, padding)
    variables = random_variables(ours, x, 2)
    reference = nn.Conv(5, kernel, strides=stride, padding=padding)

    def outputs_and_gradients(variables, x):  # one program, not each operation dispatched on its own
        return [(m.apply(variables, x), jax.grad(lambda v, x, m=m: (m.apply(v, x) ** 2).sum(), argnums=(0, 1))(variables, x))
                for m in (ours, reference)]

    (out_ours, grads_ours), (out_reference, grads_reference) = jax.jit(outputs_and_gradients)(variables, x)
    np.testing.assert_allclose(out_ours, out_reference, rtol=1e-5, atol=1e-5)
    grads = [grads_ours, grads_reference]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@NEEDS_COMPILER
@pytest.mark.parametrize(("shape", "kernel", "out_channels"), [
    ((2, 11, 7, 16), (3, 3), 16),     # one CI block, rows in a tail group of the register block
    ((3, 9, 5, 70), (5, 5), 48),      # CI over one block with a tail; CO three vectors
    ((1, 6, 3, 130), (3, 5), 80),     # CO one block and a one-vector tail; rectangular kernel
    ((4, 64, 32, 32), (3, 3), 64),    # enough positions for several shares, summed in a fixed order
])
def test_native_kernel_gradient_equals_float64(shape, kernel, out_channels):
    """The compiled kernel gradient against numpy in float64, and against the XLA form; the input gradients of
    both forms agree."""
    from convnext_audio_jax.models.conv import _conv_same_bwd

    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((*kernel, shape[-1], out_channels)).astype(np.float32)
    dy = rng.standard_normal((*shape[:3], out_channels)).astype(np.float32)
    ph, pw = kernel[0] // 2, kernel[1] // 2
    xpad = np.pad(x.astype(np.float64), ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    expected = np.stack([np.stack([np.einsum("bhwc,bhwo->co", xpad[:, i:i + shape[1], j:j + shape[2]], dy)
                                   for j in range(kernel[1])]) for i in range(kernel[0])])
    scale = np.abs(expected).max()
    dx_native, dk_native = jax.jit(lambda x, w, dy: _conv_same_bwd("native", (x, w), dy))(x, w, dy)
    dx_xla, dk_xla = jax.jit(lambda x, w, dy: _conv_same_bwd("xla", (x, w), dy))(x, w, dy)
    np.testing.assert_allclose(dk_native, expected, atol=2e-6 * scale)
    np.testing.assert_allclose(dk_xla, expected, atol=2e-5 * scale)
    np.testing.assert_allclose(dx_native, dx_xla, atol=2e-6 * np.abs(dx_xla).max())


@NEEDS_COMPILER
@pytest.mark.parametrize(("shape", "kernel", "padding"), [
    ((2, 5, 100, 16), (3, 3), ((1, 1), (1, 1))),   # lines longer than a slice of positions
    ((2, 7, 6, 8), (5, 3), ((4, 0), (0, 2))),      # all the padding on one side of each axis
    ((1, 4, 5, 20), (3, 3), ((0, 0), (0, 0))),     # none: a 'valid' convolution's gradient
    ((3, 3, 2, 16), (5, 5), ((2, 2), (2, 2))),     # lines shorter than the kernel: most columns padding
])
def test_native_kernel_gradient_reads_x_unpadded(shape, kernel, padding):
    """The kernel gradient reads x as it is and supplies the padding's zeros itself, on either side and for lines
    that span slices of positions; against numpy in float64 on the padded input."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(np.float32)
    (top, bottom), (left, right) = padding
    out_h, out_w = shape[1] + top + bottom - kernel[0] + 1, shape[2] + left + right - kernel[1] + 1
    dy = rng.standard_normal((shape[0], out_h, out_w, 32)).astype(np.float32)
    xpad = np.pad(x.astype(np.float64), ((0, 0), (top, bottom), (left, right), (0, 0)))
    expected = np.stack([np.stack([np.einsum("bhwc,bhwo->co", xpad[:, i:i + out_h, j:j + out_w], dy)
                                   for j in range(kernel[1])]) for i in range(kernel[0])])
    got = jax.jit(lambda x, dy: native.conv_kernel_grad(x, dy, kernel, padding))(x, dy)
    np.testing.assert_allclose(got, expected, atol=2e-6 * np.abs(expected).max())


@NEEDS_COMPILER
@pytest.mark.parametrize(("shape", "kernel", "out_channels"), [
    ((2, 11, 7, 16), (3, 3), 16),     # positions in a tail group; one vector
    ((3, 9, 5, 70), (5, 5), 48),      # CI panels with a tail; CO three vectors
    ((1, 6, 3, 130), (3, 5), 80),     # CO one block and a one-vector tail; rectangular kernel
    ((2, 31, 2, 256), (3, 3), 128),   # CNN14's narrow last block: groups across rows
])
def test_native_convolution_equals_float64(shape, kernel, out_channels):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((*kernel, shape[-1], out_channels)).astype(np.float32)
    ph, pw = kernel[0] // 2, kernel[1] // 2
    xpad = np.pad(x.astype(np.float64), ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    expected = sum(np.einsum("bhwc,co->bhwo", xpad[:, i:i + shape[1], j:j + shape[2]], w[i, j])
                   for i in range(kernel[0]) for j in range(kernel[1]))
    got = jax.jit(lambda x, w: native.conv_forward(x, w, ((ph, ph), (pw, pw))))(x, w)
    np.testing.assert_allclose(got, expected, atol=2e-6 * np.abs(expected).max())
    # The layer under 'direct' runs it, and its numbers are nn.Conv's within float32 summation order.
    layer_out = conv_same(jnp.asarray(x), jnp.asarray(w), "direct")
    np.testing.assert_allclose(layer_out, expected, atol=2e-6 * np.abs(expected).max())


WINOGRAD_CASES = [  # (x shape, C_out, padding); each with 3 × 3 and 5 × 5 kernels
    ((2, 11, 7, 16), 16, 1),                    # odd H and W: the last tiles half outside; one vector
    ((3, 9, 5, 70), 48, 1),                     # CI with a vector tail; CO narrower than one AVX-512 block
    ((1, 1, 1, 16), 32, 1),                     # one pixel: one tile, three outputs of it dropped
    ((2, 30, 20, 24), 144, 1),                  # 300 tiles: several chunks; CO groups with a tail block
    ((2, 31, 2, 256), 128, 1),                  # CNN14's narrow last block
    ((1, 8, 6, 32), 16, ((0, 2), (2, 0))),      # one-sided padding (for 3 × 3; 5 × 5 pads 2 more each side)
]
# Largest error relative to the largest output: F(2 × 2, 3 × 3) is closer to float64 than the direct sum, whose
# bound (2e-6) it shares; F(2 × 2, 5 × 5)'s transforms (entries up to 5 and 1/24) make it ~3× further.
WINOGRAD_TOLERANCE = {3: 2e-6, 5: 1e-5}


@NEEDS_COMPILER
@pytest.mark.parametrize("size", [3, 5])
@pytest.mark.parametrize(("shape", "out_channels", "padding"), WINOGRAD_CASES)
def test_winograd_convolution_equals_float64(shape, out_channels, padding, size):
    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((size, size, shape[-1], out_channels)).astype(np.float32)
    same = padding == 1
    half = size // 2
    padding = ((half, half), (half, half)) if same else tuple((a + half - 1, b + half - 1) for a, b in padding)
    xpad = np.pad(x.astype(np.float64), ((0, 0), *padding, (0, 0)))
    height, width = xpad.shape[1] - size + 1, xpad.shape[2] - size + 1
    expected = sum(np.einsum("bhwc,co->bhwo", xpad[:, i:i + height, j:j + width], w[i, j])
                   for i in range(size) for j in range(size))
    got = jax.jit(lambda x, w: native.conv_winograd(x, w, padding))(x, w)
    assert got.shape == expected.shape
    bound = WINOGRAD_TOLERANCE[size] * np.abs(expected).max()
    np.testing.assert_allclose(got, expected, atol=bound)
    if same:  # the layer under 'winograd' and 'direct'
        for impl in ("winograd", "direct"):
            np.testing.assert_allclose(conv_same(jnp.asarray(x), jnp.asarray(w), impl), expected, atol=bound)


@NEEDS_COMPILER
def test_winograd_convolves_each_devices_rows_under_a_mesh():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((8, 10, 6, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 16, 32)), jnp.float32)
    conv = lambda x, w: native.conv_winograd(x, w, ((1, 1), (1, 1)))  # noqa: E731
    single = jax.jit(conv)(x, w)
    rows = NamedSharding(mesh, PartitionSpec("data"))
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        sharded = jax.jit(conv, in_shardings=(rows, None)).lower(x, w).compile()
    assert "all-gather" not in sharded.as_text()
    np.testing.assert_allclose(sharded(jax.device_put(x, rows), w), single, rtol=1e-6, atol=1e-5)


def test_winograd_rejects_other_kernels():
    with pytest.raises(ValueError, match=r"kernel \(7, 7, 8, 16\).*expected.*\(k, k, C_in, C_out\) with k 3 or 5"):
        native.conv_winograd(jnp.zeros((1, 6, 6, 8)), jnp.zeros((7, 7, 8, 16)), ((3, 3), (3, 3)))


def test_conv_algorithm_follows_tiles_per_input_channel():
    """'auto' / 'native': Winograd for 3 × 3 and 5 × 5 kernels where a device has enough 2 × 2 tiles per input channel;
    'direct' / 'winograd' fix it; kernels other than 3 × 3 and 5 × 5 stay direct."""
    from convnext_audio_jax.models.conv import WINOGRAD_MIN_TILES_PER_IN_CHANNEL as need, conv_algorithm

    shape = (8, 500, 32, 64)  # 8 × 250 × 16 = 32 000 tiles
    most = int(32_000 / need)  # the most input channels that still get Winograd
    assert conv_algorithm("auto", shape, (3, 3, 64, 64)) == "winograd"
    assert conv_algorithm("native", shape, (3, 3, most, 64)) == "winograd"
    assert conv_algorithm("auto", shape, (3, 3, most + 1, 64)) == "direct"
    assert conv_algorithm("auto", (8, 499, 31, 64), (3, 3, most, 64)) == "winograd"  # odd sizes: whole tiles
    assert conv_algorithm("direct", shape, (3, 3, 64, 64)) == "direct"
    assert conv_algorithm("winograd", (1, 2, 2, 2048), (3, 3, 2048, 64)) == "winograd"
    assert conv_algorithm("winograd", shape, (5, 5, 64, 64)) == "winograd"
    assert conv_algorithm("auto", shape, (5, 5, most, 64)) == "winograd"
    assert conv_algorithm("auto", shape, (5, 5, most + 1, 64)) == "direct"
    assert conv_algorithm("winograd", shape, (7, 7, 64, 64)) == conv_algorithm("auto", shape, (3, 5, 64, 64)) == "direct"
    # Under a mesh each device has its share of the tiles.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        assert conv_algorithm("auto", shape, (3, 3, most, 64)) == "direct"
        assert conv_algorithm("auto", shape, (3, 3, most // 4, 64)) == "winograd"


def torch_conv_float64(x: np.ndarray, w: np.ndarray, padding: tuple[int, int]) -> np.ndarray:
    """torch's conv2d in float64 on NHWC x and an HWIO kernel."""
    out = torch.nn.functional.conv2d(torch.from_numpy(np.asarray(x, np.float64)).permute(0, 3, 1, 2),
                                     torch.from_numpy(np.asarray(w, np.float64)).permute(3, 2, 0, 1), padding=padding)
    return out.permute(0, 2, 3, 1).numpy()


UNIT_MARKS = {"tiles": NEEDS_AMX, "dots": NEEDS_BF16_DOT}
BFLOAT16_CASES = [  # (x shape, kernel, C_out, units)
    ((2, 11, 7, 32), (3, 3), 32, "tiles dots"),    # blocks cross lines; an image's last block is partial
    ((1, 3, 2, 64), (3, 3), 64, "tiles dots"),     # the whole image in one partial block (a short clip's end)
    ((3, 9, 12, 96), (5, 5), 96, "tiles dots"),    # CNN6's kernel; dots: CO one 64 block and a tail of 32
    ((1, 6, 5, 64), (3, 5), 160, "tiles dots"),    # rectangular kernel
    ((2, 5, 2, 2048), (3, 3), 64, "tiles dots"),   # tiles: two column panels; dots: channel panels with a tail
    ((2, 8, 4, 32), (1, 1), 32, "tiles dots"),     # a 1 x 1 kernel
    ((2, 9, 7, 6), (3, 3), 48, "dots"),            # dots: few input channels, CO one 16-channel tail
]


@pytest.mark.parametrize(("shape", "kernel", "out_channels", "unit"), [
    pytest.param(shape, kernel, out_channels, unit, marks=UNIT_MARKS[unit])
    for shape, kernel, out_channels, units in BFLOAT16_CASES for unit in units.split()])
def test_bfloat16_convolution_equals_torch_float64(shape, kernel, out_channels, unit):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    fan_in = shape[-1] * kernel[0] * kernel[1]
    w = jnp.asarray(rng.standard_normal((*kernel, shape[-1], out_channels)) / np.sqrt(fan_in), jnp.bfloat16)
    padding = ((kernel[0] // 2, kernel[0] // 2), (kernel[1] // 2, kernel[1] // 2))
    got = jax.jit(lambda x, w: native.conv_forward(x, w, padding, bf16_unit=unit))(x, w)
    assert got.dtype == jnp.bfloat16 and got.shape == (*shape[:3], out_channels)
    got = np.asarray(got, np.float64)
    exact = torch_conv_float64(x.astype(jnp.float32), w.astype(jnp.float32), (kernel[0] // 2, kernel[1] // 2))
    # Summed in float32, rounded to bfloat16 once: within one bfloat16 step (2^-8 relative) of the exact sum.
    assert np.all(np.abs(got - exact) <= 2 ** -8 * np.abs(exact) + 1e-5 * np.abs(exact).max()), unit
    # A float32 kernel is rounded as XLA rounds it (to nearest even), so both give the same bits.
    w32 = jnp.asarray(rng.standard_normal(w.shape), jnp.float32)
    rounded = [np.asarray(native.conv_forward(x, kernel, padding, bf16_unit=unit), np.float32)
               for kernel in (w32, w32.astype(jnp.bfloat16))]
    np.testing.assert_array_equal(*rounded)


def bfloat16_layer_outputs(in_channels: int, impls=("native", "xla")) -> tuple[dict, dict]:
    """A bfloat16 Conv's outputs and compiled programs under each of ``impls`` (the first compared with 'xla')."""
    x = jnp.asarray(normal(0, (2, 20, 8, in_channels)), jnp.bfloat16)
    variables = random_variables(Conv(96, (3, 3), impl="xla", dtype=jnp.bfloat16), x, 1, fan_in_scaled=True)
    outputs, texts = {}, {}
    for impl in dict.fromkeys((*impls, "xla")):
        layer = Conv(96, (3, 3), impl=impl, dtype=jnp.bfloat16)
        texts[impl] = jax.jit(layer.apply).lower(variables, x).as_text()
        outputs[impl] = np.asarray(layer.apply(variables, x), np.float32)
    # Both sum in float32 and round once (XLA converts to float32 around its convolution).
    np.testing.assert_allclose(outputs[impls[0]], outputs["xla"], rtol=2 ** -7, atol=1e-5)
    return outputs, texts


@NEEDS_AMX
def test_bfloat16_conv_layer_uses_the_tile_kernel():
    outputs, texts = bfloat16_layer_outputs(64)
    assert f"@{native.BF16_CONV_FORWARD_TARGET}(" in texts["native"]
    assert np.mean(outputs["native"] == outputs["xla"]) > 0.95


@NEEDS_BF16_DOT
def test_bfloat16_conv_layer_without_tiles_uses_dot_products(monkeypatch):
    # As on a Zen 4: no tile unit, and vdpbf16ps at full rate.
    monkeypatch.setattr(native, "amx_available", lambda: False)
    monkeypatch.setattr(native, "bf16_dot_preferred", native.bf16_dot_available)
    outputs, texts = bfloat16_layer_outputs(64)
    assert f"@{native.BF16_DOT_CONV_FORWARD_TARGET}(" in texts["native"]
    assert native.BF16_CONV_FORWARD_TARGET not in texts["native"]
    assert np.mean(outputs["native"] == outputs["xla"]) > 0.95


@NEEDS_COMPILER
def test_bfloat16_conv_without_a_bfloat16_unit_runs_the_float32_kernel(monkeypatch):
    """No AMX, no AVX512-BF16 (or channels neither fits): the compiled float32 convolution between conversions, which
    is what XLA's bfloat16 convolution computes too."""
    monkeypatch.setattr(native, "bf16_unit", lambda *channels: None)
    outputs, texts = bfloat16_layer_outputs(64, ("direct", "winograd", "xla"))
    for impl, target in (("direct", native.CONV_FORWARD_TARGET), ("winograd", native.CONV_WINOGRAD_TARGET)):
        assert "bf16_" not in texts[impl] and f"@{target}(" in texts[impl]
        # The kernel rounded to bfloat16 as XLA rounds it; float32 sums in another order: equal almost everywhere.
        assert np.mean(outputs[impl] == outputs["xla"]) > 0.99, impl


def test_bfloat16_convolution_rejects_channels_its_unit_cannot_take():
    x, kernel = jnp.zeros((1, 4, 4, 48), jnp.bfloat16), jnp.zeros((3, 3, 48, 32))
    if not native.amx_available():  # no tile unit (or no library): said before any shape is looked at
        with pytest.raises(native.NativeUnavailable):
            native.conv_forward(x, kernel, ((1, 1), (1, 1)), bf16_unit="tiles")
        return
    with pytest.raises(ValueError, match=r"convolution on 'tiles': kernel \(3, 3, 48, 32\) needs inputs a positive multiple of 32 and "
                                         "outputs a multiple of 32"):
        native.conv_forward(x, kernel, ((1, 1), (1, 1)), bf16_unit="tiles")
    with pytest.raises(ValueError, match="bf16_unit must be 'tiles' or 'dots', got 'amx'"):
        native.conv_forward(x, kernel, ((1, 1), (1, 1)), bf16_unit="amx")


@NEEDS_COMPILER
def test_native_kernel_gradient_sums_each_devices_rows_under_a_mesh():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = np.array(jax.devices()[:4])
    mesh = Mesh(devices, ("data",))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((8, 10, 6, 16)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((8, 10, 6, 32)), jnp.float32)
    grad = lambda x, dy: native.conv_kernel_grad(x, dy, (3, 3), ((1, 1), (1, 1)))  # noqa: E731
    single = jax.jit(grad)(x, dy)
    rows = NamedSharding(mesh, PartitionSpec("data"))
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        sharded = jax.jit(grad, in_shardings=(rows, rows)).lower(x, dy).compile()
    assert "all-gather" not in sharded.as_text()
    np.testing.assert_allclose(sharded(jax.device_put(x, rows), jax.device_put(dy, rows)), single, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("in_channels", "kernel"), [(1, (5, 5)), (1, (3, 3)), (3, (3, 5))])
def test_input_gradient_of_few_channels_by_taps_equals_float64(in_channels, kernel):
    """A first layer's input gradient (fewer than 16 input channels: one product and the taps' shifted sums)
    against numpy in float64, through ``conv_same``'s VJP under 'auto'; 'xla' keeps XLA's convolution."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 9, 7, in_channels)).astype(np.float32)
    w = rng.standard_normal((*kernel, in_channels, 32)).astype(np.float32)
    dy = rng.standard_normal((2, 9, 7, 32)).astype(np.float64)
    ph, pw = kernel[0] // 2, kernel[1] // 2
    # y[h, w] = Σ xpad[h + i, w + j] k[i, j], so dxpad[h + i, w + j] += dy[h, w] k[i, j]; then drop the padding.
    dxpad = np.zeros((2, 9 + 2 * ph, 7 + 2 * pw, in_channels))
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            dxpad[:, i:i + 9, j:j + 7] += np.einsum("bhwo,co->bhwc", dy, w[i, j].astype(np.float64))
    expected = dxpad[:, ph:ph + 9, pw:pw + 7]
    for impl in ("auto", "xla"):
        _, pullback = jax.vjp(lambda x: conv_same(x, jnp.asarray(w), impl), jnp.asarray(x))
        (dx,) = pullback(jnp.asarray(dy, jnp.float32))
        np.testing.assert_allclose(dx, expected, atol=2e-6 * np.abs(expected).max())
    text = jax.jit(jax.grad(lambda x: conv_same(x, jnp.asarray(w), "auto").sum())).lower(x).as_text()
    assert "convolution" not in text  # the product and slices, not XLA's one-channel convolution


@NEEDS_COMPILER
@pytest.mark.parametrize("kernel", [(3, 3), (5, 5)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_conv_layer_gradients_equal_under_either_impl(dtype, kernel):
    """A model's choice of ``conv_impl`` changes no number beyond float32 rounding (summation order; Winograd's
    transforms) (bfloat16: the native kernel gradient is summed in float32, XLA's in bfloat16): each of 'native',
    'direct' and 'winograd' against 'xla', outputs and gradients."""
    x = jnp.asarray(normal(0, (2, 12, 8, 32)), dtype)
    variables = random_variables(Conv(32, kernel, impl="xla", dtype=dtype), x, 1, fan_in_scaled=True)
    results = {}
    for impl in ("native", "direct", "winograd", "xla"):
        layer = Conv(32, kernel, impl=impl, dtype=dtype)
        loss = lambda v, x: (layer.apply(v, x).astype(jnp.float32) ** 2).sum()  # noqa: E731
        results[impl] = [layer.apply(variables, x), *jax.tree.leaves(jax.grad(loss, argnums=(0, 1))(variables, x))]
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    for impl in ("native", "direct", "winograd"):
        for a, b in zip(results[impl], results["xla"], strict=True):
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance * np.abs(b).max(), err_msg=impl)


def test_conv_impl_resolution(monkeypatch):
    assert resolve_conv_impl("xla", 64, 64) == "xla"
    with pytest.raises(ValueError, match="conv_impl must be"):
        resolve_conv_impl("fast")
    monkeypatch.setattr(native, "available", lambda: False)
    assert resolve_conv_impl("auto", 64, 64) == "xla"
    monkeypatch.setattr(native, "available", lambda: True)
    assert resolve_conv_impl("auto", 64, 64) == "native"
    assert resolve_conv_impl("auto", 1, 64) == "xla"     # CNN14's first layer: XLA's was faster
    assert resolve_conv_impl("auto", 64, 40) == "xla"    # C_out not a multiple of the vector width
    assert resolve_conv_impl("direct", 64, 64) == resolve_conv_impl("winograd", 64, 64) == "native"
    assert resolve_conv_impl("winograd", 1, 64) == "xla"
    with pytest.raises(ValueError, match="'direct', 'winograd'"):
        resolve_conv_impl("native-winograd")


def test_native_kernel_gradient_rejects_shapes_that_do_not_fit():
    with pytest.raises(ValueError, match=r"dy \(2, 5, 5, 16\) do not fit kernel \(3, 3\).*expected dy \(2, 4, 4, 16\)"):
        native.conv_kernel_grad(jnp.zeros((2, 4, 4, 8)), jnp.zeros((2, 5, 5, 16)), (3, 3), ((1, 1), (1, 1)))


@NEEDS_COMPILER
@pytest.mark.parametrize(("module", "shape"), [
    ("Conv(16, (1, 601), impl={impl})", (2, 3, 40, 16)),  # more taps than the direct kernel's weight panel (576)
    ("Conv(16, (3, 3), impl={impl})", (2, 5, 6, 0)),      # no input channels
    ("Conv(0, (3, 3), impl={impl})", (1, 4, 4, 16)),      # no output channels
])
def test_native_conv_equals_xla_on_shapes_that_crashed_it(module, shape):
    """Shapes the module accepts on which the kernels once crashed the process (issue 33), each in its own process:
    outputs and gradients equal XLA's form."""
    from native_marks import native_equals_xla_in_a_subprocess

    assert native_equals_xla_in_a_subprocess(module, shape).count("compared") == 3
