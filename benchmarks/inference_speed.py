"""Inference speed: PyTorch against ONNX Runtime, ms/image and images/s at batch 1 and 8, peak memory.

    python benchmarks/inference_speed.py --sizes 224 --batches 1 8 --repeats 10

The model is DINOv2 ViT-S/14 (offline weights) with the dense detection head at random
initialisation: speed does not depend on the head's weights. ``--builtin`` also measures
the packaged built-in model at its own input size, with and without its box refiner, on the
packaged NEU-DET samples (the refiner's cost grows with the number of detections, and noise
gives a trained model almost none). ``--bf16`` adds PyTorch under bf16 autocast (``Detector.load(...,
precision="bf16")``) beside float32 PyTorch and ONNX Runtime. Each backend runs in its own fresh
process so that its peak resident memory (``resource.getrusage`` maxrss, which includes the
Python and torch runtime every backend imports) is its own. The parent process never loads a
model (runs are made and exported in a child too): Linux carries a parent's peak RSS over
fork and exec into the child's maxrss, so a heavy parent would inflate every worker's figure.

Per configuration it reports the median over ``--repeats`` timed calls (after ``--warmup``
untimed ones) of:
- end to end: ``Detector.predict_batch`` on 200 x 200 uint8 images (resize, network, decode, NMS,
  and the box refiner when the model has one);
- network: the forward pass alone on a ready ``[batch, 3, S, S]`` tensor;
and the median of ``--large-repeats`` predictions of one 2048 x 1000 image (GC10-DET's size),
tiled automatically (random noise). The random head's images are random noise too; it finds almost
nothing in them, so decoding costs about what it costs on clean plates.
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

NUM_CLASSES = 6  # NEU-DET's
BACKEND_NAMES = {("torch", "fp32"): "PyTorch", ("torch", "bf16"): "PyTorch bf16", ("onnx", "fp32"): "ONNX Runtime"}


def make_random_head_run(folder: Path, input_size: int) -> Path:
    """A run directory holding DINOv2 ViT-S/14 + a randomly initialised dense head (head-only checkpoint)."""
    from metaldefect.engine.checkpoint import save_checkpoint
    from metaldefect.models.factory import create_model

    spec = dict(backbone_name="vit_small_patch14_dinov2", head_name="dense", num_classes=NUM_CLASSES, pretrained=True,
                weights_file=None, input_size=input_size, layers=None, head_kwargs={})
    model = create_model(**spec)
    run = folder / f"random_dense_{input_size}"
    run.mkdir(parents=True, exist_ok=True)
    save_checkpoint(run / "checkpoint_best.pt", {
        "epoch": 0, "part": "head", "state": model.head.state_dict(), "model_spec": spec,
        "classes": [f"class_{i}" for i in range(NUM_CLASSES)], "metrics": {}, "weights": model.backbone.weights_info})
    return run


def export(source: str, out: Path) -> Path:
    from metaldefect.inference.detector import load_model_refiner, load_torch_model
    from metaldefect.inference.onnx_export import export_onnx

    model, classes, spec, card = load_torch_model(source)
    return export_onnx(model, classes, spec, out, card, refiner=load_model_refiner(source, classes))


def prepare(args: argparse.Namespace) -> None:
    """Make the model to time (a random-head run, or the built-in model) and its ONNX export; print their paths."""
    folder = Path(args.folder)
    source = "builtin" if args.source == "builtin" else str(make_random_head_run(folder, int(args.source)))
    onnx_file = export(source, folder / f"{Path(source).name}.onnx")
    print(json.dumps({"source": source, "onnx": str(onnx_file)}))


def worker(args: argparse.Namespace) -> None:
    """Time one backend on one model; print one JSON line."""
    import numpy as np
    import torch

    from metaldefect.inference.detector import Detector

    detector = Detector.load(args.source, backend=args.backend, tile="off", conf=0.3, threads=args.threads or None,
                             refine=not args.no_refine, precision=args.precision)
    rng = np.random.default_rng(0)
    if args.samples:
        from metaldefect.data.images import load_image
        from metaldefect.inference.builtin import sample_images

        samples = [load_image(path) for path in sample_images()]
        images = [samples[i % len(samples)] for i in range(max(args.batches))]
    else:
        images = [rng.integers(0, 256, size=(200, 200, 3), dtype=np.uint8) for _ in range(max(args.batches))]
    size = detector.input_size
    results = []
    for batch in args.batches:
        tensor = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        timings = {"end_to_end": lambda batch=batch: detector.predict_batch(images[:batch]),
                   "network": lambda tensor=tensor: detector.network(tensor)}
        row = {"backend": BACKEND_NAMES[(args.backend, args.precision)], "input_size": size, "batch": batch}
        for name, call in timings.items():
            for _ in range(args.warmup):
                call()
            seconds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                call()
                seconds.append(time.perf_counter() - start)
            median = statistics.median(seconds)
            row[f"{name}_ms_per_image"] = 1000 * median / batch
            row[f"{name}_images_per_s"] = batch / median
        results.append(row)
    large = None
    if args.large_repeats:
        from metaldefect.inference.tiling import make_tiles

        plate = rng.integers(0, 256, size=(1000, 2048, 3), dtype=np.uint8)
        detector.tile = "auto"
        seconds = []
        for _ in range(args.large_repeats):
            start = time.perf_counter()
            detector.predict(plate)
            seconds.append(time.perf_counter() - start)
        large = {"tiles": len(make_tiles(2048, 1000, size)), "seconds": statistics.median(seconds)}
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    for row in results:
        row["peak_rss_mb"] = peak_mb
    print(json.dumps({"results": results, "large": large, "torch_threads": torch.get_num_threads()}))


def run_child(*options: str) -> dict:
    """Run this script with ``options`` in a fresh process; its last stdout line is JSON."""
    done = subprocess.run([sys.executable, __file__, *options], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(options)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224], help="input sizes (multiples of 14)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--large-repeats", type=int, default=3,
                        help="timed predictions of one 2048 x 1000 image (tiled automatically); 0 = skip")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads of torch and onnxruntime (default 0: each library's own default)")
    parser.add_argument("--builtin", action="store_true", help="also the packaged built-in model")
    parser.add_argument("--bf16", action="store_true", help="also PyTorch under bf16 autocast")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--no-refine", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--samples", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.prepare:
        return prepare(args)

    load_before = os.getloadavg()
    rows, large, threads = [], [], {}
    with tempfile.TemporaryDirectory(prefix="metaldefect-speed-") as tmp:
        models = [(f"ViT-S/14 + dense (random head), {size}", str(size), []) for size in args.sizes]
        if args.builtin:
            models += [("built-in model, samples", "builtin", ["--samples"]),
                       ("built-in model without its refiner, samples", "builtin", ["--samples", "--no-refine"])]
        timing = ["--batches", *map(str, args.batches), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
                  "--large-repeats", str(args.large_repeats), "--threads", str(args.threads)]
        for label, source, options in models:
            prepared = run_child("--prepare", "--source", source, "--folder", tmp)
            backends = [("torch", "fp32", prepared["source"]), ("onnx", "fp32", prepared["onnx"])]
            if args.bf16:
                backends.insert(1, ("torch", "bf16", prepared["source"]))
            for backend, precision, model_source in backends:
                measured = run_child("--worker", "--source", model_source, "--backend", backend,
                                     "--precision", precision, *timing, *options)
                threads[backend] = measured["torch_threads"]
                rows += [{"model": label, **row} for row in measured["results"]]
                if measured["large"]:
                    large.append({"model": label, "backend": BACKEND_NAMES[(backend, precision)], **measured["large"]})
    load_after = os.getloadavg()

    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores; "
          f"torch threads {threads.get('torch')}; onnxruntime threads "
          f"{args.threads or 'default'}; "
          f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print()
    print("| model | backend | batch | end to end ms/image | images/s | network ms/image | images/s | peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['model']} | {row['backend']} | {row['batch']} "
              f"| {row['end_to_end_ms_per_image']:.1f} | {row['end_to_end_images_per_s']:.1f} "
              f"| {row['network_ms_per_image']:.1f} | {row['network_images_per_s']:.1f} | {row['peak_rss_mb']:.0f} |")
    if large:
        print()
        print("| model | backend | 2048 x 1000 image, tiled: tiles | seconds/image |")
        print("| --- | --- | --- | --- |")
        for row in large:
            print(f"| {row['model']} | {row['backend']} "
                  f"| {row['tiles']} | {row['seconds']:.2f} |")


if __name__ == "__main__":
    main()
