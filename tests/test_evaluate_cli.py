"""`metaldefect evaluate` end to end on a tiny run: files written, numbers from pycocotools."""
import json

from data_factory import neu_dataset
from inference_factory import CLASSES, make_run

from metaldefect.cli import main


def test_evaluate_on_dataset_folder_writes_report(tmp_path, capsys):
    run_dir = make_run(tmp_path / "run")
    data_root = neu_dataset(tmp_path / "data", {
        f"img{i}": [(CLASSES[i % 3], [10 + i, 20, 90, 120 + i]), ("patches", [5, 5, 50, 50])]
        for i in range(4)})
    out = tmp_path / "eval"
    assert main(["evaluate", str(run_dir), "--data", str(data_root), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 4
    assert sum(c["ground_truth"] for c in metrics["per_class"].values()) == 4  # patches: not a class of the model
    assert 0.0 <= metrics["map"] <= metrics["map50"] <= 1.0
    assert (out / "pr_curves.png").stat().st_size > 0 and (out / "confusion.png").stat().st_size > 0
    captured = capsys.readouterr()
    assert "mAP@0.5" in captured.out
    assert "4 labelled objects are of classes the model does not know" in captured.err


def test_evaluate_needs_a_run_with_a_split(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path), "--split", "val"]) == 2
    assert "not a training run" in capsys.readouterr().err
