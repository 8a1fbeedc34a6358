"""Tiny run directories for the inference tests (test_detector, test_onnx, test_predict_cli, test_tiling).

A run here holds a freshly initialised model (no training): a 12-block ViT-Tiny at a
32 px input with a small dense head whose weights are drawn with a wide spread, so its
scores differ clearly between locations (a fresh FCOS head scores every location the same).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from metaldefect.engine.checkpoint import save_checkpoint
from metaldefect.models.factory import create_model

CLASSES = ["crazing", "inclusion", "scratches"]


def model_spec(head: str = "dense", input_size: int = 32, **extra_head_kwargs) -> dict:
    head_kwargs = {"scales": [2.0, 1.0], "channels": 32, "max_detections": 20} if head == "dense" else {}
    head_kwargs.update(extra_head_kwargs)
    return dict(backbone_name="vit_tiny_patch16_224", head_name=head, num_classes=len(CLASSES), pretrained=False,
                weights_file=None, input_size=input_size, layers=None, head_kwargs=head_kwargs)


def make_run(run_dir: Path, head: str = "dense", seed: int = 0, part: str = "model", **head_kwargs) -> Path:
    """A run directory (checkpoint_best.pt, config.yaml, classes.json, metrics.json) of a random model."""
    torch.manual_seed(seed)
    spec = model_spec(head, **head_kwargs)
    model = create_model(**spec)
    with torch.no_grad():
        for parameter in model.head.parameters():
            parameter.normal_(0.0, 0.3)
    state = model.state_dict() if part == "model" else model.head.state_dict()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(run_dir / "checkpoint_best.pt", {
        "epoch": 1, "part": part, "state": state, "model_spec": spec, "classes": CLASSES,
        "metrics": {}, "weights": model.backbone.weights_info})
    config = {"name": run_dir.name, "data": {"root": "/data/NEU-DET", "format": "auto", "split_dir": None,
                                              "split": [0.7, 0.2, 0.1], "split_seed": 42}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "classes.json").write_text(json.dumps(CLASSES))
    (run_dir / "metrics.json").write_text(json.dumps({
        "task": model.task, "images": {"train": 7, "val": 2, "test": 1}, "best_epoch": 1,
        "monitor": {"metric": "val_loss", "mode": "min"}, "best": {"loss": 1.5, "map50": 0.25},
        "test": {"loss": 1.6, "map50": 0.2}}))
    return run_dir


def textured(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A ``[H, W, 3]`` uint8 image with smooth random texture (gray replicated)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, height // 8), max(2, width // 8)), dtype=np.uint8)
    gray = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR))
    return np.repeat(gray[:, :, None], 3, axis=2)
