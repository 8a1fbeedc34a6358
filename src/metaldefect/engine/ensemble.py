"""Dense heads trained in separate runs, put together as one run of a ``dense_ensemble`` head.

``assemble_ensemble([RUN, ...], OUT)`` writes ``OUT/`` as a training run would, so that
``evaluate``, ``predict``, ``export``, ``serve`` and the built-in packaging take it as they
take any run::

    checkpoint_best.pt  the members' heads as one dense_ensemble head (part "head")
    config.yaml         the first run's config with the ensemble head (training it trains the
                        members side by side in one run, see :mod:`metaldefect.models.heads.ensemble`)
    classes.json        the shared class vocabulary
    split/              the shared split files
    metrics.json        task, and each member's run, best epoch and metrics

The runs must share what averaging their outputs assumes: a frozen backbone with the same
weights (the same pretrained ones, or the same random ones), input size and layers, the same
classes, and the same split (otherwise one member's validation images could be another's
training images).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from metaldefect.atomic import staged_directory, write_text
from metaldefect.config import load_config, save_config
from metaldefect.engine.checkpoint import load_checkpoint, save_checkpoint
from metaldefect.engine.run_files import SPLIT_FILES, json_safe
from metaldefect.errors import MetalDefectError

# model_spec entries that belong to the head; every other entry must be the same in every member.
HEAD_SPEC = ("head_name", "head_kwargs")
# Kept from each member's metrics.json: what its training cost, and in which arithmetic.
TRAINING_RECORD = ("train_seconds", "feature_seconds", "precision")


def _member(run_dir: Path) -> dict:
    checkpoint = load_checkpoint(run_dir / "checkpoint_best.pt")
    spec = checkpoint.get("model_spec") or {}
    if checkpoint.get("part") != "head" or spec.get("head_name") != "dense":
        raise MetalDefectError(f"{run_dir}: not a dense head on a frozen backbone "
                               f"(head {spec.get('head_name')!r}, trained part {checkpoint.get('part')!r}); "
                               "only such runs can share one backbone pass")
    return checkpoint


def _same_tensors(a: dict | None, b: dict | None) -> bool:
    """Two state dicts (or None: a pretrained backbone, rebuilt from its weights) hold the same tensors."""
    if a is None or b is None:
        return a is b
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def _split_texts(run_dir: Path) -> dict[str, str]:
    return {name: (run_dir / "split" / name).read_text() for name in SPLIT_FILES
            if (run_dir / "split" / name).is_file()}


def training_record(metrics: dict) -> dict:
    """The entries of a run's metrics (or of an ensemble member's) that say what its training cost: seconds
    training and extracting features, and the arithmetic; ``{}`` for one written before these were kept."""
    return {key: metrics[key] for key in TRAINING_RECORD if key in metrics}


def _member_training_record(run: Path) -> dict:
    """:func:`training_record` of a member's ``metrics.json`` (``{}`` when the run has none yet)."""
    try:
        return training_record(json.loads((run / "metrics.json").read_text()))
    except (OSError, ValueError):
        return {}


def assemble_ensemble(run_dirs: list[str | Path], out_dir: str | Path) -> Path:
    """Write the ensemble of the best checkpoints of ``run_dirs`` to ``out_dir`` (a new folder).

    MetalDefectError when fewer than two runs are given, ``out_dir`` exists, or a run is not a
    frozen-backbone dense-head run matching the first one (backbone, classes, split).
    """
    runs, out_dir = [Path(run) for run in run_dirs], Path(out_dir)
    if len(runs) < 2:
        raise MetalDefectError(f"an ensemble needs at least 2 runs, got {len(runs)}")
    if out_dir.exists():
        raise MetalDefectError(f"{out_dir}: already exists; choose a new folder for the ensemble")
    checkpoints = [_member(run) for run in runs]
    first, first_split = checkpoints[0], _split_texts(runs[0])
    backbone = {k: v for k, v in first["model_spec"].items() if k not in HEAD_SPEC}
    for run, checkpoint in zip(runs[1:], checkpoints[1:]):
        theirs = {k: v for k, v in checkpoint["model_spec"].items() if k not in HEAD_SPEC}
        differing = sorted(k for k in backbone.keys() | theirs.keys() if backbone.get(k) != theirs.get(k))
        if differing:
            raise MetalDefectError(f"{run}: its backbone differs from {runs[0]}'s in {differing[0]!r} "
                                   f"({theirs.get(differing[0])!r} against {backbone.get(differing[0])!r})")
        if (checkpoint.get("weights") or {}).get("sha256") != (first.get("weights") or {}).get("sha256"):
            raise MetalDefectError(f"{run}: its backbone weights differ from {runs[0]}'s")
        if list(checkpoint["classes"]) != list(first["classes"]):
            raise MetalDefectError(f"{run}: its classes {checkpoint['classes']} differ from {runs[0]}'s "
                                   f"{first['classes']}")
        if not _same_tensors(checkpoint.get("backbone_state"), first.get("backbone_state")):
            raise MetalDefectError(f"{run}: its frozen random backbone differs from {runs[0]}'s (another seed?)")
        if _split_texts(run) != first_split:
            raise MetalDefectError(f"{run}: its split differs from {runs[0]}'s; members must share one split")

    head_kwargs = {"members": [dict(c["model_spec"].get("head_kwargs") or {}) for c in checkpoints]}
    spec = {**first["model_spec"], "head_name": "dense_ensemble", "head_kwargs": head_kwargs}
    state = {f"members.{index}.{key}": value
             for index, checkpoint in enumerate(checkpoints) for key, value in checkpoint["state"].items()}
    members = [{"run": str(run.resolve()), "best_epoch": c.get("epoch"), "val": c.get("metrics"),
                **_member_training_record(run)} for run, c in zip(runs, checkpoints)]
    first_cfg = load_config(runs[0] / "config.yaml")
    cfg = dataclasses.replace(first_cfg, name=out_dir.name, model=dataclasses.replace(
        first_cfg.model, head="dense_ensemble", head_kwargs=head_kwargs))

    with staged_directory(out_dir) as staging:  # an interrupted call leaves no half-made run
        (staging / "split").mkdir()
        for name in first_split:
            shutil.copyfile(runs[0] / "split" / name, staging / "split" / name)
        checkpoint = {"part": "head", "model_spec": spec, "classes": first["classes"],
                      "weights": first.get("weights"), "config": cfg.to_dict(), "epoch": None, "state": state,
                      "metrics": {}, "members": members}
        if "backbone_state" in first:  # a frozen random backbone cannot be rebuilt from weights (checkpoint.py)
            checkpoint["backbone_state"] = first["backbone_state"]
        save_checkpoint(staging / "checkpoint_best.pt", checkpoint)
        save_config(cfg, staging / "config.yaml")
        write_text(staging / "classes.json", json.dumps(list(first["classes"]), indent=2) + "\n")
        write_text(staging / "metrics.json", json.dumps(json_safe({"task": "detect", "members": members}),
                                                        indent=2) + "\n")
    return out_dir
