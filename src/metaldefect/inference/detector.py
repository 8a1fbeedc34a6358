"""``Detector``: load a trained model (a run, an exported ONNX file, or the built-in model) and predict.

    from metaldefect import Detector
    detector = Detector.load("runs/neu_dense")          # or "builtin", or "model.onnx"
    detections = detector.predict("plate.png")          # [Detection(box, label, score), ...]

Images of any kind (path, ``PIL.Image``, or a numpy array: grayscale, RGB, RGBA, 16-bit)
become ``[H, W, 3]`` uint8 RGB, are resized to the network's square input exactly as in
training (:func:`metaldefect.data.transforms.to_input_tensor`), and the head's ``decode``
maps boxes back to pixels of the original image. Images much larger than the input
are tiled (:mod:`metaldefect.inference.tiling`).

Backends: ``"torch"`` runs the PyTorch model; ``"onnx"`` runs an exported graph with
onnxruntime (a run or the built-in model is exported to a temporary file first).
Both decode with the same head code, so they give the same detections.
"""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from metaldefect.data.images import load_image, to_uint8_rgb
from metaldefect.data.records import Detection
from metaldefect.data.transforms import to_input_tensor
from metaldefect.engine.precision import autocast, dtype_name, to_float32, training_dtype
from metaldefect.errors import DataError, MetalDefectError
from metaldefect.inference.tiling import DEFAULT_OVERLAP, check_overlap, parse_tile, predict_tiled, tile_side
from metaldefect.models.refiner import gray_image

DEFAULT_CONF = 0.3
DEFAULT_BATCH_SIZE = 8
BACKENDS = ("auto", "torch", "onnx")

Network = Callable[[torch.Tensor], dict]
"""``images [B, 3, S, S] float in [0, 1] -> head outputs {name: tensor [B, ...]}``."""


