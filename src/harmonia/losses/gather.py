"""All-gather of embeddings across data-parallel ranks, with or without gradients flowing back.

Contrastive losses need every rank's embeddings as negatives. :func:`gather_with_grad` concatenates the
[b, ...] tensors of all R ranks into [R*b, ...]; in backward, each rank's slice receives the sum of the
gradients every rank computed for it (``torch.distributed.nn.all_gather``). With each rank averaging its
*local* per-sample losses and DistributedDataParallel averaging parameter gradients over ranks, the update
equals that of one process on the global batch (open_clip's ``gather_with_grad=True, local_loss=True``).

:func:`gather_features` also gives open_clip's ``gather_with_grad=False``: a plain all-gather, whose rows
carry no gradient, except this rank's own rows when asked (open_clip puts them back for ``local_loss=False``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from harmonia.distributed import rank_and_world

#: (rank, world size) of the default process group, or (0, 1) when not running distributed
distributed_world = rank_and_world


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        rank, world = distributed_world()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.size = rank, x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size]


def gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """All ranks' ``x`` concatenated along dim 0, and the offset of this rank's rows in it; every row's
    gradient flows back to the rank that owns it.

    Every rank must pass the same number of rows (use a sampler that drops the last, uneven batch).
    Outside ``torch.distributed`` this returns ``(x, 0)``.
    """
    return gather_features(x)


def gather_features(
    x: Tensor, *, with_grad: bool = True, own_rows_with_grad: bool = False
) -> tuple[Tensor, int]:
    """All ranks' ``x`` concatenated along dim 0, and the offset of this rank's rows in it.

    * ``with_grad=True``: in backward, this rank's rows receive the sum of the gradients all ranks computed
      for them (as :func:`gather_with_grad`);
    * ``with_grad=False``: a plain all-gather without gradient; with ``own_rows_with_grad`` this rank's rows
      are ``x`` itself, so that they keep the gradient of this rank's own loss.

    Every rank must pass the same number of rows. Outside ``torch.distributed`` this returns ``(x, 0)``.
    """
    rank, world = distributed_world()
    if world == 1:
        return x, 0
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    if len({int(s) for s in sizes}) != 1:
        raise ValueError(
            f"contrastive gather: ranks hold different batch sizes {[int(s) for s in sizes]}; every rank "
            f"needs the same local batch (drop the last, smaller batch: drop_last=True)"
        )
    if with_grad:
        return _GatherWithGrad.apply(x), rank * x.shape[0]
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    if own_rows_with_grad:
        parts[rank] = x
    return torch.cat(parts), rank * x.shape[0]
