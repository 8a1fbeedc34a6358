"""Data-parallel training with torch.distributed, launched by ``torchrun``; world size 1 is the same path.

``torchrun --nproc_per_node 2 -m metaldefect.cli train CONFIG`` sets RANK / WORLD_SIZE /
LOCAL_RANK in each process's environment; :func:`init` then joins the process group
(gloo on the CPU, nccl on GPUs). Without those variables it is a single process and
every collective below is a no-op.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init(device: str = "auto") -> DistInfo:
    """Join the process group if launched by torchrun; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world_size, local_rank, target)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sums(values: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """Sum ``{name: (sum, count)}`` over all processes.

    Gathered as objects rather than one packed tensor so that a process which saw no
    batch (and so has no names) still takes part.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return values
    gathered: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, {name: (float(s), float(c)) for name, (s, c) in values.items()})
    total: dict[str, tuple[float, float]] = {}
    for part in gathered:
        for name, (value, count) in part.items():
            old_value, old_count = total.get(name, (0.0, 0.0))
            total[name] = (old_value + value, old_count + count)
    return dict(sorted(total.items()))


def all_reduce_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of a tensor over all processes (e.g. a confusion matrix)."""
    if dist.is_available() and dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def broadcast_object(value, src: int = 0):
    """The ``src`` process's value, on every process."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_list(items: list) -> list:
    """Concatenate every process's ``items`` in rank order (the list itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return items
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]
