"""NEU-DET (Song and Yan, Northeastern University): ``ROOT/IMAGES/*.jpg`` and ``ROOT/ANNOTATIONS/*.xml``.

Six classes, named as in the dataset's own XML. Images are 200x200 grayscale; each XML
is matched to the image with the same stem (then to its ``<filename>``).
"""
from __future__ import annotations

from pathlib import Path

from metaldefect.data.checks import ImageIndex, find_files
from metaldefect.data.problems import ProblemLog
from metaldefect.data.records import Record
from metaldefect.data.voc import read_voc_labels

NEU_CLASSES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")


def is_neu_det(root: Path) -> bool:
    return (root / "IMAGES").is_dir() and (root / "ANNOTATIONS").is_dir()


def read_neu_det(root: Path, log: ProblemLog, require_images: bool = True) -> list[Record]:
    """Records of a NEU-DET root; objects of any other class are reported and dropped."""
    images = ImageIndex([root / "IMAGES"], log=log)
    return read_voc_labels(find_files(root / "ANNOTATIONS", [".xml"]), images, root / "IMAGES", beside=False,
                           names={name: name for name in NEU_CLASSES}, source="neu-det", log=log,
                           require_images=require_images)
