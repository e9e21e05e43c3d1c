"""Decoding audio files: one clip (any soundfile/audioread format → mono, 32 kHz, 10 s, int16) for preparation and
training, and a file of any length as a stream of mono 32 kHz blocks for tagging and embeddings.

Every failure raises `ClipError` with one of the reasons in `SKIP_REASONS`, so that preparation and loading can
skip the clip and count it instead of crashing or training on garbage.

Memory: `stream_mono` holds one block of the file (`block_frames` × channels float32, 64 Ki frames by default)
plus the resampler's state, whatever the file's length; `read_span` holds only the span it returns (plus one
block when it falls back to audioread).
"""

from __future__ import annotations

import dataclasses
import io
import numbers
import os
import struct
import warnings
from collections.abc import Iterable, Iterator

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
TRUNCATED = "truncated"
CHANGED = "changed while read"
SKIP_REASONS = (MISSING, UNREADABLE, EMPTY, NON_FINITE, TOO_SHORT, TRUNCATED, CHANGED)
BLOCK_FRAMES = 65_536


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
    """Read a whole audio file as float32 (frames, channels) and its sample rate (see `read_span`)."""
    return read_span(path)


def read_span(path: str | os.PathLike, offset_s: float = 0.0, duration_s: float | None = None,
              clip_id: str | None = None) -> tuple[np.ndarray, int]:
    """Read ``duration_s`` seconds (default: to the end) from ``offset_s`` of an audio file as float32
    (frames, channels) and its sample rate; only that span is held in memory.

    soundfile (libsndfile: WAV, FLAC, Ogg, MP3, ...) seeks to the span; audioread (ffmpeg/GStreamer: m4a, ...),
    the fallback, decodes from the start and keeps only the span. Raises ClipError: missing, unreadable, or
    truncated (a WAV header claiming more samples than the file holds)."""
    name = clip_id or os.fspath(path)
    if offset_s < 0 or (duration_s is not None and duration_s < 0):
        raise ValueError(f"{name}: span offset {offset_s} s / duration {duration_s} s must not be negative")
    decoder = _Decoder(path, name)
    try:
        first = int(round(offset_s * decoder.sample_rate))
        count = None if duration_s is None else int(np.ceil(duration_s * decoder.sample_rate))
        kept, held = [], 0
        for block in decoder.blocks(first):
            kept.append(block)
            held += block.shape[0]
            if count is not None and held >= count:
                break
    finally:
        decoder.close()
    data = np.concatenate(kept) if kept else np.zeros((0, decoder.channels), np.float32)
    return np.ascontiguousarray(data[:count], dtype=np.float32), decoder.sample_rate


def _file_signature(path: str) -> tuple[int, int, int]:
    status = os.stat(path)
    return status.st_size, status.st_mtime_ns, status.st_ino


def _check_wav_header(path: str, name: str) -> None:
    """A RIFF/WAVE data chunk must fit in the file: libsndfile silently trusts the file size instead, so a header
    claiming 2^31 frames, or a file cut off mid-copy, would otherwise read as a shorter, valid file."""
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        head = file.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return
        offset = 12
        while offset + 8 <= size:
            file.seek(offset)
            chunk_id, chunk_size = struct.unpack("<4sI", file.read(8))
            if chunk_id == b"data":
                available = size - offset - 8
                if chunk_size > available:
                    raise ClipError(name, TRUNCATED, f"the WAV header declares {chunk_size} bytes of samples, the "
                                                     f"file holds {available}")
                return
            offset += 8 + chunk_size + (chunk_size & 1)


