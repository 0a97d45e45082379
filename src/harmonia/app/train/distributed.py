"""Data-parallel training under ``torchrun``: process group, rank roles, cross-rank batch normalization.

``torchrun --nproc_per_node N -m harmonia train CONFIG`` starts N processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment; :func:`init_distributed` reads
them and joins the process group (NCCL for CUDA devices, gloo on CPU) with a timeout, so that a rank left
alone by a failed peer stops with a message instead of hanging. ``train.batch_size`` is the **global** batch:
every rank takes its contiguous 1/N of each global batch (the order depends only on seed and epoch), and with
gradients averaged by DistributedDataParallel, cross-rank batch statistics and gathered contrastive negatives
a step equals one process's step on the whole global batch (tested with 2 gloo processes).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from harmonia.distributed import CrossRankBatchNorm, convert_batchnorm
from harmonia.errors import ConfigError

__all__ = [
    "CrossRankBatchNorm",
    "DistributedContext",
    "convert_batchnorm",
    "free_port",
    "init_distributed",
    "launched_distributed",
    "shutdown_distributed",
]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run folder, logs, progress bars and checkpoints."""
        return self.rank == 0


def launched_distributed() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher) with WORLD_SIZE > 1."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device, timeout_s: float) -> DistributedContext:
    """Join (or reuse) the default process group; single process when not launched distributed."""
    if dist.is_available() and dist.is_initialized():
        return DistributedContext(dist.get_rank(), dist.get_world_size(), _local_rank())
    if not launched_distributed():
        return DistributedContext()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {missing} are not set: launch with "
            f"torchrun --nproc_per_node N -m harmonia train CONFIG"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(_local_rank())
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistributedContext(dist.get_rank(), dist.get_world_size(), _local_rank())


def free_port() -> int:
    """A TCP port free on this machine now (for a local rendezvous: ``--master_port``)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
