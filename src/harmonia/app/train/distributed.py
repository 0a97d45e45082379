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
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from harmonia.distributed import rank_and_world
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


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward is the sum over ranks of the gradients (each rank's output feeds
    that rank's loss, and every input contributed to every rank's output).

    A rank whose loss does not use the output (a step that trains one modality: MLA per_step, ReconBoost)
    has no gradient for it; it sums zeros with the others, and if no rank has one the input gets none
    either, so that the parameters before it stay without gradient (the optimiser skips them: no momentum,
    no weight decay), as in one process."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.shape, ctx.dtype, ctx.device = x.shape, x.dtype, x.device
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None) -> Tensor | None:  # type: ignore[override]
        local = grad if grad is not None else torch.zeros(ctx.shape, dtype=ctx.dtype, device=ctx.device)
        flat = torch.cat([local.reshape(-1), local.new_full((1,), float(grad is not None))])
        dist.all_reduce(flat)  # one collective on every rank, with or without a gradient
        if grad is None and float(flat[-1]) == 0:  # (reads the flag only without a local gradient: no sync)
            return None
        return flat[:-1].view(ctx.shape)


class CrossRankBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch (all ranks).

    PyTorch's SyncBatchNorm runs on GPUs only; this one works with any backend. Sums and sums of squares
    are all-reduced with a differentiable all-reduce, so gradients also flow through the other ranks'
    statistics, as in single-process training on the global batch. Outside training or a process group
    it is an ordinary BatchNorm2d.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and rank_and_world()[1] > 1):
            return super().forward(x)
        c = x.shape[1]
        local = torch.cat(
            [
                x.sum((0, 2, 3)),
                (x * x).sum((0, 2, 3)),
                x.new_full((1,), x.numel() / c),
            ]
        )
        total = _AllReduceSum.apply(local)
        count = total[-1]
        mean = total[:c] / count
        var = total[c : 2 * c] / count - mean * mean
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            assert self.num_batches_tracked is not None
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                # momentum None: a cumulative moving average, as BatchNorm2d
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(unbiased.detach(), momentum)
        scale = torch.rsqrt(var + self.eps)
        y = (x - mean[None, :, None, None]) * scale[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d of ``module`` by a :class:`CrossRankBatchNorm` holding the same state."""
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, CrossRankBatchNorm):
        converted = CrossRankBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        ).to(next(iter(module.state_dict().values())).device)
        converted.load_state_dict(module.state_dict())
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        setattr(module, name, convert_batchnorm(child))
    return module
