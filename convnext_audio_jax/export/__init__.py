"""Exporting a model to StableHLO (``jax.export``) and ONNX (``jax2onnx``), with metadata beside the file.

The exported function maps a waveform batch (batch, samples) at the model's sample rate (32 kHz for the released
models; the rate and window length are in the metadata) to a fixed set of named outputs
(``OUTPUT_NAMES``; ``frame_probs`` too for the audio ConvNeXt: the table of ``convnext_audio_jax.models.outputs``):

* **StableHLO**: the file is exactly ``Exported.serialize()``'s bytes, so
  ``jax.export.deserialize(open(f, "rb").read()).call(waveform)`` runs it with only jax installed. The batch
  dimension is symbolic, and so is the length (at least one STFT window, ``n_fft`` samples) where the model
  traces with a symbolic length; the function returns a dict. It is lowered for CPU and CUDA in one
  module; the depthwise convolutions carry both implementations (``depthwise_impl="platform"``: the shifted
  multiply-add on CPU, XLA's grouped convolution on CUDA), picked where the artifact is compiled.
* **ONNX**: the batch dimension is symbolic, the length fixed at the model's window (10 s). The audio
  ConvNeXt and the PANN CNNs are written channels-first, node by node, from their variables
  (``convnext_audio_jax.export.onnx_graph``, opset 20: only the ``onnx`` package is needed), which ONNX
  Runtime and OpenVINO run as fast as the PyTorch original's own export; any other audio model is traced
  with jax2onnx (front end in its export form, ``stft="matmul"``: ONNX converters mishandle the complex
  values of an FFT; the depthwise convolution as a grouped convolution). Outputs are named as ``OUTPUT_NAMES``.

Beside ``FILE`` the metadata goes to ``FILE.json``: class names, sample rate, window length, input and output
names and shapes, the model's registry name and config and ``frame_seconds`` (seconds of each time step within
a window), which is all the ONNX Runtime backend (``convnext_audio_jax.inference.onnx_backend``) needs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from convnext_audio_jax.artifacts.exported import METADATA_FORMAT, metadata_path
from convnext_audio_jax.models import with_xla_ops
from convnext_audio_jax.models.outputs import (
    EXPORTED_OUTPUTS,
    exported_outputs,
    has_frame_scores,
    output_selector,
    step_bounds,
)
from convnext_audio_jax.runtime import files, flags
from convnext_audio_jax.runtime.errors import UserError

FORMATS = ("stablehlo", "onnx")
PLATFORMS = ("cpu", "cuda")
INPUT_NAME = "waveform"
OUTPUT_NAMES = EXPORTED_OUTPUTS
ONNX_OPSET = 23  # of the jax2onnx route; onnx_graph writes opset 20
JAX2ONNX = "jax2onnx==0.17.1"


class ExportError(UserError):
    """A model, format or output that cannot be exported; the message is one line."""


output_names = exported_outputs


def export_model_for(model: nn.Module, fmt: str) -> nn.Module:
    """The model as it is traced for ``fmt``: per-platform depthwise for StableHLO; the matmul STFT and XLA's
    grouped depthwise convolution for ONNX; XLA's dot for Dense layers in both."""
    if fmt == "stablehlo":
        return with_xla_ops(model).clone(depthwise_impl="platform")
    if fmt == "onnx":
        return with_xla_ops(model).clone(frontend=dataclasses.replace(model.frontend, stft="matmul"))
    raise ExportError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")


def forward_function(model: nn.Module, variables: Mapping[str, Any]) -> Callable[[jax.Array], dict[str, jax.Array]]:
    """waveform (B, samples) → {name: float32 array} for ``output_names(model)``, the variables closed over (they
    become constants of the exported program)."""
    select = output_selector(model, output_names(model))

    def forward(waveform):
        return select(variables, model.apply(variables, waveform, train=False))

    return forward


def _failing_op(error: BaseException) -> str:
    """The primitive or op an exporter's error names, else the error's first line."""
    text = str(error)
    for pattern in (r"primitive[ '\"`]+([\w.\-]+)", r"[Pp]rimitive ([\w.\-]+)", r"custom[_ ]call[^'\"]*['\"]([\w.\-]+)",
                    r"No (?:plugin|handler|lowering)[^'\"]*['\"]([\w.\-]+)"):
        match = re.search(pattern, text)
        if match:
            return match.group(1)
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return f"{type(error).__name__}: {first[:200]}"


def _check_output(path: pathlib.Path, overwrite: bool) -> None:
    """Fails before any work on an output that cannot be written (or that exists, unless ``overwrite``)."""
    for target in (path, metadata_path(path)):
        if target.is_dir():
            raise ExportError(f"output {target} is a directory; expected a file path")
        if target.exists() and not overwrite:
            raise ExportError(f"output {target} exists; choose another path or pass --overwrite")
    parent = path.parent
    if not parent.is_dir():
        raise ExportError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {path}: folder {parent} is not writable")


