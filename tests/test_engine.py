"""Engine: metric accumulation, train_one_epoch / evaluate, checkpoints, plots, trainable layers."""
from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from metaldefect.data.dataset import FeatureDataset, collate
from metaldefect.data.records import Detection
from metaldefect.engine import distributed
from metaldefect.engine.checkpoint import (capture_rng, load_checkpoint, load_run, model_from_checkpoint,
                                           restore_rng, save_checkpoint)
from metaldefect.engine.engine import evaluate, train_one_epoch
from metaldefect.engine.metrics import ConfusionMatrix, MetricSums, improved
from metaldefect.engine.plots import plot_confusion, plot_curves
from metaldefect.engine.val_map import DetectionCollector
from metaldefect.errors import MetalDefectError
from metaldefect.models.factory import create_model
from metaldefect.models.heads import create_head

IN_DIMS = {"pooled": 6, "map": 6, "map_size": (1, 1), "layers": [], "stride": 1}


def toy_features(count: int, seed: int = 0):
    """Features that say the class (one-hot, plus noise) and a box that depends on the class."""
    generator = torch.Generator().manual_seed(seed)
    classes = torch.arange(count) % 3
    pooled = torch.nn.functional.one_hot(classes, 6).float() + 0.1 * torch.randn(count, 6, generator=generator)
    targets = [{"boxes": torch.tensor([[0.1 * c, 0.1, 0.5 + 0.1 * c, 0.6]]), "labels": torch.tensor([c]),
                "size": (10, 10)} for c in classes.tolist()]

    def source(index: int, view: str) -> dict:
        return {"pooled": pooled[index], "map": pooled[index].view(6, 1, 1)}
    return FeatureDataset(source, targets), targets


def test_metric_means_do_not_depend_on_batching():
    head = create_head("slots", IN_DIMS, 3, num_slots=2)
    dataset, _ = toy_features(10)
    means = []
    for batch_size in (1, 3, 10):
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
        metrics, _ = evaluate(head, loader, torch.device("cpu"), progress=False)
        means.append(metrics)
    for other in means[1:]:
        assert other.keys() == means[0].keys()
        for key in means[0]:
            assert other[key] == pytest.approx(means[0][key], rel=1e-5), key


def test_metric_sums_and_improvement():
    sums = MetricSums()
    sums.add({"accuracy": (3, 4)})
    sums.add({"accuracy": (1, 4)})
    sums.add_losses({"loss": torch.tensor(2.0)}, batch_size=2)
    sums.add_losses({"loss": torch.tensor(4.0)}, batch_size=6)
    assert sums.all_reduce().means() == {"accuracy": 0.5, "loss": pytest.approx(3.5)}  # world size 1: unchanged
    assert math.isnan(MetricSums().means().get("x", math.nan))
    assert improved(0.5, None, "min") and improved(0.4, 0.5, "min") and not improved(0.5, 0.5, "min")
    assert improved(0.6, 0.5, "max") and not improved(math.nan, 0.5, "max")


def test_confusion_matrix_counts_true_by_predicted():
    matrix = ConfusionMatrix(3)
    matrix.update(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 1]))
    matrix.update(torch.tensor([2]), torch.tensor([2]))
    assert matrix.matrix.tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 1]]


@pytest.mark.parametrize("head_name, kwargs", [("classifier", {}), ("single", {"box_activation": "sigmoid"}),
                                               ("slots", {"num_slots": 2, "matching": "hungarian",
                                                          "class_layers": [64], "box_layers": [64], "box_dropout": 0.0})])
def test_training_epochs_learn_a_separable_problem(head_name, kwargs):
    learn_the_separable_problem(head_name, kwargs, torch.float32)


@pytest.mark.parametrize("head_name, kwargs", [("classifier", {}), ("single", {"box_activation": "sigmoid"})])
def test_bf16_training_steps_learn_and_keep_float32_weights(head_name, kwargs):
    head = learn_the_separable_problem(head_name, kwargs, torch.bfloat16)
    assert all(parameter.dtype == torch.float32 for parameter in head.parameters())
    # A val pass under bf16 autocast, as a bf16 run's epochs make it, scores as the float32 pass does.
    loader = DataLoader(toy_features(24, seed=1)[0], batch_size=8, collate_fn=collate)
    float32, _ = evaluate(head, loader, torch.device("cpu"), progress=False)
    bf16, _ = evaluate(head, loader, torch.device("cpu"), progress=False, dtype=torch.bfloat16)
    assert bf16.keys() == float32.keys() and bf16["accuracy"] == float32["accuracy"] == 1.0
    assert bf16["loss"] == pytest.approx(float32["loss"], rel=0.05) and bf16["loss"] != float32["loss"]


def learn_the_separable_problem(head_name: str, kwargs: dict, dtype: torch.dtype):
    """25 epochs on toy features with ``dtype`` training steps; asserts that the head learnt; returns it."""
    torch.manual_seed(0)
    head = create_head(head_name, IN_DIMS, 3, **kwargs)
    train_set, _ = toy_features(48, seed=0)
    val_set, _ = toy_features(24, seed=1)
    train_loader = DataLoader(train_set, batch_size=8, shuffle=True, collate_fn=collate)
    val_loader = DataLoader(val_set, batch_size=8, collate_fn=collate)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
    device = torch.device("cpu")
    before, _ = evaluate(head, val_loader, device, progress=False)
    for epoch in range(1, 26):
        train_metrics = train_one_epoch(head, train_loader, optimizer, epoch, device, grad_clip=1.0, progress=False,
                                        dtype=dtype)
    after, confusion = evaluate(head, val_loader, device, num_labels=4, progress=False)
    assert {"loss", "accuracy"} <= set(train_metrics)
    assert after["loss"] < 0.5 * before["loss"]
    assert after["accuracy"] == 1.0
    assert confusion.trace() == confusion.sum() and confusion[:3].sum() >= 24
    if head_name != "classifier":
        assert after["mae"] < before["mae"]
    return head


