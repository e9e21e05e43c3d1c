"""Data SPEC strings: one grammar for training (``config.data.train/validation/eval``) and
``convnext-audio evaluate --data``.

    DIR@SPLIT                          split SPLIT of a ``prepare`` output folder (ArrayRecord or HDF5)
    FILE.h5 | FILE.hdf5                a PANN packed HDF5 file, or a PANN index file such as full_train.h5
    AUDIO_DIR@CLIPS.csv                audio files in a folder listed by a segment CSV or a path,labels CSV
    tfds:NAME[/CONFIG][:VERSION]@SPLIT a TFDS dataset's ArrayRecord split, read without TensorFlow (the
                                       project's ``audioset`` builder: convnext_audio_jax/data/tfds_builder.py)
    demo[@SPLIT]                       the built-in synthetic set (split train, validation or eval)
    SPEC+SPEC+…                        the union of several SPECs (clip ids must stay unique)

and, for validation only, ``holdout:N`` or ``holdout:P%``: clips carved out of the training SPEC by a hash
of their clip id (see :func:`split_holdout`). :func:`parse` checks the grammar without touching the disk;
:func:`open_spec` opens the data, :func:`open_for_model` checks it against the model's rate and clip length (the
demo set is made to match). Unions and subsets are the views of ``views.py``. Every error is a one-line :class:`SpecError` naming the SPEC and what
exists (splits, files, datasets found).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
from collections.abc import Sequence

import h5py
import numpy as np

from convnext_audio_jax.data import audio, demo, sources
from convnext_audio_jax.data import labels as labels_lib
from convnext_audio_jax.data.views import ConcatSource, SubsetSource  # noqa: F401  (public here too)
from convnext_audio_jax.runtime.errors import UserError

LABELS_COPY = "class_labels_indices.csv"  # the class list `prepare` copies into its output folder
_TFDS = re.compile(r"^tfds:(?P<name>[A-Za-z0-9_]+)(?:/(?P<config>[A-Za-z0-9_.\-]+))?(?::(?P<version>[0-9.]+))?@(?P<split>[^@]+)$")
_HOLDOUT = re.compile(r"^holdout:(?P<amount>[0-9]+(?:\.[0-9]*)?)(?P<percent>%?)$")
GRAMMAR = "DIR@SPLIT, FILE.h5, AUDIO_DIR@CLIPS.csv, tfds:NAME[/CONFIG][:VERSION]@SPLIT, demo[@SPLIT] or SPEC+SPEC"


class SpecError(UserError):
    """A data SPEC that cannot be parsed or opened; one line naming the SPEC and what exists."""


class ClipFormatError(SpecError):
    """A SPEC whose clips are not at the model's sample rate and clip length."""


@dataclasses.dataclass(frozen=True)
class Part:
    """One parsed SPEC term."""

    kind: str  # "prepared", "hdf5", "folder", "tfds" or "demo"
    text: str
    path: str = ""
    selector: str = ""  # prepared: the split; folder: the CSV; tfds/demo: the split
    tfds_name: str = ""  # tfds: "name[/config][:version]"


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """What opening a SPEC may need beyond the SPEC itself."""

    labels_csv: str = ""  # class names (and count): folder + CSV and tfds SPECs need it
    tfds_data_dir: str = ""  # "" is TFDS's default folder
    demo_clips: dict = dataclasses.field(default_factory=lambda: {"train": 4096, "validation": 512, "eval": 512})
    demo_sample_rate: int = 16_000
    demo_clip_seconds: float = 1.0
    seed: int = 0


@dataclasses.dataclass
class OpenedSpec:
    """An opened SPEC: the clip source, the class names it knows (or None) and its clips' format."""

    spec: str
    source: object
    class_names: tuple[str, ...] | None
    sample_rate: int
    clip_samples: int


def _error(spec: str, message: str) -> SpecError:
    return SpecError(f"data SPEC {spec!r}: {message}")


