"""The optimizer: one-cycle schedule equal to torch's OneCycleLR, the host-side learning rate for logging,
and AdamW's decay mask."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from convnext_audio_jax.data import demo
from convnext_audio_jax.models import init_variables
from convnext_audio_jax.training import config as config_lib, optimizer
from training_helpers import tiny_config


def test_one_cycle_schedule_matches_torch_one_cycle_lr():
    import torch
    total = 200
    config = config_lib.default_config().optimizer
    lr = optimizer.learning_rate_schedule(config, total)
    beta1 = optimizer.one_cycle(0.95, 0.85, 0.95, total, 0.3)

    parameter = torch.nn.Parameter(torch.zeros(1))
    torch_optimizer = torch.optim.AdamW([parameter], lr=4e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(torch_optimizer, max_lr=4e-3, total_steps=total)
    torch_lr, torch_beta1 = [], []
    for _ in range(total):
        torch_lr.append(torch_optimizer.param_groups[0]["lr"])
        torch_beta1.append(torch_optimizer.param_groups[0]["betas"][0])
        torch_optimizer.step()
        scheduler.step()
    steps = jnp.arange(total)
    np.testing.assert_allclose(np.asarray(lr(steps)), torch_lr, rtol=2e-5, atol=1e-12)
    np.testing.assert_allclose(np.asarray(beta1(steps)), torch_beta1, rtol=1e-6)
    host = [optimizer.host_learning_rate(config, total, s) for s in range(total)]
    np.testing.assert_allclose(host, torch_lr, rtol=1e-9, atol=1e-15)  # float64 on the host: exact


@pytest.mark.parametrize("schedule", ["one_cycle", "constant"])
def test_host_learning_rate_equals_the_device_schedule(schedule):
    config = config_lib.default_config().optimizer
    config.schedule = schedule
    total = 1000
    device = np.asarray(optimizer.learning_rate_schedule(config, total)(jnp.arange(total + 5)))
    host = np.array([optimizer.host_learning_rate(config, total, s) for s in range(total + 5)])
    np.testing.assert_allclose(host, device, rtol=2e-5, atol=1e-10)  # float32 rounding near the end


def test_schedule_values_at_start_peak_and_end():
    total = 75_000
    lr = optimizer.learning_rate_schedule(config_lib.default_config().optimizer, total)
    start = 4e-3 / 25
    assert float(lr(0)) == pytest.approx(start, rel=1e-6)
    assert float(lr(int(0.3 * total) - 1)) == pytest.approx(4e-3, rel=1e-6)  # the peak, at 30 % (22.5k steps)
    assert float(lr(int(0.3 * total))) == pytest.approx(4e-3, rel=1e-6)
    assert float(lr(total - 1)) == pytest.approx(start / 1e4, rel=1e-4)
    assert float(lr(total // 2)) < 4e-3


def test_weight_decay_mask_covers_exactly_the_multi_axis_params():
    config = tiny_config()
    model = config_lib.build_model(config, num_classes=demo.NUM_CLASSES)
    params = init_variables(model, jax.random.key(0))["params"]
    mask = traverse_util.flatten_dict(optimizer.weight_decay_mask(params), sep="/")
    flat = traverse_util.flatten_dict(params, sep="/")
    decayed = {path for path, on in mask.items() if on}
    assert decayed == {path for path in flat if path.endswith("/kernel")}
    assert "trunk/stage0_block0/dwconv/kernel" in decayed
    for one_dimensional in ("bn0/scale", "bn0/bias", "trunk/stage0_block0/gamma", "head/bias", "head_norm/scale",
                            "trunk/stem_norm/bias", "trunk/stage2_block0/pwconv1/bias"):
        assert one_dimensional in flat and one_dimensional not in decayed

    # With zero gradients AdamW only decays: kernels shrink by lr·wd, every 1-D parameter stays put.
    tx = optimizer.make_optimizer(config.optimizer, 100)
    @jax.jit  # one program, not an eager dispatch (and a compile) per operation and parameter shape
    def decayed_params(params):
        updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
        return optax.apply_updates(params, updates)

    new = traverse_util.flatten_dict(decayed_params(params), sep="/")
    lr = 4e-3 / 25
    for path, value in flat.items():
        expected = value * (1 - lr * 0.05) if path in decayed else value
        np.testing.assert_allclose(new[path], expected, rtol=1e-6, atol=0, err_msg=path)
