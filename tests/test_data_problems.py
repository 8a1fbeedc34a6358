"""Bad input: each problem gets one line naming the file, the rest still loads; --strict stops."""
from __future__ import annotations

import pytest
from data_factory import coco_json, make_image, neu_dataset, voc_text, write_text

from metaldefect.cli import main
from metaldefect.data import load_dataset
from metaldefect.errors import DataError

GOOD = {"inclusion_1": [("inclusion", [10, 10, 50, 50])]}

BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<annotation><filename>&lol3;</filename></annotation>
"""
EXTERNAL_ENTITY = """<?xml version="1.0"?>
<!DOCTYPE annotation [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<annotation><filename>&secret;</filename></annotation>
"""


def load_with(tmp_path, stem, xml_text=None, objects=None, image=True):
    """A NEU-DET root holding one good image plus one case; returns (records, problems, root)."""
    root = neu_dataset(tmp_path / "neu", GOOD)
    if image:
        make_image(root / "IMAGES" / f"{stem}.jpg", 200, 200)
    if xml_text is None and objects is not None:
        xml_text = voc_text(f"{stem}.jpg", objects, 200, 200)
    if xml_text is not None:
        write_text(root / "ANNOTATIONS" / f"{stem}.xml", xml_text)
    records, problems = load_dataset(root)
    return records, problems, root


def only(problems):
    assert len(problems) == 1, [str(p) for p in problems]
    return list(problems)[0]


def test_malformed_xml(tmp_path):
    records, problems, root = load_with(tmp_path, "scratches_1", "<annotation><object>", image=False)
    problem = only(problems)
    assert problem.file == str(root / "ANNOTATIONS" / "scratches_1.xml")
    assert problem.message.startswith("malformed XML") and problem.kind == "error"
    assert [r.stem for r in records] == ["inclusion_1"]


@pytest.mark.parametrize("hostile", [BILLION_LAUGHS, EXTERNAL_ENTITY])
def test_hostile_xml_is_refused(tmp_path, hostile):
    records, problems, _ = load_with(tmp_path, "scratches_1", hostile, image=False)
    assert only(problems).message.startswith("unsafe XML refused")
    assert [r.stem for r in records] == ["inclusion_1"]


def test_label_without_image(tmp_path):
    records, problems, root = load_with(tmp_path, "scratches_1", objects=[("scratches", [1, 1, 9, 9])], image=False)
    problem = only(problems)
    assert problem.file == str(root / "ANNOTATIONS" / "scratches_1.xml")
    assert problem.message == "no image found for this label (expected scratches_1.jpg); skipped"
    assert [r.stem for r in records] == ["inclusion_1"]


def test_image_without_label(tmp_path):
    records, problems, root = load_with(tmp_path, "scratches_1")
    assert str(only(problems)) == f"{root / 'IMAGES' / 'scratches_1.jpg'}: image has no label file; skipped"
    assert [r.stem for r in records] == ["inclusion_1"]


def test_box_outside_image_is_clipped(tmp_path):
    records, problems, _ = load_with(tmp_path, "scratches_1", objects=[("scratches", [-5, 20, 230, 60])])
    problem = only(problems)
    assert problem.kind == "fixed"
    assert problem.message == "object 1: box [-5, 20, 230, 60] reaches outside the 200x200 image; clipped to [0, 20, 200, 60]"
    assert records[1].boxes == [[0, 20, 200, 60]]


def test_inverted_box_is_swapped(tmp_path):
    records, problems, _ = load_with(tmp_path, "scratches_1", objects=[("scratches", [90, 80, 10, 20])])
    assert only(problems).kind == "fixed" and "inverted box [90, 80, 10, 20]; corners swapped" in only(problems).message
    assert records[1].boxes == [[10, 20, 90, 80]]


@pytest.mark.parametrize("box", [[30, 30, 30, 60], [210, 10, 250, 40]])  # zero width; wholly outside
def test_zero_area_box_is_dropped(tmp_path, box):
    records, problems, _ = load_with(tmp_path, "scratches_1", objects=[("scratches", box), ("scratches", [1, 1, 9, 9])])
    problem = only(problems)
    assert problem.kind == "error" and "object 1: box" in problem.message and "zero area" in problem.message
    assert records[1].boxes == [[1, 1, 9, 9]]


def test_unknown_class_in_neu(tmp_path):
    records, problems, _ = load_with(tmp_path, "scratches_1", objects=[("rust", [1, 1, 9, 9]), ("scratches", [2, 2, 9, 9])])
    assert only(problems).message == "object 1: unknown class 'rust'; dropped"
    assert records[1].labels == ["scratches"]


def test_unknown_class_in_yolo_and_coco(tmp_path):
    yolo = tmp_path / "yolo"
    write_text(yolo / "classes.txt", "dent\n")
    make_image(yolo / "images" / "a.jpg")
    write_text(yolo / "labels" / "a.txt", "3 0.5 0.5 0.1 0.1\n0 0.5 0.5 0.1 0.1\nnot a box\n")
    records, problems = load_dataset(yolo)
    assert [p.message for p in problems] == [
        "line 1: unknown class 3 (the class list has 1); dropped",
        "line 3: expected '<class> <cx> <cy> <w> <h>', got 'not a box'; dropped"]
    assert records[0].labels == ["dent"]

    make_image(tmp_path / "coco" / "a.jpg")
    coco_json(tmp_path / "coco" / "c.json", images=[{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}],
              annotations=[{"id": 1, "image_id": 1, "category_id": 9, "bbox": [1, 1, 5, 5]},
                           {"id": 2, "image_id": 7, "category_id": 1, "bbox": [1, 1, 5, 5]}],
              categories=[{"id": 1, "name": "dent"}])
    records, problems = load_dataset(tmp_path / "coco")
    assert [p.message for p in problems] == [
        "annotation 1: unknown class (category id 9); dropped",
        "annotation 2: image id 7 is not listed in 'images'; dropped"]
    assert len(records) == 1 and records[0].boxes == []


def test_unreadable_image(tmp_path):
    root = neu_dataset(tmp_path / "neu", GOOD)
    write_text(root / "ANNOTATIONS" / "scratches_1.xml", voc_text("scratches_1.jpg", [("scratches", [1, 1, 9, 9])], 200, 200))
    (root / "IMAGES" / "scratches_1.jpg").write_bytes(b"not a jpeg at all")
    records, problems = load_dataset(root)
    problem = only(problems)
    assert problem.file == str(root / "IMAGES" / "scratches_1.jpg") and problem.message.startswith("unreadable image")
    assert [r.stem for r in records] == ["inclusion_1"]


def test_malformed_coco_json(tmp_path):
    write_text(tmp_path / "c.json", "{not json")
    records, problems = load_dataset(tmp_path / "c.json")
    assert records == [] and only(problems).message.startswith("cannot read COCO json (JSONDecodeError")


def test_strict_raises_at_first_problem(tmp_path):
    root = neu_dataset(tmp_path / "neu", GOOD)
    write_text(root / "ANNOTATIONS" / "scratches_1.xml", "<annotation>")
    with pytest.raises(DataError, match="scratches_1.xml: malformed XML"):
        load_dataset(root, strict=True)


def test_cli_reports_each_problem_on_one_line_and_strict_exits_2(tmp_path, capsys):
    root = neu_dataset(tmp_path / "neu", GOOD)
    write_text(root / "ANNOTATIONS" / "scratches_1.xml", BILLION_LAUGHS)
    make_image(root / "IMAGES" / "patches_1.jpg", 200, 200)

    assert main(["data", "stats", str(root)]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"warning: {root / 'ANNOTATIONS' / 'scratches_1.xml'}: unsafe XML refused (EntitiesForbidden: entity "
        "declarations and external references are not allowed); skipped",
        f"warning: {root / 'IMAGES' / 'patches_1.jpg'}: image has no label file; skipped"]
    assert "images: 1\n" in captured.out and "problems: 2 (0 fixed, 2 skipped or dropped)" in captured.out

    assert main(["data", "stats", str(root), "--strict"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    assert captured.err.startswith("error: ") and "Traceback" not in captured.err


def test_yolo_label_without_image_and_top_level_lists_ignored(tmp_path):
    root = tmp_path / "yolo"
    write_text(root / "data.yaml", "names: [dent]\n")
    write_text(root / "train.txt", "images/a.jpg\n")  # an image list, not a label
    make_image(root / "images" / "a.jpg")
    write_text(root / "labels" / "a.txt", "0 0.5 0.5 0.2 0.2\n")
    write_text(root / "labels" / "lost.txt", "0 0.5 0.5 0.2 0.2\n")
    records, problems = load_dataset(root)
    assert [r.path.name for r in records] == ["a.jpg"]
    assert str(only(problems)) == (f"{root / 'labels' / 'lost.txt'}: no image found for this label "
                                   "(YOLO boxes need the image's size); skipped")