def parse(spec: str) -> list[Part]:
    """The terms of ``spec`` (several for a union); raises SpecError for malformed SPECs, reading nothing."""
    if not isinstance(spec, str) or not spec.strip():
        raise _error(str(spec), f"empty; expected {GRAMMAR}")
    parts = []
    for text in spec.split("+"):
        text = text.strip()
        if not text:
            raise _error(spec, f"empty term in a union; expected {GRAMMAR}")
        if text.startswith("holdout:"):
            raise _error(spec, "holdout:N is only valid as data.validation (a carve-out of data.train)")
        if text == "demo" or text.startswith("demo@"):
            split = text.partition("@")[2] or "train"
            if split not in demo.SPLITS:
                raise _error(spec, f"demo has splits {list(demo.SPLITS)}; got {split!r}")
            parts.append(Part("demo", text, selector=split))
        elif text.startswith("tfds:"):
            match = _TFDS.match(text)
            if not match:
                raise _error(spec, f"{text!r} is not tfds:NAME[/CONFIG][:VERSION]@SPLIT")
            name = match["name"] + (f"/{match['config']}" if match["config"] else "") + (
                f":{match['version']}" if match["version"] else "")
            parts.append(Part("tfds", text, selector=match["split"], tfds_name=name))
        elif "@" in text:
            path, selector = text.rsplit("@", 1)
            if not path or not selector:
                raise _error(spec, f"{text!r}: expected {GRAMMAR}")
            kind = "folder" if selector.lower().endswith(".csv") else "prepared"
            parts.append(Part(kind, text, path=path, selector=selector))
        elif text.lower().endswith((".h5", ".hdf5")):
            parts.append(Part("hdf5", text, path=text))
        else:
            raise _error(spec, f"{text!r} is none of {GRAMMAR}")
    return parts


def parse_holdout(text: str) -> tuple[int | None, float | None] | None:
    """``holdout:N`` → (N, None), ``holdout:P%`` → (None, P/100), anything else → None."""
    match = _HOLDOUT.match(text.strip()) if isinstance(text, str) else None
    if not match:
        if isinstance(text, str) and text.strip().startswith("holdout:"):
            raise _error(text, "expected holdout:N (a clip count) or holdout:P% (a percentage)")
        return None
    if match["percent"]:
        fraction = float(match["amount"]) / 100.0
        if not 0.0 < fraction < 1.0:
            raise _error(text, "the holdout percentage must be in (0, 100)")
        return None, fraction
    if "." in match["amount"] or int(match["amount"]) < 1:
        raise _error(text, "a holdout count must be a whole number >= 1")
    return int(match["amount"]), None


def _listing(folder: pathlib.Path, limit: int = 12) -> str:
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    except OSError:
        return f"{folder} cannot be listed"
    if not names:
        return f"{folder} is empty"
    more = f", … ({len(names)} in all)" if len(names) > limit else ""
    return f"{folder} holds {', '.join(names[:limit])}{more}"


def _class_names(labels_csv: str | os.PathLike | None) -> tuple[str, ...] | None:
    return None if not labels_csv else labels_lib.read_class_labels(labels_csv).display_names


def _open_prepared(spec: str, part: Part, options: DataOptions) -> OpenedSpec:
    folder = pathlib.Path(part.path)
    if not folder.is_dir():
        raise _error(spec, f"no folder {folder} ({_listing(folder.parent) if folder.parent.is_dir() else 'its parent does not exist either'})")
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise _error(spec, f"{folder} has no manifest.json, so it is not a `prepare` output ({_listing(folder)})")
    manifest = json.loads(manifest_path.read_text())
    if part.selector not in manifest.get("splits", {}):
        raise _error(spec, f"no split {part.selector!r} in {folder}; splits found: {sorted(manifest.get('splits', {}))}")
    source = sources.open_prepared(folder, part.selector)
    copied = folder / LABELS_COPY
    names = _class_names(options.labels_csv or (copied if copied.is_file() else None))
    return OpenedSpec(part.text, source, names, audio.SAMPLE_RATE, audio.CLIP_SAMPLES)


def _open_hdf5(spec: str, part: Part, options: DataOptions) -> OpenedSpec:
    path = pathlib.Path(part.path)
    if not path.is_file():
        parent = path.parent if str(path.parent) else pathlib.Path(".")
        raise _error(spec, f"no file {path} ({_listing(parent) if parent.is_dir() else f'no folder {parent}'})")
    try:
        with h5py.File(path, "r") as f:
            keys = sorted(f.keys())
    except OSError as error:
        raise _error(spec, f"{path} is not an HDF5 file ({error})") from None
    if "hdf5_path" in keys:
        source = sources.PackedHdf5Source.from_index(path)
    elif {"audio_name", "waveform", "target"} <= set(keys):
        source = sources.PackedHdf5Source.from_files([path])
    else:
        raise _error(spec, f"{path} is neither a packed file (audio_name, waveform, target) nor a PANN index "
                           f"(audio_name, target, hdf5_path, index_in_hdf5); it holds {keys}")
    return OpenedSpec(part.text, source, _class_names(options.labels_csv), audio.SAMPLE_RATE, audio.CLIP_SAMPLES)


