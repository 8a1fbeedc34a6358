"""Checks writers make before writing anything, so a bad input never leaves a half-written output."""
from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from metaldefect.atomic import staged_directory
from metaldefect.data.records import Record
from metaldefect.errors import DataError


def check_output_folder(path: Path, overwrite: bool) -> None:
    """Refuse to replace an existing non-empty folder (or a file) unless ``overwrite``."""
    if path.exists() and not path.is_dir():
        raise DataError(f"{path}: exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise DataError(f"{path}: folder exists and is not empty; choose another or pass --overwrite")


def unique_names(names: list[str], what: str) -> None:
    """Raise DataError if two outputs would get the same file name."""
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise DataError(f"two or more {what}s would be written as '{repeated[0]}' "
                        f"({len(repeated)} names repeat); rename the inputs")


def image_depths(records: list[Record]) -> list[int]:
    """Number of channels of each record's image; DataError naming the first missing or unreadable one."""
    depths = []
    for record in records:
        try:
            with Image.open(record.path) as image:
                depths.append(len(image.getbands()))
        except FileNotFoundError:
            raise DataError(f"{record.path}: image file not found") from None
        except (UnidentifiedImageError, OSError) as error:
            raise DataError(f"{record.path}: unreadable image ({error})") from None
    return depths


@contextlib.contextmanager
def staged_output(path: Path):
    """A staging folder that replaces ``path`` on success; OS errors become one-line DataErrors."""
    try:
        with staged_directory(path) as staging:
            yield staging
    except OSError as error:
        raise DataError(f"{path}: cannot write output ({error.strerror or error}: {error.filename})") from None
