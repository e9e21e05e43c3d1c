"""Audio ConvNeXt and ImageNet ConvNeXt: sizes, shapes, train/eval behaviour, bf16, sharding, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convnext_audio_jax.models import count_params, create_model, example_input, init_variables

TINY = {"depths": (1, 1, 2, 1), "dims": (8, 16, 24, 32)}
SR = 32_000


_ABSTRACT_VARIABLES = {}


def abstract_variables(model):
    """The variables' shapes, traced once per model configuration (tracing a full-size model's init is ~0.5 s; the
    parameter count, the lengths and the default stem share convnext_tiny's)."""
    key = repr(model)
    if key not in _ABSTRACT_VARIABLES:
        _ABSTRACT_VARIABLES[key] = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
    return _ABSTRACT_VARIABLES[key]


@pytest.mark.parametrize(
    ("name", "expected"),
    [("convnext_tiny", 28_222_767), ("convnext_small", 49_857_327), ("convnext_tiny_imagenet", 28_589_128)],
)
def test_exact_parameter_counts(name, expected):
    # 28,222,767 is the released checkpoint's trainable count; 28,589,128 is timm's convnext_tiny.
    assert count_params(abstract_variables(create_model(name))["params"]) == expected


@pytest.mark.parametrize(("seconds", "frames"), [(10, 31), (1, 3), (30, 94)])
def test_output_shapes_at_several_lengths(seconds, frames):
    model = create_model("convnext_tiny")
    out = jax.eval_shape(lambda v, x: model.apply(v, x), abstract_variables(model), example_input(model, 2, seconds))
    assert out["logits"].shape == out["probs"].shape == (2, 527)
    assert out["scene_embedding"].shape == (2, 768)
    assert out["frame_embeddings"].shape == (2, frames, 7, 768)
    assert out["sequence_embeddings"].shape == (2, frames, 768)


@pytest.mark.parametrize(
    ("stem", "grid"), [("252x56", (31, 7)), ("56", (7, 7)), ("112", (14, 14)), ("504x28", (63, 3)), ("504x56", (63, 7))]
)
def test_stem_variants(stem, grid):
    model = create_model("convnext_tiny", stem=stem)
    out = jax.eval_shape(lambda v, x: model.apply(v, x), abstract_variables(model), example_input(model, 1))
    assert out["frame_embeddings"].shape == (1, *grid, 768)


def test_imagenet_model_shapes():
    model = create_model("convnext_tiny_imagenet")
    out = jax.eval_shape(lambda v, x: model.apply(v, x), abstract_variables(model), example_input(model, 2))
    assert out["logits"].shape == (2, 1000)
    # The check runs while tracing: abstract variables raise it without initialising 28 M parameters.
    with pytest.raises(ValueError, match=r"images must have shape \(batch, height, width, 3\)"):
        jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 32, 32))), abstract_variables(model))


# The tiny-model tests share one eval program and one train-mode program (with drop path), each compiled once.
TINY_MODEL = create_model("convnext_tiny", **TINY)
DROP_PATH_MODEL = create_model("convnext_tiny", drop_path_rate=0.5, **TINY)
apply_eval = jax.jit(lambda v, x: TINY_MODEL.apply(v, x))


def _train_apply(v, x, key):
    return DROP_PATH_MODEL.apply(v, x, train=True, rngs={"drop_path": key}, mutable=["batch_stats"])


train_apply = jax.jit(_train_apply)


@pytest.fixture(scope="module")
def tiny_variables():
    """One initialisation shared by the tiny-model tests (dtype and drop path add no variables)."""
    return init_variables(TINY_MODEL, jax.random.key(0))


def waveforms(batch=2, seconds=1.0, seed=0):
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal((batch, int(seconds * SR)))).astype(np.float32)


def test_tiny_model_runs_and_scene_embedding_is_normalised_pooled_sequence(tiny_variables):
    variables = tiny_variables
    out = apply_eval(variables, waveforms())
    np.testing.assert_allclose(out["probs"], jax.nn.sigmoid(out["logits"]), rtol=1e-6)
    sequence = out["sequence_embeddings"]
    np.testing.assert_allclose(sequence, out["frame_embeddings"].mean(axis=2), rtol=1e-5, atol=1e-6)
    pooled = sequence.max(axis=1) + sequence.mean(axis=1)
    norm = nn.LayerNorm(epsilon=1e-6, use_fast_variance=False)
    scene = norm.apply({"params": variables["params"]["head_norm"]}, pooled)
    np.testing.assert_allclose(out["scene_embedding"], scene, rtol=1e-5, atol=1e-5)


