"""Feature cache for frozen backbones: extract once, memory-map afterwards.

``extract_features(backbone, paths, cache_dir, views=("none", "hflip"))`` runs every image
(resized to ``input_size`` squares by antialiased bilinear interpolation, exactly as
:func:`metaldefect.data.transforms.to_input_tensor` does for end-to-end training, then
mirrored for the view) through the backbone and stores fp16 ``.npy`` arrays per view:

    pooled.npy        [N, D]
    map.npy           [N, D, h, w]          (absent when it equals the last layer, see below)
    layer{i}.npy      [N, D_i, h_i, w_i]    one file per entry of backbone.layers

For ViTs whose ``layers`` end with the last block, that layer *is* the map (both pass
the final norm), so it is stored once. Arrays are opened with ``np.load(mmap_mode="r")``:
4.5 GB of ViT-S/14 features at 448 px never need to fit in memory.

Cache entry = one folder per view, named by a hash of: backbone name, sha256 of its weights,
input size, layers, view, the preprocessing version, the arithmetic when it is not float32
(``dtype``) and the sha1 of every image file's bytes in order. Same keys -> the folder is
reused (no forward pass); any changed key -> another folder, computed afresh. Under bf16
autocast on a CPU with AMX, DINOv2 ViT-S/14's layer outputs stay within 0.6 % of float32's
(relative norm of the difference), and extracting NEU-DET's 6480 image views took 205 s
against 600 s (docs/benchmarks.md, session 13). Extraction writes into ``<entry>.partial/`` in batches,
recording the rows done in ``progress.json`` after each; an interrupted run resumes from
there, and a finished entry appears by an atomic rename. A lock file serialises
processes that extract into the same cache folder (POSIX ``fcntl``).

A mix view (:mod:`metaldefect.data.mixing`) stores the features of each image joined with its
partner; its plan (``mixes``) is part of the entry's key, so another pairing is another entry.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from metaldefect.atomic import write_text
from metaldefect.data.images import load_image
from metaldefect.data.mixing import MixPlan, mix_images
from metaldefect.data.transforms import VIEWS, to_input_tensor, view_image
from metaldefect.engine.precision import autocast, dtype_name
from metaldefect.errors import DataError
from metaldefect.models.backbones import Backbone
from metaldefect.models.weights import cache_dir as user_cache_dir
from metaldefect.models.weights import tensor_checksum

# Bump when preprocessing (resize, views, array layout) changes, so old entries are not reused.
PREPROCESSING_VERSION = 1


def default_cache_dir() -> Path:
    """``$METALDEFECT_CACHE/features`` (default ``~/.cache/metaldefect/features``)."""
    return user_cache_dir() / "features"


@dataclass
class ViewFeatures:
    """Memory-mapped fp16 features of one view; row i belongs to image i."""

    pooled: np.ndarray  # [N, D]
    map: np.ndarray  # [N, D, h, w]
    layers: list[np.ndarray]  # [N, D_l, h_l, w_l] per layer
    directory: Path


@dataclass
class FeatureSet:
    """Features of ``paths`` for each requested view.

    ``index`` maps each path (as given, ``str``) to its row; ``computed`` tells, per view,
    how many images this call had to run through the backbone (0 = cache hit).
    """

    paths: list[Path]
    views: dict[str, ViewFeatures]
    key: dict
    computed: dict[str, int] = field(default_factory=dict)

    @property
    def index(self) -> dict[str, int]:
        return {str(path): row for row, path in enumerate(self.paths)}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, view: str) -> ViewFeatures:
        return self.views[view]

    def get(self, row: int, view: str = "none") -> dict:
        """One image's features as float32 tensors: {"pooled": [D], "map": [D, h, w], "layers": [[D_l, h_l, w_l]]}.

        Signature of :data:`metaldefect.data.dataset.FeatureSource`.
        """
        features = self.views[view]
        as_tensor = lambda array: torch.from_numpy(np.asarray(array[row], dtype=np.float32))  # noqa: E731
        return {
            "pooled": as_tensor(features.pooled),
            "map": as_tensor(features.map),
            "layers": [as_tensor(layer) for layer in features.layers],
        }


def file_sha1(path: Path) -> str:
    try:
        return hashlib.sha1(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read image ({error.__class__.__name__}: {error})") from None


def backbone_key(backbone: Backbone, dtype: torch.dtype = torch.float32) -> dict:
    """Everything about the backbone and its arithmetic ``dtype`` that changes its features.

    The weights checksum is taken from the module's current tensors (a fraction of a second),
    not from ``weights_info``, so weights changed in place after creation are noticed too.
    Float32 adds no key, so entries written before ``dtype`` existed keep their names.
    """
    return {
        "backbone": backbone.name,
        "weights_sha256": tensor_checksum(backbone.model.state_dict()),
        "input_size": backbone.input_size,
        "layers": list(backbone.layers),
        "preprocessing": PREPROCESSING_VERSION,
        **({} if dtype == torch.float32 else {"precision": dtype_name(dtype)}),
    }


def entry_name(key: dict, view: str, image_sha1s: list[str], mix: MixPlan | None = None) -> str:
    named = {**key, "view": view, **({"mix": mix.digest()} if mix is not None else {})}
    digest = hashlib.sha1(json.dumps(named, sort_keys=True).encode())
    for sha1 in image_sha1s:
        digest.update(sha1.encode())
    return f"{key['backbone']}-{view}-{digest.hexdigest()[:20]}"


def map_is_last_layer(backbone: Backbone) -> bool:
    """True when the output map equals the last cached layer (ViT with the final block chosen)."""
    return bool(backbone.is_vit and backbone.layers and backbone.layers[-1] == len(backbone.model.blocks) - 1)


class _Images(Dataset):
    """Images ``[3, size, size]`` in [0, 1] (the resize of end-to-end training)."""

    def __init__(self, paths: list[Path], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return to_input_tensor(load_image(self.paths[index]), self.size)


def _view_batch(batch: torch.Tensor, view: str, rows: range, paths: list[Path], size: int,
                mix: MixPlan | None) -> torch.Tensor:
    """Images ``[B, 3, S, S]`` of ``rows`` seen in ``view``: a mix view joins each with its partner
    (read from disk here, as the loader reads the batch)."""
    if mix is None:
        return view_image(batch, view)
    mixed = []
    for image, row in zip(batch, rows):
        path = str(paths[row])
        partner = to_input_tensor(load_image(Path(mix.partner[path])), size)
        mixed.append(mix_images(image, partner, mix.cut[path], mix.axis))
    return torch.stack(mixed)


class _EntryWriter:
    """Fills one view's ``<entry>.partial`` folder batch by batch, then renames it into place."""

    def __init__(self, final: Path, count: int, meta: dict, store_map: bool):
        self.final, self.count, self.meta, self.store_map = final, count, meta, store_map
        self.partial = final.with_name(final.name + ".partial")
        self.arrays: dict[str, np.ndarray] = {}
        self.done = self._resume()

    def _resume(self) -> int:
        progress = self.partial / "progress.json"
        if progress.is_file():
            recorded = json.loads(progress.read_text())
            self.arrays = {name: np.load(self.partial / f"{name}.npy", mmap_mode="r+") for name in recorded["arrays"]}
            return int(recorded["done"])
        shutil.rmtree(self.partial, ignore_errors=True)  # nothing recorded yet: start clean
        return 0

    def write(self, row: int, outputs: dict) -> None:
        """Store ``outputs`` (the backbone's batch dict) at rows ``row...``, then record progress."""
        named = {"pooled": outputs["pooled"], **{f"layer{i}": x for i, x in enumerate(outputs["layers"])}}
        if self.store_map:
            named["map"] = outputs["map"]
        if not self.arrays:
            self.partial.mkdir(parents=True, exist_ok=True)
            self.arrays = {
                name: np.lib.format.open_memmap(
                    self.partial / f"{name}.npy", mode="w+", dtype=np.float16, shape=(self.count, *x.shape[1:])
                )
                for name, x in named.items()
            }
        end = row + len(outputs["pooled"])
        for name, x in named.items():
            self.arrays[name][row:end] = x.float().cpu().numpy().astype(np.float16)
            self.arrays[name].flush()
        self.done = end
        write_text(self.partial / "progress.json", json.dumps({"done": end, "arrays": sorted(self.arrays)}))

    def finish(self) -> None:
        self.arrays.clear()  # close the memmaps before the rename
        write_text(self.partial / "meta.json", json.dumps(self.meta, indent=1))
        (self.partial / "progress.json").unlink()
        os.replace(self.partial, self.final)


