"""The train step: an 8-device sharded step equals a one-device step, gradient accumulation averages the
micro-batches, and bfloat16 compute keeps float32 state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec
from training_helpers import STEP_COMPILE_OPTIONS, demo_batch, tiny_config

from convnext_audio_jax.data import demo
from convnext_audio_jax.models import init_variables
from convnext_audio_jax.runtime import xla
from convnext_audio_jax.runtime.sharding import data_mesh
from convnext_audio_jax.training import config as config_lib
from convnext_audio_jax.training import optimizer
from convnext_audio_jax.training import step as step_lib
from convnext_audio_jax.training.augment import AugmentConfig


def test_cpu_bfloat16_policy(monkeypatch, caplog):
    """model.dtype "bfloat16" on a CPU without native bf16 computes in float32 (logged) unless
    model.cpu_bfloat16 = "keep"; with AVX512_BF16 or AMX-BF16 it stays bfloat16. The fallback builds exactly the
    float32 model, so its numbers are the float32 run's."""
    config = tiny_config()
    config.model.dtype = "bfloat16"
    monkeypatch.setattr(xla, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    xla._log_bfloat16_fallback.cache_clear()  # logged once per process: make this the first time
    with caplog.at_level("WARNING"):
        fallback = config_lib.build_model(config, num_classes=demo.NUM_CLASSES)
    assert fallback.dtype == jnp.float32 and "without native bfloat16" in caplog.text
    float32 = config_lib.build_model(tiny_config(), num_classes=demo.NUM_CLASSES)
    # Random variables drawn on the host (the random initialiser's compile proves nothing here); the running
    # variances positive, so every output is finite and the comparison below is between real numbers.
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map_with_path(
        lambda path, leaf: (rng.uniform(0.5, 1.5, leaf.shape) if "batch_stats" in jax.tree_util.keystr(path)
                            else rng.normal(0.0, 0.1, leaf.shape)).astype(leaf.dtype),
        jax.eval_shape(lambda: init_variables(float32, jax.random.key(0))))
    waveform = jax.random.normal(jax.random.key(1), (2, 16_000)) * 0.1
    # Jitted: one compile (the second model's program is the first's, from the XLA cache) instead of op-by-op.
    probs = np.asarray(jax.jit(float32.apply)(variables, waveform)["probs"])
    assert np.isfinite(probs).all() and np.ptp(probs) > 1e-3
    np.testing.assert_array_equal(jax.jit(fallback.apply)(variables, waveform)["probs"], probs)
    config.model.cpu_bfloat16 = "keep"
    assert config_lib.build_model(config, num_classes=demo.NUM_CLASSES).dtype == jnp.bfloat16
    config.model.cpu_bfloat16 = "fallback"
    for native in xla.NATIVE_BFLOAT16_CPU_FLAGS:
        monkeypatch.setattr(xla, "cpu_flags", lambda native=native: frozenset({"avx512f", native}))
        assert config_lib.build_model(config, num_classes=demo.NUM_CLASSES).dtype == jnp.bfloat16
    assert xla.native_bfloat16("gpu") and xla.compute_dtype("bfloat16", "fallback", backend="tpu") == "bfloat16"
    config.model.cpu_bfloat16 = "sometimes"
    with pytest.raises(config_lib.ConfigError, match="model.cpu_bfloat16: .*'fallback' or 'keep', got 'sometimes'"):
        config_lib.build_model(config, num_classes=demo.NUM_CLASSES)


def test_mixed_precision_computes_in_bfloat16_and_keeps_float32_state():
    config = tiny_config()
    config.model.dtype = "bfloat16"
    config.model.cpu_bfloat16 = "keep"  # bfloat16 on any CPU
    model = config_lib.build_model(config, num_classes=demo.NUM_CLASSES)
    assert model.dtype == jnp.bfloat16
    tx = optimizer.make_optimizer(config.optimizer, config.total_steps)
    state = jax.eval_shape(lambda: step_lib.init_train_state(model, tx, 0, data_mesh()))
    floating = [leaf.dtype for leaf in jax.tree.leaves((state.params, state.opt_state, state.batch_stats))
                if jnp.issubdtype(leaf.dtype, jnp.floating)]
    assert floating and all(dtype == jnp.float32 for dtype in floating)


def _run(step, state, batch):
    return step.lower(state, batch).compile(STEP_COMPILE_OPTIONS)(state, batch)


def _clips():
    """32 rows (16 examples, mixup pairs) of float32 waveforms (which can carry a NaN) and their targets: the
    sharded and the skip_nonfinite tests run the same 8-device step on them, compiled once (the XLA cache)."""
    batch = demo_batch(32)
    return batch["waveform"].astype(np.float32) / 32767.0, batch["target"]


def _model_and_optimizer(config):
    model = config_lib.build_model(config, num_classes=demo.NUM_CLASSES)
    return model, optimizer.make_optimizer(config.optimizer, config.total_steps)


@pytest.fixture(scope="module")
def initial_state():
    """The tiny model's initial train state (seed 0) on the host, which the tests place on their meshes: one
    initialiser to compile for the module."""
    model, tx = _model_and_optimizer(tiny_config())
    return jax.device_get(step_lib.init_train_state(model, tx, 0, data_mesh()))


def _placed(state, mesh):
    """A copy of ``state`` replicated over ``mesh``, as init_train_state makes it. A copy: on the CPU a device
    array may share a host array's memory, and the step donates (overwrites) its state."""
    return jax.device_put(jax.tree.map(np.copy, state), NamedSharding(mesh, PartitionSpec()))


def _one_step(config, mesh, initial):
    model, tx = _model_and_optimizer(config)
    step = step_lib.make_train_step(model, tx, config_lib.augment_config(config), 1, mesh)
    waveform, target = _clips()
    state, metrics = _run(step, _placed(initial, mesh),
                          step_lib.global_batch({"waveform": waveform, "target": target}, mesh))
    return jax.device_get(state), jax.device_get(metrics)


def test_sharded_step_equals_one_device_step(initial_state):
    """Data parallelism changes nothing: bn0 statistics, loss and gradients are over the global batch, and
    every example draws its own augmentation whatever device holds it."""
    config = tiny_config()
    assert jax.device_count() == 8
    initial = initial_state.params
    state8, metrics8 = _one_step(config, data_mesh(), initial_state)
    state1, metrics1 = _one_step(config, data_mesh(jax.devices()[:1]), initial_state)
    assert float(metrics8["loss"]) == pytest.approx(float(metrics1["loss"]), rel=1e-6)
    assert float(metrics8["grad_norm"]) == pytest.approx(float(metrics1["grad_norm"]), rel=1e-4)
    flat8 = traverse_util.flatten_dict(state8.params, sep="/")
    flat1 = traverse_util.flatten_dict(state1.params, sep="/")
    moved = max(float(np.max(np.abs(flat8[k] - v))) for k, v in traverse_util.flatten_dict(initial, sep="/").items())
    assert moved > 1e-5  # the step did update the parameters
    # Adam's first update is lr·g/(|g| + ε): for the odd gradient near ε, summation-order differences of
    # the 8-way reduction move it by a small fraction of the step size lr.
    first_step_lr = optimizer.host_learning_rate(config.optimizer, config.total_steps, 0)
    for path, value in flat8.items():
        np.testing.assert_allclose(value, flat1[path], rtol=1e-5, atol=2e-3 * first_step_lr, err_msg=path)
    for path, value in traverse_util.flatten_dict(state8.batch_stats, sep="/").items():
        np.testing.assert_allclose(value, traverse_util.flatten_dict(state1.batch_stats, sep="/")[path],
                                   rtol=1e-5, atol=1e-6, err_msg=path)
    assert int(state8.step) == int(state1.step) == 1


def test_gradient_accumulation_averages_the_micro_batch_gradients(initial_state):
    """With SGD at lr 1 a step subtracts the gradient: two accumulated micro-batches must give the mean of
    the two single-batch steps (no augmentation or drop path, so no randomness differs between them)."""
    config = tiny_config()
    config.model.drop_path_rate = 0.0
    augment = AugmentConfig(spec_augment=False, mixup=False, speed_perturb=False)
    model = config_lib.build_model(config, num_classes=demo.NUM_CLASSES)
    mesh = data_mesh(jax.devices()[:1])
    tx = optax.sgd(1.0)
    batch = demo_batch(8)
    halves = [{key: value[rows] for key, value in batch.items()} for rows in (slice(0, 4), slice(4, 8))]

    # The module's initial parameters (drop path has none), with SGD's (empty) optimizer state.
    initial = initial_state.replace(opt_state=tx.init(initial_state.params))

    def run(accumulation_steps, data):
        step = step_lib.make_train_step(model, tx, augment, accumulation_steps, mesh)
        new_state, metrics = _run(step, _placed(initial, mesh), step_lib.global_batch(data, mesh))
        return traverse_util.flatten_dict(jax.device_get(new_state.params), sep="/"), float(metrics["loss"])

    accumulated, loss = run(2, batch)
    first, loss_first = run(1, halves[0])
    second, loss_second = run(1, halves[1])
    assert loss == pytest.approx((loss_first + loss_second) / 2, rel=1e-6)
    for path, value in accumulated.items():
        np.testing.assert_allclose(value, (first[path] + second[path]) / 2, rtol=1e-5, atol=1e-7, err_msg=path)


def test_skip_nonfinite_keeps_the_state_of_a_nan_batch_and_applies_the_next(initial_state):
    """on_nonfinite = "skip_batch": a batch holding one NaN clip (float32 waveforms carry it) leaves params,
    batch_stats and opt_state bit for bit as they were and only advances the step; the next finite batch is
    applied. Without skipping, the same batch poisons the params."""
    config = tiny_config()
    mesh = data_mesh()
    model, tx = _model_and_optimizer(config)
    waveform, target = _clips()
    poisoned = waveform.copy()
    poisoned[5, 100] = np.nan

    def batch(w):
        return step_lib.global_batch({"waveform": w, "target": target}, mesh)

    skipping = step_lib.make_train_step(model, tx, config_lib.augment_config(config), 1, mesh, skip_nonfinite=True)
    before = initial_state
    state = _placed(before, mesh)
    skipping = skipping.lower(state, batch(poisoned)).compile(STEP_COMPILE_OPTIONS)  # run twice below
    state, metrics = skipping(state, batch(poisoned))
    after = jax.device_get(state)
    assert not np.isfinite(float(metrics["loss"]))
    assert int(after.step) == 1
    for name in ("params", "batch_stats", "opt_state", "rng"):
        expected = jax.tree.leaves(getattr(before, name))
        got = jax.tree.leaves(getattr(after, name))
        assert len(expected) == len(got)
        for a, b in zip(expected, got):
            np.testing.assert_array_equal(a, b, err_msg=name)
    state, metrics = skipping(state, batch(waveform))
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 2
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), jax.device_get(state.params),
                                         before.params))
    assert max(moved) > 0 and all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(jax.device_get(state.params)))

    plain = step_lib.make_train_step(model, tx, config_lib.augment_config(config), 1, mesh)
    state, _ = _run(plain, _placed(initial_state, mesh), batch(poisoned))  # the sharded test's program
    assert not all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(jax.device_get(state.params)))
