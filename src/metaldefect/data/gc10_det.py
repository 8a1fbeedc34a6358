"""GC10-DET (Lv et al., Sensors 2020): VOC labels in ``ROOT/lable/`` (sic), images anywhere under ROOT.

The images usually sit in class folders ``1``..``10``; they are found by file stem wherever
they are. Label class codes are pinyin; they map to the English names of paper-notes.md.
``10_yaozhed``, a typo in the real labels, is read as waist_folding; any other name (the
real labels hold one object named ``d``) is reported and dropped. ``<folder>`` (which
is sometimes ``all``) is not used.
"""
from __future__ import annotations

from pathlib import Path

from metaldefect.data.checks import ImageIndex, find_files
from metaldefect.data.problems import ProblemLog
from metaldefect.data.records import Record
from metaldefect.data.voc import read_voc_labels

GC10_CLASS_CODES = {
    "1_chongkong": "punching_hole",
    "2_hanfeng": "welding_line",
    "3_yueyawan": "crescent_gap",
    "4_shuiban": "water_spot",
    "5_youban": "oil_spot",
    "6_siban": "silk_spot",
    "7_yiwu": "inclusion",
    "8_yahen": "rolled_pit",
    "9_zhehen": "crease",
    "10_yaozhe": "waist_folding",
    "10_yaozhed": "waist_folding",  # typo in 131 of the real label files
}
GC10_CLASSES = tuple(sorted(set(GC10_CLASS_CODES.values())))


def is_gc10_det(root: Path) -> bool:
    return (root / "lable").is_dir()


def read_gc10_det(root: Path, log: ProblemLog, require_images: bool = True) -> list[Record]:
    """Records of a GC10-DET root, class names in English."""
    label_dir = root / "lable"
    images = ImageIndex([root], log=log)
    return read_voc_labels(find_files(label_dir, [".xml"]), images, root, beside=False,
                           names=GC10_CLASS_CODES, source="gc10-det", log=log, require_images=require_images)
