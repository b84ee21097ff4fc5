"""Distributed training through PyTorch's own launcher.

``torchrun --nproc_per_node N -m apps.cli train ...`` starts N processes and sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; :func:`init_distributed` reads them (gloo on CPU, nccl on CUDA).
Without them the same code runs as a single process, and every helper here is a no-op.
Only rank 0 writes files; metrics are summed (or gathered) over all ranks so every rank sees the same.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = [
    "DistInfo",
    "resolve_device",
    "init_distributed",
    "cleanup",
    "is_main",
    "world_size",
    "barrier",
    "all_reduce_sum",
    "all_gather_object",
    "gather_object",
    "broadcast_object",
    "ShardSampler",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA if present, else CPU; ``cuda`` -> this process's GPU (``cuda:LOCAL_RANK``)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r}, but CUDA is not available on this machine; use device=cpu")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def init_distributed(device: str = "auto", *, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by torchrun's environment variables, if any, and pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local_rank, dev)


def cleanup() -> None:
    """Leave the process group. On the success path call ``barrier()`` first: a rank that tears gloo down
    while another is still in its last collective or writing can die in C++ at exit ("terminate called
    without an active exception", seen once in the torchrun test on a loaded machine). Not after an error:
    the other ranks may never arrive."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    return not _active() or dist.get_rank() == 0


def barrier() -> None:
    if _active():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all processes (in place, also returned)."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (pickled: plain data only)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj: Any, dst: int = 0) -> list[Any] | None:
    """``[obj of rank 0, obj of rank 1, ...]`` on rank ``dst``, None on the others (pickled: plain data only;
    unlike :func:`all_gather_object`, only ``dst`` holds everything)."""
    if not _active():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not _active():
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class ShardSampler(Sampler[int]):
    """This rank's share of ``0..n-1`` for evaluation: every index exactly once over all ranks.

    Unlike ``DistributedSampler`` it never pads with repeated samples, so summed counts are exact.
    """

    def __init__(self, n: int, rank: int | None = None, world: int | None = None) -> None:
        self.n = n
        self.rank = dist.get_rank() if rank is None and _active() else (rank or 0)
        self.world = world_size() if world is None else world

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))
