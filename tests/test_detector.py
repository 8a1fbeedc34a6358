"""Detector: loading runs and the built-in model, images of every kind, boxes in original pixels, bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from inference_factory import CLASSES, make_run, textured
from PIL import Image
from safetensors.torch import load_file
from torchvision.ops import box_iou

from metaldefect.data.transforms import to_input_tensor
from metaldefect.errors import DataError, MetalDefectError, WeightsError
from metaldefect.inference import builtin
from metaldefect.inference.detector import Detector


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "tiny_dense")


@pytest.fixture(scope="module")
def detector(run_dir):
    return Detector.load(run_dir, conf=0.5, tile="off")  # tiling is test_tiling's


def as_tuples(detections):
    return [(d.label, round(d.score, 5), [round(v, 2) for v in d.box]) for d in detections]


def test_loads_a_run_with_its_classes_and_card(detector, run_dir):
    assert detector.classes == CLASSES
    assert detector.input_size == 32
    assert detector.backend == "torch" and detector.task == "detect"
    card = detector.card
    assert card["name"] == "tiny_dense"
    assert card["backbone"] == "vit_tiny_patch16_224" and card["head"] == "dense"
    assert card["split"]["seed"] == 42 and card["split"]["images"] == {"train": 7, "val": 2, "test": 1}
    assert card["metrics"]["test"] == {"loss": 1.6, "map50": 0.2}
    assert card["training_command"] == f"metaldefect train {run_dir / 'config.yaml'}"


def test_boxes_are_pixels_of_the_original_image(detector):
    image = textured(90, 150, seed=1)  # height 90, width 150: not square, not the input size
    detections = detector.predict(image)
    assert detections
    model = detector.network.model
    with torch.no_grad():
        outputs = model(to_input_tensor(image, 32)[None])
    expected = model.head.decode(outputs, [(150, 90)], CLASSES, score_threshold=0.5)[0]
    assert as_tuples(detections) == as_tuples(expected)
    boxes = np.array([d.box for d in detections])
    assert boxes[:, [0, 2]].max() <= 150 and boxes[:, [1, 3]].max() <= 90 and boxes.min() >= 0
    assert boxes[:, [0, 2]].max() > 90  # x spans the whole width, not the 32 px input or the height
    assert all(d.score >= 0.5 for d in detections)
    assert [d.score for d in detections] == sorted((d.score for d in detections), reverse=True)


def test_every_kind_of_image_gives_the_same_detections(detector, tmp_path):
    image = textured(60, 80, seed=2)
    image[0, 0], image[0, 1] = 0, 255  # full range: stretching a 16-bit or float copy gives the same pixels
    gray = image[:, :, 0]
    reference = as_tuples(detector.predict(image))
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(image).save(tmp_path / "rgb.bmp")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "deep.png")  # 16-bit, same picture
    rgba = np.concatenate([image, np.full((60, 80, 1), 255, np.uint8)], axis=2)
    for source in (gray, gray[:, :, None], rgba, Image.fromarray(image), Image.fromarray(gray),
                   tmp_path / "gray.png", str(tmp_path / "rgb.bmp"), tmp_path / "deep.png"):
        assert as_tuples(detector.predict(source)) == reference, type(source)
    # A float array is stretched from its own range, like a 16-bit file.
    stretched = gray.astype(np.float32) / 255.0 * 3.0 - 1.0
    assert as_tuples(detector.predict(stretched)) == reference


def test_predict_batch_matches_one_by_one_and_conf_filters(detector):
    images = [textured(40, 70, seed=s) for s in range(3)] + [textured(100, 50, seed=9)]
    batched = detector.predict_batch(images)
    assert [as_tuples(d) for d in batched] == [as_tuples(detector.predict(i)) for i in images]
    loose = detector.predict(images[0], conf=0.0)
    strict = detector.predict(images[0], conf=0.7)
    assert len(strict) < len(loose)
    assert all(d.score >= 0.7 for d in strict)
    assert detector.score_threshold() == 0.5 and detector.score_threshold(0.2) == 0.2


def floating_tensors(outputs) -> list[torch.Tensor]:
    """Every floating tensor in a head's outputs, nested dicts and lists (an ensemble's members) included."""
    if isinstance(outputs, torch.Tensor):
        return [outputs] if outputs.is_floating_point() else []
    values = outputs.values() if isinstance(outputs, dict) else outputs if isinstance(outputs, (list, tuple)) else []
    return [tensor for value in values for tensor in floating_tensors(value)]


@pytest.mark.parametrize("head", ["dense", "dense_ensemble"])
def test_bf16_precision_runs_the_network_in_bf16_and_keeps_the_detections(head, tmp_path):
    options = {} if head == "dense" else dict(members=2, scales=[2.0, 1.0], channels=32, max_detections=20)
    run_dir = make_run(tmp_path / head, head=head, **options)
    exact = Detector.load(run_dir, conf=0.5, tile="off")
    fast = Detector.load(run_dir, conf=0.5, tile="off", precision="bf16")
    assert fast.dtype == torch.bfloat16 and exact.dtype == torch.float32
    image = textured(90, 150, seed=1)
    outputs = floating_tensors(fast.network(to_input_tensor(image, 32)[None]))
    reference = floating_tensors(exact.network(to_input_tensor(image, 32)[None]))
    assert outputs and all(tensor.dtype == torch.float32 for tensor in outputs)  # decoded as float32
    assert not all(torch.equal(a, b) for a, b in zip(outputs, reference))  # bf16 arithmetic really ran...
    for a, b in zip(outputs, reference):
        torch.testing.assert_close(a, b, atol=0.1, rtol=0.05)  # ...to within bf16's precision
    # This random head scores many boxes nearly alike, so a bf16 rounding can swap two, move one across the
    # threshold (0.5) or change which one NMS keeps: nearly every bf16 detection must have a float32 one of its
    # class, scored above 0.4, in nearly the same place and with nearly the same score.
    expected, found = exact.predict(image, conf=0.4), fast.predict(image)
    matched = 0
    for d in found:
        same_class = [e for e in expected if e.label == d.label]
        overlaps = box_iou(torch.tensor([d.box]), torch.tensor([e.box for e in same_class]).reshape(-1, 4))[0]
        if len(same_class) and overlaps.max() > 0.9:
            matched += 1
            assert abs(same_class[int(overlaps.argmax())].score - d.score) < 0.02
    assert len(found) >= 5 and matched >= 0.9 * len(found)


def test_classifier_run_gives_one_whole_image_detection(tmp_path):
    detector = Detector.load(make_run(tmp_path / "cls", head="classifier"), conf=0.0)
    assert detector.task == "classify"
    (detection,) = detector.predict(textured(70, 120))
    assert detection.box == [0.0, 0.0, 120.0, 70.0]
    assert detection.label in CLASSES and 1 / 3 <= detection.score <= 1.0


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 2), np.uint8), np.zeros((0, 5), np.uint8), np.zeros(5), "x"])
def test_bad_image_inputs_raise_data_error(detector, bad, tmp_path):
    if isinstance(bad, str):
        bad = tmp_path / "notes.png"
        bad.write_text("not an image")
    with pytest.raises(DataError):
        detector.predict(bad)
    with pytest.raises(DataError, match="image file not found"):
        detector.predict(tmp_path / "missing.png")
    with pytest.raises(DataError, match="list"):
        detector.predict([1, 2, 3])


def test_bad_sources_raise_one_clear_error(tmp_path, run_dir):
    with pytest.raises(MetalDefectError, match="no such run directory"):
        Detector.load(tmp_path / "missing_run")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(MetalDefectError, match="no checkpoint_best.pt"):
        Detector.load(tmp_path / "empty_run")
    corrupt = tmp_path / "corrupt_run"
    corrupt.mkdir()
    (corrupt / "checkpoint_best.pt").write_bytes(b"\x80\x04 this is not a checkpoint")
    with pytest.raises(MetalDefectError, match="cannot read checkpoint"):
        Detector.load(corrupt)
    foreign = tmp_path / "foreign_run"
    foreign.mkdir()
    torch.save({"epoch": 3}, foreign / "checkpoint_best.pt")
    with pytest.raises(MetalDefectError, match="not a metaldefect checkpoint"):
        Detector.load(foreign)
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(MetalDefectError, match="not a model"):
        Detector.load(tmp_path / "weights.txt")
    with pytest.raises(MetalDefectError, match="backend 'tensorrt'"):
        Detector.load(run_dir, backend="tensorrt")
    with pytest.raises(MetalDefectError, match="onnx backend"):
        Detector.load(tmp_path / "model.onnx", backend="torch")
    with pytest.raises(MetalDefectError, match="tile 'huge'"):
        Detector.load(run_dir, tile="huge")
    with pytest.raises(MetalDefectError, match="threads 0"):
        Detector.load(run_dir, threads=0)
    with pytest.raises(MetalDefectError, match="precision must be one of auto, fp32, bf16; got 'fp8'"):
        Detector.load(run_dir, precision="fp8")
    with pytest.raises(MetalDefectError, match="bf16 runs on the torch backend only"):
        Detector.load(run_dir, backend="onnx", precision="bf16")
    with pytest.raises(MetalDefectError, match="score threshold"):
        Detector.load(run_dir).predict(textured(20, 20), conf=1.5)


def test_builtin_absent_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "BUILTIN_DIR", tmp_path / "builtin_model")
    with pytest.raises(MetalDefectError, match="no built-in model is packaged in this build; pass --model RUN"):
        Detector.load("builtin")


def test_packaged_run_becomes_the_builtin_model(tmp_path, monkeypatch, run_dir, detector):
    report = {"num_images": 4, "map50": 0.5, "map": 0.25, "score_threshold": 0.55, "precision": 0.8, "recall": None,
              "per_class": {name: {"ap50": 0.5, "ap": 0.25} for name in CLASSES}, "pr_curves": {}}
    folder = builtin.package_run(run_dir, tmp_path / "builtin_model", command="metaldefect train configs/x.yaml",
                                 score_threshold=0.55, detection_metrics={"val": report})
    assert sorted(p.name for p in folder.iterdir()) == [
        "MODEL_CARD.md", "classes.json", "config.yaml", "metrics.json", "model_card.json", "weights.safetensors"]
    card = json.loads((folder / "model_card.json").read_text())
    assert card["training_command"] == "metaldefect train configs/x.yaml"
    assert card["metrics"]["val"] == {"loss": 1.5, "map50": 0.25} and card["classes"] == CLASSES
    assert card["part"] == "model" and card["model_spec"]["head_name"] == "dense"
    markdown = (folder / "MODEL_CARD.md").read_text()
    assert "metaldefect train configs/x.yaml" in markdown and "| map50 | 0.2000 |" in markdown
    assert card["training"] == {} and "- Best epoch: 1 (by val_loss, min)\n" in markdown  # no cost recorded
    assert "K. Song and Y. Yan" in markdown
    assert card["detection_metrics"]["val"]["ap50"] == dict.fromkeys(CLASSES, 0.5)
    assert f"| val | 4 | 0.500 | 0.250 | 0.800 / - at 0.55 | {CLASSES[0]} 0.500," in markdown

    monkeypatch.setattr(builtin, "BUILTIN_DIR", folder)
    packaged = Detector.load("builtin")
    assert packaged.card["name"] == "tiny_dense" and packaged.score_threshold() == 0.55
    image = textured(64, 48, seed=5)
    assert as_tuples(packaged.predict(image, conf=0.5)) == as_tuples(detector.predict(image))


def test_a_single_runs_card_gives_what_its_training_cost(tmp_path):
    run = make_run(tmp_path / "timed")
    metrics = json.loads((run / "metrics.json").read_text())
    cost = {"train_seconds": 2254.1, "feature_seconds": 232.7, "precision": "bfloat16"}
    (run / "metrics.json").write_text(json.dumps({**metrics, **cost, "features_computed": 6480}))
    folder = builtin.package_run(run, tmp_path / "builtin_model")
    assert json.loads((folder / "model_card.json").read_text())["training"] == cost
    markdown = (folder / "MODEL_CARD.md").read_text()
    assert ("- Best epoch: 1 (by val_loss, min); trained in 2254 s after 233 s of feature extraction, bfloat16\n"
            in markdown)


def test_a_run_fine_tuned_from_another_packages_in_float16_with_both_costs(tmp_path, monkeypatch):
    # The second stage of a two-stage recipe: a whole model, trained from a first run's weights (train.init_from).
    first = make_run(tmp_path / "heads_first", part="head")
    metrics = json.loads((first / "metrics.json").read_text())
    (first / "metrics.json").write_text(json.dumps({**metrics, "best_epoch": 72, "train_seconds": 1254.2,
                                                    "feature_seconds": 277.3, "precision": "bfloat16"}))
    second = make_run(tmp_path / "end_to_end")
    config = yaml.safe_load((second / "config.yaml").read_text())
    (second / "config.yaml").write_text(yaml.safe_dump({**config, "train": {"init_from": str(first)}}))
    with pytest.raises(MetalDefectError, match="weights dtype 'bfloat16': expected one of float32, float16"):
        builtin.package_run(second, tmp_path / "refused", weights_dtype="bfloat16")
    assert not (tmp_path / "refused").exists()

    full = builtin.package_run(second, tmp_path / "float32_model")
    folder = builtin.package_run(second, tmp_path / "builtin_model", weights_dtype="float16")
    stored = load_file(str(folder / "weights.safetensors"))
    assert {t.dtype for t in stored.values() if t.is_floating_point()} == {torch.float16}
    assert (folder / "weights.safetensors").stat().st_size < 0.55 * (full / "weights.safetensors").stat().st_size
    card = json.loads((folder / "model_card.json").read_text())
    assert card["weights_dtype"] == "float16" and card["part"] == "model"
    assert card["started_from"] == {"run": "heads_first", "best_epoch": 72, "train_seconds": 1254.2,
                                    "feature_seconds": 277.3, "precision": "bfloat16"}
    markdown = (folder / "MODEL_CARD.md").read_text()
    assert "fine-tuned, shipped here with the head. Weights stored in float16, loaded as float32." in markdown
    assert ("- Started from the weights of run `heads_first` (`train.init_from`; its epoch 72; trained in 1254 s "
            "after 277 s of feature extraction, bfloat16)") in markdown

    monkeypatch.setattr(builtin, "BUILTIN_DIR", folder)
    assert {p.dtype for p in builtin.load_builtin(folder)[0].parameters()} == {torch.float32}
    packaged, original = Detector.load("builtin", conf=0.5, tile="off"), Detector.load(second, conf=0.5, tile="off")
    image = textured(64, 48, seed=5)
    got, expected = packaged.predict(image), original.predict(image)
    assert expected and [d.label for d in got] == [d.label for d in expected]
    assert max(abs(a.score - b.score) for a, b in zip(got, expected)) < 0.01


def test_builtin_head_refuses_a_different_backbone(tmp_path):
    # A head-only package whose recorded backbone checksum differs from the backbone rebuilt here.
    run = make_run(tmp_path / "head_only", part="head")
    folder = builtin.package_run(run, tmp_path / "builtin_model")
    card = json.loads((folder / "model_card.json").read_text())
    card["backbone_weights"]["sha256"] = "0" * 64
    (folder / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="not those the model was trained on"):
        builtin.load_builtin(folder)


def test_samples_are_packaged_with_credits():
    samples = builtin.sample_images()
    assert 4 <= len(samples) <= 6
    assert len({s.stem.rsplit("_", 1)[0] for s in samples}) == len(samples)  # one per class
    assert all(s.stat().st_size < 30_000 for s in samples)
    credits = (builtin.SAMPLES_DIR / "CREDITS").read_text()
    assert "K. Song and Y. Yan, Northeastern University surface defect database" in credits
    assert all(s.name in credits for s in samples)


def test_samples_are_held_out_of_the_seed_42_training_split(neu_root, tmp_path):
    from metaldefect.cli import main

    assert main(["data", "split", str(neu_root), "--out", str(tmp_path / "split")]) == 0
    train = set((tmp_path / "split" / "train.txt").read_text().split())
    held_out = set((tmp_path / "split" / "test.txt").read_text().split())
    for sample in builtin.sample_images():
        assert f"IMAGES/{sample.name}" in held_out and f"IMAGES/{sample.name}" not in train


def test_importing_metaldefect_stays_cheap_and_detector_is_lazy():
    code = ("import sys, metaldefect; cheap = 'torch' not in sys.modules; "
            "from metaldefect import Detector; print(cheap, Detector.__name__, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["True", "Detector", "True"]
