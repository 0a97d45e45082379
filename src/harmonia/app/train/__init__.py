"""Training: the trainers of each task, their hook points, checkpoints and logs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from harmonia.app.callbacks.base import Callback
from harmonia.app.config import ExperimentConfig, TaskKind
from harmonia.app.train.base import BaseTrainer, TrainResult, seed_everything
from harmonia.app.train.pretrain import PretrainTrainer
from harmonia.app.train.trainer import Trainer, train


def build_trainer(cfg: ExperimentConfig, callbacks: Sequence[Callback] = (), **kwargs: Any) -> BaseTrainer:
    """The trainer of ``cfg.task``: :class:`Trainer` (classify) or :class:`PretrainTrainer` (pretrain)."""
    cls = PretrainTrainer if cfg.task is TaskKind.PRETRAIN else Trainer
    return cls(cfg, callbacks, **kwargs)


__all__ = [
    "BaseTrainer",
    "Callback",
    "PretrainTrainer",
    "TrainResult",
    "Trainer",
    "build_trainer",
    "seed_everything",
    "train",
]
