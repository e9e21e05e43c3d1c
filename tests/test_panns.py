"""PANN CNNs: exact parameter counts, output shapes, bf16 reaching the blocks, dropout in training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convnext_audio_jax.models import count_params, create_model, init_variables
from convnext_audio_jax.models.panns import NextBlock
from convnext_audio_jax.runtime import xla

PANNS = ["cnn14", "cnn6", "cnn14sep", "cnn6next"]
# Reduced widths keep the forward passes cheap where the full model is not the point.
TINY = {"cnn14": (8, 8, 16, 16, 16, 16), "cnn14sep": (8, 8, 16, 16, 16, 16), "cnn6": (8, 8, 16, 16), "cnn6next": (8, 16, 32, 64)}


def _abstract_variables(model):
    return jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))


# These programs run once or thrice: LLVM -O1 compiles them several times faster, with the same dtypes and values.
def run_once(fun):
    return jax.jit(fun, compiler_options=xla.RUN_ONCE_COMPILER_OPTIONS)


@pytest.fixture(scope="module")
def tiny_variables():
    """name -> random variables of the TINY float32 model, initialised once for the module (the bfloat16 models
    have the same variables: the dtype is the computation's, the parameters stay float32)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = init_variables(create_model(name, channels=TINY[name]), jax.random.key(1))
        return cache[name]

    return get


@pytest.mark.parametrize(
    "name, expected",
    [("cnn14", 80_753_615), ("cnn6", 4_837_455), ("cnn14sep", 30_470_543), ("cnn6next", 3_373_135)],
)
def test_parameter_counts(name, expected):
    variables = _abstract_variables(create_model(name))
    assert count_params(variables["params"]) == expected
    # bn0 over 64 mel bins plus one BatchNorm per conv (the CNN6Next blocks use LayerNorm instead).
    assert variables["batch_stats"]["bn0"]["mean"].shape == (64,)


# Last-block (time, mel) cells: 1 + 100·s frames and 64 mels, floor-halved by each 2×2 pooling
# (five for CNN14, four for CNN6).
CNN14_CELLS = {10: (31, 2), 1: (3, 2), 30: (93, 2)}
CNN6_CELLS = {10: (62, 4), 1: (6, 4), 30: (187, 4)}


@pytest.mark.parametrize(
    "name, cells, channels",
    [("cnn14", CNN14_CELLS, 2048), ("cnn14sep", CNN14_CELLS, 2048), ("cnn6", CNN6_CELLS, 512), ("cnn6next", CNN6_CELLS, 512)],
)
@pytest.mark.parametrize("seconds", [10, 1, 30])
def test_output_shapes(name, cells, channels, seconds):
    model = create_model(name)
    variables = _abstract_variables(model)
    out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, jax.ShapeDtypeStruct((2, 32000 * seconds), jnp.float32))
    assert out["logits"].shape == out["probs"].shape == (2, 527)
    assert out["scene_embedding"].shape == (2, channels)
    assert out["frame_embeddings"].shape == (2, *cells[seconds], channels)


@pytest.mark.parametrize("name", PANNS)
def test_forward_runs_and_head_reads_the_embedding(name, tiny_variables):
    model = create_model(name, channels=TINY[name])
    variables = tiny_variables(name)
    waveform = 0.1 * jax.random.normal(jax.random.key(2), (2, 16000))
    out = run_once(lambda v, x: model.apply(v, x))(variables, waveform)
    head = variables["params"]["fc_audioset"]
    np.testing.assert_allclose(out["logits"], out["scene_embedding"] @ head["kernel"] + head["bias"], atol=1e-5)
    np.testing.assert_allclose(out["probs"], jax.nn.sigmoid(out["logits"]), atol=1e-6)
    assert np.all(np.asarray(out["scene_embedding"]) >= 0)  # ReLU(fc1)


