"""Tagging audio as it arrives on a pipe: ``convnext-audio tag - --stream`` (``arecord``, ``ffmpeg … -f s16le -``).

Raw PCM (``--input-format s16le``, ``s32le`` or ``f32le`` at ``--input-rate`` Hz with ``--input-channels``) or a
WAV stream (its header read as it arrives; the size fields of a pipe's header are ignored) is read as the bytes
come, converted to the model's rate and mono as files are (`data.audio.mono_blocks`), and cut into the model's
windows every ``--hop`` seconds (`windowing.stream_windows`: the windows ``tag`` cuts from the same audio in a
file, the last one ending at the end of the stream). Each window is scored as soon as its last sample has arrived
and one JSON line is printed and flushed: its start and end in seconds from the start of the stream, its tags
(top-k at or above the threshold, the ``tags`` of a ``tag`` record) and the wall-clock latency from the read that completed it
to the line. Memory holds one window and one read, however long the stream runs.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from typing import BinaryIO

import numpy as np

from convnext_audio_jax.data import audio as audio_lib
from convnext_audio_jax.inference import windowing
from convnext_audio_jax.inference.tag_output import _tags
from convnext_audio_jax.runtime.errors import UserError

RAW_FORMATS = {"s16le": ("<i2", 32768.0), "s32le": ("<i4", 2147483648.0), "f32le": ("<f4", 1.0)}
INPUT_FORMATS = (*RAW_FORMATS, "wav")
READ_BYTES = 1 << 16  # at most this much per read: a read returns what the pipe holds, so a hop is not delayed
_WAV_SAMPLE = {(1, 16): "s16le", (1, 32): "s32le", (3, 32): "f32le"}  # (format tag, bits) → raw format


def _read(stream: BinaryIO, size: int) -> bytes:
    """Whatever the pipe holds now, up to ``size`` bytes (blocks only while it is empty); b"" at its end."""
    if hasattr(stream, "fileno"):
        try:
            return os.read(stream.fileno(), size)
        except (OSError, ValueError):  # not a real file (io.BytesIO in tests has fileno() raising)
            pass
    return stream.read(size)


def _exactly(stream: BinaryIO, size: int, what: str) -> bytes:
    data = b""
    while len(data) < size:
        chunk = _read(stream, size - len(data))
        if not chunk:
            raise UserError(f"standard input ended inside the WAV header ({what}); expected a WAV stream "
                            "(or give --input-format s16le/s32le/f32le for raw PCM)")
        data += chunk
    return data


def read_wav_header(stream: BinaryIO) -> tuple[str, int, int]:
    """(raw format, sample rate, channels) of a WAV stream, read up to the start of its samples."""
    riff = _exactly(stream, 12, "RIFF")
    if riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
        raise UserError(f"standard input does not start with a WAV header (got {riff[:4]!r}); for raw PCM give "
                        "--input-format s16le, s32le or f32le and --input-rate")
    fmt = None
    while True:
        kind, size = struct.unpack("<4sI", _exactly(stream, 8, "chunk header"))
        if kind == b"data":
            break
        body = _exactly(stream, size + (size & 1), kind.decode("latin-1"))
        if kind == b"fmt ":
            tag, channels, rate = struct.unpack("<HHI", body[:8])
            bits = struct.unpack("<H", body[14:16])[0]
            if tag == 0xFFFE and len(body) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the real tag opens the sub-format
                tag = struct.unpack("<H", body[24:26])[0]
            fmt = (tag, bits, rate, channels)
    if fmt is None:
        raise UserError("the WAV stream on standard input has no 'fmt ' chunk before its samples")
    tag, bits, rate, channels = fmt
    if (tag, bits) not in _WAV_SAMPLE:
        raise UserError(f"the WAV stream on standard input holds {bits}-bit samples of format {tag}; expected 16- "
                        "or 32-bit PCM or 32-bit float")
    return _WAV_SAMPLE[(tag, bits)], rate, channels


def pcm_blocks(stream: BinaryIO, fmt: str, channels: int) -> Iterator[np.ndarray]:
    """(frames, channels) float32 blocks of raw PCM as it arrives (a frame split between reads waits for its
    other bytes; a partial frame at the very end is dropped)."""
    dtype, scale = RAW_FORMATS[fmt]
    frame = np.dtype(dtype).itemsize * channels
    pending = b""
    while True:
        chunk = _read(stream, READ_BYTES)
        if not chunk:
            return
        pending += chunk
        usable = len(pending) - len(pending) % frame
        if usable:
            samples = np.frombuffer(pending[:usable], dtype).astype(np.float32) / np.float32(scale)
            pending = pending[usable:]
            yield samples.reshape(-1, channels)


def stream_tags(stream: BinaryIO, out, scorer, model, names: Sequence[str], *, fmt: str, rate: int | None,
                channels: int, hop_seconds: float | None, top_k: int, threshold: float) -> int:
    """Reads ``stream`` to its end, writing one JSON line per window to ``out``; returns the number of windows."""
    if fmt == "wav":
        fmt, rate, channels = read_wav_header(stream)
    model_rate = int(model.frontend.sample_rate)
    window = model.frontend.clip_samples
    hop = windowing.window_hop(hop_seconds, model_rate, window)  # None: half a window, as `tag`
    info = audio_lib.StreamInfo("-", rate, channels, None)
    arrived, total = time.monotonic(), 0  # when the latest block arrived; samples so far at the model's rate

    def timed(blocks):
        nonlocal arrived, total
        for block in blocks:
            arrived, total = time.monotonic(), total + len(block)
            yield block

    count = 0
    mono = timed(audio_lib.mono_blocks(info, pcm_blocks(stream, fmt, channels), model_rate))
    for start, samples in windowing.stream_windows(mono, window, hop):
        probs = np.asarray(scorer(samples[None])["probs"][0])
        # The window's end clipped to the audio, as `tag`'s windows are (only a stream shorter than a window ends
        # before its window does).
        line = {"start": round(start / model_rate, 4), "end": round(min(start + window, total) / model_rate, 4),
                "tags": _tags(probs, names, top_k, threshold),
                "latency_ms": round(1000 * (time.monotonic() - arrived), 1)}
        out.write(json.dumps(line, allow_nan=False) + "\n")
        out.flush()
        count += 1
    return count


def check_stream_arguments(args) -> None:
    """The flags of ``tag - --stream``, checked before the model loads."""
    if list(args.inputs) != ["-"]:
        raise UserError(f"--stream reads standard input: give '-' as the only input, got {' '.join(args.inputs)}")
    for flag in ("output", "resume", "frames", "all_scores"):
        if getattr(args, flag):
            raise UserError(f"--stream prints one JSON line per window to standard output; --{flag.replace('_', '-')} "
                            "does not apply")
    if args.input_format != "wav" and args.input_rate is None:
        raise UserError(f"--input-format {args.input_format} needs --input-rate (the stream's sample rate in Hz)")
    if args.input_rate is not None and args.input_rate < 1:
        raise UserError(f"--input-rate must be a positive number of Hz, got {args.input_rate}")
    if args.input_channels < 1:
        raise UserError(f"--input-channels must be ≥ 1, got {args.input_channels}")


def run_stream(args, scorer, model, names: Sequence[str]) -> int:
    try:
        count = stream_tags(sys.stdin.buffer, sys.stdout, scorer, model, names, fmt=args.input_format,
                            rate=args.input_rate, channels=args.input_channels, hop_seconds=args.hop,
                            top_k=args.top_k, threshold=args.threshold)
    except audio_lib.ClipError as error:
        print(f"tag: standard input: {error.reason} ({error.detail})", file=sys.stderr)
        return 1
    print(f"tag: {count} windows from standard input", file=sys.stderr)
    return 0
