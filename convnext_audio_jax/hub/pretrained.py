"""Released checkpoints by name: download, checksum, one-time conversion, cache (the names: ``hub.registry``).

``load("convnext_tiny_471mAP")`` returns (model, variables, metadata) like
``checkpoint.load_model``; ``resolve(name)`` returns the cached model directory (downloading and
converting on first use) or None for a string that is not a registered name. See docs/pretrained.md.

Cache (the one cache folder, ``runtime.files.cache_root``: ``$CONVNEXT_AUDIO_CACHE``, default
``$XDG_CACHE_HOME/convnext-audio-jax`` or ``~/.cache/convnext-audio-jax``)::

    downloads/FILE        verified downloads (FILE.part while a download runs or after it broke)
    models/NAME/          the converted model directory (checkpoint.save_model format)
    locks/NAME.lock       the file lock (runtime.files): one process downloads and converts, the others wait

Downloaded weights are untrusted: ``.pth`` files are read only with ``torch.load(weights_only=True)``
(by the converter), safetensors without pickle at all, and every file is checked against its
published md5/sha256 before it is used. Environment: ``CONVNEXT_AUDIO_OFFLINE=1`` (no network: fail
fast naming the missing file), ``CONVNEXT_AUDIO_MIRROR=URL`` (fetch every file as URL/FILE, same
checksums), ``CONVNEXT_AUDIO_REGISTRY=entries.json`` (extra or replaced entries, see ``register``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import pathlib
import sys
import urllib.parse
from collections.abc import Iterator
from typing import Any

from convnext_audio_jax.artifacts import model_dir as checkpoint

# The converter's Python API: the one import of it in this module.
from convnext_audio_jax.convert import (
    ConversionError,
    convert_state_dict,
    load_torch_state_dict,
    read_labels,
)
from convnext_audio_jax.data.labels import LabelFileError
from convnext_audio_jax.hub import download
from convnext_audio_jax.hub.registry import (  # noqa: F401  (public here too: pretrained.Source, .register, ...)
    REGISTRY,
    REGISTRY_ENV,
    Pretrained,
    PretrainedError,
    Source,
    register,
    registry,
)
from convnext_audio_jax.models import create_model
from convnext_audio_jax.runtime import files
from convnext_audio_jax.runtime.files import CACHE_ENV

OFFLINE_ENV = "CONVNEXT_AUDIO_OFFLINE"
MIRROR_ENV = "CONVNEXT_AUDIO_MIRROR"
HUB_ENDPOINT = "https://huggingface.co"


# The cache folder under its documented name here: the one folder of every layer (runtime.files.cache_root).
cache_dir = files.cache_root


def is_offline(offline: bool | None = None) -> bool:
    if offline is not None:
        return offline
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


# ------------------------------------------------------------------------------------------ files


def _mismatch(source: Source, path: pathlib.Path) -> str | None:
    return download.mismatch(path, size=source.size, md5=source.md5, sha256=source.sha256)


def _download_url(source: Source) -> str:
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        return mirror.rstrip("/") + "/" + urllib.parse.quote(source.file)
    if source.url is None:
        raise PretrainedError(f"{source.where} has no download URL")
    return source.url


def _offline_error(entry: Pretrained, missing: list[Source]) -> PretrainedError:
    listed, cache = ", ".join(s.where for s in missing), files.cache_root()
    return PretrainedError(
        f"offline ({OFFLINE_ENV}=1 or --offline) and pretrained {entry.name!r} is not in the cache {cache}: "
        f"missing {listed}; fetch it where there is network with `convnext-audio download {entry.name}` "
        f"(same {CACHE_ENV}) or copy the file into {cache / 'downloads'}"
    )


def _fetch_url_file(entry: Pretrained, source: Source, offline: bool) -> pathlib.Path:
    """The verified file of ``source`` in the cache, downloaded when absent."""
    downloads = files.cache_root() / "downloads"
    target = downloads / source.file
    if target.is_file():
        problem = _mismatch(source, target)
        if problem is None:
            return target
        # Not deleted: it may be a copy the user put there (the offline instructions suggest it).
        raise PretrainedError(f"{target}: {problem} ({source.page}); not used: delete it or put the published file there")
    if offline:
        raise _offline_error(entry, [source])
    downloads.mkdir(parents=True, exist_ok=True)
    part = downloads / (source.file + ".part")
    url = _download_url(source)
    try:
        download.stream(url, part, source.file)
    except download.DownloadError as error:
        raise PretrainedError(str(error)) from None
    problem = _mismatch(source, part)
    if problem is not None:
        part.unlink()
        raise PretrainedError(f"{source.file} from {url}: {problem} ({source.page}); the download was deleted")
    if source.md5 is None and source.sha256 is None:
        print(f"{source.file}: no checksum is published; its sha256 is recorded in the model's metadata", file=sys.stderr)
    files.publish(part, target)  # appears only complete and verified
    return target


def _hub_available() -> bool:
    return importlib.util.find_spec("huggingface_hub") is not None


def _hub_endpoint() -> str:
    """The server ``huggingface_hub`` downloads from (its ``HF_ENDPOINT`` setting)."""
    try:
        from huggingface_hub import constants
    except ImportError:  # a client without the constants module: its default server
        return HUB_ENDPOINT
    return getattr(constants, "ENDPOINT", HUB_ENDPOINT)


def _fetch_hub_file(source: Source, offline: bool) -> pathlib.Path:
    from huggingface_hub import hf_hub_download

    if not offline:
        # The hub client retries a connection failure for ~25 s (logging each try); one probe decides at once.
        endpoint = _hub_endpoint()
        problem = download.unreachable(endpoint)
        if problem is not None:
            raise PretrainedError(f"{source.where} via huggingface_hub: {endpoint} cannot be reached ({problem})")
    try:
        path = pathlib.Path(hf_hub_download(source.hf_repo, source.file, revision=source.hf_revision,
                                            local_files_only=offline))
    except Exception as error:  # huggingface_hub raises many kinds (offline, HTTP, missing)
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise PretrainedError(f"{source.where} via huggingface_hub: {reason}") from None
    problem = _mismatch(source, path)
    if problem is not None:
        raise PretrainedError(f"{source.where} (huggingface_hub cache {path}): {problem}; not used")
    return path


def _usable_sources(entry: Pretrained) -> list[Source]:
    """Sources this installation can fetch and read, safetensors first."""
    usable = [s for s in entry.sources if not (s.hf_repo and (os.environ.get(MIRROR_ENV) or not _hub_available()))]
    readable = [s for s in usable if not s.file.endswith((".pth", ".pt")) or importlib.util.find_spec("torch")]
    if not readable:
        need = "torch: pip install 'convnext-audio-jax[torch]'" if usable else "huggingface_hub: pip install 'convnext-audio-jax[hub]'"
        raise PretrainedError(f"pretrained {entry.name!r} ({', '.join(s.where for s in entry.sources)}) needs {need}")
    return sorted(readable, key=lambda s: not s.file.endswith(".safetensors"))


def _fetch_weights(entry: Pretrained, offline: bool) -> tuple[Source, pathlib.Path]:
    """The preferred source this installation can use and its verified file: a copy already in the
    cache first (no network), then the sources in order of preference."""
    sources = _usable_sources(entry)
    local = [s for s in sources if s.hf_repo is None and (files.cache_root() / "downloads" / s.file).is_file()]
    if local:
        return local[0], _fetch_url_file(entry, local[0], offline)
    if offline:
        for source in (s for s in sources if s.hf_repo):
            with contextlib.suppress(PretrainedError):
                return source, _fetch_hub_file(source, offline=True)
        raise _offline_error(entry, sources)
    failures = []
    for source in sources:
        try:
            return source, (_fetch_hub_file(source, False) if source.hf_repo else _fetch_url_file(entry, source, False))
        except PretrainedError as error:
            failures.append(str(error))
    downloads = files.cache_root() / "downloads"
    raise PretrainedError(f"{'; '.join(failures)}. Without a network: copy {' or '.join(s.file for s in sources)} "
                          f"into {downloads} (it is verified, then converted), or set {MIRROR_ENV} to a folder URL "
                          f"that holds it; {OFFLINE_ENV}=1 or --offline stops trying the network")


# ------------------------------------------------------------------------------------ conversion


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """The file lock per name (runtime.files): concurrent first uses download and convert once."""
    locks = files.cache_root() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with files.locked(locks / f"{name}.lock", on_wait=lambda holder: print(
            f"{name}: another process is fetching it ({holder}); waiting", file=sys.stderr)):
        yield


def _converted(entry: Pretrained, model_dir: pathlib.Path) -> bool:
    """Whether ``model_dir`` holds a conversion of one of the entry's sources as now published."""
    try:
        record = checkpoint.read_metadata(model_dir).get("pretrained", {})
    except (checkpoint.CheckpointError, OSError, ValueError):
        return False
    if record.get("name") != entry.name or not (model_dir / "variables").is_dir():
        return False
    return any(s.file == record.get("file") and all(getattr(s, a) in (None, record.get(a)) for a in ("md5", "sha256"))
               for s in entry.sources)