class _Decoder:
    """An open file, soundfile or (failing that) audioread: ``sample_rate``, ``channels``, ``header_frames`` (None
    when the decoder does not say); ``blocks(first_frame)`` yields float32 (frames, channels) blocks and raises
    ClipError when the file turns out truncated, unreadable mid-way or changed while read."""

    def __init__(self, path: str | os.PathLike, name: str, block_frames: int = BLOCK_FRAMES):
        self.path, self.name, self.block_frames = os.fspath(path), name, block_frames
        if not os.path.isfile(self.path):
            raise ClipError(name, MISSING, "no such file")
        self.signature = _file_signature(self.path)
        if self.signature[0] == 0:  # no decoder says so: soundfile and audioread fail on it as on any other bytes
            raise ClipError(name, EMPTY, "the file has 0 bytes")
        _check_wav_header(self.path, name)
        self._sound, self._audioread = None, None
        try:
            self._sound = soundfile.SoundFile(self.path)
        except (soundfile.LibsndfileError, RuntimeError, ValueError) as soundfile_error:
            try:
                import audioread  # ffmpeg/GStreamer for formats libsndfile lacks (what librosa falls back to)

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self._audioread = audioread.audio_open(self.path)
            except Exception as audioread_error:  # audioread raises many unrelated types (NoBackendError, ...)
                raise ClipError(name, UNREADABLE, f"soundfile: {soundfile_error}; audioread: {audioread_error!r}") \
                    from None

        if self._sound is not None:
            self.sample_rate, self.channels = int(self._sound.samplerate), int(self._sound.channels)
            self.header_frames = self._sound.frames if self._sound.seekable() else None
            self.blocks = self._soundfile_blocks
        else:
            self.sample_rate, self.channels = int(self._audioread.samplerate), int(self._audioread.channels)
            self.header_frames = None
            self.blocks = self._audioread_blocks

    def close(self) -> None:
        (self._sound or self._audioread).close()

    def _finish(self, frames_read: int, header_frames: int | None) -> None:
        if header_frames is not None and frames_read < header_frames:
            raise ClipError(self.name, TRUNCATED, f"read {frames_read} of the {header_frames} frames the header "
                                                  "declares")
        if _file_signature(self.path) != self.signature:
            raise ClipError(self.name, CHANGED, "the file's size, modification time or inode changed while it "
                                                "was read")

    def _soundfile_blocks(self, first: int = 0) -> Iterator[np.ndarray]:
        sound, read = self._sound, 0
        try:
            if first:
                if first >= sound.frames:
                    return
                sound.seek(first)
            header_frames = sound.frames - first if sound.seekable() else None
            while True:
                block = sound.read(self.block_frames, dtype="float32", always_2d=True)
                if block.shape[0] == 0:
                    break
                read += block.shape[0]
                yield block
        except (soundfile.LibsndfileError, RuntimeError) as error:
            raise ClipError(self.name, UNREADABLE, f"decoding failed after {first + read} frames: {error}") from None
        self._finish(read, header_frames)

    def _audioread_blocks(self, first: int = 0) -> Iterator[np.ndarray]:
        channels, position = self._audioread.channels, 0
        try:
            for buffer in self._audioread:
                block = np.frombuffer(buffer, "<i2").reshape(-1, channels).astype(np.float32) / 32768.0
                position += block.shape[0]
                if position > first:
                    yield block[max(0, first - (position - block.shape[0])):]
        except ClipError:
            raise
        except Exception as error:
            raise ClipError(self.name, UNREADABLE, f"decoding failed after {position} frames: {error!r}") from None
        self._finish(position, None)


@dataclasses.dataclass
class StreamInfo:
    """What a stream read: the file's rate and channels, and (once read) frames, samples clipped to [-1, 1]."""

    name: str
    sample_rate: int
    channels: int
    header_frames: int | None  # None when the decoder does not say (audioread)
    frames_read: int = 0
    clipped: int = 0  # samples (any channel) outside [-1, 1], clipped before the downmix

    @property
    def duration(self) -> float:
        return self.frames_read / self.sample_rate


def stream_mono(path: str | os.PathLike, clip_id: str | None = None, *, block_frames: int = BLOCK_FRAMES,
                target_rate: int = SAMPLE_RATE) -> tuple[StreamInfo, Iterator[np.ndarray]]:
    """Open a file of any length: its StreamInfo, and an iterator of mono float32 blocks at ``target_rate`` Hz
    (default 32 kHz; tag and embed pass the model's front-end rate): read, clipped to [-1, 1], downmixed by the
    mean of the channels and resampled with a streaming soxr a block at a time. The info's ``frames_read`` and ``clipped`` are final once the iterator is exhausted.

    Raises ClipError (at open: missing, unreadable, truncated WAV header; while iterating: non-finite samples,
    unreadable mid-way, truncated, changed while read; at the end: empty, no frames). Digital silence is valid.
    """
    name = clip_id or os.fspath(path)
    if isinstance(target_rate, bool) or not isinstance(target_rate, numbers.Integral) or target_rate <= 0:
        raise ValueError(f"target_rate must be a positive whole number of Hz, got {target_rate!r}")
    target_rate = int(target_rate)
    decoder = _Decoder(path, name, block_frames)
    info = StreamInfo(name, decoder.sample_rate, decoder.channels, decoder.header_frames)

    def blocks() -> Iterator[np.ndarray]:
        try:
            yield from mono_blocks(info, decoder.blocks(), target_rate)
        finally:
            decoder.close()

    return info, blocks()


