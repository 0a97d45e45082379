"""MBSD: unimodal cross-entropies plus a sample-weighted agreement term between every pair of modalities.

Source: BalanceMM (GeWu-Lab/BalanceBenchmark, ``balancemm/trainer/MBSD_trainer.py`` and
``balancemm/configs/trainer_config.yaml``), listed among the objective-level methods of Xu, Cui, Huang, Wang,
Hu, *BalanceBenchmark: A Survey for Multimodal Imbalance Learning*, arXiv:2502.10816, 2025. BalanceMM's code
names no paper for MBSD and no paper stating this loss could be found or read here, so harmonia's
specification is BalanceMM's code (see ``docs/balancing.md``). Its sample weight is the sample-wise modality
discrepancy ``|u^a_i − u^v_i|`` (the unimodal softmax confidences on the true class) of Xia, Zhao, Pang,
Zhang, Hu, *Balanced Audiovisual Dataset for Imbalance Analysis*, arXiv:2302.10912, 2023, the likeliest
origin; not confirmed.

For unimodal logits ``z^m`` (``[B, C]``), ``p^m = softmax(z^m)``, ``q^m_i = p^m_i[y_i]`` and every unordered
pair ``(j, k)`` of the M modalities (the set P, ``|P| = M(M−1)/2``):

    g_i = [argmax p^j_i = y_i  or  argmax p^k_i = y_i]        (one of the two is right)
    w_i = g_i · |q^j_i − q^k_i|                                 (sample weight)
    s_i = max(q^j_i, q^k_i),   t_i = min(q^j_i, q^k_i)          (strong / weak true-class confidence)
    R_i = (1/C) Σ_c (x^j_ic − x^k_ic)²                          (x = z: logits, or x = p: probabilities)
    D_i = t_i · (log t_i − s_i)                                 (divergence "balancemm")
       or Σ_c p^S_ic (log p^S_ic − log p^W_ic)                  (divergence "kl"; S/W: the modality with the
                                                                 higher/lower q_i, p^S detached)

    L_MBSD = (1/|P|) Σ_{(j,k)∈P} (1/B) Σ_i w_i · (R_i + D_i)
    L      = L_fused + Σ_m CE(z^m, y) + L_MBSD

Reading of BalanceMM's code: with two modalities it forms R on the logits; with three it forms R on the
probabilities and averages R and D over the three pairs (the mean over P above covers both). ``D`` is its
``F.kl_div(s, t, reduction="none")``: ``kl_div`` expects log-probabilities as its first argument, so with the
confidence ``s`` there it computes ``t·(log t − s)``, a non-positive number, not a divergence; harmonia's
default ``balancemm`` reproduces it, ``kl`` is harmonia's alternative (a real KL divergence from the
stronger to the weaker modality's prediction). BalanceMM builds ``w``, ``s`` and ``t`` by writing into new
tensors, which keeps them in the autograd graph: the loss's gradient also flows through the weight (default
``detach_weight=False``, as there). Outside its epoch window BalanceMM trains the fused cross-entropy alone
(no unimodal terms), as harmonia does. No cross-sample statistics: every term is a per-sample mean, so
data-parallel training needs no extra communication and a resumed run is exact.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harmonia.balance.method import BalanceStep, BalancingMethod, in_epoch_window
from harmonia.errors import ConfigError, InputError
from harmonia.precision import in_float32
from harmonia.settings import coerce_enums, setting


class MBSDSpace(str, enum.Enum):
    """Where the pairwise squared distance ``R`` is measured."""

    LOGITS = "logits"
    PROBS = "probs"


class MBSDDivergence(str, enum.Enum):
    """The pairwise divergence term ``D``."""

    BALANCEMM = "balancemm"
    KL = "kl"


@dataclass
class MBSDPairTerms:
    """Per-sample terms ``[B]`` of one pair of modalities: weight ``w``, distance ``R``, divergence ``D``."""

    weight: Tensor
    distance: Tensor
    divergence: Tensor


@in_float32
def mbsd_pair_terms(
    logits_j: Tensor,
    logits_k: Tensor,
    labels: Tensor,
    space: MBSDSpace | str = MBSDSpace.LOGITS,
    divergence: MBSDDivergence | str = MBSDDivergence.BALANCEMM,
    detach_weight: bool = False,
) -> MBSDPairTerms:
    """``w_i``, ``R_i`` and ``D_i`` (module docstring) of the pair ``(j, k)`` for ``[B, C]`` logits."""
    if logits_j.shape != logits_k.shape or logits_j.dim() != 2:
        raise InputError(
            f"MBSD compares two modalities' [B, C] logits of one shape, got {tuple(logits_j.shape)} and "
            f"{tuple(logits_k.shape)}"
        )
    space, divergence = MBSDSpace(space), MBSDDivergence(divergence)
    p_j, p_k = logits_j.softmax(dim=-1), logits_k.softmax(dim=-1)
    rows = labels.view(-1, 1)
    q_j, q_k = p_j.gather(1, rows).squeeze(1), p_k.gather(1, rows).squeeze(1)
    right = (p_j.argmax(dim=-1) == labels) | (p_k.argmax(dim=-1) == labels)
    j_strong = q_j >= q_k  # on a tie j counts as the stronger one (the weight is 0 there)
    strong = torch.where(j_strong, q_j, q_k)
    weak = torch.where(j_strong, q_k, q_j)
    weight = (strong - weak) * right.to(strong.dtype)
    if detach_weight:
        weight = weight.detach()
    x_j, x_k = (logits_j, logits_k) if space is MBSDSpace.LOGITS else (p_j, p_k)
    distance = (x_j - x_k).pow(2).mean(dim=-1)
    if divergence is MBSDDivergence.BALANCEMM:
        div = torch.xlogy(weak, weak) - weak * strong
    else:
        log_j, log_k = logits_j.log_softmax(dim=-1), logits_k.log_softmax(dim=-1)
        pick = j_strong.view(-1, 1)
        log_s = torch.where(pick, log_j, log_k).detach()  # the teacher: the stronger modality
        log_w = torch.where(pick, log_k, log_j)
        div = (log_s.exp() * (log_s - log_w)).sum(dim=-1)
    return MBSDPairTerms(weight, distance, div)


@in_float32
def mbsd_regularizer(
    unimodal_logits: Sequence[Tensor],
    labels: Tensor,
    space: MBSDSpace | str = MBSDSpace.LOGITS,
    divergence: MBSDDivergence | str = MBSDDivergence.BALANCEMM,
    detach_weight: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``L_MBSD`` over all pairs of ``unimodal_logits`` (at least 2) and its parts (detached):
    ``weight`` (mean w), ``distance`` and ``divergence`` (pair means of ``(1/B) Σ_i w_i R_i`` and of
    ``(1/B) Σ_i w_i D_i``)."""
    if len(unimodal_logits) < 2:
        raise InputError(f"MBSD needs the logits of at least 2 modalities, got {len(unimodal_logits)}")
    pairs = list(itertools.combinations(range(len(unimodal_logits)), 2))
    zero = unimodal_logits[0].new_zeros(())
    total, weight, distance, div = zero, zero, zero, zero
    for j, k in pairs:
        t = mbsd_pair_terms(unimodal_logits[j], unimodal_logits[k], labels, space, divergence, detach_weight)
        total = total + (t.weight * (t.distance + t.divergence)).mean()
        weight = weight + t.weight.detach().mean()
        distance = distance + (t.weight * t.distance).detach().mean()
        div = div + (t.weight * t.divergence).detach().mean()
    n = len(pairs)
    return total / n, {"weight": weight / n, "distance": distance / n, "divergence": div / n}