def _convert(entry: Pretrained, source: Source, weights: pathlib.Path, labels: pathlib.Path | None,
             model_dir: pathlib.Path) -> None:
    try:
        state_dict = load_torch_state_dict(weights)
        result = convert_state_dict(state_dict, entry.model)
        class_names = read_labels(labels) if labels is not None else None
    except (ConversionError, LabelFileError) as error:
        raise PretrainedError(f"pretrained {entry.name!r}: {error}") from None
    digests = download.file_digests(weights)
    metadata: dict[str, Any] = {
        "source": {"file": weights.name, "sha256": digests["sha256"], "layout": result.layout},
        "conversion": result.notes,
        "pretrained": {"name": entry.name, "file": source.file, **digests, "url": source.url, "hf_repo": source.hf_repo,
                       "hf_revision": source.hf_revision, "page": source.page, "published": entry.published},
    }
    if class_names is not None:
        classes = create_model(result.model_name, **result.model_config).num_classes
        if len(class_names) != classes:
            raise PretrainedError(f"{labels.name} lists {len(class_names)} classes, {result.model_name} has {classes}")
        metadata["class_names"] = class_names
    checkpoint.save_model(model_dir, result.model_name, result.variables, metadata, result.model_config, overwrite=True)


def resolve(name_or_path: str | os.PathLike, *, offline: bool | None = None) -> pathlib.Path | None:
    """The cached model directory of a registered name, downloaded and converted on first use;
    None when ``name_or_path`` is not a registered name or is an existing path (paths win)."""
    name = os.fspath(name_or_path)
    entries = registry()
    if name not in entries or os.path.exists(name):
        return None
    entry = entries[name]
    model_dir = files.cache_root() / "models" / name
    if _converted(entry, model_dir):
        return model_dir
    offline = is_offline(offline)
    with _locked(name):
        if _converted(entry, model_dir):  # done by the process we waited for
            return model_dir
        source, weights = _fetch_weights(entry, offline)
        labels = _fetch_url_file(entry, entry.labels, offline) if entry.labels is not None else None
        _convert(entry, source, weights, labels, model_dir)
        print(f"{name}: converted {weights.name} → {model_dir}", file=sys.stderr)
    return model_dir


