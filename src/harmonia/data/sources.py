"""Where a classification run's batches come from: tensors held in memory, or a prepared folder on disk.

The classification trainer sees one interface, :class:`ClassificationData`:

* :class:`InMemoryData` wraps the embedded AV-Digits (modalities ``audio`` and ``image``);
* :class:`PreparedData` streams a folder written by ``harmonia prep`` (CREMA-D, Kinetics-Sounds, VGGSound,
  AVE; modalities ``audio`` and ``visual``) through ``torch.utils.data.DataLoader`` workers.

Both give every batch as ``{"inputs": {modality: Tensor}, "labels": Tensor, "indices": Tensor}``, order the
training batches by (seed, epoch) only (a resumed run sees the batches of an uninterrupted one) and, under
data parallelism, hand each rank its contiguous share of every global batch
(:class:`~harmonia.data.loader.GlobalBatchSampler`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from harmonia.data.avdigits import AVDigits
from harmonia.data.loader import BatchLoader, GlobalBatchSampler
from harmonia.data.prepared import PreparedAVDataset, collate
from harmonia.errors import ConfigError, InputError

PREPARED_MODALITIES = ("audio", "visual")


class EpochLoader(Protocol):
    """A re-iterable loader of training batches whose order is set per epoch."""

    def set_epoch(self, epoch: int) -> None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[dict[str, Any]]: ...


class ClassificationData(Protocol):
    """What the classification trainer needs from a dataset."""

    modalities: list[str]
    num_classes: int
    input_channels: dict[str, int]
    #: splits evaluated every epoch; "test" is always one of them
    eval_splits: tuple[str, ...]

    @property
    def train_size(self) -> int:
        """Number of training samples."""
        ...

    def train_loader(self, batch_size: int, seed: int, rank: int, world_size: int) -> EpochLoader: ...

    def eval_batches(self, split: str, batch_size: int) -> Iterable[dict[str, Any]]:
        """The whole ``split`` in a fixed order, without augmentation (evaluation and probes)."""
        ...


class InMemoryData:
    """AV-Digits (or any :class:`~harmonia.data.avdigits.AVDigits`-like dataset) held in memory."""

    def __init__(self, dataset: AVDigits, modalities: list[str]) -> None:
        self.dataset, self.modalities = dataset, list(modalities)
        self.splits = {s: dataset.split(s, self.modalities) for s in ("train", "val", "test")}
        self.num_classes = dataset.num_classes
        self.input_channels = {m: int(t.shape[1]) for m, t in self.splits["train"].inputs.items()}
        self.eval_splits: tuple[str, ...] = ("val", "test")

    @property
    def train_size(self) -> int:
        return int(self.splits["train"].labels.shape[0])

    def train_loader(self, batch_size: int, seed: int, rank: int, world_size: int) -> BatchLoader:
        train = self.splits["train"]
        return BatchLoader(
            {**train.inputs, **train.train_inputs},
            train.labels,
            batch_size,
            shuffle=True,
            seed=seed,
            transforms=train.train_transforms,
            rank=rank,
            world_size=world_size,
        )

    def eval_batches(self, split: str, batch_size: int) -> BatchLoader:
        data = self.splits[split]
        return BatchLoader(data.inputs, data.labels, batch_size)


class TensorData:
    """Your own tensors as a :class:`ClassificationData`: ``splits`` maps ``train``, ``test`` (and
    optionally ``val``) to ``({modality: [N, ...] tensor}, [N] int64 labels)``.

    Example::

        data = TensorData({"train": ({"audio": xa, "image": xi}, y), "test": ({"audio": ta, "image": ti}, t)})
        Trainer(cfg, dataset=data).fit()
    """

    def __init__(self, splits: Mapping[str, tuple[Mapping[str, Tensor], Tensor]]) -> None:
        for required in ("train", "test"):
            if required not in splits:
                raise InputError(f"TensorData needs a '{required}' split; got {sorted(splits)}")
        self.splits = {name: (dict(inputs), labels) for name, (inputs, labels) in splits.items()}
        train_inputs = self.splits["train"][0]
        self.modalities = list(train_inputs)
        for name, (inputs, labels) in self.splits.items():
            if list(inputs) != self.modalities:
                raise InputError(f"split '{name}' has modalities {list(inputs)}, train has {self.modalities}")
            if labels.dtype != torch.long or labels.dim() != 1:
                raise InputError(f"split '{name}': labels must be a 1-D int64 tensor, got {labels.dtype}")
            for m, x in inputs.items():
                if x.shape[0] != labels.shape[0]:
                    raise InputError(
                        f"split '{name}': modality '{m}' has {x.shape[0]} samples but there are "
                        f"{labels.shape[0]} labels"
                    )
        self.num_classes = (
            int(max(int(labels.max()) for _, labels in self.splits.values() if labels.numel())) + 1
        )
        self.input_channels = {m: int(x.shape[1]) for m, x in train_inputs.items()}
        self.eval_splits: tuple[str, ...] = tuple(s for s in ("val", "test") if s in self.splits)

    @property
    def train_size(self) -> int:
        return int(self.splits["train"][1].shape[0])

    def train_loader(self, batch_size: int, seed: int, rank: int, world_size: int) -> BatchLoader:
        inputs, labels = self.splits["train"]
        return BatchLoader(
            inputs, labels, batch_size, shuffle=True, seed=seed, rank=rank, world_size=world_size
        )

    def eval_batches(self, split: str, batch_size: int) -> BatchLoader:
        inputs, labels = self.splits[split]
        return BatchLoader(inputs, labels, batch_size)


class PreparedLoader:
    """Training batches of a :class:`~harmonia.data.prepared.PreparedAVDataset` through DataLoader workers;
    :meth:`set_epoch` sets both the batch order and the augmentation draws."""

    def __init__(self, dataset: PreparedAVDataset, sampler: GlobalBatchSampler, num_workers: int) -> None:
        self.dataset, self.sampler, self.num_workers = dataset, sampler, num_workers

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # workers copy the dataset when iteration starts, so each epoch's workers see its epoch
        return iter(
            DataLoader(
                self.dataset,
                batch_sampler=self.sampler,
                collate_fn=collate,
                num_workers=self.num_workers,
                pin_memory=False,
            )
        )


class PreparedData:
    """A folder written by ``harmonia prep`` (see :mod:`harmonia.data.prepared`).

    Args:
        root: the prepared folder.
        dataset: the name the config gives (``cremad``, ...); it must match the folder's ``meta.json``.
        modalities: a subset of ``audio`` and ``visual``.
        frames: frames per clip (``None``: the paper's choice for the dataset).
        image_size: side of the square frame crops.
        num_workers: DataLoader worker processes.
        seed: seed of the frame choice and augmentation.
    """

    def __init__(
        self,
        root: str | Path,
        dataset: str,
        modalities: list[str],
        frames: int | None = None,
        image_size: int = 224,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        unknown = [m for m in modalities if m not in PREPARED_MODALITIES]
        if unknown:
            raise ConfigError(
                f"data.modalities: a prepared {dataset} folder has no modality "
                f"{', '.join(map(repr, unknown))}; it has {', '.join(PREPARED_MODALITIES)}"
            )
        self.root, self.modalities = Path(root), list(modalities)
        self.options = {"frames": frames, "image_size": image_size, "seed": seed, "modalities": modalities}
        self.num_workers = num_workers
        self.train = PreparedAVDataset(self.root, "train", **self.options)  # type: ignore[arg-type]
        found = self.train.meta.get("dataset")
        if found != dataset:
            raise ConfigError(
                f"data.root {self.root} holds a prepared {found!r} dataset, but data.name is {dataset!r}; "
                f"set data.name={found} or point data.root to the output of harmonia prep {dataset}"
            )
        self.num_classes = self.train.num_classes
        self.input_channels = {"audio": 1, "visual": 3}
        splits = self.train.available_splits
        if "test" not in splits:
            raise InputError(
                f"{self.root}/index.csv has no clip in split 'test' (it has {splits}); the split lists "
                f"of the raw dataset decide the splits (see docs/datasets.md)"
            )
        self.eval_splits: tuple[str, ...] = tuple(s for s in ("val", "test") if s in splits)
        self._eval: dict[str, PreparedAVDataset] = {}

    @property
    def train_size(self) -> int:
        return len(self.train)

    def train_loader(self, batch_size: int, seed: int, rank: int, world_size: int) -> EpochLoader:
        sampler = GlobalBatchSampler(len(self.train), batch_size, True, seed, False, rank, world_size)
        return PreparedLoader(self.train, sampler, self.num_workers)

    def eval_batches(self, split: str, batch_size: int) -> Iterable[dict[str, Any]]:
        if split not in self._eval:
            self._eval[split] = PreparedAVDataset(self.root, split, train=False, **self.options)  # type: ignore[arg-type]
        return DataLoader(
            self._eval[split], batch_size=batch_size, collate_fn=collate, num_workers=self.num_workers
        )


__all__ = [
    "PREPARED_MODALITIES",
    "ClassificationData",
    "EpochLoader",
    "InMemoryData",
    "PreparedData",
    "PreparedLoader",
]
