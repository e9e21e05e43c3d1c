"""Tiny datasets in the real AudioSet/PANN formats, made from generated signals, for the data tests."""

from __future__ import annotations

import pathlib

import h5py
import numpy as np
import soundfile

from convnext_audio_jax.data import audio

# Display names with commas and quotes, as in the real class_labels_indices.csv.
CLASSES = [
    ("/m/09x0r", "Speech"),
    ("/m/05zppz", "Male speech, man speaking"),
    ("/m/04rlf", "Music"),
    ("/m/0jbk", "Animal"),
    ("/m/07q6cd_", 'Squeak, "creak"'),
]


def write_class_labels(path: pathlib.Path, classes=CLASSES) -> pathlib.Path:
    lines = ["index,mid,display_name"]
    for i, (mid, name) in enumerate(classes):
        quoted = '"' + name.replace('"', '""') + '"'
        lines.append(f"{i},{mid},{quoted}")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_segments_csv(path: pathlib.Path, rows: list[tuple[str, float, float, list[str]]]) -> pathlib.Path:
    """AudioSet layout: three comment lines, then `YTID, start, end, "mid,mid"`."""
    lines = [
        "# Segments csv created Sun Mar  5 10:54:25 2017",
        f"# num_ytids={len(rows)}, num_segs={len(rows)}, num_unique_labels=5, num_positive_labels=9",
        "# YTID, start_seconds, end_seconds, positive_labels",
    ]
    lines += [f'{ytid}, {start:.3f}, {end:.3f}, "{",".join(mids)}"' for ytid, start, end, mids in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def tone(seconds: float, sample_rate: int, frequency: float, channels: int = 1, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    mono = amplitude * np.sin(2 * np.pi * frequency * t)
    return np.repeat(mono[:, None], channels, axis=1).astype(np.float32)


def segment_file(folder: pathlib.Path, ytid: str, start: float, end: float, ext: str = "wav") -> pathlib.Path:
    return folder / f"{ytid}_{start:.3f}_{end:.3f}.{ext}"


def write_packed_hdf5(path: pathlib.Path, waveforms: np.ndarray, targets: np.ndarray, names: list[str],
                      compression: str | None = None) -> pathlib.Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("audio_name", data=np.array([n.encode() for n in names], dtype="S20"))
        f.create_dataset("waveform", data=waveforms.astype(np.int16), compression=compression,
                         chunks=(1, audio.CLIP_SAMPLES) if compression else None)
        f.create_dataset("target", data=targets.astype(bool))
        f.attrs["sample_rate"] = audio.SAMPLE_RATE
    return path


def random_waveforms(n: int, seed: int = 0) -> np.ndarray:
    """Distinct non-silent int16 clips; row i starts with the sample value i+1 so rows are identifiable."""
    rng = np.random.default_rng(seed)
    waveforms = rng.integers(-3000, 3000, size=(n, audio.CLIP_SAMPLES), dtype=np.int16)
    waveforms[:, 0] = np.arange(1, n + 1)
    return waveforms


def write_generated_clips(folder: pathlib.Path, count: int, seed: int = 0) -> list[tuple[str, float, float, list[str]]]:
    """`count` short WAV/FLAC clips named like AudioSet segments, with random labels; returns the CSV rows."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        ytid = f"clip{i:04d}_x"
        mids = sorted({CLASSES[j][0] for j in rng.choice(len(CLASSES), size=rng.integers(1, 3), replace=False)})
        sample_rate = (16_000, 32_000, 44_100)[i % 3]
        ext = ("wav", "flac")[i % 2]
        signal = tone(2.0 + i % 3, sample_rate, 200.0 + 50 * i, channels=1 + i % 2)
        soundfile.write(segment_file(folder, ytid, 30.0, 40.0, ext), signal, sample_rate)
        rows.append((ytid, 30.0, 40.0, mids))
    return rows


def damage_hdf5_clips(path: pathlib.Path, clips) -> pathlib.Path:
    """Overwrite the gzip chunks of ``clips`` in a packed file written with compression: those rows become
    unreadable (h5py's filter fails), as a truncated or corrupted download would leave them."""
    with h5py.File(path, "r") as f:
        offsets = [f["waveform"].id.get_chunk_info(i).byte_offset for i in clips]
    with open(path, "r+b") as f:
        for offset in offsets:
            f.seek(offset + 10)
            f.write(b"\xff" * 200)
    return path
