"""Text search over a user's recordings with a trained retrieval model: ``convnext-audio index`` and ``search``.

``index DIR… --model M --output index.h5`` streams every audio file's windows through M's frozen encoder and its
projection, a file at a time into ``index.h5.parts/`` (the ``embed`` command's parts: ``--resume`` keeps the files
an interrupted run finished), then writes ``index.h5``: ``embeddings`` (windows, D) unit vectors in the text
space, ``file_index`` and ``window_start_s`` per window, ``files``; attributes ``model`` (the retrieval model's
folder), ``text_model``, ``window_seconds``. ``search "QUERY" --index index.h5`` embeds the query with the same
text model and ranks files by their best window's cosine similarity: rank, score, file, and for files of more
than one window the best window's start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import h5py
import numpy as np
import tqdm

from convnext_audio_jax.data import audio as audio_lib
from convnext_audio_jax.downstream import features as features_lib
from convnext_audio_jax.downstream import text as text_lib
from convnext_audio_jax.downstream.retrieval import RetrievalModel
from convnext_audio_jax.inference import windowing
from convnext_audio_jax.inference.commands import _embed_file
from convnext_audio_jax.inference.embed_output import EmbeddingStore
from convnext_audio_jax.inference.tagging import expand_inputs
from convnext_audio_jax.runtime.errors import UserError
from convnext_audio_jax.runtime.files import publish

KIND = "retrieval"


class ProjectedForward:
    """A batch of windows → {"retrieval": (B, D) unit vectors}: the encoder's features, then the projection."""

    def __init__(self, model: RetrievalModel, batch_size: int, offline: bool | None = None):
        self.model = model
        self.encoder = features_lib.AudioEncoder(model.config["encoder"], model.config["hop_seconds"], batch_size,
                                                 offline=offline)
        self.batch_size = self.encoder.batch_size

    def __call__(self, windows: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.encoder.forward(windows)[self.model.config["audio_features"]]
        return {KIND: self.model.embed_audio(outputs).astype(np.float32)}


def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="FILE_OR_DIR", help="audio files and folders (searched recursively)")
    parser.add_argument("--model", required=True, help="a trained retrieval model: its workdir (model/best, else "
                                                       "model/last) or model folder")
    parser.add_argument("--output", required=True, help="the index, an .h5 file (built at the end from OUTPUT.parts/)")
    parser.add_argument("--resume", action="store_true", help="keep the files finished in OUTPUT.parts/ by an "
                                                               "interrupted run and index only the others")
    parser.add_argument("--hop", type=float, default=None,
                        help="seconds between windows of longer files (default: the model's, from its config)")
    parser.add_argument("--max-windows", type=int, default=windowing.MAX_WINDOWS,
                        help="refuse a file with more windows than this (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _write_index(store: EmbeddingStore, files: list[str], model: RetrievalModel, window_seconds: float) -> int:
    """``store.output`` from the finished parts of ``files`` (a temporary file, then renamed); returns windows."""
    embedded = [path for path in files if path in store.done]
    parts = [np.load(os.path.join(store.parts, store.part_id(path) + ".npy")) for path in embedded]
    temporary = f"{store.output}.{os.getpid()}.tmp"
    with h5py.File(temporary, "w") as index:
        index.create_dataset("embeddings", data=np.concatenate(parts))
        index.create_dataset("file_index", data=np.concatenate([np.full(len(p), i, np.int32)
                                                                for i, p in enumerate(parts)]))
        index.create_dataset("window_start_s", data=np.concatenate([store.done[path]["window_start_s"]
                                                                    for path in embedded]).astype(np.float64))
        index.create_dataset("files", data=np.array(embedded, dtype=object), dtype=h5py.string_dtype())
        index.attrs.update({"model": str(model.directory.resolve()), "text_model": model.config["text_model"],
                            "window_seconds": window_seconds, "kind": KIND})
    publish(temporary, store.output)
    store.remove_parts()
    return sum(len(p) for p in parts)


def run_index(args: argparse.Namespace) -> int:
    """Writes the index (module doc). Exit code 1 when no file could be indexed."""
    from convnext_audio_jax.hub.resolve import offline_flag

    if args.max_windows < 1 or args.batch_size < 1:
        raise UserError(f"--max-windows and --batch-size must be ≥ 1, got {args.max_windows} and {args.batch_size}")
    model = RetrievalModel(args.model)
    store = EmbeddingStore(args.output, KIND, args.resume)
    forward = ProjectedForward(model, args.batch_size, offline=offline_flag(args))
    encoder = forward.encoder
    hop = encoder.hop if args.hop is None else windowing.hop_samples(args.hop, encoder.sample_rate)
    files, errors = expand_inputs(args.inputs)
    for error in errors:
        print(f"index: skipped {error.line()}", file=sys.stderr)
    todo = [path for path in files if path not in store.done]
    if len(todo) < len(files):
        print(f"index: {len(files) - len(todo)} files already in {store.parts}", file=sys.stderr)
    for path in tqdm.tqdm(todo, unit="file", desc="index", disable=args.no_progress, file=sys.stderr):
        try:
            _embed_file(path, store, forward, encoder.sample_rate, encoder.window, hop, args.max_windows, KIND,
                        forward.batch_size)
        except audio_lib.ClipError as error:
            print(f"index: skipped {path}: {error.reason} ({error.detail})", file=sys.stderr)
        except UserError as error:
            print(f"index: skipped {path}: {str(error).removeprefix(path + ': ')}", file=sys.stderr)
    if not any(path in store.done for path in files):
        store.remove_parts()
        print(f"index: no file could be indexed ({len(files)} files)", file=sys.stderr)
        return 1
    windows = _write_index(store, files, model, encoder.window / encoder.sample_rate)
    print(f"index: {sum(p in store.done for p in files)} files, {windows} windows → {args.output}")
    return 0


def load_index(path: str) -> dict:
    """The arrays and attributes of an index file; a file that is none is a one-line error."""
    if not os.path.isfile(path):
        raise UserError(f"--index {path}: no such file (make one with convnext-audio index)")
    try:
        with h5py.File(path, "r") as index:
            if index.attrs.get("kind") != KIND:
                raise UserError(f"--index {path}: not an index written by convnext-audio index")
            return {"embeddings": index["embeddings"][...], "file_index": index["file_index"][...],
                    "window_start_s": index["window_start_s"][...],
                    "files": [name.decode() if isinstance(name, bytes) else name for name in index["files"][...]],
                    **{key: index.attrs[key] for key in ("model", "text_model", "window_seconds")}}
    except OSError as error:
        raise UserError(f"--index {path}: not an HDF5 file ({error})") from None


def search(index: dict, query_embedding: np.ndarray, top_k: int) -> list[dict]:
    """The ``top_k`` files by their best window's score: ``file``, ``score``, ``start_s``, ``end_s``, ``windows``."""
    scores = index["embeddings"] @ query_embedding
    files = index["file_index"]
    best = np.full(len(index["files"]), -np.inf)
    np.maximum.at(best, files, scores)
    results = []
    for f in np.argsort(-best, kind="stable")[:top_k]:
        rows = np.flatnonzero(files == f)
        row = rows[np.argmax(scores[rows])]
        start = float(index["window_start_s"][row])
        results.append({"file": index["files"][f], "score": float(best[f]), "start_s": start,
                        "end_s": start + float(index["window_seconds"]), "windows": int(len(rows))})
    return results


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", help='what to look for, in words: "a dog barks near traffic"')
    parser.add_argument("--index", required=True, help="an index written by convnext-audio index")
    parser.add_argument("--top-k", type=int, default=10, help="files to list (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="one JSON line per result instead of a table")


def run_search(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise UserError(f"--top-k must be ≥ 1, got {args.top_k}")
    if not args.query.strip():
        raise UserError("the query is empty: say in words what to look for")
    index = load_index(args.index)
    query = text_lib.embed_texts([args.query], str(index["text_model"]))[0]
    for rank, result in enumerate(search(index, query, args.top_k), start=1):
        if args.json:
            print(json.dumps({"rank": rank, **result}))
        else:
            where = f"  best window {result['start_s']:.1f}-{result['end_s']:.1f} s" if result["windows"] > 1 else ""
            print(f"{rank:3d}  {result['score']:.3f}  {result['file']}{where}")
    return 0
