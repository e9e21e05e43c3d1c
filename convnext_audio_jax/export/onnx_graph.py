"""The ONNX graph of an audio ConvNeXt or PANN CNN written directly, channels-first (NCHW), from its variables.

Tracing the NHWC JAX forward (jax2onnx) gave a graph that ONNX Runtime ran at 0.2× and OpenVINO at 0.6–0.7×
the speed of the PyTorch original's own ``torch.onnx.export`` (issue 36): a Transpose pair around every Conv,
~1 800 shape-computation nodes (Shape/Gather/Concat/Expand) that block the runtimes' fusions, BatchNorm as
arithmetic after each convolution, LayerNorm and GELU as ReduceMean/Sqrt/Div/Erf chains. This graph holds
what the runtimes have fast kernels and fusions for:

* front end: reflect Pad, the Hann-windowed DFT as one strided ``Conv`` (real and imaginary bases stacked, as
  torchlibrosa's STFT), the power and the mel projection as one ``MatMul`` with the mel matrix stacked twice,
  ``Log``; the dB scale and ``bn0`` folded into one per-mel multiply-add;
* convolutions NCHW, BatchNorm folded into their weights and bias (PANNs), depthwise as grouped ``Conv``;
* ConvNeXt's channel LayerNorm and MLP in channels-last between two Transposes per block (as timm's blocks),
  as ``LayerNormalization``, ``MatMul``, ``Gelu`` (opset 20), the layer scale folded into the second Dense.

``sequence_embeddings``, ``scene_embedding`` and ``frame_probs`` are by-products of what the probabilities
need (a Transpose of the pooled sequence, the head's input, one small MatMul), so the probabilities pay
nothing measurable for them. The tests compare every output with the JAX model and with the PyTorch reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from convnext_audio_jax.models.convnext import LN_EPS, STEM_VARIANTS, AudioConvNeXt
from convnext_audio_jax.models.frontend import dft_bases, mel_filterbank
from convnext_audio_jax.models.norm import BN_EPS
from convnext_audio_jax.models.panns import PannCNN

OPSET = 20  # Gelu is in the default domain from opset 20
OUTPUT_DIMS = {"probs": ["classes"], "scene_embedding": ["channels"], "sequence_embeddings": ["steps", "channels"],
               "frame_probs": ["steps", "classes"]}


def supports(model: Any) -> bool:
    """Whether this writer knows the model's architecture (the audio ConvNeXt and the PANN CNN family)."""
    return isinstance(model, (AudioConvNeXt, PannCNN))


class _Graph:
    """Appends nodes and float32 initialisers; every value gets a fresh name."""

    def __init__(self):
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value, hint: str = "c", dtype=np.float32) -> str:
        from onnx import numpy_helper

        name = self._name(hint)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(np.asarray(value, dtype)), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], hint: str | None = None, output: str | None = None, **attrs) -> str:
        from onnx import helper

        output = output or self._name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], name=output, **attrs))
        return output

    def axes(self, *axes: int) -> str:
        return self.const(axes, "axes", np.int64)

    def dense(self, x: str, kernel, bias, hint: str) -> str:
        return self.op("Add", [self.op("MatMul", [x, self.const(kernel, f"{hint}_w")]), self.const(bias, f"{hint}_b")], hint)

    def layer_norm(self, x: str, params: Mapping[str, Any], hint: str) -> str:
        """LayerNorm over the last axis."""
        return self.op("LayerNormalization", [x, self.const(params["scale"], f"{hint}_g"), self.const(params["bias"], f"{hint}_b")],
                       hint, axis=-1, epsilon=LN_EPS)

    def conv(self, x: str, kernel_hwio, bias, hint: str, stride=(1, 1), pads=(0, 0, 0, 0), group: int = 1) -> str:
        """A 2-D convolution from a Flax kernel (kh, kw, C_in/group, C_out)."""
        kernel = np.transpose(np.asarray(kernel_hwio, np.float32), (3, 2, 0, 1))
        inputs = [x, self.const(kernel, f"{hint}_w")] + ([self.const(bias, f"{hint}_b")] if bias is not None else [])
        return self.op("Conv", inputs, hint, kernel_shape=list(kernel.shape[2:]), strides=list(stride), pads=list(pads), group=group)

    def to_last(self, x: str) -> str:
        return self.op("Transpose", [x], "nhwc", perm=[0, 2, 3, 1])

    def to_first(self, x: str) -> str:
        return self.op("Transpose", [x], "nchw", perm=[0, 3, 1, 2])


def _numpy(tree):
    return {k: _numpy(v) for k, v in tree.items()} if isinstance(tree, Mapping) else np.asarray(tree, np.float32)


