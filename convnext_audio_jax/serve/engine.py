"""What the server runs for a request: the models given at start, windows of concurrent requests batched into
shared forwards, and one upload tagged or embedded by the same code as ``convnext-audio tag`` / ``embed``.

A request's file is read and windowed by `inference.tagging.Tagger` (the ``tag`` command's engine) whose scorer
is a `BatchingScorer`: each request thread hands its batch of windows to one forward thread, which joins the
windows of the requests waiting at that moment into one forward of the model's fixed batch size (a forward costs
the same for 1 window as for a full batch, so concurrent short clips share it). The record is the ``tag
--format jsonl`` writer's (`inference.tag_output.record_chunks`), parsed back.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from convnext_audio_jax.data import audio as audio_lib
from convnext_audio_jax.inference import commands, windowing
from convnext_audio_jax.inference.embed_output import EmbeddingStore
from convnext_audio_jax.inference.tag_output import FileSpool, record_chunks
from convnext_audio_jax.inference.tagging import (
    FileScored,
    FileStarted,
    TagError,
    Tagger,
    WindowScores,
)
from convnext_audio_jax.models.outputs import EMBEDDING_KINDS, output_selector
from convnext_audio_jax.runtime.errors import UserError
from convnext_audio_jax.runtime.forward import ShardedForward

TOO_LONG = "too many windows"  # the Tagger's reason for a file past its window limit (here: the duration limit)


class RequestError(Exception):
    """A request the server refuses: an HTTP status and a one-line message naming the problem."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, dict(headers or {})


class TimeLimit(RequestError):
    def __init__(self, seconds: float):
        super().__init__(504, f"the request took longer than the server's limit of {seconds:g} s")


class BatchingScorer:
    """A `inference.tagging.WindowScorer` shared by request threads: calls queue their windows, one thread runs
    the forward on the windows of as many queued calls as fit its batch. With ``batching`` it waits up to
    ``max_wait_s`` for calls of other requests in progress (never when every request in progress is already in
    the batch); without, each call is its own forward."""

    def __init__(self, forward, batching: bool = True, max_wait_s: float = 0.01):
        self.forward, self.batching, self.max_wait_s = forward, batching, max_wait_s
        self.batch_size = forward.batch_size
        self.forwards = 0  # forwards run (the benchmark reports windows per forward)
        self._queue: queue.Queue = queue.Queue()
        self._active = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._run, name="forward", daemon=True).start()

    def enter(self) -> None:
        with self._lock:
            self._active += 1

    def leave(self) -> None:
        with self._lock:
            self._active -= 1

    def __call__(self, windows: np.ndarray) -> dict[str, np.ndarray]:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((np.asarray(windows, np.float32), future))
        return future.result()

    def _gather(self, first) -> tuple[list, Any]:
        """The calls of one forward (``first`` and those that join it) and a call left for the next one."""
        items, rows = [first], len(first[0])
        deadline = time.monotonic() + self.max_wait_s
        while self.batching and rows < self.batch_size:
            try:
                if len(items) < self._active:  # another request may send windows soon: wait for it, briefly
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                else:
                    item = self._queue.get_nowait()
            except queue.Empty:
                break
            if rows + len(item[0]) > self.batch_size:
                return items, item
            items.append(item)
            rows += len(item[0])
        return items, None

    def _run(self) -> None:
        carried = None
        while True:
            items, carried = self._gather(carried or self._queue.get())
            try:
                outputs = self.forward(np.concatenate([windows for windows, _ in items]))
                self.forwards += 1
            except BaseException as error:  # the callers get it; this thread goes on
                for _, future in items:
                    future.set_exception(error)
                continue
            row = 0
            for windows, future in items:
                future.set_result({name: value[row : row + len(windows)] for name, value in outputs.items()})
                row += len(windows)


@dataclasses.dataclass
class ServedModel:
    """A model given at start: its public name, the model and variables, its class names, and its scorer."""

    name: str
    model: Any
    variables: Any
    class_names: list[str]
    scorer: BatchingScorer
    batch_size: int
    hop_seconds: float | None = None  # None: half the model's window, as `tag`
    _embedders: dict = dataclasses.field(default_factory=dict)
    _embed_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    @property
    def sample_rate(self) -> int:
        return int(self.model.frontend.sample_rate)

    @property
    def window_seconds(self) -> float:
        return self.model.frontend.clip_samples / self.sample_rate

    @property
    def hop(self) -> int:
        """The hop in samples (``tag``'s: ``--hop``, else half the model's window)."""
        return windowing.window_hop(self.hop_seconds, self.sample_rate, self.model.frontend.clip_samples)

    def describe(self) -> dict:
        frames = Tagger(self.model, None, self.batch_size, self.hop_seconds, frames=True, scorer=self.scorer).frames
        return {"name": self.name, "sample_rate": self.sample_rate, "window_s": self.window_seconds,
                "hop_s": self.hop / self.sample_rate, "frames": frames, "num_classes": len(self.class_names),
                "classes": self.class_names}

    def max_windows(self, max_seconds: float) -> int:
        """Windows of a file of ``max_seconds``: the Tagger's limit that stands for the duration limit."""
        return windowing.window_count(int(max_seconds * self.sample_rate), self.model.frontend.clip_samples,
                                      self.hop)

    def embedder(self, kind: str) -> ShardedForward:
        with self._embed_lock:
            if kind not in self._embedders:
                self._embedders[kind] = ShardedForward(self.model, self.variables, self.batch_size,
                                                       select=output_selector(
                    self.model, [EMBEDDING_KINDS[kind]], {EMBEDDING_KINDS[kind]: kind}))
            return self._embedders[kind]


