"""Training the box refiner (:mod:`metaldefect.models.refiner`) on a run's labelled boxes, jittered.

The refiner learns to undo a random error: each labelled box of a training image is moved
by Gaussian noise on each side (``jitter`` times its width or height), and the network
is taught the deltas that bring it back. With the noise drawn afresh every epoch and
flips of the image, it never sees the same input twice. It does not need the detector's
own boxes, so it trains in minutes beside any run, on the run's own split.

Training runs the convolutions channels-last, and in bfloat16 (autocast) where the CPU computes it natively
(AMX or AVX512-BF16), with the decoded images kept in memory: 48 epochs on NEU-DET took 657 s, against
1065 s in float32 without these, for the same val mAP (docs/benchmarks.md, session 12). Val is scored in
float32, as the refiner runs at inference.

Each epoch reports the mean IoU of jittered val boxes with their labelled boxes before
and after refinement (the val jitter is drawn once, from a fixed seed, so epochs compare);
the best epoch by the IoU after is kept.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import box_iou
from tqdm import tqdm

from metaldefect.data.images import load_image
from metaldefect.data.records import Record
from metaldefect.data.transforms import random_view, view_boxes, view_image
from metaldefect.engine.checkpoint import load_checkpoint, save_checkpoint
from metaldefect.engine.precision import autocast, dtype_name, training_dtype
from metaldefect.errors import MetalDefectError
from metaldefect.models.refiner import BoxRefiner, apply_deltas, encode_deltas, gray_image

REFINER_FILE = "refiner.pt"  # in the run directory it refines


@dataclass
class RefinerSettings:
    """How the refiner is trained (saved with it)."""

    epochs: int = 48
    images_per_batch: int = 16
    jitters_per_box: int = 4  # jittered copies of each labelled box per epoch
    # Standard deviation of a side's move, as a fraction of the box's width or height: 0.16 until session 32, where
    # 0.08 moved fewer good boxes off a detector fine-tuned end to end (val mAP@0.5 +0.006 to +0.009, two seeds).
    jitter: float = 0.08
    lr: float = 0.002
    weight_decay: float = 0.05
    crop: int = 48
    context: float = 2.0
    width: int = 32
    seed: int = 0
    precision: str = "auto"  # of training: "fp32", "bf16" (autocast), or "auto": bf16 where the CPU has it natively


# Decoded images are kept in memory up to this many bytes a split (NEU-DET: 161 MB train, 46 MB val); larger
# datasets load the rest from disk each epoch. On NEU-DET this cut 48 bf16 epochs from 708 to 657 s (session 12).
CACHE_BYTES = 1 << 30


class LabelledImages(Dataset):
    """``(gray [1, H, W] float, boxes [M, 4], labels [M])`` of the records with boxes; flips when training."""

    def __init__(self, records: list[Record], classes: list[str], flips: bool):
        index = {name: i for i, name in enumerate(classes)}
        self.records = [r for r in records if any(label in index for label in r.labels)]
        self.index, self.flips = index, flips
        self.cache: dict[int, torch.Tensor] = {}
        self.cached_bytes = 0

    def __len__(self) -> int:
        return len(self.records)

    def gray(self, item: int) -> torch.Tensor:
        """The record's image ``[1, H, W]``, decoded once while the cache has room (never changed in place)."""
        image = self.cache.get(item)
        if image is None:
            image = gray_image(load_image(self.records[item].path))[0]
            if self.cached_bytes + image.nbytes <= CACHE_BYTES:
                self.cache[item] = image
                self.cached_bytes += image.nbytes
        return image

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        record = self.records[item]
        image = self.gray(item)
        pairs = [(box, self.index[label]) for box, label in zip(record.boxes, record.labels) if label in self.index]
        boxes = torch.tensor([box for box, _ in pairs], dtype=torch.float32)
        labels = torch.tensor([label for _, label in pairs], dtype=torch.long)
        if not self.flips:
            return image, boxes, labels
        # Each flip with p = 1/2, independently: the four views of a rectangle that keep its shape, uniformly.
        view = random_view(("hflip", "vflip", "rot180"))
        height, width = image.shape[-2:]
        scale = boxes.new_tensor([width, height, width, height])  # view_boxes takes normalised boxes
        return view_image(image, view), view_boxes(boxes / scale, view) * scale, labels


