"""Text search over the indexes given at start (``serve --index INDEX.h5``): ``POST /v1/search`` answers what
``convnext-audio search "QUERY" --index INDEX.h5 --json`` prints, as one JSON object."""

from __future__ import annotations

import os
from collections.abc import Sequence

from convnext_audio_jax.downstream import search as search_lib
from convnext_audio_jax.downstream import text as text_lib
from convnext_audio_jax.runtime.errors import UserError


def load_indexes(paths: Sequence[str | os.PathLike]) -> dict[str, dict]:
    """Each index file by its name without ``.h5`` (the API's ``index`` parameter); two of one name is an error."""
    indexes: dict[str, dict] = {}
    for path in paths:
        name = os.path.basename(os.fspath(path)).removesuffix(".h5")
        if name in indexes:
            raise UserError(f"--index {path}: another index is named {name!r} already (rename one of the files)")
        indexes[name] = search_lib.load_index(os.fspath(path))
    return indexes


def answer(name: str, index: dict, query: str, top_k: int) -> dict:
    """The ``top_k`` files of ``index`` for ``query``: ``search --json``'s lines under ``results``."""
    embedding = text_lib.embed_texts([query], str(index["text_model"]))[0]
    results = search_lib.search(index, embedding, top_k)
    return {"query": query, "index": name, "results": [{"rank": rank, **result}
                                                       for rank, result in enumerate(results, start=1)]}
