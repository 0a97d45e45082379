"""The trainer's use of OGM and OPM: one callback, through the same public API a user's loop calls."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from harmonia.app.train.callbacks import Callback
from harmonia.balance.ogm import OGM
from harmonia.balance.opm import OPM
from harmonia.balance.scores import discrepancy_ratio

if TYPE_CHECKING:
    from harmonia.app.train.base import BaseTrainer as Trainer
    from harmonia.models import MultimodalClassifier, MultimodalOutput


class BalanceCallback(Callback):
    """OPM before fusion, OGM after backward, or both.

    ρ is computed once per step on the features *before* OPM drops any, so that OPM's dropping does not
    bias the ratio OGM sees; OPM drops with the q of the previous step and then sets q for the next one.
    Logs ``balance/rho/<m>``, ``balance/k/<m>`` and ``balance/q/<m>`` every step.
    """

    def __init__(self, ogm: OGM | None = None, opm: OPM | None = None) -> None:
        if ogm is None and opm is None:
            raise ValueError("BalanceCallback needs an OGM, an OPM or both")
        self.ogm, self.opm = ogm, opm
        self._labels: Tensor | None = None
        self._ratios: dict[str, Tensor] | None = None

    def before_forward(self, trainer: Trainer, batch: Mapping[str, Any]) -> None:
        self._labels = batch["labels"]
        self._ratios = None

    def transform_features(self, trainer: Trainer, features: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.opm is None:
            return features
        assert self._labels is not None
        with torch.no_grad():
            model = cast("MultimodalClassifier", trainer.model)
            clean = model.fusion.unimodal_logits({m: f.detach() for m, f in features.items()})
        self._ratios = discrepancy_ratio(clean, self._labels)
        trainer.step_metrics.update({f"balance/q/{m}": q for m, q in self.opm.drop_probabilities().items()})
        dropped = self.opm(features)
        self.opm.set_ratios(self._ratios)
        return dropped

    def after_backward(self, trainer: Trainer, batch: Mapping[str, Any], output: MultimodalOutput) -> None:
        ratios = self._ratios
        if ratios is None:
            ratios = discrepancy_ratio(output.unimodal_logits, batch["labels"])
        trainer.step_metrics.update({f"balance/rho/{m}": float(r) for m, r in ratios.items()})
        if self.ogm is not None:
            stats = self.ogm.apply(ratios, trainer.epoch)
            trainer.step_metrics.update({f"balance/k/{m}": k for m, k in stats.coefficients.items()})

    def state_dict(self) -> dict[str, Any]:
        return {
            "ogm": self.ogm.state_dict() if self.ogm is not None else None,
            "opm": self.opm.state_dict() if self.opm is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.ogm is not None:
            self.ogm.load_state_dict(state["ogm"])
        if self.opm is not None:
            self.opm.load_state_dict(state["opm"])
