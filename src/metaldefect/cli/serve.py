"""``metaldefect serve``: the inspection service (HTTP API and web page) with uvicorn.

The model is loaded once, before the server starts listening; one server process
shares it between requests (``--concurrency`` detections at once, ``--queue`` waiting).
"""
from __future__ import annotations

import argparse

from metaldefect.cli.predict import add_model_options, load_detector
from metaldefect.errors import MetalDefectError
from metaldefect.serve.defaults import DEFAULT_MAX_CONCURRENCY, DEFAULT_MAX_QUEUE, DEFAULT_MAX_UPLOAD_BYTES


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected an integer of at least 1")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: expected an integer of at least 0")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text}: expected a number above 0")
    return value


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="HTTP service and web page: upload images, get defects (FastAPI + uvicorn)",
        description="Serve the model over HTTP: POST /v1/detect, GET /v1/health, GET /v1/model, "
                    "the web page at / and the API docs at /docs. No authentication: keep the default "
                    "loopback host unless the network is trusted.")
    add_model_options(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    parser.add_argument("--max-upload-mb", type=positive_float, default=DEFAULT_MAX_UPLOAD_BYTES / 1e6,
                        help="largest accepted upload in MB; larger gets 413 "
                             f"(default: {DEFAULT_MAX_UPLOAD_BYTES / 1e6:g})")
    parser.add_argument("--concurrency", type=positive_int, default=DEFAULT_MAX_CONCURRENCY,
                        help="detections running at once (default: %(default)s; each uses all torch threads)")
    parser.add_argument("--queue", type=non_negative_int, default=DEFAULT_MAX_QUEUE,
                        help="detections that may wait for a free slot; beyond that 503 (default: %(default)s)")
    parser.set_defaults(handler=run_serve)


def build_app(args: argparse.Namespace):
    """The app for ``args``, with its model loaded (once, here)."""
    from metaldefect.serve.app import create_app

    detector = load_detector(args, args.model)
    return create_app(detector, max_upload_bytes=int(args.max_upload_mb * 1e6), max_concurrency=args.concurrency,
                      max_queue=args.queue)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    if not 0 <= args.port <= 65535:
        raise MetalDefectError(f"--port {args.port}: expected 0..65535")
    app = build_app(args)
    print(f"metaldefect serve: model {args.model} loaded; page http://{args.host}:{args.port}/ "
          f"API docs http://{args.host}:{args.port}/docs", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
