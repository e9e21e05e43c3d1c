"""The channels-first ONNX graph (convnext_audio_jax.export.onnx_graph): parity with the PyTorch reference in
ONNX Runtime, and the structure that makes it fast there (no layout transposes around PANN convolutions, no
shape arithmetic, BatchNorm folded, LayerNormalization/Gelu fused ops)."""

from __future__ import annotations

import collections

import jax
import numpy as np
import onnxruntime as ort
import pytest
import torch

from convnext_audio_jax import export as export_lib
from convnext_audio_jax.convert.conversion import convert_state_dict
from convnext_audio_jax.convert.torch_reference import build_reference, randomize_
from convnext_audio_jax.export import onnx_graph
from convnext_audio_jax.models import create_model, init_variables

TOLERANCE = 1e-4
SMALL_CONVNEXT = dict(depths=(1, 1, 2, 1), dims=(16, 24, 32, 48))


def session(proto):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def from_reference(name, config, seed):
    """The PyTorch reference with random weights and our model with the same weights converted from it."""
    reference = randomize_(build_reference(name, **config), seed=seed)
    state_dict = {k: v.detach().numpy().copy() for k, v in reference.state_dict().items()}
    variables = convert_state_dict(state_dict, name, model_config=config).variables
    return reference, create_model(name, **config), variables


@pytest.mark.parametrize("name, config", [("convnext_tiny", SMALL_CONVNEXT), ("cnn6", {})])
def test_matches_the_pytorch_reference_in_onnxruntime(name, config):
    waveform = (0.1 * np.random.default_rng(7).standard_normal((2, 320_000))).astype(np.float32)
    waveform[1] *= np.linspace(0.0, 3.0, waveform.shape[1], dtype=np.float32)  # a crescendo: not stationary noise
    reference, model, variables = from_reference(name, config, seed=11)
    with torch.no_grad():
        expected = {k: v.numpy() for k, v in reference(torch.from_numpy(waveform)).items()}
    names = export_lib.output_names(model)
    got = dict(zip(names, session(onnx_graph.build(model, variables, output_names=names)).run(None, {"waveform": waveform})))
    assert np.ptp(expected["clipwise_output"]) > 1e-3  # the comparison is not between two constants
    assert np.abs(got["probs"] - expected["clipwise_output"]).max() <= TOLERANCE
    scene = expected["scene_embedding" if name.startswith("convnext") else "embedding"]
    assert np.abs(got["scene_embedding"] - scene).max() <= TOLERANCE * max(1.0, np.abs(scene).max())
    # (sequence_embeddings and frame_probs, which the reference lacks, are compared with the JAX model in test_export.)


def random_variables(model, seed=0):
    """Variables of ``model``'s shapes without running its initialiser (only the graph's structure is tested)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
    return jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32), shapes)


def op_counts(proto):
    return collections.Counter(node.op_type for node in proto.graph.node)


@pytest.mark.parametrize("name, config", [("cnn14", dict(channels=(8, 16, 16, 32, 32, 48))),
                                          ("cnn14sep", dict(channels=(8, 16, 16, 32, 32, 48))),
                                          ("cnn6next", dict(channels=(8, 16, 32, 64))), ("convnext_tiny", SMALL_CONVNEXT)])
def test_graph_holds_what_the_runtimes_fuse(name, config):
    model = create_model(name, num_classes=5, **config)
    proto = onnx_graph.build(model, random_variables(model), samples=64_000)
    ops = op_counts(proto)
    # No shape arithmetic and no unfolded normalisation: nothing between a Conv and its fusable activation.
    assert not {"Shape", "Gather", "Concat", "Expand", "Reshape", "BatchNormalization", "Erf", "Sqrt", "Div"} & set(ops)
    convs = ops["Conv"] - 1  # the first is the DFT
    if name == "convnext_tiny":
        blocks = sum(SMALL_CONVNEXT["depths"])
        # Channels-last only for each LayerNorm + MLP (two Transposes per block, per stem/downsample norm); the head norm.
        assert ops["LayerNormalization"] == blocks + 4 + 1 and ops["Gelu"] == blocks
        assert ops["Transpose"] == 2 * blocks + 2 * 4 + 2
    elif name == "cnn6next":
        assert ops["Gelu"] == ops["LayerNormalization"] == convs == 4 and ops["Transpose"] == 2 * 4 + 2
    else:  # CNN14: all NCHW; the only Transposes are the log-mel's time-major turn and the sequence output's
        assert ops["Relu"] == convs + 1 and ops["Transpose"] == 2 and convs == 12


def test_output_selection_and_unknown_output():
    model = create_model("cnn6", channels=(8, 16, 32, 48), num_classes=3)
    variables = random_variables(model)
    proto = onnx_graph.build(model, variables, samples=32_000, input_name="audio", output_names=("probs",))
    assert [o.name for o in proto.graph.output] == ["probs"] and [i.name for i in proto.graph.input] == ["audio"]
    # The probabilities alone: no sequence output's Transpose, only the log-mel's time-major turn.
    assert op_counts(proto)["Transpose"] == 1
    with pytest.raises(ValueError, match=r"PannCNN has no output\(s\) \['frame_probs'\]"):
        onnx_graph.build(model, variables, samples=32_000, output_names=("probs", "frame_probs"))