def _open_entry(directory: Path, store_map: bool) -> ViewFeatures:
    meta = json.loads((directory / "meta.json").read_text())
    layers = [np.load(directory / f"layer{i}.npy", mmap_mode="r") for i in range(len(meta["layers"]))]
    pooled = np.load(directory / "pooled.npy", mmap_mode="r")
    feature_map = np.load(directory / "map.npy", mmap_mode="r") if store_map else layers[-1]
    return ViewFeatures(pooled=pooled, map=feature_map, layers=layers, directory=directory)


@contextlib.contextmanager
def _locked(cache_dir: Path):
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def extract_features(
    backbone: Backbone,
    image_paths: list[Path],
    cache_dir: Path,
    batch_size: int = 32,
    views: tuple[str, ...] = ("none",),
    num_workers: int = 0,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    mixes: dict[str, MixPlan] | None = None,
) -> FeatureSet:
    """Features of ``image_paths`` for each view, from the cache or computed into it (see module doc);
    computed ones under autocast to ``dtype`` when it is not float32. ``mixes`` holds the plan of each
    mix view among ``views``, over these paths."""
    paths = [Path(p) for p in image_paths]
    cache_dir = Path(cache_dir)
    mixes = mixes or {}
    unknown = [view for view in views if view not in VIEWS and view not in mixes]
    if unknown or not views:
        raise ValueError(f"views must be a non-empty selection of {VIEWS} or mix views with a plan, "
                         f"got {tuple(views)}")
    if not paths:
        raise DataError("no images to extract features from")
    key = backbone_key(backbone, dtype)
    sha1s = [file_sha1(path) for path in paths]
    entries = {view: cache_dir / entry_name(key, view, sha1s, mixes.get(view)) for view in dict.fromkeys(views)}
    store_map = not map_is_last_layer(backbone)
    computed = {view: 0 for view in entries}

    if any(not entry.is_dir() for entry in entries.values()):
        with _locked(cache_dir):
            missing = {view: entry for view, entry in entries.items() if not entry.is_dir()}
            if missing:
                computed.update(_compute(backbone, paths, missing, key, store_map, batch_size, num_workers, progress,
                                         dtype, mixes))
    views_features = {view: _open_entry(entry, store_map) for view, entry in entries.items()}
    return FeatureSet(paths=paths, views=views_features, key=key, computed=computed)