def _folded_bn(params: Mapping[str, Any], stats: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Inference BatchNorm as y = x·scale + shift (float64 then float32)."""
    scale = params["scale"].astype(np.float64) / np.sqrt(stats["var"].astype(np.float64) + BN_EPS)
    return scale, params["bias"].astype(np.float64) - stats["mean"].astype(np.float64) * scale


def _front_end(g: _Graph, model: Any, params, stats) -> str:
    """waveform (B, L) → normalised log-mel (B, 1, T, mels)."""
    config = model.frontend
    pad = config.n_fft // 2
    x = g.op("Unsqueeze", ["waveform", g.axes(1)], "wave")
    x = g.op("Pad", [x, g.const([0, 0, pad, 0, 0, pad], "pads", np.int64)], "reflect", mode="reflect")
    cos, sin = dft_bases(config.n_fft)  # (n_fft, freqs): real and minus imaginary parts
    bases = np.concatenate([cos, sin], axis=1).T[:, None, :]  # (2·freqs, 1, n_fft)
    spectrum = g.op("Conv", [x, g.const(bases, "dft")], "stft", kernel_shape=[config.n_fft], strides=[config.hop_length])
    squares = g.op("Mul", [spectrum, spectrum], "squares")
    mel = mel_filterbank(config)  # (freqs, mels); re² @ M + im² @ M = [re², im²] @ [M; M]
    mel = g.op("MatMul", [g.const(np.concatenate([mel, mel], axis=0).T, "mel"), squares], "mel")  # (B, mels, T)
    log = g.op("Log", [g.op("Max", [mel, g.const(config.amin, "amin")])], "log")
    # 10·log10(m) then bn0: one multiply-add per mel bin.
    scale, shift = _folded_bn(params["bn0"], stats["bn0"])
    x = g.op("Add", [g.op("Mul", [log, g.const((10.0 / np.log(10.0) * scale)[:, None], "db_scale")]),
                     g.const(shift[:, None], "bn0_shift")], "logmel")
    return g.op("Unsqueeze", [g.op("Transpose", [x], "time_major", perm=[0, 2, 1]), g.axes(1)], "input")


def _mlp(g: _Graph, x: str, params, hint: str, gamma=None) -> str:
    """Channels-last LayerNorm → Dense 4C → GELU → Dense C (× layer scale ``gamma``)."""
    x = g.layer_norm(x, params["norm"], f"{hint}_norm")
    x = g.op("Gelu", [g.dense(x, params["pwconv1"]["kernel"], params["pwconv1"]["bias"], f"{hint}_fc1")], f"{hint}_gelu")
    kernel, bias = params["pwconv2"]["kernel"], params["pwconv2"]["bias"]
    if gamma is not None:
        kernel, bias = kernel * gamma[None, :], bias * gamma
    return g.dense(x, kernel, bias, f"{hint}_fc2")


def _convnext(g: _Graph, model: AudioConvNeXt, params, x: str) -> str:
    trunk = params["trunk"]
    stem = STEM_VARIANTS[model.stem]
    (pt, pl) = stem["padding"]
    x = g.conv(x, trunk["stem_conv"]["kernel"], trunk["stem_conv"]["bias"], "stem", stem["stride"], (pt, pl, pt, pl))
    x = g.to_first(g.layer_norm(g.to_last(x), trunk["stem_norm"], "stem_norm"))
    for stage, depth in enumerate(model.depths):
        if stage > 0:
            x = g.to_first(g.layer_norm(g.to_last(x), trunk[f"downsample{stage}_norm"], f"down{stage}_norm"))
            conv = trunk[f"downsample{stage}_conv"]
            x = g.conv(x, conv["kernel"], conv["bias"], f"down{stage}", (2, 2))
        for block in range(depth):
            p, hint = trunk[f"stage{stage}_block{block}"], f"s{stage}b{block}"
            channels = p["dwconv"]["kernel"].shape[-1]
            y = g.conv(x, p["dwconv"]["kernel"], p["dwconv"]["bias"], f"{hint}_dw", pads=(3, 3, 3, 3), group=channels)
            y = _mlp(g, g.to_last(y), p, hint, p.get("gamma"))
            x = g.op("Add", [x, g.to_first(y)], f"{hint}_out")
    return x


def _pann(g: _Graph, model: PannCNN, params, stats, x: str) -> str:
    for index, pool in enumerate(model.pools, start=1):
        p, s, hint = params[f"conv_block{index}"], stats.get(f"conv_block{index}", {}), f"block{index}"
        if model.block == "next":
            in_channels = model.channels[index - 2] if index > 1 else 1  # depthwise with a multiplier
            x = g.conv(x, p["dwconv"]["kernel"], p["dwconv"]["bias"], f"{hint}_dw", pads=(3, 3, 3, 3), group=in_channels)
            x = g.to_first(_mlp(g, g.to_last(x), p, hint))
        else:
            k, num_convs = {"conv3x3": (3, 2), "sep3x3": (3, 2), "conv5x5": (5, 1)}[model.block]
            for i in range(1, num_convs + 1):
                kernel = p[f"conv{i}"]["kernel"]
                scale, shift = _folded_bn(p[f"bn{i}"], s[f"bn{i}"])
                depthwise = model.block == "sep3x3" and i == 2
                x = g.conv(x, kernel * scale.astype(np.float32), shift, f"{hint}_conv{i}", pads=(k // 2,) * 4,
                           group=kernel.shape[-1] if depthwise else 1)
                x = g.op("Relu", [x], f"{hint}_relu{i}")
        if tuple(pool) != (1, 1):
            x = g.op("AveragePool", [x], f"{hint}_pool", kernel_shape=list(pool), strides=list(pool))
    return x


def build(model: Any, variables: Mapping[str, Any], samples: int | None = None, input_name: str = "waveform",
          output_names: Sequence[str] = ("probs", "scene_embedding", "sequence_embeddings")):
    """The ``onnx.ModelProto`` (opset 20) of ``model`` with ``variables``: input ``input_name`` (batch, samples),
    batch symbolic, float32; outputs ``output_names`` (of probs, scene_embedding, sequence_embeddings, and for the
    audio ConvNeXt frame_probs)."""
    from onnx import TensorProto, checker, helper

    params, stats = _numpy(variables["params"]), _numpy(variables.get("batch_stats", {}))
    samples = samples or model.frontend.clip_samples
    g = _Graph()
    x = _front_end(g, model, params, stats)
    frames = _convnext(g, model, params, x) if isinstance(model, AudioConvNeXt) else _pann(g, model, params, stats, x)
    sequence = g.op("ReduceMean", [frames, g.axes(3)], "mel_mean", keepdims=0)  # (B, C, T)
    pooled = g.op("Add", [g.op("ReduceMax", [sequence, g.axes(2)], "max_t", keepdims=0),
                          g.op("ReduceMean", [sequence, g.axes(2)], "mean_t", keepdims=0)], "pooled")
    outputs = {}
    if isinstance(model, AudioConvNeXt):
        scene = g.layer_norm(pooled, params["head_norm"], "head_norm")
        logits = g.op("Gemm", [scene, g.const(params["head"]["kernel"], "head_w"), g.const(params["head"]["bias"], "head_b")], "logits")
    else:
        scene = g.op("Relu", [g.op("Gemm", [pooled, g.const(params["fc1"]["kernel"], "fc1_w"), g.const(params["fc1"]["bias"], "fc1_b")],
                                   "fc1")], "embedding")
        logits = g.op("Gemm", [scene, g.const(params["fc_audioset"]["kernel"], "fc_w"), g.const(params["fc_audioset"]["bias"], "fc_b")],
                      "logits")
    outputs["probs"] = g.op("Sigmoid", [logits], output="probs")
    if "scene_embedding" in output_names:
        outputs["scene_embedding"] = g.op("Identity", [scene], output="scene_embedding")
    if {"sequence_embeddings", "frame_probs"} & set(output_names):
        steps = g.op("Transpose", [sequence], "steps", perm=[0, 2, 1])  # (B, T, C)
    if "sequence_embeddings" in output_names:
        outputs["sequence_embeddings"] = g.op("Identity", [steps], output="sequence_embeddings")
    if "frame_probs" in output_names and isinstance(model, AudioConvNeXt):
        # The clip head on each step as if the window were constant: Dense(LayerNorm(2·s_t)).
        doubled = g.op("Mul", [steps, g.const(2.0, "two")], "doubled")
        step_logits = g.dense(g.layer_norm(doubled, params["head_norm"], "frame_norm"), params["head"]["kernel"],
                              params["head"]["bias"], "frame_head")
        outputs["frame_probs"] = g.op("Sigmoid", [step_logits], output="frame_probs")
    unknown = sorted(set(output_names) - set(outputs))
    if unknown:
        raise ValueError(f"{type(model).__name__} has no output(s) {unknown}")
    graph = helper.make_graph(
        g.nodes, type(model).__name__,
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", samples])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", *OUTPUT_DIMS[name]]) for name in output_names],
        initializer=g.initializers)
    if input_name != "waveform":
        for node in graph.node:
            node.input[:] = [input_name if name == "waveform" else name for name in node.input]
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="convnext_audio_jax")
    checker.check_model(proto)  # raises on a malformed graph before anything is written
    return proto
