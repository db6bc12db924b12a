"""Data-parallel indexing under ``torchrun``: each rank takes every world-th photo, rank 0 merges."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> torch.device:
        """``auto``: this rank's GPU when there is one (one GPU per local rank), else the CPU."""
        if requested == "auto":
            return torch.device(f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu")
        return torch.device(requested)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_equal(self, value: int) -> bool:
        """Whether every rank holds the same integer (e.g. a hash of its work plan)."""
        if self.world == 1:
            return True
        t = torch.tensor([value, -value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t[0]) == value and int(-t[1]) == value


def start() -> Ranks:
    """The process group ``torchrun`` describes in the environment, or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def stop(ranks: Ranks) -> None:
    if ranks.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