def _open_folder(spec: str, part: Part, options: DataOptions) -> OpenedSpec:
    folder = pathlib.Path(part.path)
    if not folder.is_dir():
        raise _error(spec, f"no audio folder {folder}")
    csv_path = pathlib.Path(part.selector)
    if not csv_path.is_file() and (folder / csv_path).is_file():
        csv_path = folder / csv_path
    if not csv_path.is_file():
        raise _error(spec, f"no clip list {part.selector} (looked in the working folder and in {folder})")
    if not options.labels_csv:
        raise _error(spec, "a folder + clip list needs the class list: data.labels_csv / --labels class_labels_indices.csv")
    class_labels = labels_lib.read_class_labels(options.labels_csv)
    source = sources.FolderSource(folder, csv_path, class_labels)
    missing = source.missing_ids
    if len(source) and len(missing) == len(source):
        raise _error(spec, f"none of the {len(source)} clips listed in {csv_path} has a file in {folder} (first "
                           f"missing: {', '.join(missing[:3])}; {_listing(folder, 4)})")
    return OpenedSpec(part.text, source, class_labels.display_names, audio.SAMPLE_RATE, audio.CLIP_SAMPLES)


def _open_tfds(spec: str, part: Part, options: DataOptions) -> OpenedSpec:
    import tensorflow_datasets as tfds

    from convnext_audio_jax.data import tfds_builder  # noqa: F401  registers the project's `audioset` builder

    data_dir = options.tfds_data_dir or None
    try:
        builder = tfds.builder(part.tfds_name, data_dir=data_dir)
        prepared = builder.is_prepared()
    except Exception as error:  # tfds raises its own DatasetNotFoundError / registration errors
        raise _error(spec, f"TFDS cannot find {part.tfds_name!r}: {str(error).splitlines()[0]}") from None
    if not prepared:
        root = pathlib.Path(data_dir) if data_dir else pathlib.Path(builder.data_dir).parents[2]  # NAME/CONFIG/VERSION
        raise _error(spec, f"{part.tfds_name!r} is not built in {root} ({_listing(root) if root.is_dir() else 'no such folder'}); "
                           "build it with python -m convnext_audio_jax.data.tfds_builder")
    splits = sorted(builder.info.splits.keys())
    if part.selector not in splits:
        raise _error(spec, f"no split {part.selector!r} in {builder.data_dir}; splits found: {splits}")
    if not options.labels_csv:
        raise _error(spec, "a tfds SPEC needs the class list for the class count: data.labels_csv / --labels")
    names = _class_names(options.labels_csv)
    source = sources.TfdsSource(builder, part.selector, num_classes=len(names))
    return OpenedSpec(part.text, source, names, audio.SAMPLE_RATE, audio.CLIP_SAMPLES)


def _open_demo(spec: str, part: Part, options: DataOptions) -> OpenedSpec:
    clips = int(options.demo_clips.get(part.selector, 0))
    source = demo.SyntheticAudioSet(part.selector, clips, sample_rate=options.demo_sample_rate,
                                    clip_seconds=options.demo_clip_seconds, seed=options.seed)
    return OpenedSpec(part.text, source, demo.CLASS_NAMES, source.sample_rate, source.clip_samples)


_OPENERS = {"prepared": _open_prepared, "hdf5": _open_hdf5, "folder": _open_folder, "tfds": _open_tfds,
            "demo": _open_demo}


def open_spec(spec: str, options: DataOptions | None = None) -> OpenedSpec:
    """Opens ``spec`` (a union becomes one :class:`ConcatSource`); raises SpecError, one line."""
    options = options or DataOptions()
    opened = []
    for part in parse(spec):
        try:
            opened.append(_OPENERS[part.kind](spec, part, options))
        except SpecError:
            raise
        except (OSError, KeyError, ValueError) as error:  # the sources' messages name the file
            message = str(error.args[0] if error.args else error).replace("\n", " ")
            raise _error(spec, message) from None
    if len(opened) == 1:
        return opened[0]
    first = opened[0]
    for other in opened[1:]:
        if other.source.num_classes != first.source.num_classes:
            raise _error(spec, f"{first.spec} has {first.source.num_classes} classes, {other.spec} {other.source.num_classes}")
        if (other.sample_rate, other.clip_samples) != (first.sample_rate, first.clip_samples):
            raise _error(spec, f"{first.spec} and {other.spec} hold clips of different rates or lengths")
        if first.class_names and other.class_names and tuple(first.class_names) != tuple(other.class_names):
            raise _error(spec, f"{first.spec} and {other.spec} name their classes differently")
    _check_unique_ids(spec, opened)
    names = next((o.class_names for o in opened if o.class_names), None)
    source = ConcatSource([o.source for o in opened], [o.spec for o in opened])
    return OpenedSpec(spec, source, names, first.sample_rate, first.clip_samples)


