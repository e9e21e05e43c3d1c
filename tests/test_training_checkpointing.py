"""init_from (names and shapes transplanted from a model directory) and the model directories a run writes."""

import jax
import numpy as np
import optax
from flax import traverse_util
from training_helpers import tiny_config

from convnext_audio_jax.artifacts import model_dir as checkpoint
from convnext_audio_jax.data import demo
from convnext_audio_jax.models import create_model, init_variables
from convnext_audio_jax.runtime.sharding import data_mesh
from convnext_audio_jax.training import checkpointing
from convnext_audio_jax.training import config as config_lib
from convnext_audio_jax.training import step as step_lib


def test_transplant_params_takes_matching_names_and_shapes():
    target = {"bn0": {"scale": np.zeros(4)}, "trunk": {"stem": {"kernel": np.zeros((4, 4, 1, 8))},
                                                       "block": {"kernel": np.zeros((2, 3))}},
              "head": {"kernel": np.zeros((8, 10))}}
    source = {"trunk": {"stem": {"kernel": np.ones((4, 4, 3, 8))}, "block": {"kernel": np.ones((2, 3))}},
              "head": {"kernel": np.ones((8, 1000))}}
    merged, loaded, kept = checkpointing.transplant_params(target, source)
    assert loaded == ["trunk/block/kernel"]
    assert merged["trunk"]["block"]["kernel"].sum() == 6 and merged["head"]["kernel"].sum() == 0
    assert any(k.startswith("trunk/stem/kernel (shape") for k in kept) and "bn0/scale (not in the checkpoint)" in kept
    _, loaded, kept = checkpointing.transplant_params(target, source, exclude=("trunk/block",))
    assert loaded == [] and "trunk/block/kernel (excluded)" in kept


def _tiny_state(config, mesh):
    model = config_lib.build_model(config, num_classes=demo.NUM_CLASSES)
    return model, step_lib.init_train_state(model, optax.sgd(0.1), 0, mesh)


def test_init_from_a_converted_imagenet_checkpoint_loads_all_but_stem_and_head(tmp_path):
    shape = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}
    imagenet = create_model("convnext_tiny_imagenet", **shape)
    # Its variables' names and shapes, filled with random numbers: what is transplanted is told by name and shape
    # only, so the model's own init (a compile of its 224x224 forward pass, as long as the whole test) proves nothing
    # more here; each value differs from the target's initial one, so every loaded and kept array is told apart.
    rng = np.random.default_rng(1)
    imagenet_variables = jax.tree.map(lambda leaf: rng.standard_normal(leaf.shape).astype(leaf.dtype),
                                      jax.eval_shape(lambda: init_variables(imagenet, jax.random.key(1))))
    checkpoint.save_model(tmp_path / "imagenet", "convnext_tiny_imagenet", imagenet_variables, model_config=shape)

    mesh = data_mesh()
    _, state = _tiny_state(tiny_config(), mesh)
    before = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
    loaded = checkpointing.load_init(state, str(tmp_path / "imagenet"), (), mesh)
    after = traverse_util.flatten_dict(jax.device_get(loaded.params), sep="/")
    source = traverse_util.flatten_dict(imagenet_variables["params"], sep="/")
    for path, value in after.items():
        if path.startswith(("trunk/stem_conv/kernel", "head/", "bn0/")):
            np.testing.assert_array_equal(value, before[path], err_msg=path)  # shapes differ or absent: kept
        else:
            np.testing.assert_array_equal(value, source[path], err_msg=path)
    assert loaded.params["head_norm"]["scale"].sharding.is_fully_replicated


def test_model_writer_writes_loadable_best_and_last(tmp_path):
    """The demo's own front end (16 kHz, 1 s, 64 mels) is stored and comes back through load_model."""
    config = tiny_config()
    model, state = _tiny_state(config, data_mesh())
    writer = checkpointing.ModelWriter(tmp_path, config.model.name,
                                       config_lib.artifact_model_config(config, demo.NUM_CLASSES),
                                       {"class_names": list(demo.CLASS_NAMES), "sample_rate": 16_000})
    writer.write(state, 4, {"val_mAP": 0.5}, is_best=True)
    writer.wait()
    writer.write(state.replace(params=jax.tree.map(lambda p: p + 1, state.params)), 8, {"val_mAP": 0.4}, is_best=False)
    writer.wait()
    best_model, best, best_metadata = checkpoint.load_model(tmp_path / "model" / "best")
    _, last, last_metadata = checkpoint.load_model(tmp_path / "model" / "last")
    assert best_model.frontend == model.frontend and best_model.num_classes == demo.NUM_CLASSES
    assert best_metadata["provenance"] == {"step": 4, "validation": {"val_mAP": 0.5}}
    assert last_metadata["provenance"]["step"] == 8 and last_metadata["class_names"][0] == demo.CLASS_NAMES[0]
    flat_best = traverse_util.flatten_dict(best["params"], sep="/")
    for path, value in traverse_util.flatten_dict(last["params"], sep="/").items():
        np.testing.assert_allclose(value, flat_best[path] + 1, rtol=1e-6, err_msg=path)


def test_an_asynchronous_save_reads_a_copy_of_the_state_the_next_step_donates(tmp_path):
    """Orbax writes an unsliced array from np.asarray of its shard, a view of a CPU device's buffer: the save
    must read a copy, or the next (donating) train step frees what the writer is reading. Small arrays are not
    sliced (checkpointing.MIN_REPLICA_SLICE_BYTES), so this is the path every small state takes."""
    mesh = data_mesh()
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = {"w": jax.device_put(np.arange(12, dtype=np.float32), replicated), "step": jax.numpy.int32(3)}
    saved = checkpointing._host_safe(state)
    assert all(a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()
               for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(saved))
               for a, b in zip((s.data for s in x.addressable_shards), (s.data for s in y.addressable_shards)))
    assert saved["w"].sharding == replicated
    np.testing.assert_array_equal(saved["w"], state["w"])
