"""The byte layout of one clip in the ArrayRecord shards written by `prepare --format array_record`.

A record is: magic `CAJ1`, encoding byte (0 = raw int16, 1 = FLAC), uint16 id length, the UTF-8 id, uint32 number
of class indices, those indices as uint32, then the waveform (little-endian int16 samples, or a FLAC file).
Labels are class indices rather than a 527-wide vector so the layout does not depend on the class list.
"""

from __future__ import annotations

import struct

import numpy as np
import soundfile

from convnext_audio_jax.data.audio import (
    CLIP_SAMPLES,
    SAMPLE_RATE,
    decode_flac,
    encode_flac,
)
from convnext_audio_jax.runtime.errors import UserError

# The ArrayRecord writer's options: one record per group, so a random read decodes one record and not a group; and
# no compression, since riegeli's default (brotli) costs ~1 ms of CPU per 10 s clip on every read, 4x an uncompressed
# read, for little gain on audio (FLAC records are compressed already). Files written with other options still read.
WRITER_OPTIONS = "group_size:1,uncompressed"

MAGIC = b"CAJ1"
ENCODINGS = ("int16", "flac")
_HEADER = struct.Struct("<4sBH")
_COUNT = struct.Struct("<I")


class RecordError(UserError):
    """A record whose bytes do not follow the layout above."""


def encode_record(clip_id: str, class_indices, waveform: np.ndarray, encoding: str = "int16") -> bytes:
    if waveform.dtype != np.int16 or waveform.shape != (CLIP_SAMPLES,):
        raise ValueError(f"{clip_id}: expected an int16 ({CLIP_SAMPLES},) waveform, got {waveform.dtype} {waveform.shape}")
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown waveform encoding {encoding!r}; expected one of {ENCODINGS}")
    id_bytes = clip_id.encode("utf-8")
    indices = np.asarray(class_indices, dtype="<u4")
    if encoding == "flac":
        audio_bytes = encode_flac(waveform, SAMPLE_RATE)
    else:
        audio_bytes = waveform.astype("<i2", copy=False).tobytes()
    return b"".join(
        [
            _HEADER.pack(MAGIC, ENCODINGS.index(encoding), len(id_bytes)),
            id_bytes,
            _COUNT.pack(indices.size),
            indices.tobytes(),
            audio_bytes,
        ]
    )


def decode_record(record: bytes) -> tuple[str, np.ndarray, np.ndarray]:
    """(clip id, class indices int32, int16 waveform) from a record; RecordError if the bytes are malformed."""
    try:
        magic, encoding, id_length = _HEADER.unpack_from(record, 0)
        if magic != MAGIC:
            raise RecordError(f"record starts with {magic!r}, expected {MAGIC!r}")
        offset = _HEADER.size
        clip_id = record[offset : offset + id_length].decode("utf-8")
        offset += id_length
        (count,) = _COUNT.unpack_from(record, offset)
        offset += _COUNT.size
        indices = np.frombuffer(record, dtype="<u4", count=count, offset=offset).astype(np.int32)
        offset += 4 * count
        payload = memoryview(record)[offset:]
        if encoding == ENCODINGS.index("flac"):
            waveform = decode_flac(payload)
        else:
            waveform = np.frombuffer(payload, dtype="<i2")
    except (struct.error, UnicodeDecodeError, ValueError, soundfile.LibsndfileError) as error:
        raise RecordError(f"malformed record ({len(record)} bytes): {error}") from None
    if waveform.shape != (CLIP_SAMPLES,):
        raise RecordError(f"record {clip_id!r}: waveform has {waveform.shape} samples, expected ({CLIP_SAMPLES},)")
    return clip_id, indices, waveform
