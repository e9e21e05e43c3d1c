"""A built-in synthetic multi-label audio set, generated on the fly, so that training runs with no data at all.

Ten sound classes (tones, chirps, noise bands, clicks, a buzz, a warble, a pulsed tone) are mixed at random
into short clips over faint background noise. Clip ``i`` of a split is a pure function of ``(seed, split, i)``:
its labels come first from a generator seeded by that triple and its audio from a second one, so
``targets`` is computed without synthesising any audio (the balanced sampler needs it) and any process, any
grain worker and any resumed run sees exactly the same clip.

:class:`SyntheticAudioSet` has the random-access interface of the data pipeline's sources (``len``,
``source[i]`` → {"waveform": int16 (L,), "target": float32 (C,), "id": str}, ``targets`` (N, C) bool,
``clip_id(i)``), is picklable, and plugs into ``convnext_audio_jax.data.pipeline.make_loader``.
"""

from __future__ import annotations

import numpy as np

from convnext_audio_jax.data.audio import to_int16

CLASS_NAMES = (
    "low tone",
    "high tone",
    "up chirp",
    "down chirp",
    "low noise band",
    "high noise band",
    "clicks",
    "buzz",
    "warble",
    "pulsed tone",
)
NUM_CLASSES = len(CLASS_NAMES)
SPLITS = ("train", "validation", "eval")
# Probabilities of 1, 2 and 3 sounds in a clip.
_SOUNDS_PER_CLIP = (0.4, 0.4, 0.2)
_LABEL_STREAM, _AUDIO_STREAM = 0, 1
_CLICK_GAIN = 3.0


