"""An ensemble of dense heads on one backbone pass ("dense_ensemble").

Each member is a :class:`~metaldefect.models.heads.dense.DenseHead`; the ensemble's
prediction is the mean of the members' per-location class logits, distances and quality
logits, decoded once (score, NMS) by the first member. Averaging before the decoding
rather than pooling the members' boxes keeps one box per location, so NMS sees no
near-duplicates. On NEU-DET, pairs of separately trained heads averaged this way
raised the median val mAP@0.5:0.95 of single heads by 0.014 and mAP@0.5 by 0.005
(docs/benchmarks.md, session 10).

Two ways to get one:

- ``metaldefect ensemble RUN... --out DIR`` (:mod:`metaldefect.engine.ensemble`) puts
  heads trained in separate runs on the same frozen backbone together;
- a config with ``head: dense_ensemble`` trains ``members`` heads side by side in one run.
  The loss is the mean of the members' own losses, so no member's gradient depends on
  another's: they are independent heads that share the batches (each its own
  initialisation and dropout masks).

Shapes as in :mod:`.dense`: ``B`` images, ``L`` locations, ``K`` classes.
"""
from __future__ import annotations

import torch
from torch import nn

from metaldefect.errors import ConfigError
from metaldefect.models.heads import create_head, register_head

AVERAGED = ("cls_logits", "box_ltrb", "quality_logits")  # quality_logits: only heads with score="quality"
# Options that fix what a location's outputs mean; members must agree on them to be averaged.
SHARED_MEANING = ("scales", "size_ranges", "score")


def average_outputs(outputs: list[dict]) -> dict:
    """Dense-head outputs of the same locations (``[B, L, ...]`` each), as one: :data:`AVERAGED` keys are
    the mean, the rest (locations, strides) are the first's; ``box_bin_logits`` belong to one head only."""
    mean = {key: value for key, value in outputs[0].items() if key != "box_bin_logits"}
    for key in AVERAGED & mean.keys():
        mean[key] = torch.stack([output[key] for output in outputs]).mean(dim=0)
    return mean


@register_head("dense_ensemble")
class DenseEnsembleHead(nn.Module):
    """Dense heads whose per-location outputs are averaged.

    Args:
        in_dims: the backbone's feature sizes (see :class:`~metaldefect.models.factory.DefectModel`).
        num_classes: ``K``.
        members: the number of members, all built with ``options``; or one dict per member of its
            own dense-head options, laid over ``options``.
        options: dense-head options shared by the members (see :class:`.dense.DenseHead`).
    """

    task = "detect"

    def __init__(self, in_dims: dict, num_classes: int, members: int | list[dict] = 3, **options):
        super().__init__()
        if isinstance(members, bool) or not isinstance(members, (int, list)):
            raise ConfigError(f"dense_ensemble members must be a count or a list of head options, got {members!r}")
        member_options = [dict(options) for _ in range(members)] if isinstance(members, int) \
            else [{**options, **member} for member in members]
        if len(member_options) < 2:
            raise ConfigError(f"dense_ensemble needs at least 2 members, got {len(member_options)}")
        self.members = nn.ModuleList(create_head("dense", in_dims, num_classes, **kwargs) for kwargs in member_options)
        first = self.members[0]
        for index, member in enumerate(self.members):
            differing = [name for name in SHARED_MEANING if getattr(member, name) != getattr(first, name)]
            if differing:
                raise ConfigError(f"dense_ensemble member {index} differs from member 0 in {differing[0]!r}: "
                                  "averaged outputs would mix locations or scores that mean different things")
        self.num_classes = num_classes
        self.needs_image = any(member.needs_image for member in self.members)

    def forward(self, features: dict) -> dict:
        """The members' averaged outputs (keys as :meth:`.DenseHead.forward`, without ``box_bin_logits``),
        and ``"members"``: each member's own outputs, for the loss."""
        outputs = [member(features) for member in self.members]
        return {**average_outputs(outputs), "members": outputs}

    def loss(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """The mean over members of each member's loss on its own outputs (and of each part).

        So the val loss a run logs is the members' mean, not the loss of their averaged prediction.
        """
        losses = [member.loss(output, targets) for member, output in zip(self.members, outputs["members"])]
        return {key: torch.stack([loss[key] for loss in losses]).mean() for key in losses[0]}

    @torch.no_grad()
    def metrics(self, outputs: dict, targets: list[dict]) -> dict[str, tuple[float, float]]:
        """The first member's metrics (``pos_acc``, ``pos_iou``), computed on the averaged outputs."""
        return self.members[0].metrics(outputs, targets)

    @torch.no_grad()
    def decode(self, outputs: dict, image_sizes: list[tuple[int, int]], classes: list[str],
               score_threshold: float = 0.0):
        """The averaged outputs decoded as one dense head's (:meth:`.DenseHead.decode`)."""
        return self.members[0].decode(outputs, image_sizes, classes, score_threshold)
