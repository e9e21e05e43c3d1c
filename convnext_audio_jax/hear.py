"""The HEAR 2021 common API (hearbenchmark.com/hear-api.html) for the models of this package.

    from convnext_audio_jax import hear

    model = hear.load_model("ckpt/convnext_tiny")            # a torch.nn.Module shell around the JAX model
    scene = hear.get_scene_embeddings(audio, model)          # audio: torch (n_sounds, n_samples) at 48 kHz
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)

* **Sample rate 48 000 Hz.** HEAR 2021 accepts 16 000, 22 050, 44 100 or 48 000 Hz; the released models run at
  32 kHz with mel bands up to 14 kHz (a model trained at another rate, e.g. the 16 kHz demo, gets its own).
  16 and 22.05 kHz input would leave the bands above 8 / 11 kHz empty, so the choice is between 44.1 and
  48 kHz; 48 → 32 kHz is the exact ratio 3:2 (a short polyphase filter, no
  fractional phase drift). Audio is resampled internally with soxr (HQ) to the model's front-end rate, as the
  tagging commands do.
* **Scene embedding**: the model's ``scene_embedding`` (ConvNeXt: the LayerNorm the classifier reads; PANNs:
  ReLU(fc1)) of the sound zero-padded to one window (the model's input length: 10 s for the released models); a
  longer sound is cut into consecutive windows (the last zero-padded) and gets the mean of their scene embeddings.
* **Timestamp embeddings** are the last stage's time steps averaged over mel (``sequence_embeddings``), one every
  ``S`` STFT frames (S = 32 frames = 320 ms for ConvNeXt and CNN14, 16 = 160 ms for CNN6). To reach HEAR's
  ≤ 50 ms, the sound is run ``K`` times, shifted by 1/K of a step each time (K = 8 → 40 ms for ConvNeXt and
  CNN14, K = 4 → 40 ms for CNN6), and the K step grids are interleaved: **the cost is K forward passes per
  window** instead of one. Within a pass, windows follow each other every T·S frames (T steps per window: 31 ×
  320 ms = 9.92 s), so steps stay on one grid across windows. A step's timestamp is the mean of the centres of
  the STFT frames it covers (frame f is centred at f·10 ms; step t covers frames [t·S − P, (t+1)·S − P), P =
  the stem's time padding: 115 ms + 320 ms·t for the released ConvNeXt). Timestamps run from the first step's
  centre while they lie inside the sound, at least one (a 0.1 s sound gets one, at 115 ms).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import soxr
import torch

from convnext_audio_jax.inference.windowing import batches, iter_windows, window_starts
from convnext_audio_jax.models.outputs import output_selector, step_grid
from convnext_audio_jax.runtime.errors import UserError
from convnext_audio_jax.runtime.forward import ShardedForward

SAMPLE_RATE = 48_000
MAX_HOP_MS = 50.0
NO_DEFAULT_WEIGHTS = (
    "convnext_audio_jax.hear.load_model needs a model: a registered pretrained name, downloaded and converted on "
    "first use (e.g. load_model('convnext_tiny_471mAP'); the names: convnext-audio models --pretrained), a model "
    "folder, or a training workdir. Without a network, convert the authors' checkpoint yourself "
    "(topel/audioset-convnext-inf: convnext_tiny_471mAP.pth) with `convnext-audio convert convnext_tiny_471mAP.pth "
    "ckpt/ --labels class_labels_indices.csv` (or train one), then call load_model('ckpt/')"
)


class HearModel(torch.nn.Module):
    """A ``torch.nn.Module`` shell around a JAX model for the HEAR API: ``sample_rate`` (48 000),
    ``scene_embedding_size`` and ``timestamp_embedding_size`` (ints). It holds no torch parameters; the
    forward runs in JAX (jitted, sharded over the local devices, ``batch_size`` windows at a time)."""

    sample_rate: int = SAMPLE_RATE

    def __init__(self, model, variables: Mapping[str, Any], batch_size: int = 8, mesh=None):
        super().__init__()
        if not hasattr(model, "frontend"):
            raise UserError(f"{type(model).__name__} does not take audio")
        self.jax_model = model
        self.model_rate = int(model.frontend.sample_rate)
        self.window_samples = int(model.frontend.clip_samples)
        select = output_selector(model, ["scene_embedding", "sequence_embeddings"],
                                 {"scene_embedding": "scene", "sequence_embeddings": "sequence"})
        self._forward = ShardedForward(model, variables, batch_size, mesh, select)
        shapes = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, self.window_samples))), variables)
        self.scene_embedding_size = int(shapes["scene_embedding"].shape[-1])
        self.timestamp_embedding_size = int(shapes["frame_embeddings"].shape[-1])
        self.steps_per_window = int(shapes["frame_embeddings"].shape[1])
        grid = step_grid(model)
        if grid is None:
            raise UserError(f"{type(model).__name__} has no known time-step grid")
        stride, padding = grid
        hop = model.frontend.hop_length
        self.step_samples = stride * hop
        if self.steps_per_window * self.step_samples > self.window_samples:
            raise ValueError(f"{self.steps_per_window} steps of {self.step_samples} samples exceed a window")
        limit = MAX_HOP_MS * self.model_rate / 1000
        self.passes = next(k for k in range(1, self.step_samples + 1)
                           if self.step_samples % k == 0 and self.step_samples / k <= limit)
        self.hop_samples = self.step_samples // self.passes
        # Mean of the centres of the frames step 0 covers: frames [−P, S − P), frame f centred at f·hop.
        self.first_centre = ((stride - 1) / 2 - padding) * hop

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """The scene embeddings (as ``get_scene_embeddings``)."""
        return get_scene_embeddings(audio, self)

    def resample(self, audio: Any) -> np.ndarray:
        """(n_sounds, n_samples) at 48 kHz (torch or numpy) → float32 numpy at the model's rate."""
        if isinstance(audio, torch.Tensor):
            audio = audio.detach().to("cpu", torch.float32).numpy()
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 2 or audio.shape[1] == 0:
            raise ValueError(f"audio must have shape (n_sounds, n_samples) at {self.sample_rate} Hz, got {audio.shape}")
        if not np.isfinite(audio).all():
            raise ValueError("audio has NaN/Inf samples; expected finite audio in [-1, 1]")
        resampled = soxr.resample(np.ascontiguousarray(audio.T), self.sample_rate, self.model_rate, quality="HQ")
        return np.ascontiguousarray(np.asarray(resampled, np.float32).reshape(-1, audio.shape[0]).T)

    def run(self, kind: str, windows: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        """``kind`` ("scene" or "sequence") of each window, in order, a fixed-size batch at a time."""
        for batch in batches(windows, self._forward.batch_size):
            yield from self._forward(np.stack(batch))[kind]


def load_model(model_file_path: str = "", batch_size: int = 8) -> HearModel:
    """HEAR ``load_model``: a model directory written by ``convnext-audio convert`` or training, a training
    workdir (its model/best, else model/last) or a registered pretrained name (all that
    ``convnext_audio_jax.hub.resolve.load_model`` reads). There is no default: an empty path raises a
    ``UserError`` (a ValueError) naming the ways to get weights."""
    from convnext_audio_jax.hub.resolve import load_model as load_checkpoint

    if not model_file_path:
        raise UserError(NO_DEFAULT_WEIGHTS)
    model, variables, _ = load_checkpoint(os.fspath(model_file_path))
    return HearModel(model, variables, batch_size)


def _windows(waveform: np.ndarray, starts: np.ndarray, window_samples: int) -> Iterator[np.ndarray]:
    """Each row's windows at ``starts``, one at a time (`windowing.iter_windows`)."""
    for row in waveform:
        yield from iter_windows(row, starts, window_samples)


def _as_tensor(array: np.ndarray, like: Any) -> torch.Tensor:
    tensor = torch.from_numpy(np.array(array, dtype=np.float32))  # a writable copy
    return tensor.to(like.device) if isinstance(like, torch.Tensor) else tensor


def get_scene_embeddings(audio: torch.Tensor, model: HearModel) -> torch.Tensor:
    """(n_sounds, n_samples) at 48 kHz → float32 (n_sounds, model.scene_embedding_size)."""
    waveform = model.resample(audio)
    window = model.window_samples
    starts = window_starts(waveform.shape[1], window, window, last_at_end=False)
    scene = np.stack(list(model.run("scene", _windows(waveform, starts, window))))
    return _as_tensor(scene.reshape(waveform.shape[0], len(starts), -1).mean(axis=1), audio)


def get_timestamp_embeddings(audio: torch.Tensor, model: HearModel) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_sounds, n_samples) at 48 kHz → (embeddings float32 (n_sounds, n_timestamps, timestamp_embedding_size),
    timestamps float32 (n_sounds, n_timestamps) in ms, evenly spaced ``model.hop_samples`` apart)."""
    waveform = model.resample(audio)
    n_sounds, length = waveform.shape
    count = max(1, int(np.ceil((length - model.first_centre) / model.hop_samples)))
    passes, steps = model.passes, model.steps_per_window
    per_pass = -(-count // passes)  # timestamps pass 0 must cover
    windows_per_pass = -(-per_pass // steps)
    window_hop = steps * model.step_samples
    # Window j of pass k starts at k·hop + j·window_hop; its step t is timestamp (j·T + t)·K + k.
    starts = np.array([k * model.hop_samples + j * window_hop for k in range(passes) for j in range(windows_per_pass)])

    sequence = np.stack(list(model.run("sequence", _windows(waveform, starts, model.window_samples))))  # (n·K·J, T, D)
    sequence = sequence.reshape(n_sounds, passes, windows_per_pass, steps, -1).transpose(0, 2, 3, 1, 4)
    embeddings = sequence.reshape(n_sounds, windows_per_pass * steps * passes, -1)[:, :count]
    times = 1000.0 * (model.first_centre + model.hop_samples * np.arange(count)) / model.model_rate
    timestamps = np.broadcast_to(times.astype(np.float32), (n_sounds, count))
    return _as_tensor(embeddings, audio), _as_tensor(timestamps, audio)
