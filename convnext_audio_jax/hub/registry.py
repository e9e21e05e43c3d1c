"""The registry of released checkpoints: what each name is (model, sources with their checksums, class list) and
where it is published. Cheap to import (no JAX, no converter), for what needs only the names (``train.py --check``).
Entries come from the built-in list, ``register`` and the JSON file named by ``$CONVNEXT_AUDIO_REGISTRY``;
``pretrained`` fetches and converts them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import urllib.parse
from typing import Any

from convnext_audio_jax.runtime.errors import UserError

REGISTRY_ENV = "CONVNEXT_AUDIO_REGISTRY"


class PretrainedError(UserError):
    """A pretrained name that cannot be fetched or converted; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Source:
    """One published copy of a checkpoint. ``url`` for an HTTP(S) download, or ``hf_repo`` (+
    ``hf_revision``) for a Hugging Face file fetched with ``huggingface_hub``. ``md5``/``sha256``/
    ``size`` are None where none is published; whatever is given is verified."""

    file: str
    url: str | None = None
    md5: str | None = None
    sha256: str | None = None
    size: int | None = None
    page: str = ""
    listed_size: str = ""  # as the source page shows it (display only)
    hf_repo: str | None = None
    hf_revision: str | None = None

    @property
    def where(self) -> str:
        return f"{self.hf_repo}/{self.file}" if self.hf_repo else self.file


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A released checkpoint: ``sources`` are copies of the same weights (a safetensors copy is
    preferred), converted to registered model ``model``; ``labels`` is a class_labels_indices.csv
    whose names go into the metadata."""

    name: str
    model: str
    description: str
    published: str
    sources: tuple[Source, ...]
    labels: Source | None = None


_AUDIOSET_LABELS = Source(
    "class_labels_indices.csv",
    url="http://storage.googleapis.com/us_audioset/youtube_corpus/v1/csv/class_labels_indices.csv",
    page="https://research.google.com/audioset/download.html",
)


def _zenodo(record: str, file: str, md5: str | None, path: str = "record") -> Source:
    """A Zenodo file, under the URL form its publishers give (``record/`` or the newer ``records/``)."""
    quoted = urllib.parse.quote(file)
    return Source(file, url=f"https://zenodo.org/{path}/{record}/files/{quoted}?download=1", md5=md5,
                  page=f"https://zenodo.org/records/{record}")


REGISTRY: dict[str, Pretrained] = {
    entry.name: entry
    for entry in [
        Pretrained(
            "convnext_tiny_471mAP", "convnext_tiny", "audio ConvNeXt-Tiny, AudioSet (balanced + unbalanced)",
            "mAP .471",
            (
                Source("model.safetensors", hf_repo="topel/ConvNeXt-Tiny-AT",
                       hf_revision="e3eaf4c49769f034942da9062d0fee436657560b",
                       sha256="386986f8205c8cc1f244b5e14966262d85518e5481d3b8a03bb60df2062036c2",
                       page="https://huggingface.co/topel/ConvNeXt-Tiny-AT", listed_size="118 MB"),
                _zenodo("8020843", "convnext_tiny_471mAP.pth", "e069ecd1c7b880268331119521c549f2"),
            ),
            _AUDIOSET_LABELS,
        ),
        Pretrained(
            "convnext_tiny_465mAP_BL_AC_70kit", "convnext_tiny",
            "audio ConvNeXt-Tiny, AudioSet without the AudioCaps clips, 70k iterations", "mAP .465",
            (_zenodo("8020843", "convnext_tiny_465mAP_BL_AC_70kit.pth", "0688ae503f5893be0b6b71cb92f8b428"),),
            _AUDIOSET_LABELS,
        ),
        Pretrained(
            "convnext_tiny_465mAP_BL_AC_75kit", "convnext_tiny",
            "audio ConvNeXt-Tiny, AudioSet without the AudioCaps clips, 75k iterations", "mAP .465",
            (_zenodo("10987498", "convnext_tiny_465mAP_BL_AC_75kit.pth", "f6f57c87b7eb664a23ae8cad26eccaa0", "records"),),
            _AUDIOSET_LABELS,
        ),
        Pretrained(
            "cnn14_mAP431", "cnn14", "PANN CNN14 (Kong et al.), AudioSet", "mAP .431",
            (_zenodo("3987831", "Cnn14_mAP=0.431.pth", "541141fa2ee191a88f24a3219fff024e"),),
            _AUDIOSET_LABELS,
        ),
        Pretrained(
            "cnn6_mAP343", "cnn6", "PANN CNN6 (Kong et al.), AudioSet", "mAP .343",
            (_zenodo("3987831", "Cnn6_mAP=0.343.pth", "e25e26b84585b14c7754c91e48efc9be"),),
            _AUDIOSET_LABELS,
        ),
        Pretrained(
            "convnext_tiny_in1k", "convnext_tiny",
            "ImageNet init of the audio ConvNeXt-Tiny (facebookresearch ConvNeXt-T; stem conv, bn0, head fresh, seed 0)",
            "ImageNet-1k top-1 82.1 %",
            (Source("convnext_tiny_1k_224_ema.pth", url="https://dl.fbaipublicfiles.com/convnext/convnext_tiny_1k_224_ema.pth",
                    page="https://github.com/facebookresearch/ConvNeXt"),),
        ),
    ]
}


def register(entry: Pretrained, replace: bool = False) -> None:
    """Adds ``entry`` to the registry (``replace=True`` overrides a name, e.g. to point it at a
    local server or a private copy). The same can be done without code by listing entries in the
    JSON file named by ``$CONVNEXT_AUDIO_REGISTRY``: ``{"NAME": {"model": …, "sources": [{"file": …,
    "url": …, "md5": …}], …}}`` (fields of ``Pretrained``/``Source``)."""
    if entry.name in REGISTRY and not replace:
        raise PretrainedError(f"pretrained name {entry.name!r} is registered already (replace=True overrides it)")
    REGISTRY[entry.name] = entry


def _entry_from_json(name: str, spec: dict[str, Any], origin: str) -> Pretrained:
    try:
        sources = tuple(Source(**s) for s in spec["sources"])
        labels = Source(**spec["labels"]) if spec.get("labels") else None
        return Pretrained(name, spec["model"], spec.get("description", ""), spec.get("published", ""), sources, labels)
    except (KeyError, TypeError) as error:
        raise PretrainedError(f"{origin}: entry {name!r}: expected model and sources [{{file, url, md5|sha256}}] ({error})") from None


def registry() -> dict[str, Pretrained]:
    """The registered names: the built-in entries, ``register``'s and ``$CONVNEXT_AUDIO_REGISTRY``'s."""
    entries = dict(REGISTRY)
    path = os.environ.get(REGISTRY_ENV)
    if path:
        try:
            document = json.loads(pathlib.Path(path).read_text())
        except (OSError, ValueError) as error:
            raise PretrainedError(f"{REGISTRY_ENV}={path}: cannot read it as JSON ({error})") from None
        entries.update({name: _entry_from_json(name, spec, path) for name, spec in document.items()})
    return entries
