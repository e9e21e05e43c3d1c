"""Data-parallel means data-parallel, read from the compiled programs on 8 simulated devices: the train step
communicates one all-reduce of about the gradient's size (plus BatchNorm's per-channel statistics), whatever the
batch per device and the accumulation, and the eval step and the sharded forward communicate nothing; with the
XLA forms (what a GPU runs) and with the CPU's native kernels. Small models of both families (the full-size
figures: benchmarks/collectives.py, docs/train.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from training_helpers import STEP_COMPILE_OPTIONS

from convnext_audio_jax.evaluation.evaluate import Scorer
from convnext_audio_jax.models import create_model, init_variables, with_xla_ops
from convnext_audio_jax.models.frontend import FrontendConfig
from convnext_audio_jax.runtime import collectives
from convnext_audio_jax.runtime.forward import ShardedForward
from convnext_audio_jax.runtime.sharding import data_mesh
from convnext_audio_jax.training import step as step_lib
from convnext_audio_jax.training.augment import AugmentConfig

FRONTEND = FrontendConfig(sample_rate=16_000, n_mels=64, fmax=8_000.0, clip_seconds=1.0)
MODELS = {
    "convnext": lambda: create_model("convnext_tiny", dims=(16, 16, 32, 64), depths=(1, 1, 1, 1), num_classes=10,
                                     frontend=FRONTEND, drop_path_rate=0.1),
    "cnn14": lambda: create_model("cnn14", channels=(16, 16, 16, 16, 32, 32), num_classes=10, frontend=FRONTEND),
}


def _compiled_collectives(jitted, *args):
    """The collectives of ``jitted``'s compiled program: XLA's HLO passes place them (SPMD partitioning, all-reduce
    combining), before LLVM, so the -O0 options leave them as at -O3 (the same text, checked on these models)."""
    return collectives.collectives(jitted.lower(*args).compile(STEP_COMPILE_OPTIONS).as_text())


def test_parser_reads_ops_bytes_and_loops():
    text = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %r = f32[] add(f32[] %a, f32[] %b)
}

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %ar = f32[4]{0} all-reduce(f32[4]{0} %x), replica_groups={}, to_apply=%add
}

ENTRY %main (x: f32[8,2]) -> f32[64,2] {
  %ag = f32[64,2]{1,0} all-gather(f32[8,2]{1,0} %x), dimensions={0}
  %w = (s32[], f32[4]) while((s32[], f32[4]) %t), condition=%cond, body=%body
  %s = (bf16[3], f32[2]) all-reduce-start(bf16[3] %y, f32[2] %z), to_apply=%add
}
"""
    found = collectives.collectives(text)
    assert [(c.op, c.bytes, c.in_loop) for c in found] == [
        ("all-reduce", 16, True), ("all-gather", 512, False), ("all-reduce", 14, False)]
    assert collectives.summary(found)["all-reduce"] == {"count": 2, "bytes": 30, "in_loop": 1}


def _train_collectives(model, per_device: int, accumulation: int, mesh):
    tx = optax.adamw(1e-3)
    state = jax.eval_shape(lambda: step_lib.init_train_state(model, tx, 0, mesh))
    step = step_lib.make_train_step(model, tx, AugmentConfig(time_max_width=16, freq_max_width=8), accumulation, mesh)
    rows = 2 * per_device * mesh.size * accumulation  # mixup: two clips per example
    batch = {"waveform": jax.ShapeDtypeStruct((rows, FRONTEND.clip_samples), jnp.int16),
             "target": jax.ShapeDtypeStruct((rows, model.num_classes), jnp.float32)}
    return _compiled_collectives(step, state, batch)


@pytest.mark.parametrize("form", ["xla", "native"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_train_step_all_reduces_the_gradients_once_and_inference_communicates_nothing(name, form):
    assert jax.device_count() == 8
    mesh = data_mesh()
    model = MODELS[name]()
    model = with_xla_ops(model) if form == "xla" else model
    # Zeros of the variables' shapes: the programs depend on the shapes alone (no random initialiser to compile).
    variables = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype),
                             jax.eval_shape(lambda: init_variables(model, jax.random.key(0))))
    grad_bytes = collectives.tree_bytes(variables["params"])
    # BatchNorm's statistics: three psums of C floats per layer and micro-batch (mean, variance; in the
    # gradient Σg and Σg·x̂ together).
    bn_channels = sum(leaf.size for path, leaf in jax.tree_util.tree_leaves_with_path(variables["batch_stats"])
                      if "mean" in jax.tree_util.keystr(path))
    accumulation = 2
    found = _train_collectives(model, 1, accumulation, mesh)
    assert {c.op for c in found} == {"all-reduce"}, f"{name}/{form}: {collectives.summary(found)}"
    # The gradients once (an all-reduce per micro-batch would be twice their bytes), and the statistics of each
    # micro-batch; the bound does not depend on the batch.
    total = sum(c.bytes for c in found)
    assert grad_bytes <= total <= 1.05 * grad_bytes + 4 * 4 * bn_channels * accumulation, (name, form, total)

    scorer = Scorer(model, mesh)
    waveforms = jax.ShapeDtypeStruct((8, FRONTEND.clip_samples), jnp.int16)
    assert _compiled_collectives(scorer._score, variables, waveforms) == []
    forward = ShardedForward(model, variables, 8, mesh)
    assert _compiled_collectives(forward._forward, variables,
                                 jax.ShapeDtypeStruct((8, FRONTEND.clip_samples), np.float32)) == []