class SyntheticAudioSet:
    """``num_clips`` synthetic clips of ``clip_seconds`` at ``sample_rate`` for one split ('train',
    'validation' or 'eval'); the splits draw from disjoint seed streams, so held-out clips are never trained on."""

    def __init__(self, split: str, num_clips: int, *, sample_rate: int = 16_000, clip_seconds: float = 1.0,
                 seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"demo split must be one of {SPLITS}; got {split!r}")
        if num_clips < 1:
            raise ValueError(f"demo num_clips must be >= 1; got {num_clips}")
        if sample_rate < 16_000:
            raise ValueError(f"demo sample_rate must be >= 16000 Hz (the sounds reach 7 kHz); got {sample_rate}")
        if clip_seconds < 0.25:
            raise ValueError(f"demo clip_seconds must be >= 0.25; got {clip_seconds}")
        self.split = split
        self.sample_rate = int(sample_rate)
        self.clip_samples = int(round(clip_seconds * sample_rate))
        self._num_clips = int(num_clips)
        self._seed = int(seed)
        self._split_id = SPLITS.index(split)
        self._targets = np.stack([self._labels(i) for i in range(num_clips)])

    def __len__(self) -> int:
        return self._num_clips

    @property
    def targets(self) -> np.ndarray:
        return self._targets

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES

    @property
    def class_names(self) -> tuple[str, ...]:
        return CLASS_NAMES

    def clip_id(self, index: int) -> str:
        return f"demo-{self.split}-{index:06d}"

    @property
    def description(self) -> str:
        return f"the demo's {self.split} split"

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self._seed, self._split_id, index, stream])

    def _labels(self, index: int) -> np.ndarray:
        rng = self._rng(index, _LABEL_STREAM)
        count = rng.choice(len(_SOUNDS_PER_CLIP), p=_SOUNDS_PER_CLIP) + 1
        labels = np.zeros(NUM_CLASSES, dtype=bool)
        labels[rng.choice(NUM_CLASSES, size=count, replace=False)] = True
        return labels

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self._num_clips:
            raise IndexError(f"clip index {index} out of range for a demo split of {self._num_clips} clips")
        rng = self._rng(index, _AUDIO_STREAM)
        clip = rng.normal(0.0, rng.uniform(0.002, 0.01), self.clip_samples)
        for class_id in np.flatnonzero(self._targets[index]):
            clip += self._event(rng, int(class_id))
        waveform = to_int16(clip)
        return {"waveform": waveform, "target": self._targets[index].astype(np.float32), "id": self.clip_id(index)}

    def _event(self, rng: np.random.Generator, class_id: int) -> np.ndarray:
        """One sound of class ``class_id``: 30–100 % of the clip long at a random onset, faded in and out."""
        n = self.clip_samples
        length = int(n * rng.uniform(0.3, 1.0))
        onset = int(rng.integers(0, n - length + 1))
        t = np.arange(length) / self.sample_rate
        sound = _SYNTHESISERS[class_id](rng, t, self.sample_rate)
        # Peak-normalised; clicks, short by nature, get a higher peak so their frames stand out as much.
        peak = rng.uniform(0.1, 0.3) * (_CLICK_GAIN if class_id == CLASS_NAMES.index("clicks") else 1.0)
        sound = sound / (np.max(np.abs(sound)) + 1e-9) * peak
        fade = min(length // 2, int(0.01 * self.sample_rate))
        envelope = np.ones(length)
        envelope[:fade] = np.linspace(0.0, 1.0, fade)
        envelope[length - fade :] = np.linspace(1.0, 0.0, fade)
        event = np.zeros(n)
        event[onset : onset + length] = sound * envelope
        return event


def _tone(rng, t, sample_rate, low, high):
    return np.sin(2 * np.pi * rng.uniform(low, high) * t + rng.uniform(0, 2 * np.pi))


def _chirp(rng, t, sample_rate, rising: bool):
    start, end = rng.uniform(300, 800), rng.uniform(2500, 5000)
    if not rising:
        start, end = end, start
    duration = max(t[-1], 1e-3)
    # Phase of a linear sweep: 2π (f0 t + (f1 - f0) t² / 2T).
    return np.sin(2 * np.pi * (start * t + (end - start) * t**2 / (2 * duration)))


def _noise_band(rng, t, sample_rate, low, high):
    spectrum = np.fft.rfft(rng.normal(size=t.size))
    freqs = np.fft.rfftfreq(t.size, 1.0 / sample_rate)
    spectrum[(freqs < low) | (freqs > high)] = 0.0
    return np.fft.irfft(spectrum, t.size)


def _clicks(rng, t, sample_rate):
    signal = np.zeros(t.size)
    period = int(sample_rate / rng.uniform(8, 16))  # at least two clicks in the shortest event
    signal[int(rng.integers(0, period)) :: period] = 1.0
    # Each click a 10 ms noise burst decaying in ~3 ms: broadband, and long enough to mark its STFT frames.
    length = int(0.010 * sample_rate)
    burst = rng.normal(size=length) * np.exp(-np.arange(length) / (0.003 * sample_rate))
    return np.convolve(signal, burst)[: t.size]


def _buzz(rng, t, sample_rate):
    f0 = rng.uniform(80, 160)
    return sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 16) if k * f0 < sample_rate / 2)


def _warble(rng, t, sample_rate):
    centre, depth, rate = rng.uniform(1000, 1500), rng.uniform(100, 250), rng.uniform(5, 10)
    return np.sin(2 * np.pi * centre * t + depth / rate * np.sin(2 * np.pi * rate * t))


def _pulsed_tone(rng, t, sample_rate):
    gate = np.sin(2 * np.pi * rng.uniform(4, 8) * t + rng.uniform(0, 2 * np.pi)) > 0
    return _tone(rng, t, sample_rate, 600, 900) * gate


_SYNTHESISERS = (
    lambda rng, t, sr: _tone(rng, t, sr, 200, 400),
    lambda rng, t, sr: _tone(rng, t, sr, 2000, 4000),
    lambda rng, t, sr: _chirp(rng, t, sr, rising=True),
    lambda rng, t, sr: _chirp(rng, t, sr, rising=False),
    lambda rng, t, sr: _noise_band(rng, t, sr, 100, 500),
    lambda rng, t, sr: _noise_band(rng, t, sr, 4000, 7000),
    _clicks,
    _buzz,
    _warble,
    _pulsed_tone,
)
