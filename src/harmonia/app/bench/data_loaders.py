"""The loaders against the training step, for ``harmonia bench data``.

* :func:`loader_rate`: samples per second a loader delivers after its warm-up batches (the start of its
  worker processes);
* :func:`step_rate`: samples per second a trainer's ``train_step`` consumes on a batch, at the batch's
  size or, on the CPU, at the largest halving of it whose step is predicted to fit in memory
  (:func:`step_batch_size`);
* :func:`measure_classification` and :func:`measure_pretrain`: both, for a prepared folder and its
  classification config, and for pre-training shards and their config.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from harmonia.app.config import ExperimentConfig
from harmonia.app.train import build_trainer
from harmonia.app.train.base import to_device
from harmonia.data.prepared import PreparedAVDataset
from harmonia.data.shards import ShardCorpus, ShardLoader, ShardStream
from harmonia.data.sources import PreparedData, PreparedLoader
from harmonia.errors import HarmoniaError

#: (warm-up, timed) loader batches and training steps
LOADER_BATCHES = (2, 8)
STEPS = (1, 3)
#: the most of the available memory a timed step may be predicted to take
MEMORY_SHARE = 0.7
#: safety factor over the tensors the forward pass keeps for the backward pass (gradients, workspaces)
TRANSIENT = 1.5


class CyclingSampler:
    """``steps`` batches of ``batch_size`` indices of ``n`` samples, from one shuffled order after another:
    a loader at any batch size and length over a few clips."""

    def __init__(self, n: int, batch_size: int, steps: int, seed: int = 0) -> None:
        self.n, self.batch_size, self.steps, self.seed = n, batch_size, steps, seed

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed)
        order: list[int] = []
        for _ in range(self.steps):
            while len(order) < self.batch_size:
                order += torch.randperm(self.n, generator=generator).tolist()
            yield order[: self.batch_size]
            order = order[self.batch_size :]


def loader_rate(
    batches: Iterable[dict[str, Any]], batch_size: int, warmup: int
) -> tuple[float, dict[str, Any]]:
    """Samples per second of the batches after the first ``warmup`` (at least 1), and the first batch."""
    first: dict[str, Any] = {}
    start, timed = 0.0, 0
    for k, batch in enumerate(batches):
        if k == 0:
            first = batch
        if k + 1 == max(1, warmup):
            start = time.perf_counter()
        elif k + 1 > warmup:
            timed += 1
    if timed == 0:
        raise HarmoniaError("the loader gave no batch after its warm-up")
    return timed * batch_size / (time.perf_counter() - start), first


def measure_classification(
    cfg: ExperimentConfig,
    root: Path,
    classes: int,
    loader_workers: Sequence[int],
    progress: bool = True,
) -> dict[str, Any]:
    """Samples per second of the prepared training split of ``root`` through
    :class:`~harmonia.data.sources.PreparedLoader` with each number of workers, and of the training step
    of ``cfg``'s model (with ``classes`` outputs: the paper's head) on one of its batches."""
    data = cfg.data
    batch_size, (warmup, timed) = cfg.train.batch_size, LOADER_BATCHES
    dataset = PreparedAVDataset(
        root, "train", frames=data.frames, image_size=data.image_size, modalities=list(data.modalities)
    )
    rates: dict[str, float] = {}
    first: dict[str, Any] = {}
    for n in tqdm(loader_workers, desc=f"{cfg.name} loader", disable=not progress, unit="setting"):
        sampler = CyclingSampler(len(dataset), batch_size, warmup + timed)
        rates[str(n)], first = loader_rate(PreparedLoader(dataset, sampler, n), batch_size, warmup)  # type: ignore[arg-type]
    prepared = PreparedData(root, data.name, list(data.modalities), data.frames, data.image_size)
    prepared.num_classes = classes  # the generated clips have fewer classes than the paper's dataset
    # the trainer checks its config's batch against the (few) clips; the step is timed on `first`
    train = cfg.train.model_copy(update={"batch_size": min(batch_size, len(dataset))})
    trainer = build_trainer(
        cfg.model_copy(update={"name": f"step_{cfg.name}", "train": train}),
        dataset=prepared,
        overwrite=True,
        progress=False,
    )
    return row(cfg, "prepared folder", first, rates, step_rate(trainer, first))


def measure_pretrain(
    cfg: ExperimentConfig, shards: Path, loader_workers: Sequence[int], progress: bool = True
) -> dict[str, Any]:
    """Samples per second of the training shards in ``shards`` through
    :class:`~harmonia.data.shards.ShardLoader` with each number of workers, and of the pre-training step
    of ``cfg`` on one of its batches."""
    batch_size, (warmup, timed) = cfg.train.batch_size, LOADER_BATCHES
    test_shard = str(shards / "train-000000.tar")  # the test split, which is not read here
    corpus = ShardCorpus(shards, cfg.data.captions, cfg.data.words, test_shards=test_shard)
    rates: dict[str, float] = {}
    first: dict[str, Any] = {}
    for n in tqdm(loader_workers, desc="shard stream", disable=not progress, unit="setting"):
        stream = ShardStream(
            corpus, batch_size, warmup + timed, cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer
        )
        rates[str(n)], first = loader_rate(ShardLoader(stream, n), batch_size, warmup)
    update = {
        "name": f"step_{cfg.name}",
        "data": cfg.data.model_copy(
            update={"shards": str(shards), "test_shards": test_shard, "num_workers": 0}  # its loader unused
        ),
        "train": cfg.train.model_copy(update={"batch_size": min(batch_size, corpus.samples("train"))}),
    }
    trainer = build_trainer(cfg.model_copy(update=update), overwrite=True, progress=False)
    return row(cfg, "shard stream", first, rates, step_rate(trainer, first))


def row(
    cfg: ExperimentConfig,
    loader: str,
    batch: dict[str, Any],
    rates: dict[str, float],
    step: dict[str, Any],
) -> dict[str, Any]:
    """One row of the report: the config, its loader's rate per worker count, the step's rate."""
    return {
        "config": cfg.name,
        "loader": loader,
        "batch_size": cfg.train.batch_size,
        "shapes": {m: list(t.shape[1:]) for m, t in batch["inputs"].items() if m != "text_mask"},
        "loader_samples_per_s": rates,
        **step,
        "device": cfg.train.device,
    }


def first_samples(batch: Any, size: int) -> Any:
    """The first ``size`` samples of a batch (its tensors, copied, and lists, nested in dicts)."""
    if isinstance(batch, dict):
        return {k: first_samples(v, size) for k, v in batch.items()}
    if isinstance(batch, torch.Tensor) and batch.dim() > 0:
        return batch[:size].clone()
    if isinstance(batch, list):
        return batch[:size]
    return batch


def saved_bytes(trainer: Any, batch: dict[str, Any]) -> int:
    """Bytes of the tensors the training step on ``batch`` keeps for its backward pass (each storage
    counted once, the parameters included)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        trainer.train_step(batch)
    return sum(storages.values())


