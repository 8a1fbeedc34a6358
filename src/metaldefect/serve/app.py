"""The inspection service: a FastAPI app over one loaded :class:`~metaldefect.inference.detector.Detector`.

    app = create_app(Detector.load("builtin"))        # then: uvicorn.run(app, host="127.0.0.1", port=8000)

Routes:
    GET  /             the web page (``static/index.html``; its assets under ``/static``)
    POST /v1/detect    an image (multipart field ``file``, or the raw bytes) -> detections as JSON
    GET  /v1/health    liveness and load: answers while detections run
    GET  /v1/model     what the model is: classes, backbone and its weights, metrics (the model card)
    GET  /docs         OpenAPI docs (Swagger UI; ``/redoc`` too), assets served locally so they work offline

The detector is loaded once, before the app is made, and shared by every request. Decoding
and inference run in worker threads (``run_in_threadpool``), never on the event loop, so
health checks and uploads are served while a detection runs; :class:`Admission` bounds how
many run and wait at once.
"""
from __future__ import annotations

import time
from pathlib import Path

from fastapi import HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field

from metaldefect import __version__
from metaldefect.errors import DataError
from metaldefect.serve.admission import Admission
from metaldefect.serve.defaults import (DEFAULT_MAX_CONCURRENCY, DEFAULT_MAX_PIXELS, DEFAULT_MAX_QUEUE,
                                       DEFAULT_MAX_UPLOAD_BYTES)
from metaldefect.serve.uploads import UPLOAD_FIELD, decode_image, read_upload

STATIC_DIR = Path(__file__).resolve().parent / "static"


class DetectionOut(BaseModel):
    label: str = Field(description="defect class")
    score: float = Field(description="confidence in [0, 1]")
    box: list[float] = Field(description="[x1, y1, x2, y2] in pixels of the uploaded image (top left, bottom right)")


class DetectResponse(BaseModel):
    detections: list[DetectionOut] = Field(description="best first")
    width: int = Field(description="image width, pixels")
    height: int = Field(description="image height, pixels")
    model: str = Field(description="name of the model that answered")
    score_threshold: float = Field(description="detections scoring below this were dropped")
    elapsed_ms: float = Field(description="decoding and inference time on the server, milliseconds")


class HealthResponse(BaseModel):
    status: str
    model: str
    running: int = Field(description="detections running now")
    waiting: int = Field(description="detections waiting for a free slot")
    max_concurrency: int
    max_queue: int
    max_upload_bytes: int


class ModelResponse(BaseModel):
    name: str
    task: str | None = Field(description='"detect", or "classify" (one whole-image box per image)')
    classes: list[str] = Field(description="class vocabulary, index order")
    input_size: int = Field(description="side of the square network input, pixels")
    score_threshold: float = Field(description="default score threshold of /v1/detect")
    backbone: str | None = Field(description="timm architecture name")
    backbone_weights: dict = Field(description="name, source, pretrained_tag, sha256 of the backbone's weights")
    head: str | None
    training_command: str | None
    data: dict | None = Field(description="training data: root, format")
    split: dict | None = Field(description="split seed, ratios, images per split")
    metrics: dict | None = Field(description="best epoch, validation and test metrics of the run")
    detection_metrics: dict | None = Field(
        default=None, description="COCO mAP, per-class AP@0.5, precision and recall per split (packaged models)")
    box_refiner: bool = Field(default=False, description="whether a box refiner (`metaldefect refine`) moves "
                                                         "the detections' sides; the metrics include it")


ERRORS = {
    400: {"description": "multipart form without its `file` field"},
    413: {"description": "upload larger than the size limit, or an image with too many pixels"},
    415: {"description": "the content type is not an image"},
    422: {"description": "the bytes are not a readable image, or `conf` is outside [0, 1]"},
    503: {"description": "busy: every inference slot and queue place is taken; retry after `Retry-After` s"},
}

UPLOAD_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": [UPLOAD_FIELD], "properties": {
        UPLOAD_FIELD: {"type": "string", "format": "binary", "description": "the image file"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
}}}


def model_info(detector) -> dict:
    """What ``GET /v1/model`` answers: the detector's classes and input, and its model card's facts."""
    card = detector.card or {}
    weights = card.get("backbone_weights") or {}
    return {
        "name": card.get("name") or "model",
        "task": card.get("task"),
        "classes": list(detector.classes),
        "input_size": detector.input_size,
        "score_threshold": detector.score_threshold(),
        "backbone": card.get("backbone"),
        "backbone_weights": {key: weights.get(key) for key in ("name", "source", "pretrained_tag", "sha256")},
        "head": card.get("head"),
        "training_command": card.get("training_command"),
        "data": card.get("data"),
        "split": card.get("split"),
        "metrics": card.get("metrics"),
        "detection_metrics": card.get("detection_metrics"),
        "box_refiner": getattr(detector, "refiner", None) is not None,
    }


def create_app(detector, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               max_concurrency: int = DEFAULT_MAX_CONCURRENCY, max_queue: int = DEFAULT_MAX_QUEUE,
               max_pixels: int = DEFAULT_MAX_PIXELS):
    """The service's FastAPI app around ``detector``.

    ``detector``: a loaded Detector, or any object with ``predict(image [H, W, 3] uint8, conf) ->
    [Detection]``, ``score_threshold(conf=None) -> float``, ``classes``, ``input_size`` and ``card``
    (and ``refiner``, None or absent when no box refiner is applied).
    ``max_upload_bytes``: request bodies above it get 413. ``max_concurrency``: detections running
    at once; ``max_queue``: more may wait for a slot, beyond that 503. ``max_pixels``: decoded size limit.
    """
    if max_upload_bytes < 1:
        raise ValueError(f"max_upload_bytes {max_upload_bytes}: expected at least 1")
    info = model_info(detector)
    name = info["name"]

    admission = Admission(max_concurrency, max_queue)
    app = FastAPIOffline(
        title="metaldefect inspection service", version=__version__,
        description="Find defects on metal surface images. Upload an image to `POST /v1/detect` as the "
                    f"multipart field `{UPLOAD_FIELD}`, or as the raw body with an `image/*` content type.")
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.post("/v1/detect", response_model=DetectResponse, responses=ERRORS, openapi_extra=UPLOAD_BODY,
              summary="Find defects on one image")
    async def detect(request: Request,
                     conf: float | None = Query(None, ge=0.0, le=1.0,
                                                description="score threshold (default: the model's)")) -> dict:
        admission.refuse_if_full()  # before reading an upload there is no room for
        upload = await read_upload(request, max_upload_bytes)
        async with admission.slot():
            start = time.perf_counter()
            image = await run_in_threadpool(decode_image, upload, max_pixels)
            try:
                detections = await run_in_threadpool(detector.predict, image, conf)
            except DataError as error:
                raise HTTPException(422, str(error)) from None
            elapsed_ms = (time.perf_counter() - start) * 1000.0
        height, width = image.shape[:2]
        return {"detections": [d.to_dict() for d in detections], "width": width, "height": height, "model": name,
                "score_threshold": detector.score_threshold(conf), "elapsed_ms": round(elapsed_ms, 1)}

    @app.get("/v1/health", response_model=HealthResponse, summary="Liveness and current load")
    async def health() -> dict:
        return {"status": "ok", "model": name, "running": admission.running, "waiting": admission.waiting,
                "max_concurrency": max_concurrency, "max_queue": max_queue, "max_upload_bytes": max_upload_bytes}

    @app.get("/v1/model", response_model=ModelResponse,
             summary="The model: classes, backbone, weights, metrics (its model card)")
    async def model() -> dict:
        return info

    return app
