"""``convnext-audio serve MODEL [MODEL ...]``: the page and the JSON API in one process (uvicorn)."""

from __future__ import annotations

import argparse
import sys

from convnext_audio_jax.runtime.errors import UserError

DEFAULTS = dict(max_upload_mb=100.0, max_seconds=1800.0, max_queue=64, time_limit=120.0, upload_time_limit=300.0,
                workers=8)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", metavar="MODEL",
                        help="model directories, training workdirs or pretrained names (the first is the default)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default %(default)s: this machine only; 0.0.0.0 for every "
                             "interface)")
    parser.add_argument("--port", type=int, default=7860, help="port (default %(default)s)")
    parser.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                        help="a web origin (https://example.org, or *) whose pages may call the API; repeatable "
                             "(default: none, only the server's own page)")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULTS["max_upload_mb"],
                        help="largest upload in MiB, refused (413) while arriving (default %(default)s)")
    parser.add_argument("--max-seconds", type=float, default=DEFAULTS["max_seconds"],
                        help="longest audio in seconds, refused (413) from its header when it tells (default "
                             "%(default)s)")
    parser.add_argument("--max-queue", type=int, default=DEFAULTS["max_queue"],
                        help="requests in progress before more are answered 503 with Retry-After (default "
                             "%(default)s)")
    parser.add_argument("--time-limit", type=float, default=DEFAULTS["time_limit"],
                        help="seconds a request may take once uploaded before it is answered 504 (default "
                             "%(default)s)")
    parser.add_argument("--upload-time-limit", type=float, default=DEFAULTS["upload_time_limit"],
                        help="seconds an upload may take to arrive before it is answered 408 (default %(default)s)")
    parser.add_argument("--workers", type=int, default=DEFAULTS["workers"],
                        help="requests decoded and tagged at once (default %(default)s)")
    parser.add_argument("--index", action="append", default=[], metavar="INDEX.h5",
                        help="an index of recordings (convnext-audio index) that POST /v1/search queries in words; "
                             "repeatable, each named by its file name without .h5")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward (default %(default)s)")
    parser.add_argument("--max-wait-ms", type=float, default=10.0,
                        help="how long a forward waits for windows of other requests in progress (default "
                             "%(default)s)")
    parser.add_argument("--no-batching", action="store_true",
                        help="one forward per request's batch (no windows of other requests joined)")


def _check(args: argparse.Namespace) -> None:
    for flag, value, low in [("--max-upload-mb", args.max_upload_mb, 0), ("--max-seconds", args.max_seconds, 0),
                             ("--time-limit", args.time_limit, 0), ("--upload-time-limit", args.upload_time_limit, 0),
                             ("--max-wait-ms", args.max_wait_ms, -1e-9)]:
        if not value > low or value == float("inf"):
            raise UserError(f"{flag} must be a positive number, got {value}")
    for flag, value in [("--max-queue", args.max_queue), ("--workers", args.workers), ("--batch-size", args.batch_size)]:
        if value < 1:
            raise UserError(f"{flag} must be ≥ 1, got {value}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be 0 to 65535, got {args.port}")


def run(args: argparse.Namespace) -> int:
    _check(args)
    try:
        import uvicorn

        from convnext_audio_jax.serve.app import Limits, build_app
    except ImportError as error:
        raise UserError(f"serve needs the [serve] extra ({error.name} is missing): "
                        "pip install 'convnext-audio-jax[serve]'") from None
    from convnext_audio_jax.hub.resolve import offline_flag
    from convnext_audio_jax.serve.engine import load_models

    models = load_models(args.models, args.batch_size, not args.no_batching, args.max_wait_ms / 1000,
                         offline=offline_flag(args))
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_seconds=args.max_seconds,
                    max_queue=args.max_queue, time_limit=args.time_limit,
                    upload_time_limit=args.upload_time_limit, workers=args.workers,
                    allow_origins=tuple(args.allow_origin))
    indexes = {}
    if args.index:
        from convnext_audio_jax.serve.search import load_indexes

        indexes = load_indexes(args.index)
    app = build_app(models, limits, indexes)
    api = "/v1/tag, /v1/embed, /v1/models" + (", /v1/search" if indexes else "")
    print(f"serve: {', '.join(models)} on http://{args.host}:{args.port}/ (API: {api})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0
