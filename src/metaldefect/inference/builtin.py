"""The built-in model shipped inside the package, its sample images, and model cards.

``src/metaldefect/builtin_model/`` (written by ``benchmarks/package_builtin.py RUN``)::

    weights.safetensors  weights of the trained part: the head alone for a frozen-backbone
                         run (the backbone comes from its offline weights provider), the
                         head and the tuned last ViT blocks for a ``tune_blocks`` run, the
                         whole model for one trained end to end (in float16 when packaged so)
    refiner.safetensors  the run's box refiner, when it has one (``metaldefect refine``)
    model_card.json      what the model is: backbone and its weights' checksum, head, classes,
                         training command, data, split, metrics, the create_model spec, and
                         the refiner's settings
    MODEL_CARD.md        the same for people
    config.yaml, classes.json, metrics.json   copied from the run

``src/metaldefect/samples/``: a few credited NEU-DET images (see its CREDITS file) that
``metaldefect demo`` runs the built-in model on.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml

from metaldefect import __version__
from metaldefect.atomic import staged_directory, write_bytes, write_text
from metaldefect.data.images import IMAGE_SUFFIXES
from metaldefect.engine.ensemble import training_record
from metaldefect.errors import MetalDefectError, WeightsError
from metaldefect.models.factory import DefectModel, create_model
from metaldefect.models.refiner import BoxRefiner

PACKAGE_DIR = Path(__file__).resolve().parents[1]
BUILTIN_DIR = PACKAGE_DIR / "builtin_model"
SAMPLES_DIR = PACKAGE_DIR / "samples"
WEIGHTS_FILE = "weights.safetensors"
REFINER_WEIGHTS_FILE = "refiner.safetensors"
CARD_FILE = "model_card.json"
CARD_MARKDOWN = "MODEL_CARD.md"
RUN_FILES = ("config.yaml", "classes.json", "metrics.json")
STORED_DTYPES = {"float32": torch.float32, "float16": torch.float16}  # of weights.safetensors
NO_BUILTIN = "no built-in model is packaged in this build; pass --model RUN (a training run directory)"


def builtin_dir() -> Path:
    """The packaged model's folder; MetalDefectError when this build has none."""
    if not (BUILTIN_DIR / CARD_FILE).is_file() or not (BUILTIN_DIR / WEIGHTS_FILE).is_file():
        raise MetalDefectError(NO_BUILTIN)
    return BUILTIN_DIR