class TorchNetwork:
    """The PyTorch model as a :data:`Network` (inference mode, CPU), under autocast to ``dtype`` unless float32.

    Outputs come back float32 whatever ``dtype`` is, so decoding is the same for every precision.
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.float32):
        self.model = model.eval()
        self.dtype = dtype

    def __call__(self, images: torch.Tensor) -> dict:
        with torch.inference_mode(), autocast(self.dtype):
            outputs = self.model(images)
        return to_float32(outputs)


def as_rgb(image: str | Path | np.ndarray | Image.Image) -> np.ndarray:
    """Any supported image -> ``[H, W, 3]`` uint8 RGB; DataError for what cannot be one.

    Arrays: ``[H, W]`` or ``[H, W, 1|3|4]`` (alpha dropped); non-uint8 arrays (16-bit, float)
    are stretched from their own min..max to 0..255, as 16-bit files are.
    """
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return to_uint8_rgb(image)
    if not isinstance(image, np.ndarray):
        raise DataError(f"cannot read an image from a {type(image).__name__}; pass a path, a PIL image or an array")
    if image.ndim == 3 and image.shape[2] in (1, 3, 4):
        channels = image[:, :, :3] if image.shape[2] != 1 else np.repeat(image, 3, axis=2)
    elif image.ndim == 2:
        channels = np.repeat(image[:, :, None], 3, axis=2)
    else:
        raise DataError(f"image array of shape {image.shape}: expected [H, W] or [H, W, 1|3|4]")
    if min(channels.shape[:2]) < 1:
        raise DataError(f"image array of shape {image.shape} is empty")
    if channels.dtype == np.uint8:
        return np.ascontiguousarray(channels)
    values = channels.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    scale = 255.0 / (high - low) if high > low else 0.0
    return ((values - low) * scale).round().astype(np.uint8)


class Detector:
    """A trained model ready to predict on images.

    Attributes:
        classes: class vocabulary, index order.
        input_size: side of the square network input, pixels.
        card: model card (name, backbone, backbone_weights, head, training_command, data, split, metrics...).
        task: "detect", or "classify" (a classifier's prediction is one whole-image detection).
        backend: "torch" or "onnx".
        refiner: the box refiner applied to the detections (``metaldefect refine``), or None.
        dtype: the arithmetic of the PyTorch backend's network and refiner (float32 for ONNX Runtime).
    """

    def __init__(self, network: Network, head: torch.nn.Module, classes: list[str], input_size: int, card: dict,
                 backend: str = "torch", tile: str | int = "auto",
                 overlap: float = DEFAULT_OVERLAP, conf: float | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 refiner=None, dtype: torch.dtype = torch.float32):
        self.network = network
        self.head = head
        self.classes = list(classes)
        self.input_size = int(input_size)
        self.card = card
        self.backend = backend
        self.task = head.task
        self.tile = parse_tile(tile)
        self.overlap = check_overlap(overlap)
        self.conf = conf
        self.batch_size = int(batch_size)
        self.refiner = refiner if self.task == "detect" else None
        self.dtype = dtype
        self._keep: object = None  # holds a temporary export folder alive as long as the detector

    @classmethod
    def load(cls, source: str | Path = "builtin", backend: str = "auto", tile: str | int = "auto",
             conf: float | None = None, overlap: float | None = None,
             batch_size: int = DEFAULT_BATCH_SIZE, threads: int | None = None, refine: bool = True,
             precision: str = "fp32") -> "Detector":
        """Load ``source``: "builtin", a training run directory (its ``checkpoint_best.pt``), a
        checkpoint ``.pt`` file of a run, or an exported ``.onnx`` file (with its sidecar JSON).

        ``backend``: "auto" (ONNX Runtime for .onnx files, PyTorch otherwise), "torch" or "onnx".
        ``tile``: "auto", "off" or a tile side in pixels; ``overlap``: fraction of a tile (None: 0.25).
        ``conf``: default score threshold (else the model card's, else 0.3).
        ``threads``: CPU threads (None: the libraries' defaults); sets ``torch.set_num_threads`` for
        the whole process (resizing and decoding run in torch with either backend) and ONNX Runtime's
        intra-op threads. On a CPU other jobs keep busy, 1 can be several times faster than more
        (docs/benchmarks.md).
        ``refine``: move the detections' sides with the model's box refiner when it has one
        (``metaldefect refine RUN``: ``refiner.pt`` in the run; packaged with the built-in model;
        ``<name>.refiner.onnx`` beside an exported file).
        ``precision``: the PyTorch backend's arithmetic, "fp32", "bf16" (autocast), or "auto" (bf16 where the
        CPU computes it natively, as in training; :mod:`metaldefect.engine.precision`). ONNX Runtime runs
        its graph in float32 whatever this says, except that an explicit "bf16" is an error there.
        """
        if backend not in BACKENDS:
            raise MetalDefectError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        if batch_size < 1:
            raise MetalDefectError(f"batch size {batch_size}: expected a positive number")
        if threads is not None:
            if threads < 1:
                raise MetalDefectError(f"threads {threads}: expected a positive number")
            torch.set_num_threads(threads)
        # Options are checked before the (slow) model load, so a typo fails at once.
        dtype = training_dtype(precision)
        overlap = check_overlap(DEFAULT_OVERLAP if overlap is None else overlap)
        options = dict(tile=parse_tile(tile), overlap=overlap, conf=conf, batch_size=batch_size)
        path = Path(source)
        onnx_file = str(source) != "builtin" and path.suffix.lower() == ".onnx"
        if precision == "bf16" and (onnx_file or backend == "onnx"):
            raise MetalDefectError("precision bf16 runs on the torch backend only; ONNX Runtime runs float32")
        if onnx_file:
            if backend == "torch":
                raise MetalDefectError(f"{path}: an .onnx file runs with the onnx backend, not torch")
            return cls._from_onnx(path, threads, refine, **options)
        model, classes, spec, card = load_torch_model(source)
        refiner = load_model_refiner(source, classes) if refine else None
        if backend == "onnx":
            from metaldefect.inference.onnx_export import export_onnx

            folder = tempfile.TemporaryDirectory(prefix="metaldefect-onnx-")
            exported = export_onnx(model, classes, spec, Path(folder.name) / "model.onnx", card, refiner=refiner)
            detector = cls._from_onnx(exported, threads, refine, **options)
            detector._keep = folder
            return detector
        return cls(TorchNetwork(model, dtype), model.head, classes, model.backbone.input_size, card, "torch",
                   refiner=refiner, dtype=dtype, **options)

    @classmethod
    def _from_onnx(cls, path: Path, threads: int | None, refine: bool, **options) -> "Detector":
        from metaldefect.inference.onnx_runtime import load_onnx, load_onnx_refiner

        network, head, sidecar = load_onnx(path, threads)
        refiner = load_onnx_refiner(path, sidecar, threads) if refine else None
        return cls(network, head, sidecar["classes"], sidecar["input_size"], sidecar.get("card") or {}, "onnx",
                   refiner=refiner, **options)

    def score_threshold(self, conf: float | None = None) -> float:
        """The threshold in use: ``conf``, else the one given to :meth:`load`, else the card's, else 0.3."""
        for value in (conf, self.conf, self.card.get("score_threshold")):
            if value is not None:
                if not 0.0 <= float(value) <= 1.0:
                    raise MetalDefectError(f"score threshold {value}: expected a value in [0, 1]")
                return float(value)
        return DEFAULT_CONF

    def predict(self, image: str | Path | np.ndarray | Image.Image, conf: float | None = None) -> list[Detection]:
        """Detections on one image, best first; boxes are pixel ``xyxy`` of the original image."""
        return self.predict_batch([image], conf)[0]

    def predict_batch(self, images: list, conf: float | None = None) -> list[list[Detection]]:
        """:meth:`predict` for several images; the network runs on batches of ``batch_size`` inputs."""
        threshold = self.score_threshold(conf)
        arrays = [as_rgb(image) for image in images]
        detect = functools.partial(self._detect_crops, threshold=threshold)
        results: list[list[Detection] | None] = [None] * len(arrays)
        whole = []
        for index, array in enumerate(arrays):
            height, width = array.shape[:2]
            side = tile_side(width, height, self.tile, self.input_size) if self._tiles() else None
            if side is None:
                whole.append(index)
            else:
                results[index] = predict_tiled(array, detect, side, self.overlap)
        for index, detections in zip(whole, detect([arrays[i] for i in whole])):
            results[index] = detections
        if self.refiner is not None:
            results = [self._refine(array, detections) for array, detections in zip(arrays, results)]
        return results

    def _refine(self, array: np.ndarray, detections: list[Detection]) -> list[Detection]:
        """The detections with their boxes moved by the refiner, on the whole original image."""
        if not detections:
            return detections
        index = {name: i for i, name in enumerate(self.classes)}
        boxes = torch.tensor([d.box for d in detections], dtype=torch.float32)
        labels = torch.tensor([index[d.label] for d in detections], dtype=torch.long)
        with torch.inference_mode(), autocast(self.dtype):
            refined = self.refiner.refine(gray_image(array), boxes, labels)
        return [Detection(box, d.label, d.score) for box, d in zip(refined.tolist(), detections)]

    def _tiles(self) -> bool:
        # Automatic tiling is for detectors; a classifier tiles only when asked for a tile size.
        return self.task == "detect" or isinstance(self.tile, int)

    def _detect_crops(self, crops: list[np.ndarray], threshold: float) -> list[list[Detection]]:
        """Per ``[h, w, 3]`` uint8 crop, its detections in the crop's pixels."""
        results = []
        for start in range(0, len(crops), self.batch_size):
            chunk = crops[start:start + self.batch_size]
            batch = torch.stack([to_input_tensor(crop, self.input_size) for crop in chunk])
            sizes = [(crop.shape[1], crop.shape[0]) for crop in chunk]
            decoded = self.head.decode(self.network(batch), sizes, self.classes, score_threshold=threshold)
            if self.task == "classify":  # ranked (class, probability) -> the top class as a whole-image box
                decoded = [[Detection([0.0, 0.0, float(w), float(h)], ranked[0][0], ranked[0][1])] if ranked else []
                           for ranked, (w, h) in zip(decoded, sizes)]
            results.extend(decoded)
        return results

    def __repr__(self) -> str:
        return (f"Detector(name={self.card.get('name')!r}, backend={self.backend!r}, task={self.task!r}, "
                f"classes={len(self.classes)}, input_size={self.input_size}, tile={self.tile!r}, "
                f"refiner={self.refiner is not None}, precision={dtype_name(self.dtype)!r})")


def load_model_refiner(source: str | Path, classes: list[str]):
    """The box refiner that goes with "builtin", a run directory or a run's checkpoint file; None if it has none."""
    from metaldefect.engine.refine import REFINER_FILE, load_refiner
    from metaldefect.inference.builtin import load_builtin_refiner

    if str(source) == "builtin":
        return load_builtin_refiner(classes)
    path = Path(source)
    refiner_path = (path if path.is_dir() else path.parent) / REFINER_FILE
    return load_refiner(refiner_path, classes) if refiner_path.is_file() else None


def load_torch_model(source: str | Path) -> tuple[torch.nn.Module, list[str], dict, dict]:
    """``(model, classes, create_model spec, card)`` of "builtin", a run directory or a run's checkpoint file."""
    from metaldefect.engine.checkpoint import load_checkpoint, model_from_checkpoint
    from metaldefect.inference.builtin import card_from_run, load_builtin

    if str(source) == "builtin":
        return load_builtin()
    path = Path(source)
    if path.is_dir():
        checkpoint_path, run_dir = path / "checkpoint_best.pt", path
        if not checkpoint_path.is_file():
            raise MetalDefectError(f"{path}: not a training run (no checkpoint_best.pt in it)")
    elif path.is_file() and path.suffix == ".pt":
        checkpoint_path, run_dir = path, path.parent
    elif path.exists():
        raise MetalDefectError(f"{path}: not a model; expected a run directory, a .pt checkpoint, "
                               "an .onnx file or 'builtin'")
    else:
        raise MetalDefectError(f"{path}: no such run directory or model file (expected a run directory, "
                               "a .pt checkpoint, an .onnx file or 'builtin')")
    checkpoint = load_checkpoint(checkpoint_path)
    missing = [key for key in ("part", "state", "model_spec", "classes") if key not in checkpoint] \
        if isinstance(checkpoint, dict) else ["everything: it is not a dict"]
    if missing:
        raise MetalDefectError(f"{checkpoint_path}: not a metaldefect checkpoint (lacks {', '.join(missing)})")
    try:
        model = model_from_checkpoint(checkpoint)
    except RuntimeError as error:  # load_state_dict: tensors that do not fit the model the spec builds
        raise MetalDefectError(f"{checkpoint_path}: weights do not fit its model "
                               f"({' '.join(str(error).split())[:300]})") from None
    return model, list(checkpoint["classes"]), dict(checkpoint["model_spec"]), card_from_run(run_dir, checkpoint)