def frame_seconds(model: nn.Module, num_steps: int) -> list[list[float]] | None:
    """Seconds of each time step within a window, for the model with step scores (``frame_probs``)."""
    if not has_frame_scores(model):
        return None
    return np.round(step_bounds(model, num_steps), 6).tolist()


def minimum_samples(model: nn.Module, variables: Mapping[str, Any]) -> int:
    """The shortest waveform (a whole number of hops, at least ``n_fft``) for which the model's last stage has a
    time step: shorter ones leave nothing to pool. Found by bisection over shape evaluations."""
    frontend = model.frontend
    forward = forward_function(model, variables)

    def has_step(samples: int) -> bool:
        try:
            shapes = jax.eval_shape(forward, jax.ShapeDtypeStruct((1, samples), jnp.float32))
        except Exception:  # noqa: BLE001 — too short to trace (an empty reduction)
            return False
        return shapes["sequence_embeddings"].shape[1] >= 1

    low, high = 0, -(-frontend.clip_samples // frontend.hop_length)  # in hops; high is known to work
    first = -(-frontend.n_fft // frontend.hop_length)
    low = first - 1
    while high - low > 1:
        middle = (low + high) // 2
        if has_step(middle * frontend.hop_length):
            high = middle
        else:
            low = middle
    return max(frontend.n_fft, high * frontend.hop_length)


def export_stablehlo(model: nn.Module, variables: Mapping[str, Any], platforms=PLATFORMS,
                     symbolic_length: bool = True, shortest: int | None = None) -> jax.export.Exported:
    """``jax.export`` of the forward for ``platforms`` with a symbolic batch (and length ≥ ``shortest``, default
    ``minimum_samples``, when the model traces with one; otherwise the model's window length)."""
    model = export_model_for(model, "stablehlo")
    forward = jax.jit(forward_function(model, variables))
    window = model.frontend.clip_samples
    attempts = []
    if symbolic_length:
        shortest = shortest or minimum_samples(model, variables)
        attempts.append(jax.export.symbolic_shape("batch, samples", constraints=(f"samples >= {shortest}",)))
    attempts.append(jax.export.symbolic_shape(f"batch, {window}"))
    error = None
    for shape in attempts:
        try:
            return jax.export.export(forward, platforms=tuple(platforms))(jax.ShapeDtypeStruct(shape, jnp.float32))
        except Exception as failure:  # noqa: BLE001 — a symbolic length may not trace: fall back to a fixed one
            error = failure
    raise ExportError(f"cannot export {type(model).__name__} to StableHLO: {_failing_op(error)}") from error


def _jax2onnx(model: nn.Module, variables: Mapping[str, Any], samples: int):
    """The traced ONNX graph (jax2onnx) of a model ``onnx_graph`` does not know."""
    try:
        from jax2onnx import to_onnx
    except ImportError:
        raise ExportError(f"ONNX export of {type(model).__name__} traces it with jax2onnx, which is not installed: "
                          f"pip install --no-deps {JAX2ONNX}") from None
    model = export_model_for(model, "onnx")
    forward = forward_function(model, variables)
    names = output_names(model)
    try:
        with _quiet_onnx_ir():
            proto = to_onnx(lambda w: tuple(forward(w)[name] for name in names), inputs=[("batch", samples)],
                            model_name=type(model).__name__, opset=ONNX_OPSET, input_names=[INPUT_NAME], output_names=list(names))
    except Exception as error:  # noqa: BLE001 — the converter's own exceptions: one line naming the op
        raise ExportError(f"cannot export {type(model).__name__} to ONNX: {_failing_op(error)}") from error
    # jax2onnx annotates some intermediate values with NHWC shapes where its ops produce NCHW; ONNX Runtime then
    # warns and re-infers them. The annotations are optional: drop them and let the runtime infer shapes.
    del proto.graph.value_info[:]
    return proto


@contextlib.contextmanager
def _quiet_onnx_ir():
    """jax2onnx's serialisation logs one ``onnx_ir.serde`` warning per initialiser it re-reads (~270 per model);
    they say nothing a user can act on, so the logger is raised to ERROR while it runs."""
    logger = logging.getLogger("onnx_ir.serde")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def export_onnx(model: nn.Module, variables: Mapping[str, Any], samples: int | None = None):
    """The ONNX ``ModelProto`` of the forward, batch symbolic ("batch"), length ``samples`` (default the model's
    window): written channels-first by ``onnx_graph`` for the audio ConvNeXt and PANN CNNs, else traced by jax2onnx."""
    from convnext_audio_jax.export import onnx_graph

    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ExportError('ONNX export needs the onnx package: pip install -e ".[export]" (or pip install onnx)') from None
    samples = samples or model.frontend.clip_samples
    if onnx_graph.supports(model):
        return onnx_graph.build(model, variables, samples, INPUT_NAME, output_names(model))
    return _jax2onnx(model, variables, samples)


def export(model: nn.Module, variables: Mapping[str, Any], fmt: str, output: str | os.PathLike,
           metadata: Mapping[str, Any] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Writes ``output`` in ``fmt`` and ``output.json`` beside it; returns the metadata written.

    ``metadata`` is the checkpoint's (``model``, ``model_config``, ``class_names`` are carried over)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not hasattr(model, "frontend"):
        raise ExportError(f"{type(model).__name__} does not take a waveform; only audio models export")
    if fmt == "stablehlo" and importlib.util.find_spec("flatbuffers") is None:  # jax.export imports it on serialising
        raise ExportError("StableHLO serialisation needs flatbuffers (a dependency of this package): pip install flatbuffers")
    path = pathlib.Path(output).absolute()
    _check_output(path, overwrite)
    metadata = dict(metadata or {})
    names = output_names(model)
    shapes = jax.eval_shape(forward_function(model, variables), jax.ShapeDtypeStruct((1, model.frontend.clip_samples), jnp.float32))
    document: dict[str, Any] = {
        "format": METADATA_FORMAT,
        "export_format": fmt,
        "file": path.name,
        "model": metadata.get("model"),
        "model_config": metadata.get("model_config", {}),
        "class_names": metadata.get("class_names") or [str(i) for i in range(model.num_classes)],
        "sample_rate": model.frontend.sample_rate,
        "window_samples": model.frontend.clip_samples,
        "window_seconds": model.frontend.clip_seconds,
        "input_name": INPUT_NAME,
        "output_names": list(names),
        # Shapes per 10 s window; "batch" (and "samples") are symbolic.
        "output_shapes": {name: ["batch", *shapes[name].shape[1:]] for name in names},
        "frame_seconds": frame_seconds(model, shapes["sequence_embeddings"].shape[1]),
        "jax_version": jax.__version__,
    }
    if fmt == "stablehlo":
        shortest = minimum_samples(export_model_for(model, "stablehlo"), variables)
        exported = export_stablehlo(model, variables, shortest=shortest)
        document["input_shape"] = [str(d) for d in exported.in_avals[0].shape]
        document["platforms"] = list(exported.platforms)
        document["symbolic_length"] = not isinstance(exported.in_avals[0].shape[1], int)
        if document["symbolic_length"]:
            document["minimum_samples"] = shortest
        data = bytes(exported.serialize())
    else:
        proto = export_onnx(model, variables)
        for key, value in (("class_names", json.dumps(document["class_names"])), ("sample_rate", str(document["sample_rate"])),
                           ("window_samples", str(document["window_samples"]))):
            proto.metadata_props.add(key=key, value=value)
        document["input_shape"] = ["batch", model.frontend.clip_samples]
        document["opset"] = proto.opset_import[0].version
        document["onnx_writer"] = proto.producer_name or "jax2onnx"
        data = proto.SerializeToString()
    files.write_bytes(path, data)
    files.write_text(metadata_path(path), json.dumps(document, indent=2) + "\n")
    return document


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # The one positional MODEL (its documented form); what it takes is what --model takes elsewhere.
    parser.add_argument("model", metavar="MODEL", help=flags.MODEL_HELP)
    parser.add_argument("--format", required=True, help="stablehlo (jax.export, CPU + CUDA) or onnx (ONNX Runtime, OpenVINO)")
    parser.add_argument("--output", required=True, help="file to write; its metadata goes to FILE.json beside it")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def run(args: argparse.Namespace) -> int:
    from convnext_audio_jax.hub.resolve import load_model, offline_flag

    if args.format not in FORMATS:
        raise ExportError(f"unknown export format {args.format!r}; expected one of {', '.join(FORMATS)}")
    _check_output(pathlib.Path(args.output).absolute(), args.overwrite)
    model, variables, metadata = load_model(args.model, offline=offline_flag(args))
    document = export(model, variables, args.format, args.output, metadata, overwrite=args.overwrite)
    size = pathlib.Path(args.output).stat().st_size
    print(f"export: {document['model']} → {args.output} ({args.format}, {size / 2**20:.1f} MiB, input "
          f"{document['input_shape']}, outputs {', '.join(document['output_names'])}); metadata → {metadata_path(args.output)}")
    return 0