def mono_blocks(info: StreamInfo, blocks: Iterable[np.ndarray], target_rate: int) -> Iterator[np.ndarray]:
    """Mono float32 blocks at ``target_rate`` from (frames, info.channels) float32 blocks at ``info.sample_rate``
    (a decoder's, or a pipe's): non-finite samples are an error, samples outside [-1, 1] are clipped and counted,
    channels averaged, the rate converted by a streaming soxr; ``info.frames_read`` and ``clipped`` are kept."""
    name, sample_rate = info.name, info.sample_rate
    resampler = (None if sample_rate == target_rate else
                 soxr.ResampleStream(sample_rate, target_rate, 1, dtype="float32", quality="HQ"))
    for block in blocks:
        if not np.isfinite(block).all():
            bad = int(block.size - np.isfinite(block).sum())
            raise ClipError(name, NON_FINITE, f"{bad} NaN/Inf samples in frames {info.frames_read} to "
                                              f"{info.frames_read + block.shape[0]}")
        outside = int(np.count_nonzero(np.abs(block) > 1.0))
        if outside:
            info.clipped += outside
            block = np.clip(block, -1.0, 1.0)
        info.frames_read += block.shape[0]
        mono = block.mean(axis=1, dtype=np.float32)
        if resampler is not None:
            mono = resampler.resample_chunk(mono, last=False)
        if mono.size:
            yield mono
    if info.frames_read == 0:
        raise ClipError(name, EMPTY, "no samples")
    if resampler is not None:
        tail = resampler.resample_chunk(np.zeros(0, np.float32), last=True)
        if tail.size:
            yield tail


def to_mono(
    samples: np.ndarray,
    sample_rate: int,
    clip_id: str = "<array>",
    *,
    min_seconds: float = 1.0,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Validate, downmix (mean of the channels) and resample to 32 kHz; float32 (n,) of any length.

    `samples` is (frames,) or (frames, channels). Only the first `max_seconds` are resampled when given (the rest
    would be cropped anyway). A clip shorter than `min_seconds`, empty, all zero or with NaN/Inf samples raises
    ClipError.
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
    if max_seconds is not None:
        # Only resample what the crop keeps (plus a margin for the resampler's filter).
        mono = mono[: min(mono.shape[0], int(np.ceil(max_seconds * sample_rate)) + 64)]
    if sample_rate != SAMPLE_RATE:
        mono = soxr.resample(mono, sample_rate, SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)
    return mono


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
    mono = to_mono(samples, sample_rate, clip_id, min_seconds=min_seconds, max_seconds=CLIP_SECONDS)
    clip = np.zeros(CLIP_SAMPLES, dtype=np.float32)
    n = min(CLIP_SAMPLES, mono.shape[0])
    clip[:n] = mono[:n]
    return clip


def to_int16(clip: np.ndarray) -> np.ndarray:
    """PANNs' packing: clip(x, -1, 1) · 32767, truncated to int16."""
    return (np.clip(clip, -1.0, 1.0) * INT16_SCALE).astype(np.int16)


def int16_to_float(waveform: np.ndarray) -> np.ndarray:
    """The inverse scaling, float32 in [-1, 1]; works on a NumPy array or a (traced) JAX array alike."""
    return waveform.astype(np.float32) / INT16_SCALE


def encode_flac(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """An int16 waveform as the bytes of a 16-bit FLAC file (how ``flac`` shards and TFDS configs store a clip)."""
    buffer = io.BytesIO()
    soundfile.write(buffer, waveform, sample_rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def decode_flac(data: bytes | memoryview) -> np.ndarray:
    """The int16 samples of FLAC file bytes (``encode_flac``'s inverse); soundfile's errors pass through."""
    waveform, _ = soundfile.read(io.BytesIO(data), dtype="int16")
    return waveform


def load_clip(path: str | os.PathLike, clip_id: str | None = None, *, min_seconds: float = 1.0) -> np.ndarray:
    """Decode a file into the int16 (CLIP_SAMPLES,) waveform that gets packed; raises ClipError with a reason."""
    clip_id = clip_id or os.fspath(path)
    # Only the 10 s the clip keeps (plus the margin to_mono resamples) are read.
    samples, sample_rate = read_span(path, 0.0, CLIP_SECONDS + 1.0, clip_id)
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
