"""Small collectives over the default process group that are the identity in a single process.

Methods use them to compute statistics of the global batch (all ranks) under data-parallel training.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) when not running distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of ``x`` over ranks, without gradient (``x`` itself in a single process)."""
    if rank_and_world()[1] == 1:
        return x
    out = x.detach().clone()
    dist.all_reduce(out)
    return out


def from_rank_zero(x: Tensor, device: torch.device | str = "cpu") -> Tensor:
    """Rank 0's ``x`` on every rank, returned on the CPU (``x`` itself in a single process). The collective
    runs on ``device`` (the one the process group's backend needs: CUDA under NCCL)."""
    rank, world = rank_and_world()
    if world == 1:
        return x
    return all_reduce_sum((x if rank == 0 else torch.zeros_like(x)).to(device)).cpu()


def all_gather_rows(x: Tensor) -> Tensor:
    """Every rank's ``x`` (one shape on all ranks) concatenated along dim 0, without gradient."""
    world = rank_and_world()[1]
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)
