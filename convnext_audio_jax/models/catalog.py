"""The models table of ``convnext-audio models``: each registered model's parameter count, input and XLA's FLOPs
for one clip. Counting them means tracing every model (and building a mel filter bank with librosa), seconds of
work whose result changes only with the model code, JAX or Flax; so the rows are kept in the cache folder
(``runtime.files.cache_root``: ``models-table/KEY.json``), KEY a hash of this package's and the native
package's sources and of those versions, and computed again only when one of them changes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import jax

from convnext_audio_jax import models, native
from convnext_audio_jax.runtime import files

TABLE_FOLDER = "models-table"
_SOURCES = (pathlib.Path(__file__).parent, pathlib.Path(native.__file__).parent)


def code_key() -> str:
    """The hash that names the rows' cache file: the model and kernel sources, JAX, jaxlib and Flax versions."""
    digest = hashlib.sha256()
    for folder in _SOURCES:
        for path in sorted(folder.glob("*.py")):
            digest.update(f"{folder.name}/{path.name}\0".encode() + path.read_bytes())
    for package in ("jax", "jaxlib", "flax"):
        digest.update(f"{package}=={importlib.metadata.version(package)}\0".encode())
    return digest.hexdigest()[:24]


def describe(name: str, flops: bool) -> dict[str, Any]:
    """One row, computed: ``params``, ``input`` and (with ``flops``) ``gflops``, XLA's cost analysis of one clip
    (a multiply-add counts 2); traced with XLA's own ops, whose FLOPs the native kernels' custom calls would hide
    (the same parameters)."""
    spec = models.get_spec(name)
    counted = models.with_xla_ops(models.create_model(name))
    variables = jax.eval_shape(lambda: models.init_variables(counted, jax.random.key(0)))
    x = models.example_input(counted, batch=1)
    if spec.takes_waveform:
        frontend = counted.frontend
        input_desc = f"{frontend.sample_rate / 1000:g} kHz, {frontend.n_mels} mels, {frontend.num_frames(x.shape[1])} frames"
    else:
        input_desc = "224×224 RGB"
    row: dict[str, Any] = {"params": models.count_params(variables["params"]), "input": input_desc, "gflops": None}
    if flops:
        lowered = jax.jit(lambda v, w: counted.apply(v, w)["logits"]).lower(variables, x)
        count = (lowered.cost_analysis() or {}).get("flops")
        row["gflops"] = None if count is None else count / 1e9
    return row


def table(names: Sequence[str], flops: bool) -> list[dict[str, Any]]:
    """The rows of ``names`` (``describe``'s), from the cache where it holds them (with FLOPs, if asked for),
    else computed and added to it. A cache that cannot be read or written is only not used."""
    path = files.cache_root() / TABLE_FOLDER / f"{code_key()}.json"
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cached = {}
    rows, changed = [], False
    for name in names:
        row = cached.get(name)
        if not isinstance(row, dict) or (flops and row.get("gflops") is None):
            row = describe(name, flops)
            if row["gflops"] is None and isinstance(cached.get(name), dict):
                row["gflops"] = cached[name].get("gflops")  # counted before: kept
            cached[name], changed = row, True
        rows.append(row)
    if changed:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            files.write_text(path, json.dumps(cached, indent=1) + "\n")
        except OSError:
            pass  # a read-only cache folder: the table is printed all the same, computed again next time
    return rows