def _check_unique_ids(spec: str, opened: Sequence[OpenedSpec]) -> None:
    owner: dict[str, int] = {}
    for k, part in enumerate(opened):
        for i in range(len(part.source)):
            clip_id = part.source.clip_id(i)
            if owner.setdefault(clip_id, k) != k:
                raise _error(spec, f"clip id {clip_id!r} is in both {opened[owner[clip_id]].spec} and {part.spec}; "
                                   "a union needs unique clip ids")


def open_for_model(spec: str, options: DataOptions | None = None, frontend=None, where: str = "data SPEC") -> OpenedSpec:
    """:func:`open_spec` for a model whose ``frontend`` (``sample_rate``, ``clip_samples``, ``clip_seconds``) it
    feeds: the demo set is made at the model's rate and clip length, any other SPEC must hold clips of exactly
    those, or SpecError names both (``where`` names the SPEC's origin: ``data SPEC``, ``data.train``, ...). Without
    a ``frontend``, :func:`open_spec` as it is."""
    options = options or DataOptions()
    if frontend is None:
        return open_spec(spec, options)
    options = dataclasses.replace(options, demo_sample_rate=frontend.sample_rate,
                                  demo_clip_seconds=frontend.clip_seconds)
    opened = open_spec(spec, options)
    if (opened.sample_rate, opened.clip_samples) != (frontend.sample_rate, frontend.clip_samples):
        raise ClipFormatError(f"{where} {spec!r} holds clips of {opened.clip_samples} samples at {opened.sample_rate} "
                              f"Hz; the model takes clips of {frontend.clip_samples} samples at {frontend.sample_rate} Hz")
    return opened


def open_data_spec(spec: str, labels_csv: str | os.PathLike | None = None, options: DataOptions | None = None,
                   frontend=None) -> tuple[object, tuple[str, ...] | None]:
    """The source named by ``spec`` and the class names it knows, if any, for a command's ``--data SPEC
    [--labels CSV]``: :func:`open_for_model` with ``labels_csv`` as the class list."""
    options = options or DataOptions()
    if labels_csv:
        options = dataclasses.replace(options, labels_csv=os.fspath(labels_csv))
    opened = open_for_model(spec, options, frontend)
    return opened.source, opened.class_names


def clip_id_hashes(source) -> np.ndarray:
    """A uint64 per clip from its id alone (blake2b), the same on every host, run and resume."""
    return np.array([int.from_bytes(hashlib.blake2b(source.clip_id(i).encode("utf-8"), digest_size=8).digest(), "big")
                     for i in range(len(source))], dtype=np.uint64)


def split_holdout(source, holdout: str) -> tuple[SubsetSource, SubsetSource]:
    """(training clips, held-out validation clips) of ``source`` for ``holdout:N`` / ``holdout:P%``.

    A clip is held out by its id's hash: with P% every clip whose hash falls in the lowest P% of the hash
    range; with N the N clips of lowest hash (ties broken by position). Adding or removing other clips never
    moves a clip between the two sides (for P%), and no host, run or resume sees another split."""
    amount = parse_holdout(holdout)
    if amount is None:
        raise _error(holdout, "expected holdout:N or holdout:P%")
    count, fraction = amount
    hashes = clip_id_hashes(source)
    if fraction is not None:
        held = hashes < np.uint64(min(int(fraction * 2.0**64), 2**64 - 1))
    else:
        if count >= len(source):
            raise _error(holdout, f"holds out {count} clips but the training data has only {len(source)}")
        held = np.zeros(len(source), dtype=bool)
        held[np.argsort(hashes, kind="stable")[:count]] = True
    if not held.any() or held.all():
        raise _error(holdout, f"leaves {int(held.sum())} of {len(source)} clips for validation; choose another amount")
    return SubsetSource(source, np.flatnonzero(~held)), SubsetSource(source, np.flatnonzero(held))
