"""Hook points of the trainer. Balancing and harmonization methods plug in here, as a user's code would."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor, nn


class TrainerView(Protocol):
    """What a callback may read (and, for ``step_metrics``, write) of the trainer that calls it."""

    @property
    def cfg(self) -> Any: ...  # the experiment config

    @property
    def model(self) -> nn.Module: ...

    @property
    def dataset(self) -> Any: ...

    @property
    def epoch(self) -> int: ...  # the epoch being trained, counted from 0

    @property
    def global_step(self) -> int: ...  # optimizer steps taken so far

    @property
    def run_dir(self) -> Path: ...

    @property
    def dist(self) -> Any: ...  # .enabled, .rank, .world_size, .is_main

    @property
    def step_metrics(self) -> dict[str, float]: ...  # per-step values to log; reset every step


class Callback:
    """Override the hooks you need; each default does nothing.

    Order within a training step::

        before_forward -> encode -> transform_features -> fuse -> loss -> adjust_loss
        -> backward -> after_backward -> (grad clipping) -> before_optimizer_step -> optimizer.step()

    Under ``train.precision`` bf16 or 16-mixed, the hooks up to ``adjust_loss`` run inside autocast; under
    16-mixed the gradients are unscaled before ``after_backward``, so every hook sees true gradients.

    A callback that keeps state across steps returns it from :meth:`state_dict` so that ``--resume``
    restores it with the checkpoint.
    """

    def on_train_start(self, trainer: TrainerView) -> None:
        """Once, after the model and optimizer exist (and after a resume has loaded them)."""

    def before_forward(self, trainer: TrainerView, batch: Mapping[str, Any]) -> None:
        """Before the encoders run on ``batch``."""

    def transform_features(self, trainer: TrainerView, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """Between encoders and fusion head (e.g. to drop a modality's features); return the features."""
        return features

    def adjust_loss(
        self, trainer: TrainerView, batch: Mapping[str, Any], output: Any, loss: Tensor
    ) -> Tensor:
        """Before the backward pass (supervised training): return the loss to minimise; objective-level
        methods add their terms here."""
        return loss

    def after_backward(self, trainer: TrainerView, batch: Mapping[str, Any], output: Any) -> None:
        """After the backward pass: gradients are in ``.grad``; ``output`` is the model's output (a
        ``MultimodalOutput`` in supervised training, a ``PretrainOutput`` in pre-training)."""

    def before_optimizer_step(self, trainer: TrainerView) -> None:
        """After gradient clipping, just before ``optimizer.step()``."""

    def on_epoch_end(self, trainer: TrainerView, epoch: int, metrics: dict[str, float]) -> None:
        """After evaluation of ``epoch``; ``metrics`` may be extended and is then logged."""

    def on_train_end(self, trainer: TrainerView) -> None:
        """Once, after the final evaluation (reports, plots)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def transforms_features(callback: Callback) -> bool:
    """Whether ``callback`` may edit the features between encoders and fusion head: it overrides
    :meth:`Callback.transform_features`, unless its ``edits_features`` attribute says it does not (a callback
    that runs several balancing methods edits them only when one of its methods does)."""
    if type(callback).transform_features is Callback.transform_features:
        return False
    return bool(getattr(callback, "edits_features", True))
