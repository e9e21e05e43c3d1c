"""The frozen audio encoder's side: a trained tagging model's logits or scene embedding per window, averaged
over a clip's windows, computed once per clip and stored (``cached_clip_features``).

``kind`` "logits" (the paper's retrieval input: the 527 AudioSet logits), "scene" (the pooled embedding) or
"sequence" (the (T, C) sequence a captioning decoder attends to, the paper's 31 × 768).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Iterator

import numpy as np

from convnext_audio_jax.data.captions import CaptionedClips
from convnext_audio_jax.downstream.text import save_array
from convnext_audio_jax.hub import resolve
from convnext_audio_jax.inference import windowing
from convnext_audio_jax.models.outputs import EMBEDDING_KINDS, output_selector
from convnext_audio_jax.runtime.errors import UserError
from convnext_audio_jax.runtime.forward import ShardedForward

KINDS = ("logits", "scene", "sequence")


class AudioEncoder:
    """A trained model (model folder, training workdir or pretrained name) as a frozen feature extractor."""

    def __init__(self, path: str, hop_seconds: float | None = None, batch_size: int = 16,
                 offline: bool | None = None):
        self.directory = resolve.resolve_model_dir(path, announce=False, offline=offline)
        self.model, variables, self.metadata = resolve.load_model(str(self.directory), offline=offline)
        self.sample_rate = int(self.model.frontend.sample_rate)
        self.window = int(self.model.frontend.clip_samples)
        self.hop = windowing.window_hop(hop_seconds, self.sample_rate, self.window)  # None: half a window, as tag
        select = output_selector(self.model, [EMBEDDING_KINDS[kind] for kind in KINDS],
                                 {EMBEDDING_KINDS[kind]: kind for kind in KINDS})
        self._forward = ShardedForward(self.model, variables, batch_size, select=select)
        self.batch_size = self._forward.batch_size
        self.class_names = list(self.metadata.get("class_names") or [str(i) for i in range(self.model.num_classes)])

    @property
    def key(self) -> str:
        """Names this encoder's weights: its folder and the modification time of its files."""
        stamps = sorted((p.name, p.stat().st_mtime_ns) for p in self.directory.iterdir() if p.is_file())
        return json.dumps([str(self.directory.resolve()), stamps, self.hop])

    def windows(self, waveform: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start samples, (W, window) windows) of a waveform at the encoder's rate."""
        starts = windowing.window_starts(len(waveform), self.window, self.hop)
        return starts, windowing.cut_windows(waveform, starts, self.window)

    def forward(self, windows: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs of any number of windows, a batch at a time."""
        parts = [self._forward(windows[i : i + self.batch_size]) for i in range(0, len(windows), self.batch_size)]
        return {kind: np.concatenate([p[kind] for p in parts]) for kind in KINDS}

    def clip_features(self, waveforms: Iterator[np.ndarray], kind: str) -> Iterator[np.ndarray]:
        """Each clip's ``kind`` features averaged over its windows, the windows of several clips batched together."""
        if kind not in KINDS:
            raise UserError(f"audio features {kind!r}: expected one of {', '.join(KINDS)}")
        pending: list[np.ndarray] = []
        counts: list[int] = []
        for waveform in waveforms:
            _, windows = self.windows(waveform)
            pending.append(windows)
            counts.append(len(windows))
            if sum(counts) >= self.batch_size:
                yield from self._split(pending, counts, kind)
                pending, counts = [], []
        if pending:
            yield from self._split(pending, counts, kind)

    def _split(self, pending: list[np.ndarray], counts: list[int], kind: str) -> Iterator[np.ndarray]:
        outputs = self.forward(np.concatenate(pending))[kind]
        for block in np.split(outputs, np.cumsum(counts)[:-1]):
            yield block.mean(axis=0)


def cached_clip_features(clips: CaptionedClips, encoder: AudioEncoder, kind: str,
                         cache_dir: str | os.PathLike) -> np.ndarray:
    """(clips, D…) ``kind`` features of every clip, stored in ``cache_dir`` under a hash of the encoder, the clips
    and ``kind``: each clip goes through the encoder once."""
    key = hashlib.sha256(json.dumps([encoder.key, clips.description, clips.clip_ids, kind]).encode()).hexdigest()[:24]
    path = pathlib.Path(cache_dir) / f"audio-{kind}-{key}.npy"
    if path.is_file():
        return np.load(path)
    reads = (clips.read(i, encoder.sample_rate) for i in range(len(clips)))
    features = np.stack(list(encoder.clip_features(reads, kind))).astype(np.float32)
    if not np.isfinite(features).all():
        raise UserError(f"the encoder {encoder.directory} gave NaN/Inf features on {clips.description}")
    save_array(path, features)
    return features
