"""The trainer's use of balancing methods: one callback that runs any list of them through their hooks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from harmonia.app.callbacks.base import Callback, TrainerView
from harmonia.app.plots import plot_balance_curves
from harmonia.balance.method import BalanceStep, BalancingMethod


class BalancingCallback(Callback):
    """Runs ``methods`` (in order) at the trainer's hook points, one :class:`BalanceStep` per step, so that
    methods sharing ρ get it computed once. Their per-step statistics (``balance/rho|k|q/<m>``, ...) are
    logged every step; at the end, ``balance_curves.png`` plots them.

    Args:
        methods: the balancing methods; ``names`` (same length) key their states in checkpoints.
    """

    def __init__(self, methods: Sequence[BalancingMethod], names: Sequence[str] | None = None) -> None:
        if not methods:
            raise ValueError("BalancingCallback needs at least one balancing method")
        self.methods = list(methods)
        self.names = list(names) if names is not None else [type(m).__name__.lower() for m in methods]
        self._step: BalanceStep | None = None

    @property
    def edits_features(self) -> bool:
        """Whether a method transforms the features (e.g. OPM); the others leave them as they are."""
        return any(type(m).transform_features is not BalancingMethod.transform_features for m in self.methods)

    def before_forward(self, trainer: TrainerView, batch: Mapping[str, Any]) -> None:
        precision = getattr(trainer, "precision", None)
        self._step = BalanceStep(
            batch["labels"],
            trainer.epoch,
            trainer.step_metrics,
            inputs=batch["inputs"],
            loss_scale=precision.loss_scale if precision is not None else 1.0,
        )
        for method in self.methods:
            method.before_forward(self._step)

    def transform_features(self, trainer: TrainerView, features: dict[str, Tensor]) -> dict[str, Tensor]:
        assert self._step is not None, "transform_features before before_forward"
        for method in self.methods:
            features = method.transform_features(self._step, features)
        return features

    def adjust_loss(
        self, trainer: TrainerView, batch: Mapping[str, Any], output: Any, loss: Tensor
    ) -> Tensor:
        assert self._step is not None, "adjust_loss before before_forward"
        for method in self.methods:
            loss = method.adjust_loss(self._step, output, loss)
        return loss

    def after_backward(self, trainer: TrainerView, batch: Mapping[str, Any], output: Any) -> None:
        assert self._step is not None, "after_backward before before_forward"
        for method in self.methods:
            method.after_backward(self._step, output)

    def on_epoch_end(self, trainer: TrainerView, epoch: int, metrics: dict[str, float]) -> None:
        extract = getattr(trainer, "encoder_features", None)

        def features(split: str) -> tuple[dict[str, Tensor], Tensor]:
            if extract is None:
                raise TypeError(
                    f"{type(trainer).__name__} cannot give encoder features over a split (no "
                    "encoder_features method), which this balancing method needs"
                )
            return extract(split)  # type: ignore[no-any-return]

        for method in self.methods:
            method.on_epoch_end(epoch, features, metrics)

    def on_train_end(self, trainer: TrainerView) -> None:
        if trainer.dist.is_main:
            plot_balance_curves({"": trainer.run_dir}, trainer.run_dir / "balance_curves.png")

    def _keys(self) -> list[str]:
        return [f"{i}:{name}" for i, name in enumerate(self.names)]

    def state_dict(self) -> dict[str, Any]:
        return {key: dict(m.state_dict()) for key, m in zip(self._keys(), self.methods, strict=True)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, method in zip(self._keys(), self.methods, strict=True):
            method.load_state_dict(state[key])
