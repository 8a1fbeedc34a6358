"""Checkpoints: written atomically, resumable, and enough to rebuild the trained model.

A checkpoint is a dict:
``{"epoch": completed epochs, "part": "head" | "tuned" | "model", "state": state dict of that part,
"model_spec": create_model kwargs, "classes": [...], "metrics": val metrics of that epoch}``
plus, in ``checkpoint_last.pt`` only, ``"optimizer"``, ``"scheduler"``, ``"rng"``,
``"history"`` and ``"trainer"`` (best value, stale epochs) for ``--resume``.
With a frozen backbone only the head is stored (``part: "head"``), or the head and the
tuned last ViT blocks (``part: "tuned"``, see :mod:`metaldefect.models.tail_tuning`); the backbone is
rebuilt from its pretrained weights, named in ``model_spec`` (a frozen randomly
initialised backbone, which cannot be rebuilt so, is stored as ``"backbone_state"``).
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from metaldefect.atomic import atomic_path
from metaldefect.config import resolve_path
from metaldefect.errors import ConfigError, MetalDefectError
from metaldefect.models.factory import DefectModel, create_model


def save_checkpoint(path: str | Path, checkpoint: dict) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MetalDefectError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises many types for a damaged file; all mean the same here
        raise MetalDefectError(f"{path}: cannot read checkpoint ({error.__class__.__name__}: {error})") from None


def capture_rng() -> dict:
    """The random states a resumed run needs to continue the same sequence (one process)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_from_checkpoint(checkpoint: dict, device: str | torch.device = "cpu") -> DefectModel:
    """Rebuild the trained :class:`DefectModel` (backbone + head) from a checkpoint dict."""
    spec = dict(checkpoint["model_spec"])
    if checkpoint["part"] == "model":
        spec["pretrained"] = False  # every weight comes from the checkpoint
    model = create_model(**spec)
    load_trained_weights(model, checkpoint)
    return model.to(device).eval()


def load_trained_weights(model: DefectModel, checkpoint: dict) -> None:
    """Load what the checkpoint's run trained (its head, tuned blocks or whole model) into ``model``."""
    if "backbone_state" in checkpoint:  # first: a tuned run's own blocks go on top
        model.backbone.load_state_dict(checkpoint["backbone_state"])
    model.load_trained(checkpoint["part"], checkpoint["state"])


# What must agree between a run and the run whose weights it starts from (train.init_from); the
# backbone's weight source may differ, since the loaded weights replace them.
SAME_FOR_INIT = ("backbone_name", "head_name", "num_classes", "input_size", "layers", "head_kwargs")


def start_from(model: DefectModel, spec: dict, classes: list[str], source: str) -> None:
    """Load into ``model`` what another run trained (``source``: its directory, for its best checkpoint, or a
    checkpoint file): its head, tuned blocks or whole model, over the pretrained weights.

    A head trained alone (a frozen backbone's run, ``part: "head"``) may start a run at another input size:
    a convolutional head such as the dense one holds nothing of the grid's size (a head whose weights do,
    e.g. one flattening the whole map, fails to load with a one-line error). Tuned blocks or a whole model
    hold a ViT's position embeddings for their own grid, so their input size must agree.
    """
    path = resolve_path(source)
    if path.is_dir():
        path = path / "checkpoint_best.pt"
    start = load_checkpoint(path)
    theirs = start["model_spec"]
    keys = [key for key in SAME_FOR_INIT if not (key == "input_size" and start["part"] == "head")]
    differ = [f"{key} ({theirs.get(key)!r} there)" for key in keys if theirs.get(key) != spec.get(key)]
    if differ:
        raise ConfigError(f"train.init_from: {path}: its model differs in {', '.join(differ)}")
    if list(start["classes"]) != list(classes):
        raise ConfigError(f"train.init_from: {path}: its classes {start['classes']} are not this run's {classes}")
    try:
        load_trained_weights(model, start)
    except RuntimeError as error:  # load_state_dict's report of shapes that do not fit, many lines long
        last_line = str(error).strip().splitlines()[-1].strip()
        raise ConfigError(f"train.init_from: {path}: its weights do not fit this model ({last_line})") from None


def load_run(run_dir: str | Path, which: str = "best",
             device: str | torch.device = "cpu") -> tuple[DefectModel, list[str], dict]:
    """``(model, classes, checkpoint)`` of a training run directory; ``which`` is "best" or "last"."""
    if which not in ("best", "last"):
        raise MetalDefectError(f"checkpoint {which!r}: expected 'best' or 'last'")
    checkpoint = load_checkpoint(Path(run_dir) / f"checkpoint_{which}.pt")
    return model_from_checkpoint(checkpoint, device), list(checkpoint["classes"]), checkpoint
