"""The ASGI app of ``convnext-audio serve``: the JSON API (``/v1/tag``, ``/v1/embed``, ``/v1/models``,
``/healthz``) and the page (``/``, its script and style from the package: nothing from a CDN).

Every refusal is a 4xx/5xx JSON ``{"error": "..."}`` naming the problem; an unexpected exception is a 500 with
its traceback in the server's log, and the server goes on. Requests in progress (receiving or tagging) are
counted: past ``max_queue`` a request is answered 503 with Retry-After; tagging runs on a pool of threads whose
windows share forwards (`engine.BatchingScorer`), and a request that takes longer than ``time_limit`` is answered
504 (its thread stops at its next forward).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import io
import math
import pathlib
import re
import sys
import time
import traceback

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from convnext_audio_jax.inference.tag_output import CSV_HEADER
from convnext_audio_jax.serve import engine
from convnext_audio_jax.serve import search as search_lib
from convnext_audio_jax.serve.engine import RequestError, ServedModel
from convnext_audio_jax.serve.uploads import (
    UploadReceiver,
    private_folder,
    remove_folder,
)

STATIC = pathlib.Path(__file__).resolve().parent / "static"
PAGE_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
# The page may load and call only this server (and the blob: URLs of its own downloads); no frames of it elsewhere.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; "
                                           "frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


@dataclasses.dataclass
class Limits:
    max_upload_bytes: int = 100 * 1024 * 1024
    max_seconds: float = 1800.0
    max_queue: int = 64
    time_limit: float = 120.0
    upload_time_limit: float = 300.0
    workers: int = 8
    temp_root: str | None = None  # where each request's private folder is made (default: the system's)
    allow_origins: tuple[str, ...] = ()


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _int(request: Request, name: str, default: int, low: int) -> int:
    text = request.query_params.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise RequestError(400, f"query {name}={text!r}: expected a whole number ≥ {low}") from None
    if value < low:
        raise RequestError(400, f"query {name}={text!r}: expected a whole number ≥ {low}")
    return value


def _float(request: Request, name: str, default: float) -> float:
    text = request.query_params.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise RequestError(400, f"query {name}={text!r}: expected a number from 0 to 1")
    return value


def _flag(request: Request, name: str) -> bool:
    text = request.query_params.get(name, "false").lower()
    if text not in ("1", "true", "yes", "0", "false", "no", ""):
        raise RequestError(400, f"query {name}={text!r}: expected true or false")
    return text in ("1", "true", "yes")


class Server:
    """The app's state: the models, the limits, the thread pool and the count of requests in progress."""

    def __init__(self, models: dict[str, ServedModel], limits: Limits, indexes: dict[str, dict] | None = None):
        if not models:
            raise ValueError("no model to serve")
        self.models, self.limits, self.indexes = models, limits, dict(indexes or {})
        self.pool = concurrent.futures.ThreadPoolExecutor(limits.workers, thread_name_prefix="request")
        self.in_progress = 0

    def model(self, request: Request) -> ServedModel:
        name = request.query_params.get("model")
        if name is None:
            return next(iter(self.models.values()))
        if name not in self.models:
            raise RequestError(404, f"no model named {name!r} on this server; it serves {', '.join(self.models)}")
        return self.models[name]

    def check_origin(self, request: Request) -> None:
        """A page of another origin may not use the API unless ``--allow-origin`` names it (a browser sends a
        cross-origin form POST without asking first: refusing it here keeps such a page from running work)."""
        origin = request.headers.get("origin")
        if origin is None or origin == f"{request.url.scheme}://{request.headers.get('host', '')}":
            return
        if "*" in self.limits.allow_origins or origin in self.limits.allow_origins:
            return
        raise RequestError(403, f"requests from origin {origin} are not allowed (the server's --allow-origin)")

    async def handle_upload(self, request: Request, work) -> Response:
        """Admission, the upload into a private folder, then ``work(served, path, name, deadline)`` on the pool;
        the folder is removed when the work is done (or never started)."""
        self.check_origin(request)
        served = self.model(request)
        if self.in_progress >= self.limits.max_queue:
            raise RequestError(503, f"the server is busy ({self.in_progress} requests in progress); try again",
                               {"Retry-After": "1"})
        self.in_progress += 1
        folder = private_folder(self.limits.temp_root)
        handed_over = False
        try:
            receiver = UploadReceiver(request.headers.get("content-type", ""), request.headers.get("content-length"),
                                      folder, self.limits.max_upload_bytes)
            try:  # a client that sends slowly holds a place in the queue: it gets a time limit of its own
                async with asyncio.timeout(self.limits.upload_time_limit):
                    async for chunk in request.stream():
                        receiver.feed(chunk)
            except TimeoutError:
                receiver.close()
                raise RequestError(408, f"the upload took longer than the server's limit of "
                                        f"{self.limits.upload_time_limit:g} s") from None
            receiver.finish()
            deadline = time.monotonic() + self.limits.time_limit
            future = self.pool.submit(work, served, receiver.path, receiver.name, deadline)
            future.add_done_callback(lambda _: remove_folder(folder))
            handed_over = True
            try:
                return await asyncio.wait_for(asyncio.wrap_future(future), self.limits.time_limit)
            except TimeoutError:
                raise engine.TimeLimit(self.limits.time_limit) from None
        finally:
            self.in_progress -= 1
            if not handed_over:
                remove_folder(folder)

    async def search(self, request: Request) -> Response:
        """``q`` (the query, in words), ``top_k`` and ``index`` (its name; default the first given at start)."""
        self.check_origin(request)
        if not self.indexes:
            raise RequestError(404, "this server has no index to search: start it with --index INDEX.h5 "
                                    "(made by convnext-audio index)")
        name = request.query_params.get("index", next(iter(self.indexes)))
        if name not in self.indexes:
            raise RequestError(404, f"no index named {name!r} on this server; it has {', '.join(self.indexes)}")
        query = request.query_params.get("q", "").strip()
        if not query:
            raise RequestError(400, "query q is empty: say in words what to look for")
        top_k = _int(request, "top_k", 10, 1)
        if self.in_progress >= self.limits.max_queue:
            raise RequestError(503, f"the server is busy ({self.in_progress} requests in progress); try again",
                               {"Retry-After": "1"})
        self.in_progress += 1
        try:  # the text model runs on the pool, as the audio models do: the event loop keeps answering
            future = self.pool.submit(search_lib.answer, name, self.indexes[name], query, top_k)
            try:
                return JSONResponse(await asyncio.wait_for(asyncio.wrap_future(future), self.limits.time_limit))
            except TimeoutError:
                raise engine.TimeLimit(self.limits.time_limit) from None
        finally:
            self.in_progress -= 1

    def tag_work(self, request: Request):
        top_k = _int(request, "top_k", 10, 1)
        threshold = _float(request, "threshold", 0.25)
        frames = _flag(request, "frames")
        fmt = request.query_params.get("format", "json")
        if fmt not in ("json", "csv"):
            raise RequestError(400, f"query format={fmt!r}: expected json or csv")

        def work(served, path, name, deadline):
            record = engine.tag_file(served, path, name, top_k=top_k, threshold=threshold, frames=frames,
                                     max_seconds=self.limits.max_seconds, deadline=deadline,
                                     time_limit=self.limits.time_limit, fmt="csv" if fmt == "csv" else "jsonl")
            if fmt == "csv":  # what `tag --format csv` writes for this one file: the header line, then its rows
                return Response(",".join(CSV_HEADER) + "\n" + record, media_type="text/csv")
            return Response(record, media_type="application/json")
        return work

    def embed_work(self, request: Request):
        kind = request.query_params.get("kind", "scene")
        fmt = request.query_params.get("format", "json")
        if fmt not in ("json", "npz"):
            raise RequestError(400, f"query format={fmt!r}: expected json or npz")

        def work(served, path, name, deadline):
            del deadline  # embeddings run on their own forward, not the shared batches: the time limit's 504 holds
            output = engine.embed_file(served, path, name, kind, max_seconds=self.limits.max_seconds)
            data = pathlib.Path(output).read_bytes()
            if fmt == "npz":
                stem = re.sub(r"[^A-Za-z0-9._-]", "_", name.rsplit(".", 1)[0]) or "upload"
                return Response(data, media_type="application/octet-stream",
                                headers={"Content-Disposition": f'attachment; filename="{stem}.{kind}.npz"'})
            with np.load(io.BytesIO(data)) as arrays:
                return JSONResponse({"file": name, "model": served.name, "kind": kind,
                                     "shape": list(arrays["embeddings"].shape),
                                     "window_start_s": arrays["window_start_s"].tolist(),
                                     "embeddings": arrays["embeddings"].tolist()})
        return work


