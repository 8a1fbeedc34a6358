"""The box refiner: crops and deltas, that it learns to undo jitter, `metaldefect refine`, and every path that
applies it (Detector with PyTorch and ONNX Runtime, export, the built-in packaging)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from inference_factory import CLASSES, make_run, textured
from synthetic_defects import make_dataset, write_config

from metaldefect.cli import main
from metaldefect.data.images import load_image
from metaldefect.engine import refine
from metaldefect.engine.refine import (REFINER_FILE, LabelledImages, RefinerSettings, jitter_boxes, save_refiner,
                                      train_refiner)
from metaldefect.errors import MetalDefectError
from metaldefect.inference import builtin
from metaldefect.inference.detector import Detector
from metaldefect.inference.evaluation import split_records
from metaldefect.models.refiner import (BoxRefiner, apply_deltas, crop_boxes, encode_deltas, gray_image,
                                       mirrored_deltas)


def test_deltas_encode_and_apply_as_inverses():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 40.0], [0.0, 0.0, 3.0, 100.0]])
    targets = torch.tensor([[12.0, 18.0, 47.0, 44.0], [1.0, 5.0, 4.0, 90.0]])
    deltas = encode_deltas(boxes, targets)
    assert torch.allclose(deltas[0], torch.tensor([2 / 40, -2 / 20, -3 / 40, 4 / 20]) / 0.1)
    assert torch.allclose(apply_deltas(boxes, deltas), targets, atol=1e-5)


def test_a_crop_holds_the_box_and_its_context_at_the_crop_size():
    ramp = torch.arange(100.0).repeat(60, 1)[None, None] / 100  # [1, 1, 60, 100]: the value is x / 100
    crops = crop_boxes(ramp, torch.tensor([0]), torch.tensor([[20.0, 10.0, 60.0, 50.0]]), crop=16, context=1.5)
    assert crops.shape == (1, 1, 16, 16)
    # Context 1.5 around a box from x 20 to 60 spans x 10 to 70; aligned pixel centres read x - 0.5.
    assert crops[0, 0, 0, 0].item() == pytest.approx((10 + 60 / 32 - 0.5) / 100, abs=0.005)
    assert crops[0, 0, 0, -1].item() == pytest.approx((70 - 60 / 32 - 0.5) / 100, abs=0.005)
    assert torch.allclose(crops[0, 0, 0], crops[0, 0, -1])  # the ramp does not vary along y


def test_a_new_refiner_leaves_boxes_alone_and_a_refined_box_stays_valid_and_inside():
    image = gray_image(textured(40, 60))
    boxes = torch.tensor([[5.0, 5.0, 30.0, 20.0], [40.0, 10.0, 58.0, 39.0]])
    refiner = BoxRefiner(num_classes=3, crop=16, width=8).eval()
    assert torch.equal(refiner.refine(image, boxes, torch.tensor([0, 2])), boxes)

    with torch.no_grad():
        refiner.predict[-1].bias.copy_(torch.tensor([-100.0, -100.0, 100.0, 100.0]))  # every side far out
    assert torch.equal(refiner.refine(image, boxes, torch.tensor([0, 2])), torch.tensor([[0.0, 0, 60, 40]] * 2))
    with torch.no_grad():
        refiner.predict[-1].bias.copy_(torch.tensor([20.0, 0.0, -20.0, 0.0]))  # left and right sides cross
    assert torch.equal(refiner.refine(image, boxes, torch.tensor([0, 2])), boxes)  # kept as detected
    with pytest.raises(ValueError, match="multiple of 16"):
        BoxRefiner(num_classes=3, crop=20)


def test_refinement_averaged_over_flips_mirrors_with_the_image():
    """Mirroring the image and its boxes mirrors the refined boxes: the four views' deltas are mapped back
    to the sides they move (a wrong mapping, or none, breaks this for a refiner whose deltas are not zero)."""
    torch.manual_seed(0)
    refiner = BoxRefiner(num_classes=2, crop=16, width=8).eval()
    with torch.no_grad():
        refiner.predict[-1].weight.normal_(0.0, 0.2)
        refiner.predict[-1].bias.copy_(torch.tensor([0.5, -0.3, 0.2, 0.4]))
    image = gray_image(textured(40, 60, seed=5))
    boxes, labels = torch.tensor([[5.0, 6.0, 30.0, 20.0], [35.0, 10.0, 52.0, 37.0]]), torch.tensor([0, 1])
    refined = refiner.refine(image, boxes, labels)
    assert not torch.allclose(refined, boxes, atol=0.5)

    def left_right(b):
        return torch.stack([60 - b[:, 2], b[:, 1], 60 - b[:, 0], b[:, 3]], dim=1)

    def up_down(b):
        return torch.stack([b[:, 0], 40 - b[:, 3], b[:, 2], 40 - b[:, 1]], dim=1)

    assert torch.allclose(refiner.refine(image.flip(-1), left_right(boxes), labels), left_right(refined), atol=1e-4)
    assert torch.allclose(refiner.refine(image.flip(-2), up_down(boxes), labels), up_down(refined), atol=1e-4)
    # One view's deltas, mapped back: moving the left side out is moving the mirrored box's right side out.
    assert mirrored_deltas(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), True, False).tolist() == [[-3.0, 2.0, -1.0, 4.0]]
    assert mirrored_deltas(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), True, True).tolist() == [[-3.0, -4.0, -1.0, -2.0]]


def test_refining_a_few_boxes_at_a_time_gives_the_same_boxes(monkeypatch):
    from metaldefect.models import refiner as refiner_module

    torch.manual_seed(2)
    refiner = BoxRefiner(num_classes=2, crop=16, width=8).eval()
    with torch.no_grad():
        refiner.predict[-1].weight.normal_(0.0, 0.2)
    image = gray_image(textured(50, 70, seed=6))
    corners = torch.rand(7, 2) * torch.tensor([40.0, 25.0])
    boxes = torch.cat([corners, corners + torch.tensor([20.0, 15.0])], dim=1)
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    whole = refiner.refine(image, boxes, labels)
    monkeypatch.setattr(refiner_module, "BOXES_PER_CALL", 3)
    assert torch.allclose(refiner.refine(image, boxes, labels), whole, atol=1e-5)
    assert not torch.allclose(whole, boxes, atol=0.1)


def test_the_refine_command_defaults_to_the_refiner_settings_defaults(tmp_path):
    """The CLI states its defaults itself (it does not import torch to build its parser): they must not drift."""
    from metaldefect.cli import build_parser
    args = build_parser(["refine"]).parse_args(["refine", str(tmp_path)])
    defaults = RefinerSettings()
    for name in ("epochs", "jitter", "crop", "context", "seed", "precision"):
        assert getattr(args, name) == getattr(defaults, name), name


def test_jitter_moves_each_side_by_the_given_fraction_and_keeps_valid_boxes():
    boxes = torch.tensor([[100.0, 100.0, 200.0, 150.0]])  # far enough inside that clipping never cuts the noise
    noisy, source = jitter_boxes(boxes, 0.1, 4000, (400, 400), torch.Generator().manual_seed(0))
    assert (source == 0).all() and len(noisy) == 4000
    moves = (noisy - boxes) / torch.tensor([100.0, 50.0, 100.0, 50.0])
    assert moves.std(dim=0).tolist() == pytest.approx([0.1] * 4, abs=0.01)
    assert ((noisy[:, 2:] - noisy[:, :2]) >= 1).all()
    corner, _ = jitter_boxes(torch.tensor([[0.0, 0.0, 20.0, 20.0]]), 0.5, 1000, (30, 25),
                             torch.Generator().manual_seed(1))
    assert corner[:, 0::2].min() >= 0 and corner[:, 0::2].max() <= 30  # clipped to the image (W 30, H 25)
    assert corner[:, 1::2].min() >= 0 and corner[:, 1::2].max() <= 25
    assert (corner[:, 2] == 30).any() and (corner[:, 3] == 25).any()


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory) -> Path:
    """A tiny trained dense run on synthetic defects: sharp-edged patches and stripes."""
    root = tmp_path_factory.mktemp("refine")
    data = make_dataset(root / "NEU", images=24, size=64)
    config = write_config(root / "dense.yaml", data, root / "cache", "dense",
                          model={"backbone": "vit_tiny_patch16_224", "input_size": 64,
                                 "head_kwargs": {"channels": 16, "num_convs": 1, "scales": [1.0, 0.5]}},
                          train={"epochs": 2})
    assert main(["train", str(config), "--runs-dir", str(root / "runs")]) == 0
    return root / "runs" / "dense"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_refiner_learns_to_undo_jitter_on_sharp_edged_defects(dense_run, precision):
    # Noise of 0.16 (the default until session 32) leaves a clear margin to undo on these few images.
    settings = RefinerSettings(epochs=12, images_per_batch=8, jitters_per_box=8, jitter=0.16, crop=32, width=8,
                               lr=0.004, precision=precision)
    refiner, summary = train_refiner(split_records(dense_run, "train"), split_records(dense_run, "val"),
                                     ["patches", "pitted_surface", "scratches"], settings, progress=False)
    best = summary["best"]
    assert len(summary["history"]) == 12 and summary["best_epoch"] == best["epoch"]
    assert best["val_iou_after"] > best["val_iou_before"] + 0.05, best
    # Trained channels-last and maybe in bf16, it is handed back as the float32, contiguous network inference runs.
    assert summary["precision"] == {"fp32": "float32", "bf16": "bfloat16"}[precision]
    weights = [w for w in refiner.state_dict().values() if w.is_floating_point()]
    assert all(w.dtype == torch.float32 and w.is_contiguous() for w in weights)


def test_decoded_images_are_kept_up_to_the_byte_budget_and_equal_a_fresh_decode(dense_run, monkeypatch):
    records = split_records(dense_run, "train")
    classes = ["patches", "pitted_surface", "scratches"]
    images = LabelledImages(records, classes, flips=False)
    first = images[0][0]
    assert images.cache and images[0][0] is first  # the second read comes from memory
    monkeypatch.setattr(refine, "CACHE_BYTES", int(first.nbytes * 1.5))  # room for one image
    images = LabelledImages(records, classes, flips=False)
    for item in range(len(images)):
        fresh = gray_image(load_image(images.records[item].path))[0]
        assert torch.equal(images[item][0], fresh)
    assert list(images.cache) == [0] and images.cached_bytes == first.nbytes


def test_refine_cli_writes_the_refiner_and_the_detector_applies_it(dense_run, capsys):
    assert main(["refine", str(dense_run), "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "val IoU of jittered boxes" in out and "mAP@0.5:0.95" in out
    for name in (REFINER_FILE, "refiner_history.csv", "refiner_curves.png"):
        assert (dense_run / name).is_file()
    saved = torch.load(dense_run / REFINER_FILE, weights_only=False)
    assert set(saved["val_map"]) == {"with", "without"} and saved["settings"]["epochs"] == 2

    refined, plain = Detector.load(dense_run, conf=0.05), Detector.load(dense_run, conf=0.05, refine=False)
    assert refined.refiner is not None and plain.refiner is None
    image = textured(64, 64, seed=3)
    got, raw = refined.predict(image), plain.predict(image)
    assert raw and [(d.label, d.score) for d in got] == [(d.label, d.score) for d in raw]
    index = {name: i for i, name in enumerate(refined.classes)}
    expected = refined.refiner.refine(gray_image(image), torch.tensor([d.box for d in raw]),
                                      torch.tensor([index[d.label] for d in raw]))
    assert torch.allclose(torch.tensor([d.box for d in got]), expected)


def test_refine_refusals_are_one_line_and_leave_the_run_alone(dense_run, tmp_path, capsys):
    main(["refine", str(dense_run), "--epochs", "1", "--force"])  # make sure a refiner exists
    before = (dense_run / REFINER_FILE).read_bytes()
    capsys.readouterr()
    assert main(["refine", str(dense_run)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {dense_run / REFINER_FILE} exists; pass --force to replace it"
    assert (dense_run / REFINER_FILE).read_bytes() == before
    assert main(["refine", str(dense_run), "--force", "--crop", "40"]) == 2
    assert "--crop must be a multiple of 16" in capsys.readouterr().err
    assert main(["refine", str(dense_run), "--force", "--jitter", "1.5"]) == 2
    assert "--jitter in (0, 1)" in capsys.readouterr().err
    assert (dense_run / REFINER_FILE).read_bytes() == before
    assert main(["refine", str(tmp_path)]) == 2
    assert "not a training run" in capsys.readouterr().err
    classifier = make_run(tmp_path / "classifier", head="classifier")
    assert main(["refine", str(classifier)]) == 2
    assert "not a detector run" in capsys.readouterr().err
    assert not (classifier / REFINER_FILE).exists()


def test_a_final_fit_trains_on_val_too_and_refine_evaluate_and_packaging_follow(dense_run, tmp_path, capsys):
    """train.final_fit: val's images join training, the last epoch is kept, and what reads the run's split
    (refine, evaluate, the built-in card) knows there is no val left to score."""
    assert main(["train", str(dense_run / "config.yaml"), "name=final", "train.final_fit=true",
                 "--runs-dir", str(tmp_path)]) == 0
    run = tmp_path / "final"
    split = {name: (run / "split" / f"{name}.txt").read_text().split() for name in ("train", "val", "test")}
    source = {name: (dense_run / "split" / f"{name}.txt").read_text().split() for name in ("train", "val", "test")}
    assert split["train"] == sorted(source["train"] + source["val"]) and source["val"]
    assert split["val"] == [] and split["test"] == source["test"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["final_fit"] is True and metrics["monitor"] is None and metrics["best"] is None
    assert metrics["best_epoch"] == metrics["epochs_run"] == 2
    assert metrics["images"]["train"] == len(split["train"]) and metrics["images"]["val"] == 0
    assert not [key for key in (run / "history.csv").read_text().splitlines()[0].split(",") if key.startswith("val_")]
    assert torch.load(run / "checkpoint_best.pt", weights_only=False)["epoch"] == 2
    assert "training on the train and val images together" in capsys.readouterr().err

    assert main(["refine", str(run), "--epochs", "2"]) == 0
    assert "no val images (the run trained on them: train.final_fit)" in capsys.readouterr().out
    saved = torch.load(run / REFINER_FILE, weights_only=False)
    assert saved["best_epoch"] == 2 and "val_map" not in saved and (run / "refiner_curves.png").is_file()

    assert main(["evaluate", str(run), "--split", "val"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"error: {run}: its val split is empty (a final fit trained on its val images: " \
                    "train.final_fit); choose another --split or --data"

    folder = builtin.package_run(run, tmp_path / "builtin_model")
    card = (folder / "MODEL_CARD.md").read_text()
    assert "A final fit (`train.final_fit`)" in card and "Validation: none" in card
    assert "Box refiner" in card and "val IoU" not in card


@pytest.fixture(scope="module")
def refined_run(tmp_path_factory) -> Path:
    """A random tiny run (inference_factory) with a random refiner whose deltas are not zero."""
    run = make_run(tmp_path_factory.mktemp("refined") / "tiny_dense")
    torch.manual_seed(1)
    refiner = BoxRefiner(len(CLASSES), crop=16, width=8)
    with torch.no_grad():
        refiner.predict[-1].weight.normal_(0.0, 0.05)
    save_refiner(run / REFINER_FILE, refiner.eval(), CLASSES, {"settings": {}, "best_epoch": 1, "history": [],
                                                              "best": {"val_iou_before": 0.6, "val_iou_after": 0.7},
                                                              "train_seconds": 1.0})
    return run


def boxes_of(detections) -> torch.Tensor:
    return torch.tensor([d.box for d in detections])


def test_onnx_export_carries_the_refiner_and_gives_the_torch_boxes(refined_run, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    assert main(["export", str(refined_run), "--out", str(out)]) == 0
    assert "box refiner" in capsys.readouterr().out
    assert (tmp_path / "model.refiner.onnx").is_file()
    assert json.loads(out.with_suffix(".json").read_text())["refiner"]["file"] == "model.refiner.onnx"
    torch_detector, onnx_detector = Detector.load(refined_run, tile="off"), Detector.load(out, tile="off")
    unrefined = Detector.load(refined_run, tile="off", refine=False)
    assert onnx_detector.refiner is not None
    image = textured(48, 64, seed=2)
    expected, got, raw = torch_detector.predict(image), onnx_detector.predict(image), unrefined.predict(image)
    assert expected and [d.label for d in got] == [d.label for d in expected]
    assert torch.allclose(boxes_of(got), boxes_of(expected), atol=1e-3)
    assert not torch.allclose(boxes_of(expected), boxes_of(raw), atol=0.5)  # the refiner did move them

    (tmp_path / "model.refiner.onnx").unlink()
    with pytest.raises(MetalDefectError, match="model.refiner.onnx: the box refiner named in model.json is missing"):
        Detector.load(out)
    assert Detector.load(out, refine=False).refiner is None
    assert main(["export", str(refined_run), "--out", str(tmp_path / "plain.onnx"), "--no-refine"]) == 0
    assert not (tmp_path / "plain.refiner.onnx").exists()


def test_the_refiner_is_packaged_with_the_builtin_model(refined_run, tmp_path, monkeypatch):
    folder = builtin.package_run(refined_run, tmp_path / "builtin_model")
    assert (folder / "refiner.safetensors").is_file()
    card = json.loads((folder / "model_card.json").read_text())
    assert card["refiner"]["kwargs"] == {"num_classes": 3, "crop": 16, "context": 2.0, "width": 8}
    assert "Box refiner" in (folder / "MODEL_CARD.md").read_text()
    monkeypatch.setattr(builtin, "BUILTIN_DIR", folder)
    image = textured(48, 64, seed=4)
    packaged, run = Detector.load("builtin", tile="off", conf=0.3), Detector.load(refined_run, tile="off", conf=0.3)
    assert packaged.refiner is not None
    assert [d.to_dict() for d in packaged.predict(image)] == [d.to_dict() for d in run.predict(image)]


def test_the_service_says_whether_it_refines_boxes(refined_run):
    from fastapi.testclient import TestClient

    from metaldefect.serve.app import create_app

    for enabled in (True, False):
        with TestClient(create_app(Detector.load(refined_run, refine=enabled))) as client:
            assert client.get("/v1/model").json()["box_refiner"] is enabled


def test_a_refiner_of_other_classes_is_refused(refined_run, tmp_path):
    other = make_run(tmp_path / "other")
    saved = torch.load(refined_run / REFINER_FILE, weights_only=False)
    saved["classes"] = ["a", "b", "c"]
    torch.save(saved, other / REFINER_FILE)
    with pytest.raises(MetalDefectError, match="trained on classes"):
        Detector.load(other)
    (other / REFINER_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(MetalDefectError, match="refiner.pt: cannot read checkpoint"):
        Detector.load(other)