def collate_padded(items):
    """Images padded with 0 at the bottom and right to the largest in the batch: ``[B, 1, H, W]``;
    the boxes ``[N, 4]``, labels ``[N]`` and image index ``[N]`` of all of them."""
    height = max(image.shape[-2] for image, _, _ in items)
    width = max(image.shape[-1] for image, _, _ in items)
    images = torch.zeros(len(items), 1, height, width)
    for i, (image, _, _) in enumerate(items):
        images[i, :, :image.shape[-2], :image.shape[-1]] = image
    boxes = torch.cat([boxes for _, boxes, _ in items])
    labels = torch.cat([labels for _, _, labels in items])
    image_index = torch.cat([torch.full((len(b),), i, dtype=torch.long) for i, (_, b, _) in enumerate(items)])
    return images, boxes, labels, image_index


def jitter_boxes(boxes: torch.Tensor, jitter: float, copies: int, image_size: tuple[int, int],
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``copies`` noisy versions of each of ``boxes`` ``[M, 4]``, clipped to the image ``(W, H)``.

    Returns the jittered boxes ``[copies * M', 4]`` and, for each, the row of ``boxes`` it came from;
    copies whose sides crossed are dropped.
    """
    source = torch.arange(len(boxes)).repeat(copies)
    base = boxes[source]
    size = (base[:, 2:] - base[:, :2]).repeat(1, 2)
    noisy = base + torch.randn(base.shape, generator=generator) * jitter * size
    width, height = image_size
    noisy = torch.stack([noisy[:, 0].clamp(0, width), noisy[:, 1].clamp(0, height),
                         noisy[:, 2].clamp(0, width), noisy[:, 3].clamp(0, height)], dim=1)
    valid = ((noisy[:, 2:] - noisy[:, :2]) >= 1.0).all(dim=1)
    return noisy[valid], source[valid]


def refiner_loss(refiner: BoxRefiner, batch, settings: RefinerSettings, generator=None):
    """Smooth-L1 loss of the deltas, and ``(jittered boxes, refined boxes, target boxes)`` of one batch."""
    images, boxes, labels, image_index = batch
    noisy, source = jitter_boxes(boxes, settings.jitter, settings.jitters_per_box,
                                 (images.shape[-1], images.shape[-2]), generator)
    targets, labels, image_index = boxes[source], labels[source], image_index[source]
    deltas = refiner.deltas(images, image_index, noisy, labels)
    loss = F.smooth_l1_loss(deltas.float(), encode_deltas(noisy, targets), beta=0.5)
    return loss, (noisy, apply_deltas(noisy, deltas.detach()), targets)


def train_one_epoch(refiner: BoxRefiner, loader, optimizer, scheduler, settings: RefinerSettings, epoch: int,
                    progress: bool = True, dtype: torch.dtype = torch.float32) -> float:
    """One pass over the training images, the network's ops in ``dtype`` (autocast); the mean loss."""
    refiner.train()
    total, count = 0.0, 0
    for batch in tqdm(loader, desc=f"refiner epoch {epoch}", leave=False, disable=not progress, dynamic_ncols=True):
        with autocast(dtype):
            loss, _ = refiner_loss(refiner, batch, settings)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total, count = total + loss.item(), count + 1
    return total / max(count, 1)


@torch.no_grad()
def evaluate(refiner: BoxRefiner, loader, settings: RefinerSettings) -> dict[str, float]:
    """Val loss, and mean IoU with the labelled boxes of the jittered boxes before and after refinement.

    The jitter comes from a generator seeded with ``settings.seed``, so every call sees the same boxes.
    """
    refiner.eval()
    generator = torch.Generator().manual_seed(settings.seed)
    losses, before, after = [], [], []
    for batch in loader:
        loss, (noisy, refined, targets) = refiner_loss(refiner, batch, settings, generator)
        losses.append(loss.item() * len(noisy))
        before.append(box_iou(noisy, targets).diagonal())
        after.append(box_iou(refined, targets).diagonal())
    count = sum(len(b) for b in before)
    if not count:
        raise MetalDefectError("refiner: the val split has no labelled boxes of the run's classes")
    return {"loss": sum(losses) / count, "iou_before": torch.cat(before).mean().item(),
            "iou_after": torch.cat(after).mean().item()}


def train_refiner(train_records: list[Record], val_records: list[Record], classes: list[str],
                  settings: RefinerSettings, progress: bool = True,
                  say=lambda text: print(text, file=sys.stderr)) -> tuple[BoxRefiner, dict]:
    """Train a refiner; return it (the best epoch by val IoU after refinement, eval mode; the last epoch when
    ``val_records`` is empty, as after a final fit) and a summary:
    ``{"settings", "best_epoch", "best", "history", "train_seconds"}``."""
    torch.manual_seed(settings.seed)
    train_set = LabelledImages(train_records, classes, flips=True)
    val_set = LabelledImages(val_records, classes, flips=False)
    if not len(train_set):
        raise MetalDefectError("refiner: the train split has no labelled boxes of the run's classes")
    train_loader = DataLoader(train_set, batch_size=settings.images_per_batch, shuffle=True,
                              collate_fn=collate_padded)
    val_loader = DataLoader(val_set, batch_size=settings.images_per_batch, collate_fn=collate_padded)
    dtype = training_dtype(settings.precision)
    # Channels-last convolutions: 1.3-1.5x faster float32 steps in one timing on this CPU, at the same precision.
    refiner = BoxRefiner(len(classes), settings.crop, settings.context, settings.width).to(
        memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(refiner.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr,
                                                    total_steps=settings.epochs * len(train_loader))
    history, best, best_state = [], None, None
    started = time.time()
    for epoch in range(1, settings.epochs + 1):
        train_loss = train_one_epoch(refiner, train_loader, optimizer, scheduler, settings, epoch, progress, dtype)
        val = evaluate(refiner, val_loader, settings) if len(val_set) else {}
        if not math.isfinite(train_loss):
            raise MetalDefectError(f"refiner epoch {epoch}: the training loss became {train_loss}; lower the lr")
        history.append({"epoch": epoch, "train_loss": train_loss, **{f"val_{k}": v for k, v in val.items()}})
        say(f"refiner epoch {epoch}/{settings.epochs}: train loss {train_loss:.4f}" + (
            f", val loss {val['loss']:.4f}, val IoU {val['iou_before']:.3f} -> {val['iou_after']:.3f}" if val else ""))
        if best is None or not val or val["iou_after"] > best["val_iou_after"]:
            best = history[-1]
            best_state = {k: v.clone(memory_format=torch.contiguous_format) for k, v in refiner.state_dict().items()}
    refiner = refiner.to(memory_format=torch.contiguous_format)
    refiner.load_state_dict(best_state)
    summary = {"settings": asdict(settings), "precision": dtype_name(dtype),
               "best_epoch": best["epoch"], "best": best, "history": history,
               "train_seconds": round(time.time() - started, 1)}
    return refiner.eval(), summary


def save_refiner(path: Path, refiner: BoxRefiner, classes: list[str], summary: dict) -> None:
    """Write the refiner and what it was trained with to ``path`` (atomically)."""
    save_checkpoint(path, {"kind": "box_refiner", "kwargs": dict(refiner.kwargs), "state": refiner.state_dict(),
                           "classes": list(classes), **summary})


def load_refiner(path: str | Path, classes: list[str]) -> BoxRefiner:
    """The refiner saved at ``path`` (eval mode); MetalDefectError when it is not one, or was
    trained on other classes than the detector's ``classes``."""
    saved = load_checkpoint(path)
    if not isinstance(saved, dict) or saved.get("kind") != "box_refiner":
        raise MetalDefectError(f"{path}: not a box refiner (written by `metaldefect refine RUN`)")
    if list(saved["classes"]) != list(classes):
        raise MetalDefectError(f"{path}: the refiner was trained on classes {saved['classes']}, "
                               f"not the model's {list(classes)}")
    refiner = BoxRefiner(**saved["kwargs"])
    try:
        refiner.load_state_dict(saved["state"])
    except RuntimeError as error:
        raise MetalDefectError(f"{path}: weights do not fit the refiner "
                               f"({' '.join(str(error).split())[:200]})") from None
    return refiner.eval()
