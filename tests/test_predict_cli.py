"""``metaldefect predict`` and ``metaldefect demo``: outputs on disk, exit codes, one line per bad input."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from inference_factory import CLASSES, make_run, textured
from PIL import Image

from metaldefect.cli import main
from metaldefect.inference import builtin


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "tiny_dense", seed=2)


@pytest.fixture
def images(tmp_path):
    """A folder of images of several kinds, nested, plus a text file that is not an image."""
    folder = tmp_path / "plates"
    (folder / "line2").mkdir(parents=True)
    Image.fromarray(textured(200, 200, seed=1)[:, :, 0]).save(folder / "gray.png")
    Image.fromarray(textured(120, 180, seed=2)).save(folder / "rgb.jpg")
    Image.fromarray(textured(64, 96, seed=3)).save(folder / "line2" / "scan.bmp")
    Image.fromarray((textured(80, 80, seed=4)[:, :, 0].astype(np.uint16) * 257)).save(folder / "line2" / "deep.tif")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"junk a camera tool left")
    return folder


def predict(args, *extra):
    return main(["predict", *map(str, args), *map(str, extra)])


def test_predict_folder_writes_json_csv_and_annotated_images(images, run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert predict([images], "--model", run_dir, "--out", out, "--conf", "0.4") == 0
    captured = capsys.readouterr()
    assert "4 images" in captured.out and "error" not in captured.err and "Traceback" not in captured.err
    names = {"gray": (200, 200), "rgb": (180, 120), "line2__scan": (96, 64), "line2__deep": (80, 80)}
    assert sorted(p.stem for p in (out / "json").glob("*.json")) == sorted(names)
    for name, (width, height) in names.items():
        record = json.loads((out / "json" / f"{name}.json").read_text())
        assert (record["width"], record["height"]) == (width, height)
        assert record["model"] == "tiny_dense" and record["score_threshold"] == 0.4
        for detection in record["detections"]:
            x1, y1, x2, y2 = detection["box"]
            assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
            assert detection["label"] in CLASSES and detection["score"] >= 0.4
        with Image.open(out / "annotated" / f"{name}.png") as picture:
            factor = -(-512 // max(width, height))
            assert picture.size == (width * factor, height * factor)
    with open(out / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["name"] for r in rows) == sorted(names)
    assert set(CLASSES) <= set(rows[0])
    total = sum(int(r["detections"]) for r in rows)
    with open(out / "detections.csv") as handle:
        assert len(list(csv.DictReader(handle))) == total > 0
    assert not list(out.rglob("*.tmp")) and not (out / "report.html").exists()


def test_annotated_image_shows_class_coloured_boxes(run_dir, tmp_path):
    Image.new("L", (200, 200), 0).save(tmp_path / "black.png")
    options = ["--model", run_dir, "--out", tmp_path / "out", "--tile", "off"]
    assert predict([tmp_path / "black.png"], *options, "--conf", "0.0") == 0
    top = json.loads((tmp_path / "out" / "json" / "black.json").read_text())["detections"][0]["score"]
    assert predict([tmp_path / "black.png"], *options, "--conf", str(top - 1e-4)) == 0
    (best,) = json.loads((tmp_path / "out" / "json" / "black.json").read_text())["detections"]
    picture = np.asarray(Image.open(tmp_path / "out" / "annotated" / "black.png").convert("RGB"))
    assert picture.shape == (600, 600, 3)  # 200 px is drawn 3x larger
    x1, y1, x2, y2 = (int(v * 3) for v in best["box"])
    colour = class_rgb(best["label"])
    for row in (y1, y2):  # the top and bottom edges, within a pixel of the box, at the middle column
        assert any(tuple(picture[r, (x1 + x2) // 2]) == colour for r in range(max(row - 1, 0), min(row + 2, 600)))
    assert (picture == 0).all(axis=2).mean() > 0.5  # the rest stays the black image


def class_rgb(label):
    from metaldefect.inference.outputs import class_colour

    hexa = class_colour(label, CLASSES)
    return tuple(int(hexa[i:i + 2], 16) for i in (1, 3, 5))


def test_unreadable_files_are_skipped_with_one_line_each_and_exit_3(images, run_dir, tmp_path, capsys):
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    out = tmp_path / "out"
    status = predict([images, images / "notes.txt", tmp_path / "absent.png"], "--model", run_dir, "--out", out)
    err = capsys.readouterr().err
    assert status == 3
    lines = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(lines) == 3
    assert any("broken.jpg" in line and "unreadable image" in line for line in lines)
    assert any("notes.txt" in line and "unreadable image" in line for line in lines)
    assert any("absent.png" in line and "no such file or folder" in line for line in lines)
    assert "Traceback" not in err and "3 inputs skipped" in err
    assert len(list((out / "json").glob("*.json"))) == 4  # the readable ones are all there


def test_empty_folder_and_no_images_exit_2(run_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("hello")
    assert predict([tmp_path / "empty", tmp_path / "docs"], "--model", run_dir, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "empty: no images (jpg, jpeg, png, bmp, tif, tiff) in this folder" in err
    assert err.strip().splitlines()[-1].startswith("error: no images to predict on")
    assert not (tmp_path / "o").exists()


def test_an_empty_folder_beside_images_is_skipped_with_exit_3(images, run_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert predict([images, tmp_path / "empty"], "--model", run_dir, "--out", tmp_path / "o", "--no-images") == 3
    assert "no images" in capsys.readouterr().err
    assert not (tmp_path / "o" / "annotated").exists() and (tmp_path / "o" / "summary.csv").is_file()


@pytest.mark.parametrize("model, message", [
    ("missing_run", "no such run directory or model file"),
    ("corrupt_run", "cannot read checkpoint"),
    ("nonsense.txt", "not a model"),
    ("absent.onnx", "ONNX model file not found"),
])
def test_bad_models_exit_2_with_one_line(images, tmp_path, capsys, model, message):
    (tmp_path / "corrupt_run").mkdir()
    (tmp_path / "corrupt_run" / "checkpoint_best.pt").write_bytes(b"PK\x03\x04 half a zip")
    (tmp_path / "nonsense.txt").write_text("x")
    assert predict([images], "--model", tmp_path / model, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_bad_options_exit_2(images, run_dir, tmp_path, capsys):
    assert predict([images], "--model", run_dir, "--conf", "1.5", "--out", tmp_path / "o") == 2
    assert "score threshold 1.5" in capsys.readouterr().err
    assert predict([images], "--model", run_dir, "--tile", "big", "--out", tmp_path / "o") == 2
    assert "tile 'big'" in capsys.readouterr().err
    assert predict([images], "--model", run_dir, "--overlap", "0.95", "--out", tmp_path / "o") == 2
    assert "overlap" in capsys.readouterr().err
    assert predict([images], "--model", run_dir, "--threads", "0", "--out", tmp_path / "o") == 2
    assert "threads 0" in capsys.readouterr().err
    assert predict([images], "--model", run_dir, "--batch-size", "0", "--out", tmp_path / "o") == 2
    assert "batch size 0" in capsys.readouterr().err
    onnx_bf16 = ["--backend", "onnx", "--precision", "bf16"]
    assert predict([images], "--model", run_dir, *onnx_bf16, "--out", tmp_path / "o") == 2
    assert "bf16 runs on the torch backend only" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_no_builtin_model_is_one_clear_line(images, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(builtin, "BUILTIN_DIR", tmp_path / "none")
    assert predict([images], "--out", tmp_path / "o") == 2
    assert capsys.readouterr().err.strip() == (
        "error: no built-in model is packaged in this build; pass --model RUN (a training run directory)")
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2


def test_html_report_is_self_contained(images, run_dir, tmp_path):
    assert predict([images], "--model", run_dir, "--out", tmp_path / "o", "--html", "--conf", "0.5") == 0
    page = (tmp_path / "o" / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 4
    assert "http://" not in page and "https://" not in page and "<link" not in page
    assert "tiny_dense" in page and all(name in page for name in ("gray", "rgb", "line2__scan"))


def test_demo_runs_the_packaged_model_on_the_samples(run_dir, tmp_path, monkeypatch, capsys):
    folder = builtin.package_run(run_dir, tmp_path / "builtin_model", command="metaldefect train cfg.yaml")
    monkeypatch.setattr(builtin, "BUILTIN_DIR", folder)
    out = tmp_path / "metaldefect-demo"
    assert main(["demo", "--out", str(out)]) == 0
    samples = builtin.sample_images()
    assert sorted(p.stem for p in (out / "annotated").glob("*.png")) == sorted(s.stem for s in samples)
    assert sorted(p.stem for p in (out / "json").glob("*.json")) == sorted(s.stem for s in samples)
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(samples)
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out
