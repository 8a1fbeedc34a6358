"""A second stage that moves a detection's sides onto the defect's edges, from the pixels around it.

A frozen ViT sees the image in patches of 12.5 px (NEU-DET at 224 px), so the dense head
places a box side only roughly; the short side of a NEU-DET inclusion's or scratch's box is
25 or 19 px (medians), two patches or less.
The refiner looks at each detected box again at the image's own resolution: the box,
enlarged by ``context`` around its centre, is cut out of the grayscale image with
``torchvision.ops.roi_align`` and resampled to ``crop x crop`` pixels, so every box,
whatever its size and aspect, reaches the network in one frame (R-CNN's box head does the
same on feature maps). A small CNN, told the class and the box's size, predicts how far
each side should move, as a fraction of the box's width or height (R-CNN's box deltas
on ``x1, y1, x2, y2``). Scores and classes are left as they are.

It is trained apart from the detector, on the training images' labelled boxes jittered
at random (:mod:`metaldefect.engine.refine`), so it does not depend on the detector
it follows and any detecting run can use it.

Shapes: ``N`` boxes, ``K`` classes, ``C = crop``.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchvision.ops import roi_align

# The deltas are learnt divided by this, so that typical targets are about 1 (R-CNN's 0.1 box-coder std).
DELTA_SCALE = 0.1
# Narrower boxes are widened to this many pixels before cropping, so a crop never samples a zero-width line.
MIN_SIDE = 2.0


def gray_image(image: np.ndarray) -> torch.Tensor:
    """``[H, W, 3]`` uint8 RGB -> ``[1, 1, H, W]`` float grayscale in [0, 1] (channel mean)."""
    return torch.from_numpy(image.astype(np.float32)).mean(dim=2)[None, None] / 255.0  # astype: a writable copy


def crop_boxes(images: torch.Tensor, image_index: torch.Tensor, boxes: torch.Tensor, crop: int,
               context: float) -> torch.Tensor:
    """Cut each box, enlarged by ``context`` around its centre, out of its image.

    Args:
        images: ``[B, 1, H, W]`` grayscale in [0, 1].
        image_index: ``[N]`` the image of each box.
        boxes: ``[N, 4]`` pixel ``xyxy``.

    Returns:
        ``[N, 1, crop, crop]``; parts outside the image are 0.
    """
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).clamp(min=MIN_SIDE) * context / 2
    rois = torch.cat([image_index[:, None].to(boxes.dtype), centre - half, centre + half], dim=1)
    return roi_align(images, rois, crop, spatial_scale=1.0, sampling_ratio=2, aligned=True)


def encode_deltas(boxes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[N, 4]`` boxes and their target boxes (``xyxy``) -> ``[N, 4]`` scaled side deltas."""
    size = (boxes[:, 2:] - boxes[:, :2]).clamp(min=MIN_SIDE).repeat(1, 2)
    return (targets - boxes) / size / DELTA_SCALE


