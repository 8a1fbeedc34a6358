"""Reading an uploaded image from an HTTP request: size limit, content type, decoding.

An upload is either a multipart form with the image in the field ``file`` (what browsers
and ``curl -F file=@plate.png`` send) or the raw image bytes as the request body with an
image content type (``curl --data-binary @plate.png -H "Content-Type: image/png"``).

Problems become :class:`fastapi.HTTPException` with a one-line message:
413 too large (bytes or pixels), 415 not an image content type, 422 bytes that do not
decode as an image, 400 a multipart form without its ``file`` field.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from fastapi import HTTPException, Request
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from metaldefect.data.images import to_uint8_rgb
from metaldefect.serve.defaults import DEFAULT_MAX_PIXELS

UPLOAD_FIELD = "file"
# Generic binary is accepted too: many clients (and curl for unknown suffixes) label files so.
BINARY_TYPES = ("application/octet-stream",)


@dataclass
class Upload:
    """The bytes of one uploaded image, with what the client said about them."""

    data: bytes
    content_type: str
    filename: str | None = None


def megabytes(size: int) -> str:
    return f"{size / 1_000_000:g} MB"


def is_image_type(content_type: str) -> bool:
    media_type = content_type.split(";")[0].strip().lower()
    return media_type.startswith("image/") or media_type in BINARY_TYPES


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole request body; 413 as soon as it is known to exceed ``max_bytes``.

    The declared Content-Length is checked before reading; a chunked body is counted while
    it streams in, so a client cannot make the server hold more than ``max_bytes`` + one chunk.
    """
    too_large = HTTPException(413, f"upload larger than the limit of {megabytes(max_bytes)} "
                                    "(the server's --max-upload-mb)")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def read_upload(request: Request, max_bytes: int) -> Upload:
    """The uploaded image's bytes from a multipart form or a raw body (see the module docstring)."""
    content_type = request.headers.get("content-type", "")
    body = await read_body(request, max_bytes)
    if content_type.split(";")[0].strip().lower() == "multipart/form-data":
        return await _from_form(request, body)
    if not is_image_type(content_type):
        raise HTTPException(415, f"content type {content_type or '(none)'!r} is not an image: send a multipart "
                                 f"form with the image in the field {UPLOAD_FIELD!r}, or the raw image bytes "
                                 "with an image/* content type")
    return Upload(body, content_type)


async def _from_form(request: Request, body: bytes) -> Upload:
    async def replay() -> dict:  # the body was read (and counted) already: hand it to the form parser
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        async with Request(request.scope, replay).form(max_files=1, max_fields=10) as form:
            field = form.get(UPLOAD_FIELD)
            if not isinstance(field, UploadFile):
                raise HTTPException(400, f"the multipart form has no file in the field {UPLOAD_FIELD!r}")
            part_type = field.content_type or "application/octet-stream"
            if not is_image_type(part_type):
                raise HTTPException(415, f"{field.filename or 'the upload'}: content type {part_type!r} "
                                         "is not an image")
            return Upload(await field.read(), part_type, field.filename)
    except MultiPartException as error:  # Starlette raises it, or a 400 of its own, for a broken form
        raise HTTPException(400, f"malformed multipart form: {error.message}") from None


def decode_image(upload: Upload, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The upload as ``[H, W, 3]`` uint8 RGB; 422 when it is not a readable image, 413 when it has
    more than ``max_pixels`` pixels (checked from the header, before decoding)."""
    name = upload.filename or "the upload"
    if not upload.data:
        raise HTTPException(422, f"{name}: empty upload (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies below
            with Image.open(io.BytesIO(upload.data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise HTTPException(413, f"{name}: {width} x {height} pixels is more than the limit of "
                                             f"{max_pixels:,} pixels")
                image.load()
                array = to_uint8_rgb(image)
    except UnidentifiedImageError:
        raise HTTPException(422, f"{name}: not a readable image (unknown or unsupported format)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise HTTPException(422, f"{name}: not a readable image ({error.__class__.__name__}: {error})") from None
    if min(array.shape[:2]) < 1:
        raise HTTPException(422, f"{name}: the image is empty ({width} x {height} pixels)")
    return array
