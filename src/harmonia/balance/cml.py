"""Calibrating Multimodal Learning, CML (Ma, Zhang, Zhang, Wu, Fu, Zhou, Hu, ICML 2023).

Huan Ma, Qingyang Zhang, Changqing Zhang, Bingzhe Wu, Huazhu Fu, Joey Tianyi Zhou, Qinghua Hu,
"Calibrating Multimodal Learning", Proceedings of the 40th International Conference on Machine Learning
(ICML 2023), PMLR 202; arXiv:2306.01265.

Principle: the confidence of a prediction must not increase when a modality is removed,
``Conf(x^(T')) <= Conf(x^(T))`` for ``T' ⊂ T``. Confidence is the maximum softmax probability,
``Conf(z) = max_c softmax(z)_c``. For each sample i a random removal order of the M modalities gives a
chain of nested subsets ``T_0 = all ⊃ T_1 ⊃ ... ⊃ T_{M-1}`` (one modality fewer at each link; the
official code's ``get_multi_mask``), and the regulariser penalises every link where confidence rises:

    L_CML = Σ_i Σ_{k=1}^{M-1} s_{i,k} · ReLU(Conf(z_i^{T_k}) - Conf(z_i^{T_{k-1}}))

    s_{i,k} = 0 if the reduced prediction is right and the fuller one wrong
              (argmax z^{T_k} = y_i and argmax z^{T_{k-1}} ≠ y_i), else 1    ("trick 1" of the code)

and the objective is ``L = L_cls + λ · L_CML``; with ``subset_ce`` (as in both code bases)
``L_cls = (CE(z^{T_0}) + Σ_k CE(z^{T_k})) / M``: every prediction of the chain is also trained.

A reduced prediction ``z^{T_k}`` is the model's fusion head applied to the features with the removed
modalities set to zero (for a concat head this is ``Σ_{m∈T_k} W^m φ^m + b``, exactly what BalanceMM forms
as ``out - o^m + b/M``); a model without a ``fusion`` head uses the sum of its unimodal logits over the
subset (exact for additive heads). ``z^{T_0}`` is the model's output logits (after any feature transform
of an earlier method, e.g. OPM's dropping).

Defaults and sources (the paper's method text was not available to check; see the report):

* ``lam = 0.1``: the official code (github.com/QingyangZhang/CML, ``miwae/train.py``) scales the term by
  ``beta / 100`` with ``--beta 10`` in its README; BalanceMM (GeWu-Lab/BalanceBenchmark,
  ``CML_trainer.py``, ``trainer_config.yaml``) uses ``lam: 0.1``;
* ``reduction = sum``: both code bases sum the term over the batch (not a mean), so λ's effect grows with
  the batch size; ``mean`` divides by the batch size;
* ``exempt_corrected = True``: the official code's mask (``cpm/CPM_Nets.py``); BalanceMM computes the same
  mask but never applies it, and applies the hinge to the batch *sum* of differences
  (``max(0, Σ_i ΔConf_i)``) rather than per sample;
* ``subset_ce = True``: both code bases average the cross-entropy over the chain's M predictions.

No cross-sample statistics are kept (every term is per sample), so nothing is all-reduced. Under
``torch.distributed`` the removal orders are drawn for the global batch (each rank takes its rows), and a
``sum`` term is multiplied by the world size, so that data-parallel gradients (averaged over ranks) equal
a single process's on the global batch.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harmonia.balance.method import (
    BalanceStep,
    BalancingMethod,
    in_epoch_window,
    step_generator,
    unimodal_heads,
)
from harmonia.distributed import rank_and_world
from harmonia.errors import ConfigError, InputError
from harmonia.precision import in_float32
from harmonia.settings import setting

SubsetLogits = Callable[[Mapping[str, Tensor], Tensor], Tensor]


class CMLReduction(str, enum.Enum):
    """How the per-sample CML terms of a batch are combined."""

    SUM = "sum"
    MEAN = "mean"


def confidence(logits: Tensor) -> Tensor:
    """``Conf(z) = max_c softmax(z)_c`` per row of ``[B, C]`` logits."""
    return logits.softmax(dim=-1).amax(dim=-1)


@in_float32
def cml_regularizer(
    chain: Sequence[Tensor],
    labels: Tensor,
    exempt_corrected: bool = True,
    reduction: CMLReduction | str = CMLReduction.SUM,
) -> tuple[Tensor, Tensor]:
    """The CML term of a chain of logits ``[z^{T_0}, z^{T_1}, ...]`` (each ``[B, C]``, one modality fewer
    at each link) and the fraction of (sample, link) pairs it penalises.

    Returns ``(Σ_k Σ_i s_{i,k} ReLU(Conf(z_i^{T_k}) - Conf(z_i^{T_{k-1}})), violated fraction)``, the sum
    divided by the batch size when ``reduction`` is ``mean``.
    """
    if len(chain) < 2:
        raise InputError(f"cml_regularizer needs a chain of at least 2 predictions, got {len(chain)}")
    reduction = CMLReduction(reduction)
    conf = [confidence(z) for z in chain]
    pred = [z.argmax(dim=-1) for z in chain]
    term = chain[0].new_zeros(())
    violated = chain[0].new_zeros(())
    for k in range(1, len(chain)):
        gap = F.relu(conf[k] - conf[k - 1])
        if exempt_corrected:
            gap = gap * (~((pred[k] == labels) & (pred[k - 1] != labels))).to(gap.dtype)
        term = term + gap.sum()
        violated = violated + (gap > 0).sum()
    batch = chain[0].shape[0]
    if reduction is CMLReduction.MEAN:
        term = term / max(batch, 1)
    return term, violated.detach() / max(batch * (len(chain) - 1), 1)


@dataclass
class CMLSettings:
    """CML hyper-parameters (defaults: the official code and BalanceMM; see the module docstring)."""

    lam: float = setting(
        0.1, help="λ: weight of the CML term (official code beta/100 = 0.1; BalanceMM 0.1)", ge=0
    )
    reduction: CMLReduction = setting(
        CMLReduction.SUM, help="combine per-sample terms: sum (both codes) or mean"
    )
    exempt_corrected: bool = setting(
        True, help="skip samples whose reduced prediction is right and fuller one wrong (official code)"
    )
    subset_ce: bool = setting(
        True, help="average cross-entropy over all predictions of the chain (both codes)"
    )
    start_epoch: int = setting(0, help="first epoch in which CML is applied", ge=0)
    end_epoch: int | None = setting(None, help="CML stops at this epoch (null: never)", ge=1)


class CML(BalancingMethod):
    """Calibrating Multimodal Learning: penalise confidence that rises when a modality is removed.

    Args:
        modalities: the modality names, in a fixed order (at least 2).
        subset_logits: ``(features, keep [B, M] bool) -> logits`` of the model on the kept modalities
            (set by :meth:`build` from the model's fusion head or unimodal heads).
        lam, reduction, exempt_corrected, subset_ce, start_epoch, end_epoch: see :class:`CMLSettings`.
        seed: the removal orders of step t come from a generator seeded with (seed, t); the step counter
            is a buffer, so a resumed run draws what an uninterrupted one would.
    """

    Settings: ClassVar[type[Any]] = CMLSettings
    num_steps: Tensor

    def __init__(
        self,
        modalities: Sequence[str],
        subset_logits: SubsetLogits | None = None,
        lam: float = 0.1,
        reduction: CMLReduction | str = CMLReduction.SUM,
        exempt_corrected: bool = True,
        subset_ce: bool = True,
        start_epoch: int = 0,
        end_epoch: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if len(modalities) < 2:
            raise ConfigError(
                f"CML balances modalities (it compares predictions with one modality fewer): give at least "
                f"2, got {list(modalities)}"
            )
        if lam < 0:
            raise ConfigError(f"CML lam must be >= 0, got {lam}")
        self.modalities = tuple(modalities)
        self.subset_logits = subset_logits
        self.lam, self.reduction = lam, CMLReduction(reduction)
        self.exempt_corrected, self.subset_ce = exempt_corrected, subset_ce
        self.start_epoch, self.end_epoch, self.seed = start_epoch, end_epoch, seed
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))

    @classmethod
    def build(cls, model: nn.Module, settings: CMLSettings | None = None, seed: int = 0) -> CML:
        """CML over the modalities of ``model``: reduced predictions from its fusion head (zeroed features)
        or, for a model without one, from the sum of its unimodal logits."""
        s = settings or CMLSettings()
        modalities = tuple(model.modalities)  # type: ignore[arg-type]
        fusion = getattr(model, "fusion", None)
        if isinstance(fusion, nn.Module):
            subset_logits = _zeroed_fusion(modalities, fusion)
        else:
            subset_logits = _summed_unimodal(modalities, unimodal_heads(model))
        cml = cls(
            modalities,
            subset_logits,
            lam=s.lam,
            reduction=s.reduction,
            exempt_corrected=s.exempt_corrected,
            subset_ce=s.subset_ce,
            start_epoch=s.start_epoch,
            end_epoch=s.end_epoch,
            seed=seed,
        )
        return cml.to(next(model.parameters()).device)

    def active(self, epoch: int) -> bool:
        return in_epoch_window(epoch, self.start_epoch, self.end_epoch)

    def removal_orders(self, batch: int) -> Tensor:
        """``[batch, M]``: each local sample's random order of removing the modalities, for this step."""
        generator = step_generator(self.seed, self.num_steps)
        rank, world = rank_and_world()
        orders = torch.rand(batch * world, len(self.modalities), generator=generator).argsort(dim=1)
        return orders[rank * batch : (rank + 1) * batch]

    def chain(self, features: Mapping[str, Tensor], logits: Tensor, orders: Tensor) -> list[Tensor]:
        """The chain ``[z^{T_0}, ..., z^{T_{M-1}}]``: ``logits``, then one prediction per removal."""
        if self.subset_logits is None:
            raise ConfigError(
                "CML as a training hook needs the model's reduced predictions: build it with "
                "CML.build(model, settings)"
            )
        missing = [m for m in self.modalities if m not in features]
        if missing:
            raise InputError(f"CML: no features for {missing}; it was built for {list(self.modalities)}")
        keep = torch.ones(orders.shape, dtype=torch.bool)
        rows = torch.arange(orders.shape[0])
        out = [logits]
        for k in range(len(self.modalities) - 1):
            keep = keep.clone()
            keep[rows, orders[:, k]] = False
            out.append(self.subset_logits(features, keep.to(logits.device)))
        return out

    def adjust_loss(self, step: BalanceStep, output: Any, loss: Tensor) -> Tensor:
        """Add ``λ · L_CML`` (and, with ``subset_ce``, average the chain's cross-entropies into the loss).
        Logs ``balance/cml/loss`` (the added ``λ · L_CML``) and ``balance/cml/violated`` (the fraction of
        sample-links whose confidence rose)."""
        if not self.active(step.epoch):
            return loss
        logits = output.logits
        orders = self.removal_orders(logits.shape[0])
        self.num_steps = self.num_steps + 1  # a new tensor: a saved state_dict is not mutated
        chain = self.chain(output.features, logits, orders)
        labels = step.labels.to(logits.device)
        term, violated = cml_regularizer(chain, labels, self.exempt_corrected, self.reduction)
        step.metrics["balance/cml/loss"] = float(self.lam * term.detach())
        step.metrics["balance/cml/violated"] = float(violated)
        if self.reduction is CMLReduction.SUM:
            term = term * rank_and_world()[1]  # ranks' averaged gradients = the global batch's sum
        if self.subset_ce:
            loss = (loss + sum(F.cross_entropy(z, labels) for z in chain[1:])) / len(chain)
        return loss + self.lam * term


def _zeroed_fusion(modalities: tuple[str, ...], fusion: nn.Module) -> SubsetLogits:
    def subset_logits(features: Mapping[str, Tensor], keep: Tensor) -> Tensor:
        return fusion(
            {
                m: features[m] * keep[:, j].to(features[m].dtype).view(-1, *[1] * (features[m].dim() - 1))
                for j, m in enumerate(modalities)
            }
        )

    return subset_logits


def _summed_unimodal(
    modalities: tuple[str, ...], heads: Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]]
) -> SubsetLogits:
    def subset_logits(features: Mapping[str, Tensor], keep: Tensor) -> Tensor:
        unimodal = heads(features)
        return sum(
            unimodal[m] * keep[:, j].to(unimodal[m].dtype).view(-1, 1) for j, m in enumerate(modalities)
        )  # type: ignore[return-value]

    return subset_logits