def apply_deltas(boxes: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_deltas`: ``[N, 4]`` boxes moved by ``[N, 4]`` scaled deltas."""
    size = (boxes[:, 2:] - boxes[:, :2]).clamp(min=MIN_SIDE).repeat(1, 2)
    return boxes + deltas * DELTA_SCALE * size


def _block(channels_in: int, channels_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(channels_out), nn.SiLU(inplace=True))


class BoxRefiner(nn.Module):
    """Side deltas for detected boxes from a crop of the image around each.

    Args:
        num_classes: ``K``; each class has its own learnt embedding, as defects of different
            kinds end differently (a scratch's tip, a patch's blurred rim).
        crop: side of the resampled crop in pixels (halved four times by the network).
        context: how much larger than the box the crop is (2.0: half the box's size beyond
            each side, where a side that should move out can be seen).
        width: channels of the first convolution; later ones are 2x and 4x.
    """

    def __init__(self, num_classes: int, crop: int = 48, context: float = 2.0, width: int = 32):
        super().__init__()
        if crop < 16 or crop % 16:
            raise ValueError(f"refiner crop must be a multiple of 16, at least 16; got {crop}")
        if context < 1.0:
            raise ValueError(f"refiner context must be at least 1 (the whole box), got {context}")
        self.kwargs = {"num_classes": num_classes, "crop": crop, "context": context, "width": width}
        self.crop, self.context = crop, context
        self.features = nn.Sequential(
            _block(1, width, 2), _block(width, 2 * width, 1), _block(2 * width, 2 * width, 2),
            _block(2 * width, 4 * width, 1), _block(4 * width, 4 * width, 2), _block(4 * width, 4 * width, 2))
        self.class_embedding = nn.Embedding(num_classes, 32)
        cells = (crop // 16) ** 2
        self.predict = nn.Sequential(nn.Linear(4 * width * cells + 32 + 2, 256), nn.SiLU(inplace=True),
                                     nn.Linear(256, 4))
        nn.init.zeros_(self.predict[-1].weight)  # starts as the identity: no box moves before it has learnt
        nn.init.zeros_(self.predict[-1].bias)

    def forward(self, crops: torch.Tensor, labels: torch.Tensor, relative_sizes: torch.Tensor) -> torch.Tensor:
        """``crops`` ``[N, 1, C, C]`` in [0, 1], ``labels`` ``[N]`` class indices, ``relative_sizes``
        ``[N, 2]`` box width and height over the image's -> scaled deltas ``[N, 4]``."""
        pixels = (crops - 0.5) / 0.25  # NEU-DET and GC10-DET grey levels centre near 0.5
        features = self.features(pixels).flatten(1)
        return self.predict(torch.cat([features, self.class_embedding(labels), relative_sizes], dim=1))

    def deltas(self, images: torch.Tensor, image_index: torch.Tensor, boxes: torch.Tensor,
               labels: torch.Tensor) -> torch.Tensor:
        """Scaled deltas ``[N, 4]`` for ``boxes`` ``[N, 4]`` (pixel ``xyxy``) of ``images`` ``[B, 1, H, W]``."""
        return self(*refiner_inputs(images, image_index, boxes, labels, self.crop, self.context))

    @torch.no_grad()
    def refine(self, image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Refined boxes ``[N, 4]`` for ``boxes`` ``[N, 4]`` of one ``image`` ``[1, 1, H, W]``."""
        return refine_boxes(self, self.crop, self.context, image, boxes, labels)


def refiner_inputs(images: torch.Tensor, image_index: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
                   crop: int, context: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The network's inputs for ``boxes`` ``[N, 4]`` of ``images`` ``[B, 1, H, W]``: crops ``[N, 1, C, C]``,
    labels ``[N]`` and the boxes' sizes over their image's ``[N, 2]``."""
    crops = crop_boxes(images, image_index, boxes, crop, context)
    image_size = torch.tensor([images.shape[-1], images.shape[-2]], dtype=boxes.dtype)  # (W, H)
    return crops, labels, (boxes[:, 2:] - boxes[:, :2]) / image_size


def mirrored_deltas(deltas: torch.Tensor, horizontal: bool, vertical: bool) -> torch.Tensor:
    """Deltas ``[N, 4]`` predicted on a mirrored crop, as moves of the unmirrored box's sides.

    Mirroring left-right swaps the left and right sides and turns an outward move into an
    outward move of the other side: ``(dx1, dy1, dx2, dy2) -> (-dx2, dy1, -dx1, dy2)``.
    """
    x1, y1, x2, y2 = deltas.unbind(dim=1)
    if horizontal:
        x1, x2 = -x2, -x1
    if vertical:
        y1, y2 = -y2, -y1
    return torch.stack([x1, y1, x2, y2], dim=1)


# The refiner is trained on flipped images, so it sees each crop as is and mirrored three ways at
# inference, and the four answers, mapped back, are averaged: with the built-in model's refiner this
# gave val mAP@0.5 0.728 and mAP@0.5:0.95 0.373 against 0.721 and 0.369 from one view
# (docs/benchmarks.md, session 11).
FLIP_VIEWS = ((False, False), (True, False), (False, True), (True, True))
# Boxes per network call, to bound memory: the built-in model on a tiled 2048 x 1000 noise image gave 297
# detections; refining them in one call raised the peak RSS by 485 MB, 64 at a time by 159 MB (session 11).
BOXES_PER_CALL = 64


def flip_averaged_deltas(network, crops: torch.Tensor, labels: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Scaled deltas ``[N, 4]`` for ``crops`` ``[N, 1, C, C]``: the mean over :data:`FLIP_VIEWS`, in one call."""
    # A crop of the mirrored image around the mirrored box is the mirrored crop, so the crop is cut once.
    views = [crops.flip([-1] * horizontal + [-2] * vertical) for horizontal, vertical in FLIP_VIEWS]
    count = len(FLIP_VIEWS)
    deltas = network(torch.cat(views), labels.repeat(count), sizes.repeat(count, 1)).view(count, len(crops), 4)
    return torch.stack([mirrored_deltas(d, *view) for d, view in zip(deltas, FLIP_VIEWS)]).mean(dim=0)


def refine_boxes(network, crop: int, context: float, image: torch.Tensor, boxes: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
    """Move ``boxes`` ``[N, 4]`` of one ``image`` ``[1, 1, H, W]`` by ``network``'s deltas, clipped to the image.

    The deltas are averaged over :data:`FLIP_VIEWS` of each crop, :data:`BOXES_PER_CALL` boxes at a time.
    ``network(crops, labels, relative_sizes) -> deltas``: a :class:`BoxRefiner`, or its ONNX graph
    (:mod:`metaldefect.inference.onnx_runtime`), which is why this is not a method.
    """
    if not len(boxes):
        return boxes
    index = torch.zeros(len(boxes), dtype=torch.long)
    crops, labels, sizes = refiner_inputs(image, index, boxes, labels, crop, context)
    deltas = torch.cat([flip_averaged_deltas(network, crops[i:i + BOXES_PER_CALL], labels[i:i + BOXES_PER_CALL],
                                             sizes[i:i + BOXES_PER_CALL])
                        for i in range(0, len(boxes), BOXES_PER_CALL)])
    moved = apply_deltas(boxes, deltas)
    height, width = image.shape[-2:]
    x = moved[:, 0::2].clamp(0, width)
    y = moved[:, 1::2].clamp(0, height)
    moved = torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)
    # Sides that crossed (or a box pushed off the image) say nothing useful: keep the detector's box.
    crossed = (moved[:, 2] <= moved[:, 0]) | (moved[:, 3] <= moved[:, 1])
    return torch.where(crossed[:, None], boxes, moved)
