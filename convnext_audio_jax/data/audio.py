"""Decoding and normalising one clip: any soundfile/librosa format → mono, 32 kHz, 10 s, int16.

Every failure raises `ClipError` with one of the reasons in `SKIP_REASONS`, so that preparation and loading can
skip the clip and count it instead of crashing or training on garbage.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import soundfile
import soxr

SAMPLE_RATE = 32_000
CLIP_SECONDS = 10
CLIP_SAMPLES = SAMPLE_RATE * CLIP_SECONDS
INT16_SCALE = 32767.0

MISSING = "missing"
UNREADABLE = "unreadable"
EMPTY = "empty"
NON_FINITE = "non-finite"
TOO_SHORT = "too short"
SKIP_REASONS = (MISSING, UNREADABLE, EMPTY, NON_FINITE, TOO_SHORT)


class ClipError(Exception):
    """A clip that cannot be used; `reason` is one of SKIP_REASONS, `detail` says what was seen."""

    def __init__(self, clip_id: str, reason: str, detail: str):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {SKIP_REASONS}")
        super().__init__(f"{clip_id}: {reason} ({detail})")
        self.clip_id = clip_id
        self.reason = reason
        self.detail = detail


def decode(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read an audio file as float32 (frames, channels) and its sample rate.

    soundfile (libsndfile: WAV, FLAC, Ogg, MP3, ...) first; librosa (audioread/ffmpeg: m4a, ...) as a fallback.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ClipError(path, MISSING, "no such file")
    try:
        data, sample_rate = soundfile.read(path, dtype="float32", always_2d=True)
        return data, sample_rate
    except (soundfile.LibsndfileError, RuntimeError, ValueError) as soundfile_error:
        first_error = soundfile_error
    try:
        import librosa  # imported lazily: it is slow to import and only needed for formats libsndfile lacks

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # librosa warns when it falls back to audioread
            data, sample_rate = librosa.load(path, sr=None, mono=False, dtype=np.float32)
    except Exception as librosa_error:  # audioread raises many unrelated types (NoBackendError, EOFError, ...)
        raise ClipError(path, UNREADABLE, f"soundfile: {first_error}; librosa: {librosa_error!r}") from None
    data = np.atleast_2d(data).T  # librosa gives (channels, frames)
    return np.ascontiguousarray(data, dtype=np.float32), int(sample_rate)


def to_clip(
    samples: np.ndarray,
    sample_rate: int,
    clip_id: str = "<array>",
    *,
    min_seconds: float = 1.0,
) -> np.ndarray:
    """Validate, downmix, resample to 32 kHz and pad/crop to 10 s; float32 (CLIP_SAMPLES,) in [-1, 1].

    `samples` is (frames,) or (frames, channels). The first 10 s are kept and shorter clips are zero-padded at the
    end, as PANNs did. A clip shorter than `min_seconds` is rejected as too short.
    """
    samples = np.asarray(samples)
    if samples.ndim == 1:
        samples = samples[:, None]
    if samples.ndim != 2:
        raise ClipError(clip_id, UNREADABLE, f"expected (frames,) or (frames, channels) samples, got shape {samples.shape}")
    if samples.shape[0] == 0 or samples.shape[1] == 0:
        raise ClipError(clip_id, EMPTY, f"no samples (shape {samples.shape})")
    if not np.isfinite(samples).all():
        bad = int(np.size(samples) - np.isfinite(samples).sum())
        raise ClipError(clip_id, NON_FINITE, f"{bad} NaN/Inf samples of {samples.size}")
    duration = samples.shape[0] / sample_rate
    if duration < min_seconds:
        raise ClipError(clip_id, TOO_SHORT, f"{duration:.3f} s < {min_seconds} s")
    if not np.any(samples):
        raise ClipError(clip_id, EMPTY, f"all {samples.shape[0]} frames are zero")
    mono = samples.mean(axis=1, dtype=np.float32)
    # Only decode what the 10 s crop keeps (plus a margin for the resampler's filter).
    keep = min(mono.shape[0], int(np.ceil(CLIP_SECONDS * sample_rate)) + 64)
    mono = mono[:keep]
    if sample_rate != SAMPLE_RATE:
        mono = soxr.resample(mono, sample_rate, SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)
    clip = np.zeros(CLIP_SAMPLES, dtype=np.float32)
    n = min(CLIP_SAMPLES, mono.shape[0])
    clip[:n] = mono[:n]
    return clip


def to_int16(clip: np.ndarray) -> np.ndarray:
    """PANNs' packing: clip(x, -1, 1) · 32767, truncated to int16."""
    return (np.clip(clip, -1.0, 1.0) * INT16_SCALE).astype(np.int16)


def int16_to_float(waveform: np.ndarray) -> np.ndarray:
    return waveform.astype(np.float32) / INT16_SCALE


def load_clip(path: str | os.PathLike, clip_id: str | None = None, *, min_seconds: float = 1.0) -> np.ndarray:
    """Decode a file into the int16 (CLIP_SAMPLES,) waveform that gets packed; raises ClipError with a reason."""
    clip_id = clip_id or os.fspath(path)
    try:
        samples, sample_rate = decode(path)
    except ClipError as error:
        raise ClipError(clip_id, error.reason, error.detail) from None
    return to_int16(to_clip(samples, sample_rate, clip_id, min_seconds=min_seconds))


def check_waveform(waveform: np.ndarray, clip_id: str) -> None:
    """Read-time check of a packed waveform: right shape, and not all zero (PANNs' packer left missing clips as
    zeros, so an all-zero row means a clip that never existed)."""
    if waveform.shape != (CLIP_SAMPLES,):
        raise ClipError(clip_id, UNREADABLE, f"waveform shape {waveform.shape}, expected ({CLIP_SAMPLES},)")
    if waveform.dtype.kind == "f" and not np.isfinite(waveform).all():
        raise ClipError(clip_id, NON_FINITE, "NaN/Inf samples in the stored waveform")
    if not waveform.any():
        raise ClipError(clip_id, EMPTY, "the stored waveform is all zeros")
