"""Datasets: readers for NEU-DET, GC10-DET, VOC, YOLO and COCO into one record type; writers; merge, split, stats."""
from metaldefect.data.coco import read_coco, write_coco
from metaldefect.data.loading import FORMATS, detect_format, load_dataset
from metaldefect.data.problems import Problem, ProblemLog
from metaldefect.data.records import Detection, Record
from metaldefect.data.split import make_split, read_split, select_split, write_split
from metaldefect.data.voc import read_voc, write_voc
from metaldefect.data.yolo import read_yolo, write_yolo

__all__ = [
    "FORMATS", "Detection", "Problem", "ProblemLog", "Record", "detect_format", "load_dataset", "make_split",
    "read_coco", "read_split", "read_voc", "read_yolo", "select_split", "write_coco", "write_split", "write_voc",
    "write_yolo",
]
