"""Running an exported ONNX file (``convnext-audio export --format onnx``) with ONNX Runtime or OpenVINO: no JAX
in the loop.

``OnnxRuntimeForward(path)`` maps a batch of windows (n ≤ batch_size, window_samples) float32 at the model's rate
(the metadata's ``sample_rate`` and ``window_samples``) to the same dict of numpy arrays the JAX forward
(``runtime.forward.ShardedForward`` with ``models.outputs.output_selector``) gives for the output names asked for
(``models.outputs.exported_outputs``), so tagging's windowing code runs unchanged on it
(``convnext-audio tag … --backend onnxruntime|openvino``).
OpenVINO compiles the file for a fixed batch of ``batch_size`` (static shapes run faster there), in float32
(its CPU plugin would otherwise run bf16 where the CPU has it); a shorter last batch is zero-padded.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence

import numpy as np

from convnext_audio_jax.artifacts.exported import read_export_metadata
from convnext_audio_jax.models.outputs import EMBEDDING_KINDS, EXPORTED_OUTPUTS
from convnext_audio_jax.runtime.errors import UserError

BACKENDS = ("jax", "onnxruntime", "openvino")
RUNTIMES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}  # backend → the package that runs it
# `convnext-audio embed --kind` → the exported output that holds it (an export holds no frame grid nor logits).
EMBEDDING_OUTPUTS = {kind: name for kind, name in EMBEDDING_KINDS.items() if name in EXPORTED_OUTPUTS}


class OnnxRuntimeForward:
    """``forward(windows)``: (n ≤ batch_size, window_samples) float32 → dict of numpy arrays with n rows.

    ``model`` is the Flax module description the file was exported from (built from the metadata, no weights,
    for the frame grid and the front-end settings); ``metadata`` the export metadata; ``select`` restricts the
    outputs returned (default: all of the file's), ``aliases`` renames them in the returned dict."""

    def __init__(self, path: str | os.PathLike, batch_size: int = 8, select: Sequence[str] | None = None,
                 num_threads: int | None = None, aliases: dict[str, str] | None = None, runtime: str = "onnxruntime"):
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {sorted(RUNTIMES)}, got {runtime!r}")
        if batch_size < 1:
            raise ValueError(f"batch size must be ≥ 1, got {batch_size}")
        try:
            module = importlib.import_module(RUNTIMES[runtime])
        except ImportError:
            raise UserError(f"--backend {runtime} needs the {RUNTIMES[runtime]} package: pip install {RUNTIMES[runtime]}") from None
        self.path = os.fspath(path)
        self.runtime = runtime
        self.metadata = read_export_metadata(path)
        if self.metadata["export_format"] != "onnx":
            raise UserError(f"{path} is a {self.metadata['export_format']} export; the {runtime} backend runs ONNX files")
        self.batch_size = batch_size
        self.window_samples = int(self.metadata["window_samples"])
        if runtime == "onnxruntime":
            options = module.SessionOptions()
            if num_threads:
                options.intra_op_num_threads = num_threads
            self._session = module.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
            available = [output.name for output in self._session.get_outputs()]
            self._input_name = self._session.get_inputs()[0].name
        else:
            core = module.Core()
            network = core.read_model(self.path)
            network.reshape({network.inputs[0].get_any_name(): [batch_size, self.window_samples]})
            config = {"INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": num_threads} if num_threads else {})}
            self._compiled = core.compile_model(network, "CPU", config)
            self._request = self._compiled.create_infer_request()
            available = [output.get_any_name() for output in self._compiled.outputs]
        unknown = sorted(set(select or ()) - set(available))
        if unknown:
            raise UserError(f"{path} has no output(s) {unknown}; its outputs are {available}")
        self.output_names = list(select or available)
        self._aliases = dict(aliases or {})  # output name → the key it is returned under

    def restrict(self, names: Sequence[str]) -> None:
        """Return only those of ``names`` the file has (e.g. ``frame_probs`` exists for the audio ConvNeXt only)."""
        self.output_names = [name for name in names if name in self.output_names]

    @property
    def model(self):
        from convnext_audio_jax.models import create_model

        if not self.metadata.get("model"):
            raise UserError(f"{self.path}'s metadata names no registered model (export it from a checkpoint folder)")
        return create_model(self.metadata["model"], **self.metadata.get("model_config", {}))

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata["class_names"])

    def __call__(self, waveforms: np.ndarray) -> dict[str, np.ndarray]:
        waveforms = np.ascontiguousarray(waveforms, dtype=np.float32)
        if waveforms.ndim != 2 or waveforms.shape[1] != self.window_samples:
            raise ValueError(f"expected windows of shape (n, {self.window_samples}), got {waveforms.shape}")
        if not 0 < waveforms.shape[0] <= self.batch_size:
            raise ValueError(f"expected 1 to {self.batch_size} waveforms, got {waveforms.shape[0]}")
        count = waveforms.shape[0]
        if self.runtime == "onnxruntime":
            outputs = self._session.run(self.output_names, {self._input_name: waveforms})
        else:
            if count < self.batch_size:
                waveforms = np.concatenate([waveforms, np.zeros((self.batch_size - count, self.window_samples), np.float32)])
            results = self._request.infer([waveforms])
            outputs = [results[self._compiled.output(name)][:count].copy() for name in self.output_names]
        return {self._aliases.get(name, name): value for name, value in zip(self.output_names, outputs)}