@dataclass
class MBSDSettings:
    """MBSD settings (defaults: BalanceMM's two-modality trainer and config; see the module docstring)."""

    space: MBSDSpace = setting(
        MBSDSpace.LOGITS,
        help="squared distance between the pair's logits (BalanceMM, 2 modalities) or probs (BalanceMM, 3)",
    )
    divergence: MBSDDivergence = setting(
        MBSDDivergence.BALANCEMM,
        help="balancemm: t·(log t − s) on true-class confidences (BalanceMM's kl_div call); "
        "kl: KL(p_strong || p_weak) over classes, strong detached (harmonia's alternative)",
    )
    detach_weight: bool = setting(
        False, help="stop the gradient through the sample weight |q_j − q_k| (BalanceMM: it flows)"
    )
    unimodal_ce: bool = setting(True, help="add Σ_m CE(z^m, y) (BalanceMM: yes)")
    start_epoch: int = setting(0, help="first epoch with the MBSD objective (BalanceMM: 0)", ge=0)
    end_epoch: int | None = setting(
        None, help="epoch at which MBSD stops (null: never; BalanceMM: after epoch 80)", ge=1
    )

    def __post_init__(self) -> None:
        coerce_enums(self)


class MBSD(BalancingMethod):
    """MBSD: ``loss -> loss + Σ_m CE(z^m, y) + L_MBSD`` in its epoch window (module docstring).

    Args:
        modalities: the modality names, in a fixed order (at least 2).
        space, divergence, detach_weight, unimodal_ce, start_epoch, end_epoch: see :class:`MBSDSettings`.
    """

    Settings: ClassVar[type[Any]] = MBSDSettings

    def __init__(
        self,
        modalities: Sequence[str],
        space: MBSDSpace | str = MBSDSpace.LOGITS,
        divergence: MBSDDivergence | str = MBSDDivergence.BALANCEMM,
        detach_weight: bool = False,
        unimodal_ce: bool = True,
        start_epoch: int = 0,
        end_epoch: int | None = None,
    ) -> None:
        super().__init__()
        if len(modalities) < 2:
            raise ConfigError(
                f"MBSD balances modalities (it compares pairs of unimodal predictions): give at least 2, got "
                f"{list(modalities)}"
            )
        try:
            self.space, self.divergence = MBSDSpace(space), MBSDDivergence(divergence)
        except ValueError:
            raise ConfigError(
                f"MBSD space must be one of {[s.value for s in MBSDSpace]} and divergence one of "
                f"{[d.value for d in MBSDDivergence]}, got {space!r} and {divergence!r}"
            ) from None
        if start_epoch < 0 or (end_epoch is not None and end_epoch <= start_epoch):
            raise ConfigError(
                f"MBSD needs 0 <= start_epoch < end_epoch (end_epoch null: no end), got start_epoch="
                f"{start_epoch}, end_epoch={end_epoch}"
            )
        self.modalities = tuple(modalities)
        self.detach_weight, self.unimodal_ce = detach_weight, unimodal_ce
        self.start_epoch, self.end_epoch = start_epoch, end_epoch

    @classmethod
    def build(cls, model: nn.Module, settings: MBSDSettings | None = None, seed: int = 0) -> MBSD:
        """MBSD over the modalities of ``model`` (any fusion head: it uses the model's unimodal logits)."""
        s = settings or MBSDSettings()
        return cls(
            tuple(model.modalities),  # type: ignore[arg-type]
            space=s.space,
            divergence=s.divergence,
            detach_weight=s.detach_weight,
            unimodal_ce=s.unimodal_ce,
            start_epoch=s.start_epoch,
            end_epoch=s.end_epoch,
        )

    def active(self, epoch: int) -> bool:
        return in_epoch_window(epoch, self.start_epoch, self.end_epoch)

    def objective(
        self, unimodal_logits: Mapping[str, Tensor], labels: Tensor
    ) -> tuple[Tensor, dict[str, float]]:
        """What MBSD adds to the fused loss, ``Σ_m CE(z^m, y) + L_MBSD``, and the values it logs."""
        missing = [m for m in self.modalities if m not in unimodal_logits]
        if missing:
            raise InputError(
                f"MBSD: no unimodal logits for {missing}; it was built for {list(self.modalities)}"
            )
        logits = [unimodal_logits[m] for m in self.modalities]
        labels = labels.to(logits[0].device)
        term, parts = mbsd_regularizer(logits, labels, self.space, self.divergence, self.detach_weight)
        metrics = {f"balance/mbsd/{k}": float(v) for k, v in parts.items()}
        metrics["balance/mbsd/loss"] = float(term.detach())
        if self.unimodal_ce:
            ces = {m: F.cross_entropy(z, labels) for m, z in zip(self.modalities, logits, strict=True)}
            metrics.update({f"balance/mbsd/ce/{m}": float(v.detach()) for m, v in ces.items()})
            term = term + torch.stack(list(ces.values())).sum()
        return term, metrics

    def adjust_loss(self, step: BalanceStep, output: Any, loss: Tensor) -> Tensor:
        """Add ``Σ_m CE(z^m, y) + L_MBSD`` in the epoch window; log ``balance/mbsd/{loss,weight,distance,
        divergence}`` and ``balance/mbsd/ce/<m>``."""
        if not self.active(step.epoch):
            return loss
        term, metrics = self.objective(output.unimodal_logits, step.labels)
        step.metrics.update(metrics)
        return loss + term