def test_train_mode_updates_bn0_and_uses_drop_path(tiny_variables):
    variables = tiny_variables
    x = waveforms(8)  # the batch test_sharded_jit_equals_single_device shards: one program for both
    out_a, updates = train_apply(variables, x, jax.random.key(1))
    out_b, _ = train_apply(variables, x, jax.random.key(2))
    assert not np.allclose(out_a["logits"], out_b["logits"])  # different drop-path masks
    new_mean = updates["batch_stats"]["bn0"]["mean"]
    assert new_mean.shape == (224,) and not np.allclose(new_mean, variables["batch_stats"]["bn0"]["mean"])
    # Eval mode is deterministic and uses the running statistics (drop path adds no variables: the tiny model's
    # eval program is the drop-path model's).
    eval_a = apply_eval(variables, waveforms())
    eval_b = apply_eval(variables, waveforms())
    np.testing.assert_array_equal(eval_a["logits"], eval_b["logits"])
    with pytest.raises(flax_errors_invalid_rng()):
        jax.eval_shape(lambda v: DROP_PATH_MODEL.apply(v, x, train=True, mutable=["batch_stats"]), variables)


def flax_errors_invalid_rng():
    from flax.errors import InvalidRngError

    return InvalidRngError


def test_logmel_hook_sees_normalised_logmel_in_train_mode_only(tiny_variables):
    seen = []

    def hook(logmel):
        seen.append(logmel.shape)
        return logmel[::2]  # like mixup: 2B rows in, B out

    # The hook runs while the forward is traced, so tracing alone (no compile) shows what it sees and that its
    # rows are what the rest of the model gets.
    out, _ = jax.eval_shape(lambda v, x: TINY_MODEL.apply(v, x, train=True, logmel_hook=hook, mutable=["batch_stats"],
                                                          rngs={"drop_path": jax.random.key(0)}),
                            tiny_variables, waveforms(4))
    assert seen == [(4, 101, 224)] and out["logits"].shape == (2, 527)
    jax.eval_shape(lambda v, x: TINY_MODEL.apply(v, x, train=False, logmel_hook=hook), tiny_variables, waveforms(4))
    assert len(seen) == 1


def test_bfloat16_reaches_every_block_and_params_stay_float32(tiny_variables):
    model = create_model("convnext_tiny", dtype=jnp.bfloat16, **TINY)
    # Initialised in bf16 mode itself: the dtypes come from tracing the init, its values are tiny_variables'.
    abstract = abstract_variables(model)
    assert {p.dtype for p in jax.tree.leaves(abstract["params"])} == {jnp.dtype(jnp.float32)}
    assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract) == jax.tree.map(lambda a: (a.shape, a.dtype),
                                                                                 tiny_variables)
    variables = tiny_variables
    out, state = jax.jit(lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"]))(
        variables, waveforms())
    trunk = state["intermediates"]["trunk"]
    block_outputs = {k: v["__call__"][0] for k, v in trunk.items() if k.startswith("stage")}
    assert len(block_outputs) == sum(TINY["depths"])
    assert all(v.dtype == jnp.bfloat16 for v in block_outputs.values()), {k: v.dtype for k, v in block_outputs.items()}
    for layer in ("dwconv", "norm", "pwconv1", "pwconv2"):
        assert trunk["stage2_block1"][layer]["__call__"][0].dtype == jnp.bfloat16
    assert out["frame_embeddings"].dtype == jnp.bfloat16
    assert out["logits"].dtype == jnp.float32 and np.isfinite(np.asarray(out["probs"])).all()
    reference = apply_eval(variables, waveforms())  # model.clone(dtype=None)
    np.testing.assert_allclose(out["probs"], reference["probs"], atol=0.05)


def test_sharded_jit_equals_single_device(tiny_variables):
    assert jax.device_count() == 8, "tests/conftest.py should provide 8 simulated devices"
    variables = tiny_variables
    x = waveforms(8)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    # With drop path: each device's rows get the masks the single device draws for them.
    key = jax.random.key(1)
    sharded = jax.jit(_train_apply, in_shardings=(replicated, data, replicated))(
        jax.device_put(variables, replicated), jax.device_put(x, data), key)
    single = train_apply(variables, x, key)  # test_train_mode_updates_bn0_and_uses_drop_path's program
    assert sharded[0]["logits"].sharding.spec == jax.sharding.PartitionSpec("data")
    np.testing.assert_allclose(sharded[0]["logits"], single[0]["logits"], rtol=1e-5, atol=1e-5)
    # bn0 statistics are over the global batch, not per device.
    np.testing.assert_allclose(
        sharded[1]["batch_stats"]["bn0"]["var"], single[1]["batch_stats"]["bn0"]["var"], rtol=1e-5
    )


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (np.zeros(SR, np.float32), r"shape \(batch, samples\)"),
        (np.zeros((1, 300), np.float32), "shorter than one STFT window"),
        (np.full((2, SR), np.nan, np.float32), "NaN/Inf samples in batch rows"),
    ],
)
def test_bad_input_is_a_clear_error(x, message, tiny_variables):
    with pytest.raises(ValueError, match=message):
        TINY_MODEL.apply(tiny_variables, x)


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown model 'convnext_huge'; registered models: convnext_tiny"):
        create_model("convnext_huge")
    with pytest.raises(ValueError, match=r"has no field\(s\) \['width'\]"):
        create_model("convnext_tiny", width=3)
    with pytest.raises(ValueError, match="unknown stem"):
        model = create_model("convnext_tiny", stem="99", **TINY)
        init_variables(model, jax.random.key(0))
