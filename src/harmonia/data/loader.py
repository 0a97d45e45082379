"""Mini-batches over tensors held in memory, with a data order that depends only on (seed, epoch).

Because the order of epoch e is drawn from a generator seeded with (seed, e), a resumed run sees exactly the
batches an uninterrupted run would have seen. Under data-parallel training each of the ``world_size`` ranks
takes its contiguous share of every global batch of ``batch_size`` samples (what ``DistributedSampler`` does
per epoch, at the level of batches), so the ranks together see exactly the batches of one process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor


class BatchLoader:
    """Yields ``{"inputs": {modality: Tensor}, "labels": Tensor, "indices": Tensor}`` batches.

    Args:
        inputs: modality name -> tensor with the samples on dim 0.
        labels: [N] integer labels.
        batch_size: samples per batch.
        shuffle: draw a new order each epoch (call :meth:`set_epoch`).
        seed: base seed of the order.
        drop_last: skip a last, smaller batch.
        transforms: modality -> ``f(batch_tensor, generator)``, applied to each batch (augmentation); the
            generator is seeded by (seed, epoch), so augmentations are reproducible and resumable.
        rank, world_size: this rank's share of each global batch; ``batch_size`` must be a multiple of
            ``world_size``, and a last, smaller global batch is dropped when ``world_size`` > 1 (every rank
            needs a batch of the same size).
    """

    def __init__(
        self,
        inputs: Mapping[str, Tensor],
        labels: Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        transforms: Mapping[str, Callable[[Tensor, torch.Generator], Tensor]] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(
                f"batch size {batch_size} (the global batch) is not a multiple of the {world_size} ranks; "
                f"choose train.batch_size divisible by the number of processes"
            )
        sizes = {m: int(t.shape[0]) for m, t in inputs.items()}
        if any(s != labels.shape[0] for s in sizes.values()):
            raise ValueError(f"every modality needs one row per label ({labels.shape[0]}); got {sizes}")
        self.inputs = dict(inputs)
        self.labels = labels
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last or world_size > 1
        self.rank, self.world_size = rank, world_size
        self.transforms = dict(transforms or {})
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = int(self.labels.shape[0])
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self) -> Tensor:
        n = int(self.labels.shape[0])
        if not self.shuffle:
            return torch.arange(n)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(n, generator=generator)

    def __iter__(self) -> Iterator[dict]:
        order = self.order()
        augment = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + 500_009)
        share = self.batch_size // self.world_size
        local = slice(self.rank * share, (self.rank + 1) * share) if self.world_size > 1 else slice(None)
        for b in range(len(self)):
            global_idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            idx = global_idx[local]
            if self.transforms:  # drawn for the global batch: every rank uses the draws of one process
                whole = {m: t[global_idx] for m, t in self.inputs.items()}
                for m, transform in self.transforms.items():
                    whole[m] = transform(whole[m], augment)
                inputs = {m: t[local] for m, t in whole.items()}
            else:
                inputs = {m: t[idx] for m, t in self.inputs.items()}
            yield {
                "inputs": inputs,
                "labels": self.labels[idx],
                "indices": idx,
            }