def load(name: str, *, offline: bool | None = None, **overrides: Any):
    """(model, variables, metadata) of a registered pretrained name (``overrides`` as in
    ``checkpoint.load_model``, e.g. ``dtype=jnp.bfloat16``)."""
    model_dir = resolve(name, offline=offline)
    if model_dir is None:
        raise _not_a_name(name)
    return checkpoint.load_model(model_dir, **overrides)


def _not_a_name(name: str) -> PretrainedError:
    if os.path.exists(name):
        return PretrainedError(f"{name!r} is an existing path, not taken for a pretrained name (checkpoint.load_model reads a directory)")
    return PretrainedError(f"{name!r} is not a registered pretrained name; registered: {', '.join(sorted(registry()))}")


# ------------------------------------------------------------------------------------------ CLI


def _size_text(entry: Pretrained) -> str:
    for source in entry.sources:
        cached = files.cache_root() / "downloads" / source.file
        if cached.is_file():
            return f"{cached.stat().st_size / 1e6:.0f} MB"
        if source.size is not None:
            return f"{source.size / 1e6:.0f} MB"
        if source.listed_size:
            return source.listed_size
    return "not published"


def print_table(out=None) -> None:
    out = out or sys.stdout
    models = files.cache_root() / "models"
    rows = [(e.name, e.model, e.published, _size_text(e), "yes" if _converted(e, models / e.name) else "no",
             " | ".join(s.page or s.url or s.where for s in e.sources)) for e in registry().values()]
    headers = ("name", "model", "published", "size", "cached", "source")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    for row in [headers, tuple("-" * w for w in widths), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip(), file=out)
    print(f"\ncache: {files.cache_root()} ({CACHE_ENV})", file=out)


def add_download_arguments(parser) -> None:
    parser.add_argument("names", nargs="+", help="registered pretrained names (convnext-audio models --pretrained)")
    # SUPPRESS: `convnext-audio --offline download …` (the global flag) is not reset by this one's default
    parser.add_argument("--offline", action="store_true", default=argparse.SUPPRESS,
                        help="no network: convert from files already in the cache (as CONVNEXT_AUDIO_OFFLINE=1)")


def run_download(args) -> int:
    for name in args.names:
        model_dir = resolve(name, offline=getattr(args, "offline", False) or None)
        if model_dir is None:
            raise _not_a_name(name)
        print(model_dir)
    return 0
