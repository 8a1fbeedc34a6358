"""Pascal VOC XML: parsing one label file safely, reading VOC folders, writing a VOC folder.

Layouts read (``read_voc``):
  - ``ROOT/Annotations/*.xml`` with images in ``ROOT/JPEGImages/`` (or anywhere under ROOT),
    matched by file stem, then by the XML's ``<filename>``;
  - otherwise every ``*.xml`` under ROOT, each with its image beside it (same folder, same stem).

Coordinates are taken as written (VOC's 1-based pixel convention is not shifted: the
difference is below the 1 px that annotators achieve). XML is parsed with defusedxml, so
entity expansion ("billion laughs") and external entities are refused, not followed.
"""
from __future__ import annotations

import shutil
import xml.etree.ElementTree as ElementTree  # building XML only; parsing goes through defusedxml
from dataclasses import dataclass
from pathlib import Path

import defusedxml
import defusedxml.ElementTree as SafeElementTree
from tqdm import tqdm

from metaldefect.data.checks import ImageIndex, build_record, find_files
from metaldefect.data.output import check_output_folder, image_depths, staged_output, unique_names
from metaldefect.data.problems import ProblemLog
from metaldefect.data.records import Record

BOX_TAGS = ("xmin", "ymin", "xmax", "ymax")


@dataclass
class VocLabel:
    """The parts of one VOC XML file we use. ``objects`` keep the file's own class names."""

    file: Path
    filename: str
    folder: str
    size: tuple[int, int] | None
    objects: list[tuple[int, str, list[float]]]


def parse_voc(path: Path, log: ProblemLog) -> VocLabel | None:
    """Parse one VOC XML file; None (reported) if it is unreadable, malformed or unsafe.

    Objects without a name or a numeric box are dropped and reported; the rest are kept.
    """
    try:
        root = SafeElementTree.parse(path).getroot()
    except defusedxml.DefusedXmlException as error:
        log.add(path, f"unsafe XML refused ({error.__class__.__name__}: entity declarations and "
                      "external references are not allowed); skipped")
        return None
    except SafeElementTree.ParseError as error:
        log.add(path, f"malformed XML ({error}); skipped")
        return None
    except OSError as error:
        log.add(path, f"cannot read label file ({error.strerror or error}); skipped")
        return None
    if root.tag != "annotation":
        log.add(path, f"not a Pascal VOC annotation (root element <{root.tag}>); skipped")
        return None
    objects = []
    for index, element in enumerate(root.findall("object")):
        name = (element.findtext("name") or "").strip()
        try:
            box = [float(element.findtext(f"bndbox/{tag}")) for tag in BOX_TAGS]
        except (TypeError, ValueError):
            log.add(path, f"object {index + 1} ({name or 'no name'}): missing or non-numeric <bndbox>; dropped")
            continue
        if not name:
            log.add(path, f"object {index + 1}: no <name>; dropped")
            continue
        objects.append((index, name, box))
    return VocLabel(file=path, filename=(root.findtext("filename") or "").strip(),
                    folder=(root.findtext("folder") or "").strip(), size=_size(root), objects=objects)


def _size(root) -> tuple[int, int] | None:
    try:
        width, height = int(float(root.findtext("size/width"))), int(float(root.findtext("size/height")))
    except (TypeError, ValueError):
        return None
    return (width, height) if width > 0 and height > 0 else None


def map_names(label: VocLabel, names: dict[str, str] | None, log: ProblemLog) -> list[tuple[int, str, list[float]]]:
    """Objects with class names mapped through ``names`` (None: keep as written); unknown ones reported."""
    if names is None:
        return label.objects
    kept = []
    for index, name, box in label.objects:
        if name in names:
            kept.append((index, names[name], box))
        else:
            log.add(label.file, f"object {index + 1}: unknown class '{name}'; dropped")
    return kept


