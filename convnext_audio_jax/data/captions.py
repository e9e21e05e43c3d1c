"""Captioned clips for retrieval and captioning: Clotho's and AudioCaps' caption CSVs over an audio folder, and
a captioned version of the synthetic demo set, as caption SPECs:

    clotho:AUDIO_DIR@CAPTIONS.csv      Clotho v2: ``file_name,caption_1,…,caption_5`` (one row per clip)
    audiocaps:AUDIO_DIR@SPLIT.csv      AudioCaps: ``audiocap_id,youtube_id,start_time,caption`` (a row per
                                       caption; a clip's rows share youtube_id and start_time)
    demo-captions[@SPLIT]              the synthetic demo set (data/demo.py), five captions per clip composed
                                       from its events, with synonyms and word order varied

:func:`open_captions` gives a :class:`CaptionedClips`: clip ids, each clip's captions, and ``read(i)`` → the
clip's mono float32 waveform at a given rate (the whole file; the encoder windows it). Every error is a
one-line :class:`CaptionSpecError` naming the SPEC, file, column or clip.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import pathlib
from collections.abc import Callable

import numpy as np

from convnext_audio_jax.data import audio, demo, sources
from convnext_audio_jax.runtime.errors import UserError

GRAMMAR = "clotho:AUDIO_DIR@CAPTIONS.csv, audiocaps:AUDIO_DIR@SPLIT.csv or demo-captions[@SPLIT]"
CLOTHO_CAPTIONS = 5

# Each demo class: noun phrases (synonyms) and what the sound does; a caption picks one of each per event.
_DEMO_WORDS = {
    "low tone": (("a low tone", "a deep hum", "a low pitched drone", "a bass tone"), ("hums", "drones", "sounds")),
    "high tone": (("a high tone", "a high pitched beep", "a shrill whistle", "a piercing tone"),
                  ("rings", "whistles", "sounds")),
    "up chirp": (("a rising chirp", "an upward sweep", "a rising whistle"), ("sweeps up", "rises", "climbs")),
    "down chirp": (("a falling chirp", "a downward sweep", "a descending whistle"), ("sweeps down", "falls", "drops")),
    "low noise band": (("a low rumble", "rumbling noise", "a deep roar"), ("rumbles", "roars")),
    "high noise band": (("a hiss", "hissing noise", "a high pitched hiss", "steam hissing"), ("hisses", "sizzles")),
    "clicks": (("clicking", "a series of clicks", "ticking", "rapid taps"), ("clicks", "ticks", "taps")),
    "buzz": (("a buzz", "a buzzing sound", "an electric buzz"), ("buzzes", "drones")),
    "warble": (("a warbling tone", "a wavering tone", "a trilling sound"), ("warbles", "wavers", "trills")),
    "pulsed tone": (("a pulsing beep", "repeated beeps", "an intermittent tone", "a beeping alarm"),
                    ("beeps", "pulses")),
}
_CAPTION_STREAM = 7  # a seed stream of its own: the demo's labels and audio streams are 0 and 1


class CaptionSpecError(UserError):
    """A caption SPEC that cannot be parsed or opened; one line naming what is wrong."""


@dataclasses.dataclass
class CaptionedClips:
    """``clip_ids[i]``'s captions are ``captions[i]``; ``read(i, sample_rate)`` → float32 mono waveform."""

    clip_ids: list[str]
    captions: list[list[str]]
    reader: Callable[[int, int], np.ndarray]
    description: str

    def __len__(self) -> int:
        return len(self.clip_ids)

    def read(self, index: int, sample_rate: int) -> np.ndarray:
        return self.reader(index, sample_rate)

    def all_captions(self) -> tuple[list[str], np.ndarray]:
        """Every caption, flattened, and the clip index of each."""
        texts = [text for captions in self.captions for text in captions]
        owner = np.concatenate([np.full(len(c), i, np.int32) for i, c in enumerate(self.captions)])
        return texts, owner


def demo_captions(labels: np.ndarray, rng: np.random.Generator, count: int = CLOTHO_CAPTIONS) -> list[str]:
    """``count`` captions of a demo clip whose events are ``labels`` (bool, one per demo class), each with its
    own synonyms, verbs, event order and sentence form."""
    names = [demo.CLASS_NAMES[i] for i in np.flatnonzero(labels)]
    captions = []
    for _ in range(count):
        order = rng.permutation(len(names))
        parts = []
        for j in order:
            nouns, verbs = _DEMO_WORDS[names[j]]
            parts.append((nouns[rng.integers(len(nouns))], verbs[rng.integers(len(verbs))]))
        form = int(rng.integers(3))
        if len(parts) == 1:
            noun, verb = parts[0]
            text = [f"{noun} {verb}", f"{noun} over faint background noise", f"there is {noun}"][form]
        elif form == 0:
            text = " and ".join(f"{noun} {verb}" for noun, verb in parts[:-1]) + f" while {parts[-1][0]} {parts[-1][1]}"
        elif form == 1:
            text = ", ".join(noun for noun, _ in parts[:-1]) + f" and {parts[-1][0]} can be heard"
        else:
            text = f"{parts[0][0]} {parts[0][1]} with " + " and ".join(noun for noun, _ in parts[1:])
        captions.append(text[0].upper() + text[1:])
    return captions