def test_training_stops_clearly_on_a_non_finite_loss():
    head = create_head("classifier", IN_DIMS, 3)
    dataset, _ = toy_features(4)
    with torch.no_grad():
        head.classify.weight.fill_(float("nan"))
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    loader = DataLoader(dataset, batch_size=4, collate_fn=collate)
    with pytest.raises(MetalDefectError, match="training loss became nan"):
        train_one_epoch(head, loader, optimizer, 1, torch.device("cpu"), progress=False)


def test_checkpoints_are_atomic_and_rebuild_the_model(tmp_path):
    torch.manual_seed(0)
    spec = dict(backbone_name="paper_cnn", head_name="single", num_classes=3, pretrained=False, input_size=32)
    model = create_model(**spec).eval()
    images = torch.rand(2, 3, 32, 32)
    checkpoint = {"part": "model", "state": model.state_dict(), "model_spec": spec, "classes": ["a", "b", "c"]}
    save_checkpoint(tmp_path / "run" / "checkpoint_best.pt", checkpoint)
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["checkpoint_best.pt"]  # no temporary left
    rebuilt, classes, _ = load_run(tmp_path / "run")
    assert classes == ["a", "b", "c"]
    with torch.no_grad():
        assert torch.allclose(rebuilt(images)["boxes"], model(images)["boxes"])

    head_only = {"part": "head", "state": model.head.state_dict(), "model_spec": spec,
                 "backbone_state": model.backbone.state_dict()}
    with torch.no_grad():
        assert torch.allclose(model_from_checkpoint(head_only)(images)["logits"], model(images)["logits"])

    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MetalDefectError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "broken.pt")
    with pytest.raises(MetalDefectError, match="checkpoint not found"):
        load_run(tmp_path / "missing")


def test_rng_state_round_trip():
    state = capture_rng()
    first = torch.rand(3)
    restore_rng(state)
    assert torch.equal(torch.rand(3), first)


def test_set_trainable_keeps_only_the_last_layers():
    model = create_model("paper_cnn", "classifier", 3, pretrained=False, input_size=32)
    backbone_tensors = lambda: [n for n, p in model.backbone.named_parameters() if p.requires_grad]  # noqa: E731
    model.set_trainable(1)
    assert backbone_tensors() == ["model.stages.3.0.weight", "model.stages.3.0.bias"]
    assert all(p.requires_grad for p in model.head.parameters())
    model.set_trainable(0)
    assert backbone_tensors() == []
    model.set_trainable(None)
    assert len(backbone_tensors()) == 8


def test_plots_are_written(tmp_path):
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e, "train_accuracy": 0.5 + e / 10,
                "val_accuracy": 0.4 + e / 10, "train_mse": 0.1 / e, "val_mse": 0.2 / e} for e in range(1, 4)]
    plot_curves(history, tmp_path / "curves.png", title="t")
    plot_confusion(torch.tensor([[3, 1], [0, 4]]).numpy(), ["a", "b"], tmp_path / "confusion.png")
    for name in ("curves.png", "confusion.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.size[0] > 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion.png", "curves.png"]


def test_single_process_is_world_size_one(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = distributed.init("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    assert distributed.all_reduce_sums({"a": (1.0, 2.0)}) == {"a": (1.0, 2.0)}
    assert distributed.broadcast_object(5) == 5


class _EchoHead:
    """A head whose decode returns given pixel boxes for the images of a batch, in order."""

    num_classes = 2

    def __init__(self, answers):
        self.answers = list(answers)

    def decode(self, outputs, image_sizes, classes, score_threshold=0.0):
        out = []
        for _ in image_sizes:
            boxes, label = self.answers.pop(0)
            out.append([Detection(box=box, label=classes[label], score=0.9) for box in boxes])
        return out


def test_the_epoch_map_is_computed_in_pixels_of_each_image():
    # Two images of different sizes; normalised targets, predictions in pixels.
    targets = [{"boxes": torch.tensor([[0.1, 0.1, 0.5, 0.5]]), "labels": torch.tensor([0]), "size": (200, 100)},
               {"boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0]]), "labels": torch.tensor([1]), "size": (50, 50)}]
    perfect = DetectionCollector(_EchoHead([([[20, 10, 100, 50]], 0), ([[0, 0, 50, 50]], 1)]))
    perfect.add({}, targets)
    assert perfect.result() == pytest.approx({"map50": 1.0, "map": 1.0})
    # The second image's box shifted by half its width: IoU 1/3, so class 1 has AP 0 and the mean halves.
    shifted = DetectionCollector(_EchoHead([([[20, 10, 100, 50]], 0), ([[25, 0, 75, 50]], 1)]))
    shifted.add({}, targets)
    assert shifted.result() == pytest.approx({"map50": 0.5, "map": 0.5})
    assert DetectionCollector(_EchoHead([])).result() == {}  # an empty split has no mAP
