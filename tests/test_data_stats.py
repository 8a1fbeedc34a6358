"""data stats: the exact counts of the real NEU-DET subset and GC10-DET labels; the plot."""
from __future__ import annotations

import numpy as np
from data_factory import make_image, neu_dataset
from PIL import Image

from metaldefect.cli import main
from metaldefect.data.stats import dataset_stats

NEU_COUNTS = {"crazing": 553, "inclusion": 815, "patches": 705, "pitted_surface": 344,
              "rolled-in_scale": 504, "scratches": 445}


def test_neu_det_counts(neu_root, capsys):
    assert main(["data", "stats", str(neu_root)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.splitlines()
    assert "label files: 1440" in lines and "images: 1440" in lines and "boxes: 3366" in lines
    assert all(f"  {name:<15}  {count}" in lines for name, count in NEU_COUNTS.items())
    assert "boxes per image (boxes: images): 1: 378, 2: 543, 3: 312, 4: 133, 5: 41, 6: 16, 7: 7, 8: 6, 9: 4" in lines
    assert lines[-1] == "problems: 0 (0 fixed, 0 skipped or dropped)"


def test_gc10_labels_only(gc10_labels, tmp_path, capsys):
    (tmp_path / "lable").symlink_to(gc10_labels)
    assert main(["data", "stats", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"warning: {tmp_path / 'lable' / 'img_02_425616500_00770.xml'}: object 2: unknown class 'd'; dropped"]
    lines = captured.out.splitlines()
    assert "label files: 2280" in lines and "boxes: 3541" in lines
    assert "images: 0  (no images found: statistics from the labels only)" in lines
    assert "  waist_folding  142" in lines  # 131 spelled 10_yaozhed + 11 spelled 10_yaozhe
    assert "  rolled_pit     83" in lines and not any("yaozhe" in line for line in lines)
    assert lines[-1] == "problems: 1 (0 fixed, 1 skipped or dropped)"


def test_box_size_summary_and_missing_image_when_others_exist(tmp_path):
    root = neu_dataset(tmp_path / "neu", {"scratches_1": [("scratches", [0, 0, 50, 100])],
                                          "scratches_2": [("scratches", [0, 0, 100, 50]), ("inclusion", [0, 0, 20, 20])]})
    (root / "IMAGES" / "scratches_2.jpg").unlink()
    stats = dataset_stats(root)
    assert (stats.label_files, stats.images, stats.boxes) == (2, 1, 3)
    assert stats.boxes_per_class == {"inclusion": 1, "scratches": 2} and stats.boxes_per_image == {1: 1, 2: 1}
    assert np.allclose(stats.box_sizes, [[50, 100, 0.125, 0.5], [100, 50, 0.125, 2], [20, 20, 0.01, 1]])
    assert [str(p) for p in stats.problems] == [
        f"{root / 'IMAGES' / 'scratches_2.jpg'}: image not found for label scratches_2.xml; "
        "counted in these statistics but not usable for training"]


def test_plot_is_a_png(tmp_path, capsys):
    root = neu_dataset(tmp_path / "neu", {"scratches_1": [("scratches", [0, 0, 50, 100])]})
    make_image(root / "IMAGES" / "orphan.jpg")
    out = tmp_path / "plots" / "stats.png"
    assert main(["data", "stats", str(root), "--plot", str(out)]) == 0
    assert f"plot: {out}" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (1200, 900)