def sample_images() -> list[Path]:
    """The packaged sample images, sorted by name."""
    return sorted(p for p in SAMPLES_DIR.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def read_json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MetalDefectError(f"{path}: file not found") from None
    except (OSError, ValueError) as error:
        raise MetalDefectError(f"{path}: unreadable JSON ({error})") from None


def load_builtin(folder: Path | None = None) -> tuple[DefectModel, list[str], dict, dict]:
    """``(model in eval mode, classes, create_model spec, card)`` of the packaged model.

    The backbone is rebuilt from its offline weights; their checksum must equal the one the
    head was trained on (WeightsError otherwise: the head would sit on different features).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = builtin_dir() if folder is None else Path(folder)
    card = read_json(folder / CARD_FILE)
    spec, part = dict(card["model_spec"]), card["part"]
    if part == "model":
        spec["pretrained"] = False  # every weight comes from the packaged file
    model = create_model(**spec)
    expected = (card.get("backbone_weights") or {}).get("sha256")
    if part in ("head", "tuned") and expected and model.backbone.weights_info.get("sha256") != expected:
        raise WeightsError(f"{folder / CARD_FILE}: the backbone weights found here (sha256 "
                           f"{model.backbone.weights_info.get('sha256')}) are not those the model was trained on "
                           f"({expected}); reinstall the weights package named in the model card")
    try:
        state = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError) as error:
        raise MetalDefectError(f"{folder / WEIGHTS_FILE}: unreadable weights ({error})") from None
    try:
        model.load_trained(part, state)
    except RuntimeError as error:
        raise MetalDefectError(f"{folder / WEIGHTS_FILE}: weights do not fit the model in the card "
                               f"({' '.join(str(error).split())[:300]})") from None
    return model.eval(), list(card["classes"]), spec, card


def load_builtin_refiner(classes: list[str], folder: Path | None = None) -> BoxRefiner | None:
    """The packaged box refiner (eval mode), or None when the built-in model has none."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = builtin_dir() if folder is None else Path(folder)
    card = read_json(folder / CARD_FILE)
    if not card.get("refiner"):
        return None
    refiner = BoxRefiner(**card["refiner"]["kwargs"])
    if refiner.kwargs["num_classes"] != len(classes):
        raise MetalDefectError(f"{folder / CARD_FILE}: the refiner knows {refiner.kwargs['num_classes']} classes, "
                               f"the model {len(classes)}")
    try:
        refiner.load_state_dict(load_file(str(folder / REFINER_WEIGHTS_FILE)))
    except (SafetensorError, OSError, RuntimeError) as error:
        raise MetalDefectError(f"{folder / REFINER_WEIGHTS_FILE}: unreadable refiner weights "
                               f"({' '.join(str(error).split())[:300]})") from None
    return refiner.eval()


def card_from_run(run_dir: str | Path, checkpoint: dict, command: str | None = None) -> dict:
    """A model card for a training run: name, backbone and weights, head, data, split, metrics."""
    run_dir = Path(run_dir)
    spec = checkpoint["model_spec"]
    config = _read_yaml(run_dir / "config.yaml")
    metrics = read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").is_file() else {}
    data = config.get("data", {}) if isinstance(config, dict) else {}
    weights = dict(checkpoint.get("weights") or {})
    weights.pop("path", None)  # a path on the training machine means nothing elsewhere
    return {
        "name": (config.get("name") if isinstance(config, dict) else None) or run_dir.name,
        "task": metrics.get("task"),
        "backbone": spec["backbone_name"],
        "backbone_weights": weights,
        "head": spec["head_name"],
        "head_kwargs": spec.get("head_kwargs") or {},
        "input_size": spec.get("input_size"),
        "classes": list(checkpoint["classes"]),
        "training_command": command or f"metaldefect train {run_dir / 'config.yaml'}",
        "data": {"root": data.get("root"), "format": data.get("format")},
        "split": {"split_dir": data.get("split_dir"), "ratios": data.get("split"), "seed": data.get("split_seed"),
                  "images": metrics.get("images")},
        "metrics": {"best_epoch": metrics.get("best_epoch"), "monitor": metrics.get("monitor"),
                    "final_fit": bool(metrics.get("final_fit")), "val": metrics.get("best"),
                    "test": metrics.get("test")},
        # What the run's training cost, and in which arithmetic (an ensemble records it per member).
        "training": training_record(metrics),
        # An ensemble (metaldefect ensemble) has no epoch of its own: its members' runs and epochs say what it is.
        **({"members": [{"run": Path(m["run"]).name, "best_epoch": m.get("best_epoch"),
                         **training_record(m)} for m in metrics["members"]]}
           if metrics.get("members") else {}),
        # A run started from another's weights (train.init_from) cost that run's training too.
        **_started_from((config.get("train") or {}).get("init_from") if isinstance(config, dict) else None),
    }


def _started_from(init_from: str | None) -> dict:
    """``{"started_from": {"run": name, **its training record}}`` for a run trained from another's weights."""
    if not init_from:
        return {}
    source = Path(init_from)
    run = source if source.is_dir() else source.parent  # a run folder, or a checkpoint file inside one
    metrics = read_json(run / "metrics.json") if (run / "metrics.json").is_file() else {}
    return {"started_from": {"run": run.name, "best_epoch": metrics.get("best_epoch"), **training_record(metrics)}}


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise MetalDefectError(f"{path}: unreadable config ({error})") from None


def package_run(run_dir: str | Path, dest: str | Path = BUILTIN_DIR, command: str | None = None,
                score_threshold: float = 0.3, detection_metrics: dict | None = None,
                weights_dtype: str = "float32") -> Path:
    """Copy a run's trained weights, config, classes and metrics into ``dest`` with a model card.

    For a frozen-backbone run only the head's weights are copied; the backbone must come from
    an offline weights provider (not a local ``weights_file``), so a fresh install can rebuild it.
    ``detection_metrics``: per split, a ``DetectionReport.to_dict()`` (shown in the card).
    ``weights_dtype="float16"`` stores the model's floating-point weights at half their size (a ViT
    fine-tuned end to end ships whole: about 100 MB in float32, over PyPI's default file limit);
    they load back as float32. The run's box refiner (``refiner.pt``, from ``metaldefect refine``)
    is packaged with it, in float32. ``dest`` is replaced as a whole, atomically.
    """
    from safetensors.torch import save

    from metaldefect.engine.checkpoint import load_checkpoint
    from metaldefect.engine.refine import REFINER_FILE

    if weights_dtype not in STORED_DTYPES:
        raise MetalDefectError(f"weights dtype {weights_dtype!r}: expected one of {', '.join(STORED_DTYPES)}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MetalDefectError(f"{run_dir}: run directory not found")
    checkpoint = load_checkpoint(run_dir / "checkpoint_best.pt")
    spec = dict(checkpoint["model_spec"])
    if checkpoint["part"] in ("head", "tuned") and spec.get("weights_file"):
        raise MetalDefectError(f"{run_dir}: the backbone was loaded from a local file ({spec['weights_file']}); "
                               "a built-in model needs backbone weights an install can resolve offline")
    spec["weights_file"] = None
    card = card_from_run(run_dir, checkpoint, command)
    card.update({"part": checkpoint["part"], "model_spec": spec, "score_threshold": score_threshold,
                 "weights_dtype": weights_dtype, "packaged_with": f"metaldefect {__version__}"})
    if detection_metrics:
        card["detection_metrics"] = {split: _detection_summary(report) for split, report in detection_metrics.items()}
    refiner = load_checkpoint(run_dir / REFINER_FILE) if (run_dir / REFINER_FILE).is_file() else None
    if refiner is not None:
        card["refiner"] = {key: refiner.get(key) for key in ("kwargs", "settings", "best_epoch", "best",
                                                             "train_seconds", "precision")}
    with staged_directory(dest) as staging:
        weights = _tensors(checkpoint["state"], STORED_DTYPES[weights_dtype])
        write_bytes(staging / WEIGHTS_FILE, save(weights))  # save_file would leave it 0600
        if refiner is not None:
            write_bytes(staging / REFINER_WEIGHTS_FILE, save(_tensors(refiner["state"])))
        for name in RUN_FILES:
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, staging / name)
        write_text(staging / CARD_FILE, json.dumps(card, indent=2) + "\n")
        write_text(staging / CARD_MARKDOWN, card_markdown(card))
    return Path(dest)


def _tensors(state: dict, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The state's tensors, contiguous on the CPU; floating-point ones in ``dtype`` (integer buffers as they are)."""
    return {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
            for k, v in state.items() if isinstance(v, torch.Tensor)}


def _detection_summary(report: dict) -> dict:
    """The card's part of a ``DetectionReport.to_dict()``: mAP, per-class AP@0.5, P and R at the threshold."""
    keep = ("num_images", "map50", "map", "score_threshold", "precision", "recall")
    return {**{key: report.get(key) for key in keep},
            "ap50": {name: values["ap50"] for name, values in report.get("per_class", {}).items()}}


def _detection_rows(detection: dict) -> list[str]:
    def fmt(value) -> str:
        return "-" if value is None else f"{value:.3f}"
    rows = ["| split | images | mAP@0.5 | mAP@0.5:0.95 | precision / recall at the threshold | AP@0.5 per class |",
            "| --- | --- | --- | --- | --- | --- |"]
    for split, report in detection.items():
        per_class = ", ".join(f"{name} {fmt(ap)}" for name, ap in report["ap50"].items())
        rows.append(f"| {split} | {report['num_images']} | {fmt(report['map50'])} | {fmt(report['map'])} | "
                    f"{fmt(report['precision'])} / {fmt(report['recall'])} at {report['score_threshold']} | {per_class} |")
    return rows


def _metric_rows(metrics: dict | None) -> list[str]:
    if not metrics:
        return ["| (none recorded) | |"]
    return [f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |"
            for key, value in metrics.items() if not isinstance(value, (dict, list))]


def _epoch_rows(card: dict) -> list[str]:
    """The checkpoint's epoch, its training cost (and that of the run it started from) and its metrics; for
    an ensemble, which has no epoch of its own, its members' runs, epochs and costs."""
    if card.get("members"):
        return [f"- Ensemble of {len(card['members'])} dense heads, outputs averaged: "
                + ", ".join(f"run `{m['run']}` (best epoch {m['best_epoch']}{_training_note(m)})"
                            for m in card["members"])]
    metrics = card.get("metrics") or {}
    monitor = metrics.get("monitor") or {}
    if metrics.get("final_fit"):
        epoch = (f"- A final fit (`train.final_fit`): trained on the train and val images together, checkpoint "
                 f"from the last epoch, {metrics.get('best_epoch')}")
        val = ["Validation: none (the val images were trained on); test is the held-out check."]
    else:
        epoch = f"- Best epoch: {metrics.get('best_epoch')} (by {monitor.get('metric')}, {monitor.get('mode')})"
        val = ["Validation (best epoch):", "", "| metric | value |", "| --- | --- |", *_metric_rows(metrics.get("val"))]
    started = card.get("started_from")
    start = ([f"- Started from the weights of run `{started['run']}` (`train.init_from`; its epoch "
              f"{started.get('best_epoch')}{_training_note(started)})"] if started else [])
    return [epoch + _training_note(card.get("training") or {}), *start,
            "", "## Metrics", "", *val,
            "", "Test:", "", "| metric | value |", "| --- | --- |",
            *_metric_rows(metrics.get("test"))]


def _refiner_note(refiner: dict) -> str:
    """``"val IoU of jittered boxes 0.650 -> 0.761; trained in 357 s, bfloat16"`` (no val IoU after a final fit)."""
    best = refiner.get("best") or {}
    iou = (f"val IoU of jittered boxes {best['val_iou_before']:.3f} -> {best['val_iou_after']:.3f}; "
           if "val_iou_after" in best else "")
    return f"{iou}trained in {refiner['train_seconds']:.0f} s, {refiner.get('precision') or 'float32'}"


def _training_note(member: dict) -> str:
    """``"; trained in 1434 s after 205 s of feature extraction, bfloat16"``, or what of it the run recorded."""
    if "train_seconds" not in member:
        return ""
    extracted = round(member.get("feature_seconds") or 0)  # 0 when the features came from the cache
    features = f" after {extracted} s of feature extraction" if extracted else ""
    return f"; trained in {member['train_seconds']:.0f} s{features}, {member.get('precision') or 'float32'}"


def card_markdown(card: dict) -> str:
    """The model card as Markdown for people."""
    weights = card.get("backbone_weights") or {}
    split = card.get("split") or {}
    lines = [
        f"# Model card: {card['name']}", "",
        "The built-in model of metaldefect: it finds and locates defects on metal surface images "
        f"({', '.join(card['classes'])}).", "",
        "## Model", "",
        f"- Backbone: `{card['backbone']}`, weights `{weights.get('name')}` from `{weights.get('source')}` "
        f"(tag `{weights.get('pretrained_tag')}`, sha256 `{weights.get('sha256')}`); "
        + {"head": "frozen, not shipped here: rebuilt from the offline provider.",
           "tuned": "rebuilt from the offline provider; its last blocks were tuned and are shipped here "
                    "with the head."}.get(card.get("part"), "fine-tuned, shipped here with the head.")
        + (f" Weights stored in {card['weights_dtype']}, loaded as float32."
           if card.get("weights_dtype", "float32") != "float32" else ""),
        f"- Head: `{card['head']}` with `{json.dumps(card.get('head_kwargs') or {})}`",
        *([f"- Box refiner (`metaldefect refine`): `{json.dumps(card['refiner']['kwargs'])}`; it moves each "
           f"detection's sides from a crop of the image around it ({_refiner_note(card['refiner'])})"]
          if card.get("refiner") else []),
        f"- Input: {card['input_size']} x {card['input_size']} pixels; default score threshold "
        f"{card.get('score_threshold')}",
        "", "## Training", "",
        f"    {card['training_command']}", "",
        f"- Data: `{(card.get('data') or {}).get('root')}` (format `{(card.get('data') or {}).get('format')}`)",
        f"- Split: seed {split.get('seed')}, ratios {split.get('ratios')}, split folder `{split.get('split_dir')}`; "
        f"images: {', '.join(f'{k} {v}' for k, v in (split.get('images') or {}).items()) or 'not recorded'}",
        *_epoch_rows(card),
        *(["", "## Detection metrics (COCO, pycocotools, `metaldefect evaluate`)", "",
           *_detection_rows(card["detection_metrics"])] if card.get("detection_metrics") else []),
        "", "## Limits", "",
        "- Trained only on the data above (NEU-DET: 200 x 200 grayscale images of hot-rolled steel strip); "
        "other surfaces, cameras and lighting need evaluation, and likely retraining, before use.",
        "- Large images are tiled (see docs/inference.md); defects larger than a tile may be split.",
        "", "## Data credit", "",
        "NEU-DET: K. Song and Y. Yan, Northeastern University surface defect database.", "",
    ]
    return "\n".join(lines)