def _compute(backbone, paths, entries, key, store_map, batch_size, num_workers, progress, dtype,
             mixes) -> dict[str, int]:
    """Run the images through the backbone for the ``entries`` views; returns rows computed per view."""
    writers = {
        view: _EntryWriter(entry, len(paths), {**key, "view": view, "count": len(paths),
                                               **({"mix": mixes[view].digest()} if view in mixes else {})},
                           store_map)
        for view, entry in entries.items()
    }
    start = min(writer.done for writer in writers.values())
    computed = {view: 0 for view in writers}
    loader = DataLoader(_Images(paths[start:], backbone.input_size), batch_size=batch_size, num_workers=num_workers)
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.buffers()).device
    description = f"features {backbone.name} @{backbone.input_size} [{', '.join(writers)}]"
    try:
        with tqdm(total=len(paths), initial=start, unit="img", desc=description, disable=not progress) as bar:
            row = start
            for batch in loader:
                end = row + len(batch)
                for view, writer in writers.items():
                    if writer.done >= end:
                        continue  # resumed: this view already holds these rows
                    images = _view_batch(batch, view, range(row, end), paths, backbone.input_size, mixes.get(view))
                    with torch.inference_mode(), autocast(dtype, device):
                        outputs = backbone(images.to(device))
                    writer.write(row, outputs)
                    computed[view] += len(batch)
                row = end
                bar.update(len(batch))
    finally:
        backbone.train(was_training)
    for writer in writers.values():
        writer.finish()
    return computed