def _open_demo(spec: str, split: str, num_clips: int, seed: int) -> CaptionedClips:
    if split not in demo.SPLITS:
        raise CaptionSpecError(f"caption SPEC {spec!r}: the demo's splits are {', '.join(demo.SPLITS)}")
    clips = demo.SyntheticAudioSet(split, num_clips, seed=seed)
    captions = [demo_captions(clips.targets[i], np.random.default_rng([seed, demo.SPLITS.index(split), i,
                                                                       _CAPTION_STREAM]))
                for i in range(num_clips)]

    def read(index: int, sample_rate: int) -> np.ndarray:
        waveform = clips[index]["waveform"].astype(np.float32) / audio.INT16_SCALE
        if sample_rate != clips.sample_rate:
            import soxr

            waveform = soxr.resample(waveform, clips.sample_rate, sample_rate).astype(np.float32)
        return waveform

    return CaptionedClips([clips.clip_id(i) for i in range(num_clips)], captions, read, clips.description)


def _rows(spec: str, path: pathlib.Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.is_file():
        raise CaptionSpecError(f"caption SPEC {spec!r}: {path} is not a file")
    with open(path, newline="", encoding="utf-8-sig") as file:
        reader = csv.DictReader(file)
        missing = [name for name in required if name not in (reader.fieldnames or [])]
        if missing:
            raise CaptionSpecError(f"{path}: no column {', '.join(missing)} (found {', '.join(reader.fieldnames or [])};"
                                   f" expected {', '.join(required)})")
        return list(reader)


def read_clotho_csv(spec: str, path: pathlib.Path) -> tuple[list[str], list[list[str]]]:
    """(file names, their captions) of a Clotho captions CSV; a clip with an empty caption is an error."""
    columns = ("file_name", *(f"caption_{k}" for k in range(1, CLOTHO_CAPTIONS + 1)))
    names, captions = [], []
    for line, row in enumerate(_rows(spec, path, columns), start=2):
        texts = [row[name].strip() for name in columns[1:]]
        if not row["file_name"].strip() or not all(texts):
            raise CaptionSpecError(f"{path}:{line}: an empty file_name or caption")
        names.append(row["file_name"].strip())
        captions.append(texts)
    return names, captions


def read_audiocaps_csv(spec: str, path: pathlib.Path) -> tuple[list[str], list[list[str]]]:
    """(clip stems ``{youtube_id}_{start_time}``, their captions) of an AudioCaps CSV, in first-seen order."""
    by_clip: dict[str, list[str]] = {}
    for line, row in enumerate(_rows(spec, path, ("youtube_id", "start_time", "caption")), start=2):
        if not row["youtube_id"].strip() or not row["caption"].strip():
            raise CaptionSpecError(f"{path}:{line}: an empty youtube_id or caption")
        try:
            start = float(row["start_time"])
        except ValueError:
            raise CaptionSpecError(f"{path}:{line}: start_time {row['start_time']!r} is no number") from None
        by_clip.setdefault(f"{row['youtube_id'].strip()}_{start:g}", []).append(row["caption"].strip())
    return list(by_clip), list(by_clip.values())


def _open_folder(spec: str, layout: str, body: str) -> CaptionedClips:
    if "@" not in body:
        raise CaptionSpecError(f"caption SPEC {spec!r}: expected {layout}:AUDIO_DIR@CSV")
    folder, csv_path = body.rsplit("@", 1)
    if not os.path.isdir(folder):
        raise CaptionSpecError(f"caption SPEC {spec!r}: audio folder {folder} does not exist")
    reader = read_clotho_csv if layout == "clotho" else read_audiocaps_csv
    names, captions = reader(spec, pathlib.Path(csv_path))
    index = sources.index_audio_folder(folder)
    # AudioCaps downloads name a clip {id}_{start} (seconds), or Y{id}… as PANNs do; Clotho by its file name.
    paths = [index.get(name) or index.get(os.path.splitext(name)[0]) or index.get(f"Y{name}") for name in names]
    missing = [name for name, path in zip(names, paths) if path is None]
    if missing:
        raise CaptionSpecError(f"caption SPEC {spec!r}: {len(missing)} of {len(names)} clips of {csv_path} have no "
                               f"file in {folder} (first: {missing[0]!r})")

    def read(i: int, sample_rate: int) -> np.ndarray:
        _, blocks = audio.stream_mono(paths[i], names[i], target_rate=sample_rate)
        return np.concatenate([np.zeros(0, np.float32), *blocks])

    return CaptionedClips(names, captions, read, f"{layout} captions {csv_path} over {folder}")


def open_captions(spec: str, *, demo_clips: int = 512, seed: int = 0) -> CaptionedClips:
    """The captioned clips of a caption SPEC (module doc); ``demo_clips``: the size of a demo split."""
    kind, _, body = spec.partition(":")
    if spec == "demo-captions" or spec.startswith("demo-captions@"):
        return _open_demo(spec, spec.partition("@")[2] or "train", demo_clips, seed)
    if kind in ("clotho", "audiocaps") and body:
        return _open_folder(spec, kind, body)
    raise CaptionSpecError(f"caption SPEC {spec!r} is none of {GRAMMAR}")
