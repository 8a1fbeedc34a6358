"""``metaldefect weights ...``: where each backbone's pretrained weights come from, and preparing them."""
from __future__ import annotations

import argparse

from metaldefect.models.backbones import KNOWN_BACKBONES
from metaldefect.models.weights import TRAINED_FROM_SCRATCH, resolve_weights, split_name, weights_status


def register(subparsers) -> None:
    weights = subparsers.add_parser("weights", help="pretrained backbone weights: list, fetch")
    commands = weights.add_subparsers(dest="weights_command", metavar="WEIGHTS_COMMAND", required=True)

    listing = commands.add_parser("list", help="each known backbone, where its weights come from, whether present")
    listing.set_defaults(handler=run_list)

    fetch = commands.add_parser("fetch", help="resolve (and convert, for offline providers) a backbone's weights")
    fetch.add_argument("name", help="timm backbone name, e.g. vit_small_patch14_dinov2")
    fetch.set_defaults(handler=run_fetch)


def run_list(args: argparse.Namespace) -> int:
    rows = [weights_status(name) for name in KNOWN_BACKBONES]
    width = max(len(row["name"]) for row in rows)
    source_width = max(len(row["source"]) for row in rows)
    for row in rows:
        present = "present" if row["present"] else "missing"
        print(f"{row['name']:<{width}}  {row['source']:<{source_width}}  {present}  {row['detail']}")
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    if split_name(args.name)[0] in TRAINED_FROM_SCRATCH:
        print(f"{args.name}: trained from scratch; there are no pretrained weights to fetch")
        return 0
    info = resolve_weights(args.name).info
    print(f"{info['name']}: {info['source']} ({info['pretrained_tag']})")
    print(f"sha256 {info['sha256']}")
    print(f"path {info['path']}")
    return 0
