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
from torch.utils.data import Sampler

from harmonia.errors import ConfigError


def local_batch_size(batch_size: int, world_size: int) -> int:
    """Each rank's share of a global batch; the global batch must divide evenly among the ranks (else a
    :class:`~harmonia.errors.ConfigError`, which the CLI reports as a config error)."""
    if batch_size % world_size:
        raise ConfigError(
            f"batch size {batch_size} (the global batch) is not a multiple of the {world_size} ranks; "
            f"choose train.batch_size divisible by the number of processes"
        )
    return batch_size // world_size


class GlobalBatchSampler(Sampler[list[int]]):
    """Batches of indices in an order that depends only on (seed, epoch), each rank taking its contiguous
    share of every global batch of ``batch_size`` (a ``batch_sampler`` for ``torch.utils.data.DataLoader``;
    :class:`BatchLoader` uses it for its in-memory batches)."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        share = local_batch_size(batch_size, world_size)
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.drop_last = drop_last or world_size > 1
        self.rank, self.world_size, self.epoch = rank, world_size, 0
        #: this rank's rows of a global batch
        self.local = slice(rank * share, (rank + 1) * share) if world_size > 1 else slice(None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def global_batches(self) -> Iterator[Tensor]:
        """The indices of each whole global batch of this epoch."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=generator)
        else:
            order = torch.arange(self.n)
        for b in range(len(self)):
            yield order[b * self.batch_size : (b + 1) * self.batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            yield batch[self.local].tolist()


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
        sizes = {m: int(t.shape[0]) for m, t in inputs.items()}
        if any(s != labels.shape[0] for s in sizes.values()):
            raise ValueError(f"every modality needs one row per label ({labels.shape[0]}); got {sizes}")
        self.inputs = dict(inputs)
        self.labels = labels
        self.seed = seed
        self.sampler = GlobalBatchSampler(
            int(labels.shape[0]), batch_size, shuffle, seed, drop_last, rank, world_size
        )
        self.transforms = dict(transforms or {})

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict]:
        sampler = self.sampler
        augment = torch.Generator().manual_seed(self.seed * 1_000_003 + sampler.epoch + 500_009)
        for global_idx in sampler.global_batches():
            idx = global_idx[sampler.local]
            if self.transforms:  # drawn for the global batch: every rank uses the draws of one process
                whole = {m: t[global_idx] for m, t in self.inputs.items()}
                for m, transform in self.transforms.items():
                    whole[m] = transform(whole[m], augment)
                inputs = {m: t[sampler.local] for m, t in whole.items()}
            else:
                inputs = {m: t[idx] for m, t in self.inputs.items()}
            yield {
                "inputs": inputs,
                "labels": self.labels[idx],
                "indices": idx,
            }
