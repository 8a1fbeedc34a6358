"""A tiny learnable defect dataset in the NEU-DET layout (IMAGES/ + ANNOTATIONS/), and configs for it.

Each 64x64 grayscale image holds 1-3 "defects" of one class, drawn where their boxes say,
with NEU-DET class names (the NEU-DET reader knows only those): "patches" (white patch),
"pitted_surface" (black patch) or "scratches" (vertical stripes), on a noisy grey
background, so even a small randomly initialised CNN's features separate the classes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader

from metaldefect.config import load_config
from metaldefect.data.dataset import ImageDataset, collate
from metaldefect.engine.engine import evaluate
from metaldefect.engine.run_data import build_data

CLASSES = ("patches", "pitted_surface", "scratches")


def _paint(pixels: np.ndarray, name: str, box: tuple[int, int, int, int]) -> None:
    x1, y1, x2, y2 = box
    if name == "patches":
        pixels[y1:y2, x1:x2] = 240
    elif name == "pitted_surface":
        pixels[y1:y2, x1:x2] = 15
    else:
        pixels[y1:y2, x1:x2] = 20
        pixels[y1:y2, x1:x2:3] = 235


def make_dataset(root: Path, images: int = 30, size: int = 64, seed: int = 0, max_objects: int = 3) -> Path:
    """Write ``images`` images (classes in turn) with VOC labels; returns ``root``."""
    rng = np.random.default_rng(seed)
    (root / "IMAGES").mkdir(parents=True, exist_ok=True)
    (root / "ANNOTATIONS").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        name = CLASSES[i % len(CLASSES)]
        pixels = rng.normal(128, 12, (size, size)).clip(0, 255).astype(np.uint8)
        objects = []
        for _ in range(1 + int(rng.integers(max_objects))):
            w, h = (int(v) for v in rng.integers(size // 6, size // 3, 2))
            x1, y1 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            box = (x1, y1, x1 + w, y1 + h)
            _paint(pixels, name, box)
            objects.append((name, box))
        stem = f"{name}_{i}"
        Image.fromarray(pixels, "L").save(root / "IMAGES" / f"{stem}.jpg", quality=95)
        parts = [f"<annotation><folder>IMAGES</folder><filename>{stem}.jpg</filename>",
                 f"<size><width>{size}</width><height>{size}</height><depth>1</depth></size>"]
        for label, (x1, y1, x2, y2) in objects:
            parts.append(f"<object><name>{label}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
                         f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
        (root / "ANNOTATIONS" / f"{stem}.xml").write_text("".join(parts) + "</annotation>\n")
    return root


def write_config(path: Path, data_root: Path, cache_dir: Path, head: str = "classifier", **sections) -> Path:
    """A small config: random-init ``paper_cnn`` at 32 px, frozen with cached features, 3 epochs."""
    config = {
        "name": path.stem,
        "seed": 7,
        "data": {"root": str(data_root), "split": [0.6, 0.4, 0.0]},
        "model": {"backbone": "paper_cnn", "pretrained": False, "input_size": 32, "head": head,
                  "head_kwargs": {}},
        "train": {"frozen": True, "cache_dir": str(cache_dir), "epochs": 3, "batch_size": 4, "lr": 0.003,
                  "progress": False},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def val_loss_from_images(model: torch.nn.Module, config: Path, input_size: int) -> float:
    """``model``'s val loss on ``config``'s val split, run end to end from the images (no feature cache).

    Batched as training batches it: a dense head normalises its loss by each batch's positives.
    """
    cfg = load_config(config)
    data = build_data(cfg)
    dataset = ImageDataset(data.records["val"], data.targets["val"], input_size)
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, collate_fn=collate)
    metrics, _ = evaluate(model, loader, torch.device("cpu"), progress=False)
    return metrics["loss"]
