"""ReconBoost: alternating, boosting-like modality updates (Hua et al., ICML 2024).

Cong Hua, Qianqian Xu, Shilong Bao, Zhiyong Yang, Qingming Huang, *ReconBoost: Boosting Can Achieve Modality
Reconcilement*, ICML 2024, PMLR 235 (arXiv:2405.09321). Official code: github.com/huacong/ReconBoost
(``train.py``, ``models/dynamic_net.py``, ``schedule.py``). BalanceMM: GeWu-Lab/BalanceBenchmark,
``balancemm/trainer/ReconBoost_trainer.py`` and ``configs/trainer_config.yaml``. Only the paper's abstract
was readable here; the equations below are read from the official code.

**Alternating stages.** Training is a sequence of *stages* s = 0, 1, 2, ...; stage s updates one modality,
``m = modalities[s mod M]`` (the official fixed round robin), and is followed by a *global rectification*
phase. With ``S = stage_epochs`` and ``R = rectify_epochs`` (official: 4 and 4; BalanceMM: 1 and 1), epoch e
lies in cycle position ``p = e mod (S + R)`` of stage ``s = e // (S + R)``: epochs with ``p < S`` train
modality m with the boosting loss below, the other R epochs train the whole model on the model's own loss.

**Boosting (reconcilement) loss.** With ``o^m`` the unimodal logits of the updated modality, the *ensemble*
of the others ``F_{-m} = β Σ_{k≠m, k in ensemble} o^k`` (β = ``boost_rate``, detached: the other learners are
fixed in a stage) and ``q_i = softmax(F_{-m}(x_i))_{y_i}``, the official loss is

    L_boost = (1/B) Σ_i (w_1 - w_2 q_i) · CE(o^m_i, y_i) / C                                     (C classes)

(``-w_1 mean_c(y log p^m) + w_2 mean_c(y softmax(F_{-m}) log p^m)``: the reconcilement term pushes modality m
*away* from what the ensemble already predicts, so samples the other modalities classify confidently weigh
less and modality m corrects their errors, the gradient-boosting reading of the paper's KL reconcilement;
w_2/w_1 plays the role of the paper's λ). When the ensemble is empty (``ensemble_from_start: false``, before
the other modalities' first stages) ``q = 1``, as with the official constant ``c0``. **Memory consolidation**
(official ``ga_loss``, stages s > 0): ``α · MSE(softmax(o^m), softmax(o^{m'}))`` with m' the previous modality
in the order; the official code (and BalanceMM) detaches *both* arguments, so the term has no gradient: it is
added to the loss value and logged, as there, and changes nothing in training.

**Global rectification.** After each stage the official code trains all encoders, the shared head and the
learnable β jointly on ``CE(β Σ_m o^m, y)``. Here the rectification epochs keep the loss the trainer gives
(the fused cross-entropy; with a ``sum`` or ``concat`` fusion head ``Σ_m o^m`` is exactly the fused logits, so
it is the official objective with β fixed at 1).

**Differences from the official code.** One optimiser for all parameters (official: a fresh SGD per stage
over modality m's network, a fresh SGD per rectification), so momentum carries across phases; parameters a
boosting step leaves without gradient (the other modalities) are skipped by the optimiser, as they are
frozen officially; β is a constant, not learned; the modalities keep their own heads (official: one shared
MLP head); evaluation uses the model's fused logits (official: ``β Σ_m o^m``). ``ensemble_from_start``
(default true) is the official ``--use_pretrain`` runs and BalanceMM (every modality in the ensemble from the
start); false: modality k joins the ensemble after its first stage. BalanceMM: S = R = 1 and the optimiser
is the global one; defaults here follow the official CREMA-D command (w_1 5, w_2 1, α 0.5, β 1, S = R = 4).

Under ``torch.distributed`` the losses are per-sample means, so no statistic crosses ranks; but a boosting
step leaves the other modalities without gradient, which DistributedDataParallel only accepts with
``find_unused_parameters``. The schedule depends on the epoch only, so resuming is exact with no state.
List ReconBoost first in ``balance``: in boosting epochs it *replaces* the loss. Logs
``balance/reconboost/boost/<m>`` (L_boost), ``balance/reconboost/agreement/<m>`` (batch mean of q),
``balance/reconboost/consolidation/<m>`` (the MSE) in boosting steps, ``balance/reconboost/rectify`` (the
fused loss) in rectification steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harmonia.balance.method import BalanceStep, BalancingMethod
from harmonia.errors import ConfigError, InputError
from harmonia.settings import setting


@dataclass
class ReconBoostSettings:
    """ReconBoost settings (see the module docstring; defaults: the official CREMA-D command)."""

    weight1: float = setting(5.0, gt=0, help="w_1, weight of the modality's own cross-entropy (official 5)")
    weight2: float = setting(1.0, ge=0, help="w_2, weight of the reconcilement term against the ensemble")
    alpha: float = setting(0.5, ge=0, help="α of the memory-consolidation MSE (detached, as officially)")
    boost_rate: float = setting(1.0, gt=0, help="β, scale of the ensemble logits β Σ_{k≠m} o^k")
    stage_epochs: int = setting(4, ge=1, help="epochs per boosting stage (official 4, BalanceMM 1)")
    rectify_epochs: int = setting(4, ge=0, help="global-rectification epochs after each stage (official 4)")
    ensemble_from_start: bool = setting(
        True, help="every modality in the ensemble from the start (official --use_pretrain, BalanceMM)"
    )


@dataclass(frozen=True)
class ReconBoostPhase:
    """What epoch ``epoch`` trains: ``modality`` (None: global rectification) in stage ``stage``."""

    stage: int
    modality: str | None


def reconboost_loss(
    logits: Tensor,
    ensemble: Tensor | None,
    labels: Tensor,
    weight1: float,
    weight2: float,
) -> tuple[Tensor, Tensor]:
    """The official boosting loss ``mean_i (w_1 - w_2 q_i) CE(logits_i, y_i) / C`` with
    ``q_i = softmax(ensemble_i)_{y_i}`` (``ensemble`` None: ``q = 1``). Returns ``(loss, q)``."""
    dtype = torch.promote_types(logits.dtype, torch.float32)  # half precision: computed in float32
    logp = F.log_softmax(logits.to(dtype), dim=1)
    nll = -logp.gather(1, labels.view(-1, 1)).squeeze(1)
    if ensemble is None:
        q = torch.ones_like(nll)
    else:
        q = F.softmax(ensemble.detach().to(dtype), dim=1).gather(1, labels.view(-1, 1)).squeeze(1)
    loss = ((weight1 - weight2 * q) * nll).mean() / logits.shape[1]
    return loss, q


class ReconBoost(BalancingMethod):
    """ReconBoost: stages that each train one modality against the ensemble of the others, each followed by
    a global rectification of the whole model.

    Args:
        modalities: the modality names (at least 2), in the order the stages take them.
        weight1, weight2, alpha, boost_rate, stage_epochs, rectify_epochs, ensemble_from_start: see
            :class:`ReconBoostSettings`.
    """

    @classmethod
    def leaves_parameters_unused(cls, settings: Any) -> bool:
        return True  # a boosting step trains one modality

    Settings: ClassVar[type[Any]] = ReconBoostSettings

    def __init__(
        self,
        modalities: Sequence[str],
        weight1: float = 5.0,
        weight2: float = 1.0,
        alpha: float = 0.5,
        boost_rate: float = 1.0,
        stage_epochs: int = 4,
        rectify_epochs: int = 4,
        ensemble_from_start: bool = True,
    ) -> None:
        super().__init__()
        if len(modalities) < 2:
            raise ConfigError(
                f"ReconBoost alternates between modalities: give at least 2, got {list(modalities)}"
            )
        if not weight1 > 0 or weight2 < 0 or alpha < 0 or not boost_rate > 0:
            raise ConfigError(
                "ReconBoost needs weight1 > 0, weight2 >= 0, alpha >= 0 and boost_rate > 0, got "
                f"{weight1}, {weight2}, {alpha}, {boost_rate}"
            )
        if stage_epochs < 1 or rectify_epochs < 0:
            raise ConfigError(
                "ReconBoost needs stage_epochs >= 1 and rectify_epochs >= 0, got "
                f"{stage_epochs}, {rectify_epochs}"
            )
        self.modalities = tuple(modalities)
        self.weight1, self.weight2 = float(weight1), float(weight2)
        self.alpha, self.boost_rate = float(alpha), float(boost_rate)
        self.stage_epochs, self.rectify_epochs = int(stage_epochs), int(rectify_epochs)
        self.ensemble_from_start = bool(ensemble_from_start)

    @classmethod
    def build(cls, model: nn.Module, settings: ReconBoostSettings | None = None, seed: int = 0) -> ReconBoost:
        s = settings or ReconBoostSettings()
        return cls(
            tuple(model.modalities),  # type: ignore[arg-type]
            weight1=s.weight1,
            weight2=s.weight2,
            alpha=s.alpha,
            boost_rate=s.boost_rate,
            stage_epochs=s.stage_epochs,
            rectify_epochs=s.rectify_epochs,
            ensemble_from_start=s.ensemble_from_start,
        )

    def phase(self, epoch: int) -> ReconBoostPhase:
        """The stage of ``epoch`` and the modality it boosts (None in a rectification epoch)."""
        cycle = self.stage_epochs + self.rectify_epochs
        stage, pos = divmod(int(epoch), cycle)
        modality = self.modalities[stage % len(self.modalities)] if pos < self.stage_epochs else None
        return ReconBoostPhase(stage, modality)

    def ensemble_members(self, stage: int, modality: str) -> tuple[str, ...]:
        """The modalities whose logits form the ensemble ``F_{-m}`` in ``stage`` (which boosts
        ``modality``): all others, or (``ensemble_from_start`` false) those a stage has already trained."""
        return tuple(
            k
            for j, k in enumerate(self.modalities)
            if k != modality and (self.ensemble_from_start or j < stage)
        )

    def previous(self, modality: str) -> str:
        """The modality before ``modality`` in the order (cyclic): the memory-consolidation partner."""
        return self.modalities[self.modalities.index(modality) - 1]

    def boosting_loss(
        self, stage: int, modality: str, unimodal_logits: Mapping[str, Tensor], labels: Tensor
    ) -> tuple[Tensor, dict[str, float]]:
        """The loss of a boosting step of ``modality`` in ``stage`` and the values it logs."""
        missing = [m for m in self.modalities if m not in unimodal_logits]
        if missing:
            raise InputError(
                f"ReconBoost: no unimodal logits for {missing}; it was built for {list(self.modalities)}"
            )
        members = self.ensemble_members(stage, modality)
        ensemble = None
        if members:
            ensemble = self.boost_rate * torch.stack([unimodal_logits[k].detach() for k in members]).sum(0)
        own = unimodal_logits[modality]
        loss, q = reconboost_loss(own, ensemble, labels, self.weight1, self.weight2)
        prefix = "balance/reconboost"
        logs = {
            f"{prefix}/boost/{modality}": float(loss.detach()),
            f"{prefix}/agreement/{modality}": float(q.mean()),
        }
        if stage > 0:
            with torch.no_grad():
                previous = unimodal_logits[self.previous(modality)]
                dtype = torch.promote_types(own.dtype, torch.float32)
                consolidation = F.mse_loss(own.to(dtype).softmax(1), previous.to(dtype).softmax(1))
            logs[f"{prefix}/consolidation/{modality}"] = float(consolidation)
            loss = loss + self.alpha * consolidation  # no gradient: detached, as in the official code
        return loss, logs

    def adjust_loss(self, step: BalanceStep, output: Any, loss: Tensor) -> Tensor:
        """Boosting epochs: the boosting loss of the stage's modality instead of ``loss``; rectification
        epochs: ``loss`` unchanged."""
        phase = self.phase(step.epoch)
        if phase.modality is None:
            step.metrics["balance/reconboost/rectify"] = float(loss.detach())
            return loss
        boost, logs = self.boosting_loss(phase.stage, phase.modality, output.unimodal_logits, step.labels)
        step.metrics.update(logs)
        return boost
