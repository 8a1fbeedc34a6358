"""Reading images of any kind users have: 8/16-bit grayscale, RGB, palette, JPEG/PNG/BMP/TIFF.

Everything comes back as an ``HxWx3`` uint8 RGB array (grayscale replicated), the one
form the backbones expect. A file that cannot be read raises :class:`DataError`
naming the file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from metaldefect.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def to_uint8_rgb(image: Image.Image) -> np.ndarray:
    """PIL image of any mode -> ``[H, W, 3]`` uint8 array."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit or float images: stretch their own range to 0..255 rather than clip.
        array = np.asarray(image, dtype=np.float32)
        low, high = float(array.min()), float(array.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        array = ((array - low) * scale).round().astype(np.uint8)
        return np.repeat(array[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as ``[H, W, 3]`` uint8 RGB; raise DataError if unreadable."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            return to_uint8_rgb(image)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise DataError(f"{path}: unreadable image ({error.__class__.__name__}: {error})") from None


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an image file without decoding its pixels."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise DataError(f"{path}: unreadable image ({error.__class__.__name__}: {error})") from None