@pytest.mark.parametrize("name", PANNS)
def test_bfloat16_reaches_every_block(name, tiny_variables):
    model = create_model(name, channels=TINY[name], dtype=jnp.bfloat16)
    abstract = _abstract_variables(model)  # what init_variables gives the bfloat16 model, without compiling it
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(abstract["params"]))
    variables = tiny_variables(name)
    assert jax.tree.structure(variables) == jax.tree.structure(abstract)
    waveform = 0.1 * jax.random.normal(jax.random.key(2), (2, 16000))
    out, state = run_once(lambda v, x: model.apply(v, x, capture_intermediates=True))(variables, waveform)
    inter = state["intermediates"]
    blocks = [k for k in inter if k.startswith("conv_block")]
    assert len(blocks) == len(TINY[name])
    for block in blocks:
        assert inter[block]["__call__"][0].dtype == jnp.bfloat16, block
        for layer, value in inter[block].items():
            if layer != "__call__":
                assert value["__call__"][0].dtype == jnp.bfloat16, f"{block}/{layer}"
    assert inter["fc1"]["__call__"][0].dtype == jnp.bfloat16
    assert out["probs"].dtype == jnp.float32
    assert all(np.isfinite(np.asarray(v, np.float32)).all() for v in out.values())


def test_training_uses_the_dropout_rng_and_updates_batch_stats(tiny_variables):
    model = create_model("cnn6", channels=TINY["cnn6"])
    variables = tiny_variables("cnn6")
    waveform = 0.1 * jax.random.normal(jax.random.key(2), (2, 16000))  # the forward test's: its program is reused

    # The variables and clips are arguments, not constants XLA would fold at compile time.
    @run_once
    def train(v, x, key):
        return model.apply(v, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"])

    with pytest.raises(Exception, match="dropout"):  # raised while tracing: no eager forward pass needed
        jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, waveform)
    (a, state), (b, _), (c, _) = (train(variables, waveform, jax.random.key(k)) for k in (3, 3, 4))
    np.testing.assert_array_equal(a["logits"], b["logits"])
    assert np.abs(np.asarray(a["logits"] - c["logits"])).max() > 1e-4
    before = variables["batch_stats"]["conv_block1"]["bn1"]["mean"]
    assert np.abs(np.asarray(state["batch_stats"]["conv_block1"]["bn1"]["mean"] - before)).max() > 0
    # Evaluation is deterministic and needs no RNG.
    evaluate = run_once(lambda v, x: model.apply(v, x))
    e1, e2 = evaluate(variables, waveform), evaluate(variables, waveform)
    np.testing.assert_array_equal(e1["logits"], e2["logits"])


@pytest.mark.parametrize("impl", ["xla", "shift"])
def test_next_block_depthwise_multiplier_matches_torch_grouped_conv(impl):
    """CNN6Next's 'DW K=2' conv: output channel c·2+m reads input channel c, as torch's groups=C."""
    block = NextBlock(16, pool=(1, 1), depthwise_impl=impl)
    x = np.random.default_rng(0).normal(size=(2, 12, 10, 8)).astype(np.float32)
    variables = run_once(lambda key: block.init(key, x, False))(jax.random.key(0))  # one compile, not one per op
    params = variables["params"]
    captured = run_once(lambda v: block.apply(v, x, False, capture_intermediates=True))(variables)
    captured = captured[1]["intermediates"]["dwconv"]["__call__"][0]
    conv = torch.nn.Conv2d(8, 16, 7, padding=3, groups=8)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(np.transpose(np.asarray(params["dwconv"]["kernel"]), (3, 2, 0, 1)).copy()))
        conv.bias.copy_(torch.from_numpy(np.array(params["dwconv"]["bias"])))
        want = conv(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(captured), want, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 9, 7, 5), (1, 8, 4, 3)])  # odd sizes: floor, as torch
def test_average_pooling_equals_torch_avg_pool2d(shape):
    from convnext_audio_jax.models.panns import _avg_pool

    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    dy = np.random.default_rng(1).standard_normal((shape[0], shape[1] // 2, shape[2] // 2, shape[3])).astype(np.float32)
    y, pullback = jax.vjp(lambda v: _avg_pool(v, (2, 2)), jnp.asarray(x))
    tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    ty = torch.nn.functional.avg_pool2d(tx, (2, 2))
    ty.backward(torch.tensor(dy.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(y, ty.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(pullback(jnp.asarray(dy))[0], tx.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-6, atol=1e-6)
    assert _avg_pool(jnp.asarray(x), (1, 1)) is not None and np.array_equal(_avg_pool(jnp.asarray(x), (1, 1)), x)
