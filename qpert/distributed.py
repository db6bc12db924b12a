"""Data parallelism under ``torchrun`` (``qpert eval``, ``tune`` and ``index``): which rank does what.

torch.distributed carries everything (NCCL on GPUs, gloo on CPUs); the processes share work
through the feature cache on a file system they all see, and small results through collectives.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> torch.device:
        """``auto``: this rank's GPU when there is one (one GPU per local rank), else the CPU; ``cuda``:
        this rank's GPU."""
        if requested == "auto":
            return torch.device(f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu")
        if requested == "cuda":
            return torch.device(f"cuda:{self.local_rank}")
        return torch.device(requested)

    def strided(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every world-th, from its own rank on."""
        return list(items[self.rank :: self.world])

    def contiguous(self, count: int) -> range:
        """This rank's part of ``range(count)`` split into ``world`` runs of (nearly) equal length."""
        bounds = np.linspace(0, count, self.world + 1).round().astype(int)
        return range(int(bounds[self.rank]), int(bounds[self.rank + 1]))

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (a small picklable object), on every rank, in rank order."""
        if self.world == 1:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def all_equal(self, value: int) -> bool:
        """Whether every rank holds the same integer (e.g. a hash of its work plan)."""
        if self.world == 1:
            return True
        device = torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
        t = torch.tensor([value, -value], dtype=torch.int64, device=device)  # NCCL reduces GPU tensors only
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t[0]) == value and int(-t[1]) == value


def start() -> Ranks:
    """The process group ``torchrun`` describes in the environment, or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)  # NCCL's collectives (and all_gather_object) run on it
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank)


def stop(ranks: Ranks) -> None:
    if ranks.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def session() -> Iterator[Ranks]:
    """This process's place under torchrun (a single process otherwise), torn down when the work is done."""
    ranks = start()
    try:
        yield ranks
    finally:
        stop(ranks)