def available_bytes() -> int | None:
    """MemAvailable of ``/proc/meminfo`` (None where there is none)."""
    try:
        with open("/proc/meminfo") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def step_batch_size(trainer: Any, batch: dict[str, Any]) -> tuple[int, float | None]:
    """The batch size to time the step at, and the bytes predicted for a step at the full batch.

    The full batch, or on the CPU its largest halving whose prediction fits in :data:`MEMORY_SHARE` of the
    memory available: :data:`TRANSIENT` × the bytes a step keeps for its backward pass per sample (the
    growth from a step at batch 2 to one at batch 4) × the batch.
    """
    size = int(batch["indices"].shape[0])
    free = available_bytes()
    if trainer.device.type != "cpu" or free is None or size <= 4:
        return size, None
    per_sample = (
        saved_bytes(trainer, first_samples(batch, 4)) - saved_bytes(trainer, first_samples(batch, 2))
    ) / 2
    predicted = TRANSIENT * per_sample * size
    fitting = size
    while fitting > 4 and TRANSIENT * per_sample * fitting > MEMORY_SHARE * free:
        fitting //= 2
    return fitting, predicted


def step_rate(trainer: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """Samples per second of ``trainer.train_step``: the median of :data:`STEPS` timed steps after the
    warm-up, at the size :func:`step_batch_size` chooses."""
    batch = to_device(batch, trainer.device)
    size, predicted = step_batch_size(trainer, batch)
    batch = first_samples(batch, size)
    warmup, timed = STEPS
    seconds = []
    for k in range(warmup + timed):
        start = time.perf_counter()
        trainer.train_step(batch)  # returns the loss as a float: the step has finished on any device
        if k >= warmup:
            seconds.append(time.perf_counter() - start)
    step = statistics.median(seconds)
    return {
        "step_batch_size": size,
        "step_seconds": step,
        "step_samples_per_s": size / step,
        "step_predicted_gib": predicted / 2**30 if predicted is not None else None,
        "threads": torch.get_num_threads(),
    }
