"""data merge: the paper's 11-class dataset, its manifest, and byte-identical re-runs."""
from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest
from data_factory import gc10_placeholders, make_image, neu_dataset, voc_text, write_text

from metaldefect.cli import main
from metaldefect.data import load_dataset
from metaldefect.data.merge import PAPER_CLASSES, merge_paper_dataset
from metaldefect.errors import DataError


def read_manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def gc10_placeholder_root(gc10_labels, tmp_path_factory):
    """All 2280 real GC10-DET labels, each with a placeholder image of the labelled size."""
    return gc10_placeholders(gc10_labels, tmp_path_factory.mktemp("gc10"))


@pytest.fixture
def small_inputs(tmp_path):
    neu = neu_dataset(tmp_path / "neu", {
        "crazing_1": [("crazing", [1, 1, 50, 50])],
        "inclusion_1": [("inclusion", [1, 1, 50, 50])],
        "patches_1": [("patches", [1, 1, 50, 50]), ("inclusion", [60, 60, 90, 90])],
        "rolled-in_scale_1": [("rolled-in_scale", [1, 1, 50, 50])],
    })
    gc10 = tmp_path / "gc10"
    for stem, objects in {"g1": [("8_yahen", [0, 0, 9, 9]), ("6_siban", [10, 10, 90, 70]), ("7_yiwu", [5, 5, 30, 30])],
                          "g2": [("8_yahen", [0, 0, 9, 9])],
                          "g3": [("7_yiwu", [1, 1, 20, 20])]}.items():
        write_text(gc10 / "lable" / f"{stem}.xml", voc_text(f"{stem}.jpg", objects, 100, 80))
        make_image(gc10 / "6" / f"{stem}.jpg", 100, 80)
    return neu, gc10


def test_small_merge_names_counts_and_manifest(small_inputs, tmp_path):
    neu, gc10 = small_inputs
    result = merge_paper_dataset(neu, gc10, tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out" / "JPEGImages").iterdir())
    # NEU first, then GC10; an image is named after its first kept object (g1: silk_spot)
    assert names == ["inclusion (1).jpg", "inclusion (2).jpg", "inclusion (3).jpg",
                     "rolled_in_scale (1).jpg", "silk_spot (1).jpg"]
    assert result.images_per_class["inclusion"] == 3 and result.boxes_per_class["silk_spot"] == 1
    assert result.excluded_objects == Counter({"crazing": 1, "patches": 1, "rolled_pit": 2})
    assert result.excluded_images == 2
    rows = read_manifest(tmp_path / "out")
    images = {row["output"]: row["source"] for row in rows if row["status"] == "image"}
    assert images["JPEGImages/inclusion (2).jpg"] == "IMAGES/patches_1.jpg"
    assert images["JPEGImages/inclusion (3).jpg"] == "6/g3.jpg"
    assert images["JPEGImages/silk_spot (1).jpg"] == "6/g1.jpg"
    annotations = {row["output"]: row["source"] for row in rows if row["status"] == "annotation"}
    assert annotations["Annotations/silk_spot (1).xml"] == "lable/g1.xml"
    excluded = [(row["dataset"], row["source"], row["class"]) for row in rows if row["status"] == "excluded_image"]
    assert excluded == [("neu-det", "IMAGES/crazing_1.jpg", "crazing"), ("gc10-det", "6/g2.jpg", "rolled_pit")]
    records, problems = load_dataset(tmp_path / "out")
    assert len(problems) == 0
    g1 = next(r for r in records if r.path.name == "silk_spot (1).jpg")
    assert g1.labels == ["silk_spot", "inclusion"] and g1.boxes == [[10, 10, 90, 70], [5, 5, 30, 30]]


def test_merge_refuses_a_non_empty_folder(small_inputs, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        merge_paper_dataset(*small_inputs, tmp_path / "out")
    assert main(["data", "merge", "--neu", str(small_inputs[0]), "--gc10", str(small_inputs[1]),
                 "--out", str(tmp_path / "out")]) == 2


def test_merge_needs_images(small_inputs, tmp_path):
    neu, gc10 = small_inputs
    for image in (gc10 / "6").iterdir():
        image.unlink()
    with pytest.raises(DataError, match=r"gc10: no usable gc10-det image \(3 problems, e.g. .*g1.xml: no image found"):
        merge_paper_dataset(neu, gc10, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_merge_of_the_real_datasets(neu_root, gc10_placeholder_root, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["data", "merge", "--neu", str(neu_root), "--gc10", str(gc10_placeholder_root), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"warning: {gc10_placeholder_root / 'lable' / 'img_02_425616500_00770.xml'}: object 2: unknown class 'd'; dropped"]
    report = captured.out.splitlines()
    assert [line.split()[0] for line in report[2:13]] == list(PAPER_CLASSES)
    # the kept classes' boxes: NEU inclusion 815 + GC10 inclusion 344; GC10 3541 usable minus 83 rolled_pit
    assert report[4].split() == ["inclusion", report[4].split()[1], str(815 + 344)]
    assert report[13].split()[0] == "total" and int(report[13].split()[2]) == 815 + 504 + 445 + 3541 - 83
    assert "excluded objects: crazing 553, patches 705, pitted_surface 344, rolled_pit 83" in report

    records, problems = load_dataset(out)
    assert len(problems) == 0
    assert sorted({label for r in records for label in r.labels}) == list(PAPER_CLASSES)
    assert all(r.path.name.startswith(f"{r.labels[0]} (") for r in records)
    assert {r.path.stem.rsplit(" (", 1)[0] for r in records} == set(PAPER_CLASSES)

    rows = read_manifest(out)
    rolled_pit = [row for row in rows if row["status"] == "excluded_object" and row["class"] == "rolled_pit"]
    assert len(rolled_pit) == 83 and all(row["reason"] == "rolled_pit is not one of the paper's 11 classes"
                                         for row in rolled_pit)
    assert [row["source"] for row in rows if row["status"] == "problem"] == ["lable/img_02_425616500_00770.xml"]
    assert sum(row["status"] == "image" for row in rows) == len(records)
    assert sum(row["status"] == "excluded_image" for row in rows) + len(records) == 1440 + 2280

    again = tmp_path / "again"
    merge_paper_dataset(neu_root, gc10_placeholder_root, again)
    assert tree_bytes(again) == tree_bytes(out)
