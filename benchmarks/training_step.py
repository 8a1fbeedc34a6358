"""Time a frozen-backbone head's training step on real cached features, against stock GroupNorm in the same run.

Builds the data, model and loaders of CONFIG as `metaldefect train` does (the feature cache must hold the
config's features, or they are extracted first), takes the first ``--steps`` training batches, and times whole
steps of the engine's own ``train_one_epoch`` on one batch at a time (channels-last inputs, forward under the
training precision, loss, backward, gradient clipping, the optimizer's step, the per-step metrics) of:

- the head as the product builds it;
- a copy of it in which every GroupNorm is torch's stock ``nn.GroupNorm`` (the layers before session 15).

The two run in turn on each batch, twice over the batches; the second pass is timed. Reports the median step of
each and their ratio. Command (docs/benchmarks.md, session 15):

    python benchmarks/training_step.py configs/neu_det_dense_pair.yaml train.cache_dir=runs/bench/bf16_cache
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from metaldefect.config import load_config
from metaldefect.engine import distributed
from metaldefect.engine.engine import train_one_epoch
from metaldefect.engine.optim import build_optimizer
from metaldefect.engine.precision import dtype_name, training_dtype
from metaldefect.engine.train import build_data, build_loaders, build_model, seed_everything


def with_stock_group_norm(module: nn.Module) -> nn.Module:
    """``module`` with each GroupNorm subclass replaced by a plain ``nn.GroupNorm`` holding the same weights."""
    for name, child in module.named_children():
        if isinstance(child, nn.GroupNorm) and type(child) is not nn.GroupNorm:
            stock = nn.GroupNorm(child.num_groups, child.num_channels, child.eps, child.affine)
            stock.load_state_dict(child.state_dict())
            setattr(module, name, stock)
        else:
            with_stock_group_norm(child)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--steps", type=int, default=9, help="training batches timed per variant (default: 9)")
    args = parser.parse_args()
    if args.steps < 1:
        raise SystemExit(f"--steps must be at least 1, got {args.steps}")
    cfg = load_config(args.config, [*args.overrides, "train.progress=false"])
    if not cfg.train.frozen:
        raise SystemExit(f"{args.config}: times a frozen backbone's head; train.frozen is false")
    seed_everything(cfg.seed)
    dist = distributed.init("cpu")
    data = build_data(cfg)
    model, _ = build_model(cfg, data)
    dtype = training_dtype(cfg.train.precision, dist.device)
    loaders, _, _ = build_loaders(cfg, data, model, dist, dtype=dtype)
    batches = [batch for batch, _ in zip(loaders["train"], range(args.steps))]
    product = model.head.to(memory_format=torch.channels_last)
    stock = with_stock_group_norm(copy.deepcopy(product)).to(memory_format=torch.channels_last)
    variants = {"product head": product, "stock nn.GroupNorm": stock}
    optimizers = {name: build_optimizer(cfg, head) for name, head in variants.items()}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for timed in (False, True):  # the first pass warms up allocators and kernels
        for batch in batches:
            for name, head in variants.items():
                started = time.perf_counter()
                train_one_epoch(head, [batch], optimizers[name], 1, dist.device, cfg.train.grad_clip,
                                progress=False, dtype=dtype)
                if timed:
                    seconds[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"{cfg.model.head} ({cfg.name}), batch {cfg.train.batch_size}, {dtype_name(dtype)}, "
          f"{torch.get_num_threads()} threads, median of {len(batches)} steps:")
    for name, median in medians.items():
        print(f"  {name}: {median:.3f} s/step (range {min(seconds[name]):.3f}-{max(seconds[name]):.3f})")
    print(f"  stock / product: {medians['stock nn.GroupNorm'] / medians['product head']:.2f}x")


if __name__ == "__main__":
    main()
