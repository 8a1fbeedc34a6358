"""Stratified, seeded splits: files written, read back, selected; known answers on NEU-DET."""
from __future__ import annotations

import json
from collections import Counter

import pytest
from data_factory import neu_dataset

from metaldefect.cli import main
from metaldefect.data import Record, load_dataset, make_split, read_split, select_split
from metaldefect.data.split import cut
from metaldefect.errors import DataError


def records_for(counts: dict[str, int], root="/data"):
    """``counts[class]`` one-box images of each class, as records under ``root``."""
    return [Record(f"{root}/{name}/{index:03d}.jpg", 10, 10, [[0, 0, 5, 5]], [name], "test")
            for name, count in counts.items() for index in range(count)]


def test_cut_keeps_totals_and_ratios():
    assert cut(10, (0.7, 0.2, 0.1)) == [7, 2, 1]
    assert cut(240, (0.7, 0.2, 0.1)) == [168, 48, 24]
    assert cut(2, (0.7, 0.2, 0.1)) == [1, 1, 0]
    assert cut(0, (0.7, 0.2, 0.1)) == [0, 0, 0]


def test_stratified_and_seeded():
    records = records_for({"a": 100, "b": 20, "c": 10})
    split = make_split(records, "/data", (0.7, 0.2, 0.1), seed=42)
    per_class = {name: Counter(path.split("/")[0] for path in paths) for name, paths in split.items()}
    assert per_class == {"train": {"a": 70, "b": 14, "c": 7}, "val": {"a": 20, "b": 4, "c": 2},
                         "test": {"a": 10, "b": 2, "c": 1}}
    assert all(paths == sorted(paths) for paths in split.values())
    assert split == make_split(list(reversed(records)), "/data", (0.7, 0.2, 0.1), seed=42)  # order-free
    assert split != make_split(records, "/data", (0.7, 0.2, 0.1), seed=7)
    assert sorted(p for paths in split.values() for p in paths) == sorted(f"{r.path.parent.name}/{r.path.name}"
                                                                          for r in records)


def test_multi_label_image_goes_by_its_rarest_class():
    records = records_for({"common": 20})
    records += [Record(f"/data/mixed/{i}.jpg", 10, 10, [[0, 0, 5, 5]] * 2, ["common", "rare"], "test")
                for i in range(10)]
    split = make_split(records, "/data", (0.7, 0.2, 0.1), seed=0)
    mixed = {name: sum(p.startswith("mixed/") for p in paths) for name, paths in split.items()}
    assert mixed == {"train": 7, "val": 2, "test": 1}


def test_bad_ratios():
    with pytest.raises(DataError, match="must be three non-negative numbers summing to 1"):
        make_split(records_for({"a": 3}), "/data", (0.5, 0.2, 0.1), seed=1)


def test_select_split(tmp_path):
    records = records_for({"a": 3}, root=str(tmp_path))
    (tmp_path / "val.txt").write_text("# a comment\na/002.jpg\n\na/000.jpg\n")
    names = read_split(tmp_path / "val.txt")
    assert [r.path.name for r in select_split(records, tmp_path, names)] == ["002.jpg", "000.jpg"]
    with pytest.raises(DataError, match=r"val.txt: 1 entries are not in the dataset at .*: a/404.jpg"):
        select_split(records, tmp_path, names + ["a/404.jpg"], split_file=tmp_path / "val.txt")
    with pytest.raises(DataError, match="cannot read split file"):
        read_split(tmp_path / "absent.txt")


def test_cli_split_on_neu_det(neu_root, tmp_path, capsys):
    out = tmp_path / "split"
    assert main(["data", "split", str(neu_root), "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("train: 1008 images")
    lines = {name: (out / f"{name}.txt").read_text().splitlines() for name in ("train", "val", "test")}
    assert {name: len(paths) for name, paths in lines.items()} == {"train": 1008, "val": 288, "test": 144}
    assert lines["train"][0].startswith("IMAGES/") and lines["train"] == sorted(lines["train"])
    info = json.loads((out / "split.json").read_text())
    assert info["seed"] == 42 and info["ratios"] == [0.7, 0.2, 0.1]
    records, _ = load_dataset(neu_root)
    images_per_class = Counter(label for record in records for label in set(record.labels))
    for name, ratio in zip(("train", "val", "test"), (0.7, 0.2, 0.1)):  # every class near its share
        for label, count in info["counts"][name]["images_per_class"].items():
            assert abs(count - ratio * images_per_class[label]) <= 0.05 * images_per_class[label], (name, label)
    chosen = select_split(records, neu_root, read_split(out / "val.txt"))
    assert len(chosen) == 288 and all(r.path.is_file() for r in chosen)
    # same seed, same files
    assert main(["data", "split", str(neu_root), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "train.txt").read_bytes() == (out / "train.txt").read_bytes()


def test_cli_split_relative_to_root_with_tiny_dataset(tmp_path, capsys):
    root = neu_dataset(tmp_path / "neu", {f"scratches_{i}": [("scratches", [1, 1, 9, 9])] for i in range(10)})
    assert main(["data", "split", str(root), "--out", str(tmp_path / "s"), "--ratios", "0.5", "0.5", "0",
                 "--seed", "3"]) == 0
    assert len(read_split(tmp_path / "s" / "train.txt")) == 5 and read_split(tmp_path / "s" / "test.txt") == []
