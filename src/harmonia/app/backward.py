"""Backward strategies: how a training step turns its loss into gradients.

The trainers always call ``strategy.backward(trainer, batch, losses, output)``: ``plain`` runs
``loss.backward()`` (of the scaled loss under ``16-mixed``); ``harmonize`` runs the cross-modality gradient
harmonizer (pre-training; it is also a callback, for its logs and state). Registered in
:mod:`harmonia.app.registry`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from harmonia.app.callbacks.harmonize import HarmonizeCallback, build_harmonize_callback


class PlainBackward:
    """``loss.backward()`` (``losses`` is the loss tensor or an object with a ``loss`` attribute), of the
    loss times the gradient scaler's scale under ``train.precision=16-mixed``."""

    def backward(self, trainer: Any, batch: Mapping[str, Any], losses: Any, output: Any) -> None:
        loss: Tensor = losses if isinstance(losses, Tensor) else losses.loss
        precision = getattr(trainer, "precision", None)
        (loss if precision is None else precision.scale(loss)).backward()


def plain(trainer: Any) -> PlainBackward:
    return PlainBackward()


def harmonize(trainer: Any) -> HarmonizeCallback:
    """The harmonizer of ``trainer.cfg.harmonize`` on ``trainer.model`` (a pre-training model)."""
    return build_harmonize_callback(
        trainer.cfg.harmonize, trainer.model, len(trainer.train_loader), trainer.cfg.pretrain
    )
