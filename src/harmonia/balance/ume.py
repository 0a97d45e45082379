"""UME: the uni-modal ensemble (Du et al., ICML 2023).

Chenzhuang Du, Jiaye Teng, Tingle Li, Yichen Liu, Tianyuan Yuan, Yue Wang, Yang Yuan, Hang Zhao, *On Uni-Modal
Feature Learning in Supervised Multi-Modal Learning*, ICML 2023 (arXiv:2305.01233; openreview HNbwCYFOZM).
The paper's diagnosis ("modality laziness"): multimodal joint training saturates on the easy features and
leaves each modality's uni-modal features under-learned. When the task's paired (cross-modal) features matter
little, it recommends the uni-modal ensemble: train one model per modality on its own, each with its own
cross-entropy, and combine their predictions at test time.

In harmonia's contract the M unimodal models are the modality branches of one late-fusion model: modality m's
encoder and its part of an *additive* fusion head, whose unimodal logits ``o^m`` add up to the fused logits
(:class:`~harmonia.models.SumFusion`: ``z = Σ_m o^m``, ``o^m = W^m φ^m + b^m``;
:class:`~harmonia.models.ConcatFusion`: ``o^m = W[:, block_m] φ^m + b/M``). The objective of a step replaces
the fused cross-entropy by

    L_UME = Σ_m CE(o^m, y)          (reduction "sum", default)  or  (1/M) Σ_m CE(o^m, y)  ("mean"),

so each branch gets exactly the gradient of its own cross-entropy, as if trained alone, and the model's fused
prediction ``z = Σ_m o^m = M · mean_m o^m`` is the ensemble: the average of the unimodal logits (up to the
factor M, which does not change the arg-max or the accuracy). Exact for ``sum`` fusion (disjoint parameters:
training the M branches together is training M unimodal models side by side, with per-parameter optimisers
such as SGD or Adam); for ``concat`` fusion the only shared parameter is the head's bias b (b/M in each
branch, a shared class prior), whose gradient is the mean of the M unimodal losses' gradients. ``film`` and
``gated`` heads are not additive (their unimodal logits are zero-out estimates, which do not sum to the
prediction): UME refuses them with a :class:`~harmonia.errors.ConfigError` at build. The "sum" reduction is
the default because it gives each branch the step size of its own unimodal training; "mean" divides every
gradient by M. Global gradient-norm clipping (``train.grad_clip_norm``) couples the branches (one norm
over all parameters).

Not verified against the paper's text (only its abstract was readable here): whether its ensemble averages
logits or probabilities; harmonia's ensemble is the sum (mean) of logits. There is no official UME trainer in
BalanceMM (GeWu-Lab/BalanceBenchmark); its ``unimodal_trainer.py`` trains a single modality.

The method *replaces* the loss it is given: a method listed before it in ``balance`` loses its added terms;
list UME first. Every term is a per-sample mean and nothing is kept between steps, so data-parallel training
needs no extra communication and a resumed run is exact. Logs ``balance/ume/loss/<m>`` (each CE(o^m, y)).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harmonia.balance.method import BalanceStep, BalancingMethod
from harmonia.errors import ConfigError, InputError
from harmonia.models.fusion import ConcatFusion, SumFusion
from harmonia.settings import coerce_enums, setting

#: fusion heads whose unimodal logits add up to the fused logits (``Σ_m o^m = z``)
ADDITIVE_FUSION_HEADS: tuple[type[nn.Module], ...] = (ConcatFusion, SumFusion)


class UMEReduction(str, enum.Enum):
    """How the unimodal cross-entropies are combined."""

    SUM = "sum"
    MEAN = "mean"


@dataclass
class UMESettings:
    """UME settings (see the module docstring)."""

    reduction: UMEReduction = setting(
        UMEReduction.SUM,
        help="sum: Σ_m CE(o^m, y), each branch trained as if alone (default); mean: (1/M) Σ_m CE(o^m, y)",
    )

    def __post_init__(self) -> None:
        coerce_enums(self)


def check_additive_fusion(model: nn.Module, method: str) -> None:
    """Raise :class:`ConfigError` unless ``model.fusion`` is a head whose unimodal logits sum to its
    output (``concat`` or ``sum``)."""
    fusion = getattr(model, "fusion", None)
    if isinstance(fusion, ADDITIVE_FUSION_HEADS):
        return
    kind = type(fusion).__name__ if fusion is not None else f"{type(model).__name__} (no 'fusion' head)"
    raise ConfigError(
        f"{method} is an ensemble of the unimodal branches and needs a fusion head whose unimodal logits "
        f"add up to the prediction (model.fusion=concat or sum); this model has {kind}, whose unimodal "
        "logits are zero-out estimates: set model.fusion=concat or model.fusion=sum"
    )


def ume_loss(
    unimodal_logits: dict[str, Tensor],
    labels: Tensor,
    modalities: Sequence[str],
    reduction: UMEReduction | str = UMEReduction.SUM,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``Σ_m CE(o^m, y)`` (or its mean over the modalities) and each modality's ``CE(o^m, y)``."""
    missing = [m for m in modalities if m not in unimodal_logits]
    if missing:
        raise InputError(f"UME: no unimodal logits for {missing}; it was built for {list(modalities)}")
    losses = {m: F.cross_entropy(unimodal_logits[m], labels) for m in modalities}
    total = torch.stack(list(losses.values())).sum()
    if UMEReduction(reduction) is UMEReduction.MEAN:
        total = total / len(modalities)
    return total, losses


class UME(BalancingMethod):
    """UME: ``loss -> Σ_m CE(o^m, y)`` (or the mean), training each modality's branch on its own.

    Args:
        modalities: the modality names (at least 2).
        reduction: ``sum`` (default) or ``mean`` over the modalities.
    """

    Settings: ClassVar[type[Any]] = UMESettings

    def __init__(self, modalities: Sequence[str], reduction: UMEReduction | str = UMEReduction.SUM) -> None:
        super().__init__()
        if len(modalities) < 2:
            raise ConfigError(
                f"UME balances modalities (an ensemble of unimodal branches): give at least 2, got "
                f"{list(modalities)}"
            )
        self.modalities = tuple(modalities)
        try:
            self.reduction = UMEReduction(reduction)
        except ValueError:
            choices = ", ".join(r.value for r in UMEReduction)
            raise ConfigError(f"UME reduction must be one of {choices}, got {reduction!r}") from None

    @classmethod
    def build(cls, model: nn.Module, settings: UMESettings | None = None, seed: int = 0) -> UME:
        """UME over the modalities of ``model``, whose fusion head must be additive (concat or sum)."""
        s = settings or UMESettings()
        modalities = tuple(model.modalities)  # type: ignore[arg-type]
        if len(modalities) < 2:
            raise ConfigError(
                f"UME balances modalities (an ensemble of unimodal branches): give at least 2, got "
                f"{list(modalities)}"
            )
        check_additive_fusion(model, "UME")
        return cls(modalities, reduction=s.reduction)

    def adjust_loss(self, step: BalanceStep, output: Any, loss: Tensor) -> Tensor:
        """Return the unimodal cross-entropies' sum (or mean) instead of ``loss``; log each of them."""
        total, losses = ume_loss(output.unimodal_logits, step.labels, self.modalities, self.reduction)
        step.metrics.update({f"balance/ume/loss/{m}": float(v.detach()) for m, v in losses.items()})
        return total