def read_voc_labels(label_files: list[Path], images: ImageIndex, image_dir: Path, *, beside: bool,
                    names: dict[str, str] | None, source: str, log: ProblemLog,
                    require_images: bool) -> list[Record]:
    """Records for VOC label files whose images are looked up in ``images``.

    Args:
        beside: images sit in the label's own folder (index keyed by path without suffix)
            rather than being looked up by stem alone.
        image_dir: where a missing image is expected (label-only records point there).
    """
    records = []
    for label_file in tqdm(label_files, desc=f"reading {source}", unit="file", leave=False, disable=None):
        label = parse_voc(label_file, log)
        if label is None:
            continue
        stems = [label_file.stem] + ([Path(label.filename).stem] if label.filename else [])
        keys = [str(label_file.parent / stem) if beside else stem for stem in stems]
        image = images.claim(keys[0]) or (images.claim(keys[1]) if len(keys) > 1 else None)
        folder = label_file.parent if beside else image_dir
        expected = folder / (label.filename if Path(label.filename).stem == label_file.stem
                             else label_file.stem + ".jpg")
        record = build_record(label_file, image, expected, label.size, map_names(label, names, log),
                              source, log, require_images)
        if record is not None:
            records.append(record)
    images.report_unlabelled(log)
    return records


def read_voc(root: Path, log: ProblemLog, require_images: bool = True) -> list[Record]:
    """Read a plain Pascal VOC folder (either layout in the module docstring); any class name."""
    annotations = root / "Annotations"
    if annotations.is_dir():
        image_dir = root / "JPEGImages" if (root / "JPEGImages").is_dir() else root
        images = ImageIndex([image_dir], log=log)
        return read_voc_labels(find_files(annotations, [".xml"]), images, image_dir, beside=False,
                               names=None, source="voc", log=log, require_images=require_images)
    images = ImageIndex([root], key=lambda path: str(path.with_suffix("")), log=log)
    return read_voc_labels(find_files(root, [".xml"]), images, root, beside=True,
                           names=None, source="voc", log=log, require_images=require_images)


def voc_xml(record: Record, image_name: str, depth: int) -> bytes:
    """The VOC annotation of ``record`` for an image stored as ``JPEGImages/<image_name>``.

    Box corners are written as whole pixels (rounded), as VOC tools expect.
    """
    root = ElementTree.Element("annotation")
    ElementTree.SubElement(root, "folder").text = "JPEGImages"
    ElementTree.SubElement(root, "filename").text = image_name
    ElementTree.SubElement(ElementTree.SubElement(root, "source"), "database").text = record.source or "Unknown"
    size = ElementTree.SubElement(root, "size")
    for tag, value in (("width", record.width), ("height", record.height), ("depth", depth)):
        ElementTree.SubElement(size, tag).text = str(value)
    ElementTree.SubElement(root, "segmented").text = "0"
    for box, label in zip(record.boxes, record.labels):
        element = ElementTree.SubElement(root, "object")
        for tag, text in (("name", label), ("pose", "Unspecified"), ("truncated", "0"), ("difficult", "0")):
            ElementTree.SubElement(element, tag).text = text
        bndbox = ElementTree.SubElement(element, "bndbox")
        for tag, value in zip(BOX_TAGS, box):
            ElementTree.SubElement(bndbox, tag).text = str(round(value))
    ElementTree.indent(root, space="\t")
    return ElementTree.tostring(root, encoding="utf-8") + b"\n"


def write_voc_files(records: list[Record], folder: Path, image_names: list[str], depths: list[int]) -> None:
    """Copy images into ``folder/JPEGImages/`` and write ``folder/Annotations/*.xml`` (no checks)."""
    (folder / "JPEGImages").mkdir(exist_ok=True)
    (folder / "Annotations").mkdir(exist_ok=True)
    for record, name, depth in tqdm(list(zip(records, image_names, depths)), desc="writing VOC",
                                    unit="image", leave=False, disable=None):
        shutil.copyfile(record.path, folder / "JPEGImages" / name)
        (folder / "Annotations" / f"{Path(name).stem}.xml").write_bytes(voc_xml(record, name, depth))


def write_voc(records: list[Record], out_dir: str | Path, image_names: list[str] | None = None,
              overwrite: bool = False) -> None:
    """Write a VOC folder: images copied byte for byte to ``OUT/JPEGImages/``, XML to ``OUT/Annotations/``.

    Args:
        image_names: output file name of each record's image (default: its own name).
        overwrite: replace an existing non-empty ``out_dir`` (otherwise DataError).
    Everything is checked before anything is written; the folder appears complete or not at all.
    """
    out_dir = Path(out_dir)
    check_output_folder(out_dir, overwrite)
    image_names = image_names or [record.path.name for record in records]
    unique_names([Path(name).stem for name in image_names], "annotation")
    depths = image_depths(records)
    with staged_output(out_dir) as staging:
        write_voc_files(records, staging, image_names, depths)
