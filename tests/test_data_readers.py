"""Readers: every layout load_dataset detects, read into the one record type."""
from __future__ import annotations

import pytest
from data_factory import coco_json, gc10_placeholders, make_image, neu_dataset, voc_text, write_text

from metaldefect.data import detect_format, load_dataset
from metaldefect.errors import DataError


def test_neu_det_layout(tmp_path):
    root = neu_dataset(tmp_path / "neu", {
        "scratches_2": [("scratches", [10, 20, 30, 40])],
        "crazing_1": [("crazing", [1, 2, 100, 150]), ("crazing", [5, 5, 50, 60])],
    })
    records, problems = load_dataset(root)
    assert detect_format(root) == "neu-det"
    assert len(problems) == 0
    assert [r.path.name for r in records] == ["crazing_1.jpg", "scratches_2.jpg"]  # sorted by path
    first = records[0]
    assert (first.width, first.height, first.source, first.original_name) == (200, 200, "neu-det", "crazing_1.xml")
    assert first.boxes == [[1, 2, 100, 150], [5, 5, 50, 60]] and first.labels == ["crazing", "crazing"]
    assert first.path == root / "IMAGES" / "crazing_1.jpg"


def test_neu_det_real_subset(neu_root):
    records, problems = load_dataset(neu_root)
    assert len(records) == 1440 and len(problems) == 0
    assert sum(len(r.boxes) for r in records) == 3366
    assert {label for r in records for label in r.labels} == {
        "crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"}


def test_gc10_images_found_by_stem_anywhere_and_codes_mapped(tmp_path):
    root = tmp_path / "gc10"
    write_text(root / "lable" / "a.xml", voc_text("a.jpg", [("1_chongkong", [0, 0, 10, 10]),
                                                              ("10_yaozhed", [5, 5, 20, 20])], 64, 48, "all"))
    write_text(root / "lable" / "b.xml", voc_text("b.jpg", [("8_yahen", [1, 1, 9, 9]), ("d", [2, 2, 8, 8])]))
    make_image(root / "1" / "a.jpg")
    make_image(root / "deep" / "8" / "b.jpg")
    records, problems = load_dataset(root)
    assert detect_format(root) == "gc10-det"
    assert [r.labels for r in records] == [["punching_hole", "waist_folding"], ["rolled_pit"]]
    assert records[1].path == root / "deep" / "8" / "b.jpg"
    assert [str(p) for p in problems] == [f"{root / 'lable' / 'b.xml'}: object 2: unknown class 'd'; dropped"]


def test_gc10_real_labels_only(gc10_labels, tmp_path):
    (tmp_path / "lable").symlink_to(gc10_labels)
    records, problems = load_dataset(tmp_path, require_images=False)
    assert len(records) == 2280
    assert sum(len(r.boxes) for r in records) == 3541
    assert [p.message for p in problems] == ["object 2: unknown class 'd'; dropped"]
    assert {(r.width, r.height) for r in records} == {(2048, 1000)}
    # the label says where the image should be; it is not there
    assert records[0].path == tmp_path / records[0].original_name.replace(".xml", ".jpg")


def test_gc10_subset_with_placeholder_images(gc10_labels, tmp_path):
    stems = sorted(p.stem for p in gc10_labels.glob("*.xml"))[:30]
    root = gc10_placeholders(gc10_labels, tmp_path / "gc10", stems)
    records, problems = load_dataset(root)
    assert len(records) == 30 and len(problems) == 0
    assert all(r.path.is_file() and r.path.stem in stems for r in records)


@pytest.mark.parametrize("annotations_folder", [True, False])
def test_voc_layouts(tmp_path, annotations_folder):
    root = tmp_path / "voc"
    if annotations_folder:
        write_text(root / "Annotations" / "x1.xml", voc_text("x1.png", [("dent", [3, 4, 30, 40])]))
        make_image(root / "JPEGImages" / "x1.png")
    else:  # XML beside its image, in any sub-folder
        write_text(root / "part" / "x1.xml", voc_text("x1.png", [("dent", [3, 4, 30, 40])]))
        make_image(root / "part" / "x1.png")
    records, problems = load_dataset(root)
    assert detect_format(root) == "voc" and len(problems) == 0
    assert len(records) == 1 and records[0].labels == ["dent"] and records[0].boxes == [[3, 4, 30, 40]]
    assert (records[0].width, records[0].height) == (64, 48)


def test_voc_image_found_by_xml_filename_when_stems_differ(tmp_path):
    root = tmp_path / "voc"
    write_text(root / "Annotations" / "label_7.xml", voc_text("picture_7.jpg", [("dent", [1, 1, 5, 5])]))
    make_image(root / "JPEGImages" / "picture_7.jpg")
    records, problems = load_dataset(root)
    assert [r.path.name for r in records] == ["picture_7.jpg"] and len(problems) == 0


@pytest.mark.parametrize("class_file,text", [
    ("data.yaml", "names: [dent, scratch]\n"),
    ("data.yaml", "names:\n  0: dent\n  1: scratch\n"),
    ("classes.txt", "dent\nscratch\n"),
])
def test_yolo(tmp_path, class_file, text):
    root = tmp_path / "yolo"
    write_text(root / class_file, text)
    make_image(root / "images" / "train" / "a.jpg", 100, 50)
    write_text(root / "labels" / "train" / "a.txt", "1 0.5 0.5 0.2 0.4\n0 0.1 0.1 0.2 0.2\n")
    make_image(root / "flat" / "b.png", 100, 50)
    write_text(root / "flat" / "b.txt", "")  # label beside its image; empty: no defect
    records, problems = load_dataset(root)
    assert detect_format(root) == "yolo" and len(problems) == 0
    b, a = records  # sorted by path: flat/ before images/
    assert a.path.name == "a.jpg" and a.labels == ["scratch", "dent"]
    assert [pytest.approx(box) for box in a.boxes] == [[40, 15, 60, 35], [0, 0, 20, 10]]
    assert b.path.name == "b.png" and b.boxes == [] and b.labels == []


def test_coco_file_and_folder(tmp_path):
    root = tmp_path / "coco"
    make_image(root / "images" / "a.jpg", 80, 60)
    make_image(root / "b.jpg", 80, 60)
    path = coco_json(root / "instances.json",
                     images=[{"id": 1, "file_name": "a.jpg", "width": 80, "height": 60},
                             {"id": 2, "file_name": "b.jpg", "width": 80, "height": 60}],
                     annotations=[{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 5, 20, 30]}],
                     categories=[{"id": 3, "name": "dent"}])
    for where in (root, path):
        records, problems = load_dataset(where)
        assert detect_format(where) == "coco" and len(problems) == 0
        assert [r.path.name for r in records] == ["b.jpg", "a.jpg"]  # sorted by path: images/a.jpg after b.jpg
        assert records[1].boxes == [[10, 5, 30, 35]] and records[1].labels == ["dent"]
        assert records[0].boxes == [] and records[0].original_name == "b.jpg"


def test_forced_format_and_unknown_format(tmp_path):
    root = neu_dataset(tmp_path / "neu", {"inclusion_1": [("inclusion", [1, 1, 9, 9])]})
    records, _ = load_dataset(root / "ANNOTATIONS", fmt="voc")  # XML only: images beside are missing
    assert records == []
    with pytest.raises(DataError, match="unknown dataset format 'pascal'"):
        load_dataset(root, fmt="pascal")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cannot tell the dataset format"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(DataError, match="no such file or folder"):
        load_dataset(tmp_path / "absent")
