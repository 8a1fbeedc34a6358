"""Feature-extraction throughput and feature-cache reuse on real NEU-DET images.

Throughput: each backbone runs in its own process (so peak memory is its own): one
warm-up batch, then ``--repeats`` timed forward passes of ``--batch-size`` real images
at ``--input-size`` px; reports the median images/s and the process's peak RSS.

Cache: ``extract_features`` over every image of the dataset into a fresh cache folder,
then the same call again (a cache hit), timing both.

    python benchmarks/feature_extraction.py --data ../shared/data/NEU-DET

Prints a Markdown section for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from metaldefect.data.images import IMAGE_SUFFIXES, load_image
from metaldefect.data.transforms import to_input_tensor
from metaldefect.engine.features import extract_features
from metaldefect.models import create_backbone


def dataset_images(root: Path) -> list[Path]:
    folder = root / "IMAGES" if (root / "IMAGES").is_dir() else root
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def throughput(name: str, root: Path, input_size: int, batch_size: int, repeats: int) -> dict:
    """Median images/s of ``repeats`` timed batches, this process's RSS before the model and its peak RSS."""
    baseline_mb = current_rss_mb()  # torch, timm and the package imported, no model yet
    backbone = create_backbone(name, input_size=input_size)
    images = torch.stack([to_input_tensor(load_image(p), input_size) for p in dataset_images(root)[:batch_size]])
    seconds = []
    with torch.inference_mode():
        backbone(images)  # warm-up
        for _ in range(repeats):
            started = time.perf_counter()
            backbone(images)
            seconds.append(time.perf_counter() - started)
    rates = [batch_size / s for s in seconds]
    return {
        "backbone": name,
        "weights": backbone.weights_info["source"],
        "images_per_s": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "baseline_rss_mb": baseline_mb,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cache_reuse(name: str, root: Path, input_size: int, batch_size: int, cache: Path) -> dict:
    backbone = create_backbone(name, input_size=input_size)
    paths = dataset_images(root)
    timings = []
    for _ in range(2):
        started = time.perf_counter()
        features = extract_features(backbone, paths, cache, batch_size=batch_size)
        timings.append((time.perf_counter() - started, features.computed["none"]))
    size = sum(f.stat().st_size for f in features["none"].directory.iterdir())
    return {"backbone": name, "images": len(paths), "runs": timings, "cache_mb": size / 2**20}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="NEU-DET root (IMAGES/) or a folder of images")
    parser.add_argument("--backbones", nargs="+", default=["vit_small_patch14_dinov2", "tf_efficientnet_lite0"])
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache-backbone", default="vit_small_patch14_dinov2", help="backbone for the cache run")
    parser.add_argument("--skip-cache", action="store_true", help="throughput only")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one backbone in this process
    args = parser.parse_args()

    if args.one:
        print(json.dumps(throughput(args.one, args.data, args.input_size, args.batch_size, args.repeats)))
        return 0

    load_before = os.getloadavg()
    results = []
    for name in args.backbones:
        command = [sys.executable, __file__, "--data", str(args.data), "--one", name, "--input-size",
                   str(args.input_size), "--batch-size", str(args.batch_size), "--repeats", str(args.repeats)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
    cache = None
    if not args.skip_cache:
        with tempfile.TemporaryDirectory(prefix="metaldefect-bench-") as folder:
            cache = cache_reuse(args.cache_backbone, args.data, args.input_size, args.batch_size, Path(folder))
    load_after = os.getloadavg()

    print(f"Machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after.\n")
    print(f"Throughput at {args.input_size} px, batch {args.batch_size}, median of {args.repeats} timed batches "
          "after one warm-up (forward pass only, images already decoded and resized):\n")
    print("| backbone | weights | images/s (median) | min - max | peak RSS (MB) | RSS before model (MB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['backbone']} | {r['weights']} | {r['images_per_s']:.1f} | {r['min']:.1f} - {r['max']:.1f} "
              f"| {r['peak_rss_mb']:.0f} | {r['baseline_rss_mb']:.0f} |")
    if cache:
        (cold, computed), (warm, reused) = cache["runs"]
        print(f"\nCache: `extract_features` over all {cache['images']} images with {cache['backbone']} at "
              f"{args.input_size} px (view none, fp16, {cache['cache_mb']:.0f} MB on disk):\n")
        print("| run | images computed | seconds |")
        print("| --- | --- | --- |")
        print(f"| first (cold cache) | {computed} | {cold:.1f} |")
        print(f"| second (same keys) | {reused} | {warm:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