def _guarded(handler):
    @functools.wraps(handler)
    async def guarded(request: Request) -> Response:
        try:
            return await handler(request)
        except RequestError as error:
            headers = dict(error.headers)
            if error.status in (408, 413):  # the rest of the body is not read: the connection cannot be reused
                headers["Connection"] = "close"
            return _error(error.status, error.message, headers)
    return guarded


def build_app(models: dict[str, ServedModel], limits: Limits | None = None,
              indexes: dict[str, dict] | None = None) -> Starlette:
    """The app over ``models`` (name → ServedModel) and the search ``indexes`` (name → ``search.load_index``)."""
    server = Server(models, limits or Limits(), indexes)

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=PAGE_HEADERS)

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in PAGE_FILES:  # a fixed list: a request never names a file on the server
            raise RequestError(404, f"no page file named {name!r}")
        return FileResponse(STATIC / name, media_type=PAGE_FILES[name], headers=PAGE_HEADERS)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "models": list(server.models), "in_progress": server.in_progress})

    async def models_list(request: Request) -> Response:
        return JSONResponse({"models": [served.describe() for served in server.models.values()],
                             "limits": {"max_upload_bytes": server.limits.max_upload_bytes,
                                        "max_seconds": server.limits.max_seconds,
                                        "time_limit_s": server.limits.time_limit,
                                        "upload_time_limit_s": server.limits.upload_time_limit},
                             "indexes": list(server.indexes)})

    async def tag(request: Request) -> Response:
        return await server.handle_upload(request, server.tag_work(request))

    async def embed(request: Request) -> Response:
        return await server.handle_upload(request, server.embed_work(request))

    async def search(request: Request) -> Response:
        return await server.search(request)

    async def http_error(request: Request, error: HTTPException) -> Response:
        return _error(error.status_code, f"{request.method} {request.url.path}: {error.detail}")

    async def internal_error(request: Request, error: Exception) -> Response:
        traceback.print_exception(error, file=sys.stderr)
        return _error(500, f"internal error ({type(error).__name__}); the server's log has the traceback")

    middleware = []
    if server.limits.allow_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(server.limits.allow_origins),
                                     allow_methods=["GET", "POST"], allow_headers=["*"]))
    routes = [
        Route("/", _guarded(page)),
        Route("/static/{name}", _guarded(asset)),
        Route("/healthz", _guarded(healthz)),
        Route("/v1/models", _guarded(models_list)),
        Route("/v1/tag", _guarded(tag), methods=["POST"]),
        Route("/v1/embed", _guarded(embed), methods=["POST"]),
        Route("/v1/search", _guarded(search), methods=["POST"]),
    ]
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={HTTPException: http_error, Exception: internal_error})
    app.state.server = server
    return app
