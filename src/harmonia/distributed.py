"""Small collectives over the default process group that are the identity in a single process, and batch
normalization over the global batch.

Methods use the collectives to compute statistics of the global batch (all ranks) under data-parallel
training; :func:`convert_batchnorm` gives a model's batch normalization the same (PyTorch's ``SyncBatchNorm``
needs a GPU; this one works with gloo on CPU too).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


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
