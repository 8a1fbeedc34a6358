"""Writers: VOC, YOLO and COCO written and read back; nothing half-written; the NEU-DET round trip."""
from __future__ import annotations

import json

import numpy as np
import pytest
from data_factory import make_image

from metaldefect.cli import main
from metaldefect.data import Record, load_dataset, write_coco, write_voc, write_yolo
from metaldefect.errors import DataError

CLASSES = ["dent", "scratch"]


def sample_records(tmp_path):
    return [
        Record(make_image(tmp_path / "src" / "a.jpg", 100, 50), 100, 50,
               [[10.0, 5.0, 40.0, 45.0], [50.0, 0.0, 100.0, 20.0]], ["scratch", "dent"], "test", "a.xml"),
        Record(make_image(tmp_path / "src" / "b.png", 64, 48, "RGB"), 64, 48, [], [], "test", "b.xml"),
    ]


def assert_same_objects(read, written, tolerance):
    assert [r.path.name for r in read] == [r.path.name for r in written]
    for got, want in zip(read, written):
        assert (got.width, got.height, got.labels) == (want.width, want.height, want.labels)
        assert np.allclose(np.array(got.boxes).reshape(-1, 4), np.array(want.boxes).reshape(-1, 4), atol=tolerance)


def test_write_voc_reads_back(tmp_path):
    records = sample_records(tmp_path)
    write_voc(records, tmp_path / "out")
    assert (tmp_path / "out" / "JPEGImages" / "a.jpg").read_bytes() == records[0].path.read_bytes()
    assert "<depth>1</depth>" in (tmp_path / "out" / "Annotations" / "a.xml").read_text()
    assert "<depth>3</depth>" in (tmp_path / "out" / "Annotations" / "b.xml").read_text()
    read, problems = load_dataset(tmp_path / "out")
    assert len(problems) == 0
    assert_same_objects(read, records, 0)


def test_write_voc_renames_images(tmp_path):
    records = sample_records(tmp_path)
    write_voc(records, tmp_path / "out", image_names=["dent (1).jpg", "dent (2).png"])
    read, _ = load_dataset(tmp_path / "out")
    assert [r.path.name for r in read] == ["dent (1).jpg", "dent (2).png"]


def test_write_yolo_reads_back(tmp_path):
    records = sample_records(tmp_path)
    write_yolo(records, tmp_path / "out", CLASSES)
    assert (tmp_path / "out" / "labels" / "a.txt").read_text().splitlines()[0] == "1 0.250000 0.500000 0.300000 0.800000"
    assert (tmp_path / "out" / "labels" / "b.txt").read_text() == ""
    read, problems = load_dataset(tmp_path / "out")
    assert len(problems) == 0
    assert_same_objects(read, records, 1e-3)


def test_write_coco_references_images(tmp_path):
    records = sample_records(tmp_path)
    write_coco(records, tmp_path / "out" / "coco.json", CLASSES)
    data = json.loads((tmp_path / "out" / "coco.json").read_text())
    assert [image["file_name"] for image in data["images"]] == ["../src/a.jpg", "../src/b.png"]
    assert data["categories"] == [{"id": 1, "name": "dent", "supercategory": "defect"},
                                  {"id": 2, "name": "scratch", "supercategory": "defect"}]
    assert data["annotations"][0]["bbox"] == [10.0, 5.0, 30.0, 40.0] and data["annotations"][0]["category_id"] == 2
    read, problems = load_dataset(tmp_path / "out" / "coco.json")
    assert len(problems) == 0
    assert_same_objects(read, records, 0)


def test_writers_check_everything_before_writing(tmp_path):
    records = sample_records(tmp_path)
    with pytest.raises(DataError, match="class 'scratch' is not in the class list"):
        write_yolo(records, tmp_path / "yolo", ["dent"])
    with pytest.raises(DataError, match="class 'scratch' is not in the class list"):
        write_coco(records, tmp_path / "c.json", ["dent"])
    records[1].path.unlink()
    with pytest.raises(DataError, match="b.png: image file not found"):
        write_voc(records, tmp_path / "voc")
    assert not (tmp_path / "yolo").exists() and not (tmp_path / "c.json").exists() and not (tmp_path / "voc").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no staging folder left behind


def test_writers_refuse_a_non_empty_folder_unless_overwrite(tmp_path):
    records = sample_records(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="folder exists and is not empty"):
        write_voc(records, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    write_voc(records, tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["Annotations", "JPEGImages"]


def test_round_trip_voc_coco_yolo_voc_on_neu_det(neu_root, tmp_path):
    original, problems = load_dataset(neu_root)
    assert len(original) == 1440 and len(problems) == 0
    classes = sorted({label for record in original for label in record.labels})
    write_coco(original, tmp_path / "coco" / "neu.json", classes)
    from_coco, problems = load_dataset(tmp_path / "coco" / "neu.json")
    assert len(problems) == 0
    write_yolo(from_coco, tmp_path / "yolo", classes)
    from_yolo, problems = load_dataset(tmp_path / "yolo")
    assert len(problems) == 0
    write_voc(from_yolo, tmp_path / "voc")
    final, problems = load_dataset(tmp_path / "voc")
    assert len(problems) == 0
    assert sum(len(r.boxes) for r in final) == 3366
    assert_same_objects(final, original, 1.0)


def test_cli_convert(tmp_path, capsys):
    records = sample_records(tmp_path)
    write_voc(records, tmp_path / "voc")
    assert main(["data", "convert", str(tmp_path / "voc"), "--to", "yolo", "--out", str(tmp_path / "yolo")]) == 0
    assert "wrote 2 images (2 classes) as yolo" in capsys.readouterr().out
    read, _ = load_dataset(tmp_path / "yolo")
    assert_same_objects(read, records, 1e-3)
