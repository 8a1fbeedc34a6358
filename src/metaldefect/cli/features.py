"""``metaldefect features extract``: cache a frozen backbone's features for a dataset (split)."""
from __future__ import annotations

import argparse
import sys
import time

from metaldefect.data.loading import FORMATS, load_dataset
from metaldefect.data.split import read_split, select_split
from metaldefect.data.transforms import VIEWS
from metaldefect.engine.features import default_cache_dir, extract_features
from metaldefect.engine.precision import PRECISIONS, dtype_name, training_dtype
from metaldefect.models.backbones import DEFAULT_BACKBONE, create_backbone


def register(subparsers) -> None:
    features = subparsers.add_parser("features", help="frozen-backbone feature cache")
    commands = features.add_subparsers(dest="features_command", metavar="FEATURES_COMMAND", required=True)

    extract = commands.add_parser("extract", help="extract (or reuse) cached features of a dataset or split")
    extract.add_argument("--data", required=True, metavar="ROOT", help="dataset folder (or COCO json)")
    extract.add_argument("--split", metavar="FILE", help="split file (image paths relative to ROOT); default: all")
    extract.add_argument("--format", default="auto", choices=["auto", *FORMATS],
                         help="dataset format (default: detect)")
    extract.add_argument("--backbone", default=DEFAULT_BACKBONE, metavar="NAME",
                         help=f"timm name (default: {DEFAULT_BACKBONE})")
    extract.add_argument("--input-size", type=int, default=224, metavar="N",
                         help="square input side in pixels (default: 224)")
    extract.add_argument("--layers", type=int, nargs="+", metavar="I",
                         help="ViT blocks / CNN feature levels (default: the backbone's)")
    extract.add_argument("--views", nargs="+", default=["none"], choices=VIEWS, help="views to cache (default: none)")
    extract.add_argument("--weights", metavar="FILE", help="explicit weights file (timm state dict)")
    extract.add_argument("--random-init", action="store_true", help="no pretrained weights (pretrained: false)")
    extract.add_argument("--cache", metavar="DIR", help=f"cache folder (default: {default_cache_dir()})")
    extract.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    extract.add_argument("--workers", type=int, default=0, help="image-loading worker processes (default: 0)")
    extract.add_argument("--precision", choices=PRECISIONS, default="auto",
                         help="arithmetic of the forward passes, as train.precision: auto is bf16 on a CPU that "
                              "computes it natively (AMX, AVX512-BF16), float32 elsewhere; training reuses only "
                              "entries of its own precision (default: auto)")
    extract.set_defaults(handler=run_extract)


def run_extract(args: argparse.Namespace) -> int:
    records, problems = load_dataset(args.data, args.format)
    problems.print(sys.stderr)
    if args.split:
        records = select_split(records, args.data, read_split(args.split), args.split)
    backbone = create_backbone(args.backbone, pretrained=not args.random_init, weights_file=args.weights,
                               input_size=args.input_size, layers=tuple(args.layers) if args.layers else None)
    dtype = training_dtype(args.precision)
    started = time.perf_counter()
    features = extract_features(backbone, [record.path for record in records], args.cache or default_cache_dir(),
                                batch_size=args.batch_size, views=tuple(args.views), num_workers=args.workers,
                                dtype=dtype)
    seconds = time.perf_counter() - started
    info = backbone.weights_info
    print(f"{backbone.name} @{backbone.input_size} px, layers {list(backbone.layers)}, weights {info['source']} "
          f"sha256 {info['sha256'][:12]}, {dtype_name(dtype)}")
    for view, view_features in features.views.items():
        done = features.computed[view]
        state = f"computed {done} images" if done else "reused from cache"
        print(f"{view}: {len(features)} images, {state} -> {view_features.directory}")
    print(f"{seconds:.1f} s")
    return 0