def load_models(sources: Sequence[str], batch_size: int, batching: bool, max_wait_s: float,
                offline: bool = False) -> dict[str, ServedModel]:
    """The models named on the command line (model folders, training workdirs or pretrained names), by public
    name: the folder's name or the pretrained name (``-2``, ``-3`` … for repeats)."""
    from convnext_audio_jax.hub.resolve import load_model

    served: dict[str, ServedModel] = {}
    for source in sources:
        model, variables, metadata = load_model(source, offline=offline)
        names = commands.class_names_for(metadata, model.num_classes, None)
        # The tag command's forward with frame scores (probs for every model, frame_probs for a ConvNeXt):
        # one compiled forward serves requests with and without ``frames``.
        forward = Tagger(model, variables, batch_size, frames=True).scorer
        base = os.path.basename(os.path.normpath(source)) or "model"
        name, number = base, 1
        while name in served:
            number += 1
            name = f"{base}-{number}"
        served[name] = ServedModel(name, model, variables, names, BatchingScorer(forward, batching, max_wait_s),
                                   forward.batch_size)
    return served


def _deadline_scorer(scorer: BatchingScorer, deadline: float, limit: float):
    def score(windows: np.ndarray):
        if time.monotonic() > deadline:  # the client had its answer (504): stop spending forwards on it
            raise TimeLimit(limit)
        return scorer(windows)
    return score


def _refusal(error: TagError, max_seconds: float) -> RequestError:
    if error.reason == TOO_LONG:
        return RequestError(413, f"the audio is longer than the server's limit of {max_seconds:g} s ({error.detail})")
    return RequestError(422, f"the upload is not audio this server can decode: {error.reason} ({error.detail})")


def tag_file(served: ServedModel, path: str, name: str, *, top_k: int, threshold: float, frames: bool,
             max_seconds: float, deadline: float, time_limit: float, fmt: str = "jsonl") -> str:
    """The record ``convnext-audio tag --format FMT [--frames]`` (jsonl or csv) writes for the file at ``path``
    (a private temporary file), naming it ``name`` (the upload's name, a label only)."""
    served.scorer.enter()
    try:
        tagger = Tagger(served.model, None, served.batch_size, served.hop_seconds, "max", frames,
                        max_windows=served.max_windows(max_seconds),
                        scorer=_deadline_scorer(served.scorer, deadline, time_limit))
        spool, record = None, None
        try:
            for event in tagger.stream([path]):
                if isinstance(event, FileStarted) and frames:
                    spool = FileSpool(os.path.dirname(path), tagger.frames, tagger.window_seconds)
                elif isinstance(event, WindowScores) and spool is not None:
                    spool.add(event)
                elif isinstance(event, FileScored):
                    event = dataclasses.replace(event, audio=dataclasses.replace(event.audio, name=name))
                    record = "".join(record_chunks(fmt, event, spool, served.class_names, top_k, threshold, False))
                elif isinstance(event, TagError):
                    raise _refusal(event, max_seconds)
        finally:
            if spool is not None:
                spool.close()
    finally:
        served.scorer.leave()
    return record


def embed_file(served: ServedModel, path: str, name: str, kind: str, *, max_seconds: float) -> str:
    """The ``.npz`` that ``convnext-audio embed --kind KIND`` writes for the file at ``path``, written next to
    it; returns its path."""
    if kind not in EMBEDDING_KINDS:
        raise RequestError(422, f"kind {kind!r}: expected one of {', '.join(EMBEDDING_KINDS)}")
    output = os.path.join(os.path.dirname(path), "embeddings.npz")
    store = EmbeddingStore(output, kind)
    embedder = served.embedder(kind)
    hop = served.hop
    try:
        commands._embed_file(path, store, embedder, served.sample_rate, served.model.frontend.clip_samples, hop,
                             served.max_windows(max_seconds), kind, embedder.batch_size)
    except audio_lib.ClipError as error:
        raise _refusal(TagError(name, error.reason, error.detail), max_seconds) from None
    except UserError as error:  # past the window limit (the duration limit), or NaN embeddings
        message = str(error).removeprefix(path + ": ")
        raise _refusal(TagError(name, TOO_LONG if "windows" in message else "non-finite", message),
                       max_seconds) from None
    store.finish([path], {"class_names": np.array(served.class_names)} if kind == "logits" else None)
    return output
