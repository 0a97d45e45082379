"""Adaptive Mask Co-optimization, AMCo (Zhou, Liang, Zheng, Xuan, Kumada, ICASSP 2023).

Ying Zhou, Xuefeng Liang, ShiQuan Zheng, Huijun Xuan, Takatsune Kumada, "Adaptive Mask Co-optimization for
Modal Dependence in Multimodal Learning", IEEE ICASSP 2023, doi:10.1109/ICASSP49357.2023.10096641.

Principle (the abstract): an *adaptive mask* makes the modality the model depends on harder to learn, so
the model fits the others better; *co-optimization* (unimodal losses next to the fused one) keeps the
dependent modality's own performance from degrading. The paper's method text was not available to check;
the equations below are those of BalanceMM (GeWu-Lab/BalanceBenchmark, ``balancemm/trainer/AMCo_trainer.py``,
``BaseClassifierAMCoModel`` in ``balancemm/models/avclassify_model.py``, ``configs/trainer_config.yaml``),
the only implementation found.

**Dependence.** With ``õ^m`` the (masked) unimodal logits ``[B, C]`` of modality m, the softmax over the
concatenation ``[õ^1, ..., õ^M]`` (``M·C`` entries per sample) gives each modality a share of the mass

    s^m = (1/B) Σ_i Σ_c softmax([õ^1_i, ..., õ^M_i])_{(m, c)},    Σ_m s^m = 1,

and m is *dependent* in the next step when ``s^m > σ`` (σ = 0.5: the modality holding most of the mass
when M = 2; for M > 2 the balanced share is 1/M). The flags start false at every epoch (BalanceMM resets
them per epoch) and are all-reduced over the global batch under ``torch.distributed``.

**Mask ratio.** At the b-th step of epoch e (b from 0), with ``l = g·e·b`` (BalanceMM: ``l_t`` starts at 0
every epoch and grows by ``e/10`` per step, g = 0.1)

    p = sin(π/2 · min(ε, l)/ε),    N = ⌊p·D⌋ positions masked,    ε = 0.3,

so p = 0 in epoch 0 and rises to 1 within ``ε/(g·e)`` steps of epoch e ≥ 1. The N zeroed positions are
drawn uniformly without replacement, one draw per step shared by the whole batch; kept entries are *not*
rescaled (BalanceMM). ``target`` chooses what is masked:

* ``logits`` (default, BalanceMM): the C class logits of every dependent modality, one mask ``μ ∈ {0,1}^C``
  shared by them: ``õ^m = μ ⊙ o^m`` and the fused logits ``z̃ = z − Σ_{m dep} (1 − μ) ⊙ o^m`` (= ``Σ_m õ^m``,
  BalanceMM's fused output, for the additive concat/sum heads);
* ``features`` (harmonia's alternative, in ``transform_features``): D = d_m feature channels of the
  dependent modality's pooled features, one mask per dependent modality. BalanceMM's config has ``U: 512``
  (ResNet-18's feature size) that its code never reads; masking features is a guess at its meaning.

**Co-optimization.** The objective is ``CE(z̃, y) + Σ_m CE(õ^m, y)`` (BalanceMM: unit weights). In
``adjust_loss`` the trainer's ``CE(z, y)`` is swapped for ``CE(z̃, y)`` (``logits``; with ``features`` the
fused logits are already masked) and the unimodal terms are added. Outside ``[start_epoch, end_epoch)``
AMCo does nothing (BalanceMM: epochs 0 to 80).

Not carried over from BalanceMM: ``linear_star``, an extra C×C linear layer its AMCo model applies to the
fused logits (an architecture change, not a balancing step; a method here cannot add trained parameters);
its unused ``alpha``, ``method`` and ``U`` settings. Logged per step: ``balance/amco/ratio`` (p),
``balance/amco/share/<m>`` (s^m) and ``balance/amco/dependent/<m>`` (1 if masked in this step).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harmonia.balance.method import BalanceStep, BalancingMethod, in_epoch_window, step_generator
from harmonia.distributed import all_reduce_sum
from harmonia.errors import ConfigError, InputError
from harmonia.settings import coerce_enums, setting


class AMCoTarget(str, enum.Enum):
    """What AMCo masks in the dependent modality: its class logits (BalanceMM) or its feature channels."""

    LOGITS = "logits"
    FEATURES = "features"


def amco_mask_ratio(epoch: int, batch_index: int, eps: float = 0.3, growth: float = 0.1) -> float:
    """``p = sin(π/2 · min(ε, l)/ε)`` with ``l = growth · epoch · batch_index`` (BalanceMM's ``l_t``)."""
    if eps <= 0:
        raise ConfigError(f"AMCo eps must be > 0, got {eps}")
    level = growth * epoch * batch_index
    return math.sin(math.pi / 2 * min(eps, level) / eps)


def amco_mask(size: int, ratio: float, generator: torch.Generator) -> Tensor:
    """``[size]`` float mask with ``⌊ratio·size⌋`` zeros at uniformly drawn positions, ones elsewhere."""
    masked = int(ratio * size)
    mask = torch.ones(size)
    mask[torch.randperm(size, generator=generator)[:masked]] = 0.0
    return mask


def dependence_shares(unimodal_logits: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``s^m``: the batch-mean softmax mass of modality m over the concatenated unimodal logits (of the
    global batch under ``torch.distributed``); the shares sum to 1. Computed without gradient."""
    names = list(unimodal_logits)
    if not names:
        raise InputError("dependence_shares: unimodal_logits is empty; pass one [B, C] tensor per modality")
    with torch.no_grad():
        joint = torch.cat([unimodal_logits[m].float() for m in names], dim=1).softmax(dim=1)
        sizes = [unimodal_logits[m].shape[1] for m in names]
        sums = torch.stack([part.sum() for part in joint.split(sizes, dim=1)])
        total = all_reduce_sum(torch.cat([sums, sums.new_tensor([float(joint.shape[0])])]))
    return {m: total[j] / total[-1].clamp_min(1.0) for j, m in enumerate(names)}


@dataclass
class AMCoSettings:
    """AMCo hyper-parameters (defaults: BalanceMM's ``trainer_config.yaml`` and ``AMCo_trainer.py``)."""

    sigma: float = setting(0.5, help="σ: a modality whose softmax share exceeds σ is dependent", ge=0, le=1)
    eps: float = setting(0.3, help="ε: the mask ratio reaches 1 when l = growth·epoch·step reaches ε", gt=0)
    growth: float = setting(0.1, help="g: l grows by g·epoch per step of an epoch (BalanceMM: 1/10)", ge=0)
    target: AMCoTarget = setting(
        AMCoTarget.LOGITS, help="logits: mask class logits (BalanceMM); features: mask feature channels"
    )
    start_epoch: int = setting(0, help="first epoch in which AMCo is applied", ge=0)
    end_epoch: int | None = setting(None, help="AMCo stops at this epoch (null: never)", ge=1)

    def __post_init__(self) -> None:
        coerce_enums(self)


class AMCo(BalancingMethod):
    """Mask the dependent modality (by its softmax share) with a ratio that rises within each epoch, and
    train every modality's unimodal logits next to the fused ones.

    Args:
        modalities: the modality names, in a fixed order (at least 2).
        sigma, eps, growth, target, start_epoch, end_epoch: see :class:`AMCoSettings`.
        seed: the mask of step t comes from a generator seeded with (seed, t), the same on every rank.
            The step counters, the epoch and the dependence flags are buffers (saved with ``state_dict``),
            so a resumed run masks what an uninterrupted one would.
    """

    Settings: ClassVar[type[Any]] = AMCoSettings
    dependent: Tensor
    num_steps: Tensor
    epoch_step: Tensor
    epoch: Tensor

    def __init__(
        self,
        modalities: Sequence[str],
        sigma: float = 0.5,
        eps: float = 0.3,
        growth: float = 0.1,
        target: AMCoTarget | str = AMCoTarget.LOGITS,
        start_epoch: int = 0,
        end_epoch: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if len(modalities) < 2:
            raise ConfigError(f"AMCo balances modalities: give at least 2, got {list(modalities)}")
        if not 0 <= sigma <= 1:
            raise ConfigError(f"AMCo sigma must be in [0, 1], got {sigma}")
        if eps <= 0 or growth < 0:
            raise ConfigError(f"AMCo needs eps > 0 and growth >= 0, got eps={eps}, growth={growth}")
        self.modalities = tuple(modalities)
        self.sigma, self.eps, self.growth, self.target = sigma, eps, growth, AMCoTarget(target)
        self.start_epoch, self.end_epoch, self.seed = start_epoch, end_epoch, seed
        self.register_buffer("dependent", torch.zeros(len(self.modalities), dtype=torch.bool))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("epoch_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("epoch", torch.full((), -1, dtype=torch.long))
        self._ratio = 0.0
        self._generator: torch.Generator | None = None
        self._logit_mask: Tensor | None = None

    @classmethod
    def build(cls, model: nn.Module, settings: AMCoSettings | None = None, seed: int = 0) -> AMCo:
        """AMCo over the modalities of ``model``."""
        s = settings or AMCoSettings()
        amco = cls(
            tuple(model.modalities),  # type: ignore[arg-type]
            sigma=s.sigma,
            eps=s.eps,
            growth=s.growth,
            target=s.target,
            start_epoch=s.start_epoch,
            end_epoch=s.end_epoch,
            seed=seed,
        )
        return amco.to(next(model.parameters()).device)

    def active(self, epoch: int) -> bool:
        return in_epoch_window(epoch, self.start_epoch, self.end_epoch)

    def dependent_modalities(self) -> list[str]:
        return [m for m, d in zip(self.modalities, self.dependent.tolist(), strict=True) if d]

    def before_forward(self, step: BalanceStep) -> None:
        """Start a new epoch (step counter to 0, no modality dependent), set this step's mask ratio p and
        its seeded generator."""
        if int(self.epoch) != step.epoch:
            self.epoch = torch.full_like(self.epoch, step.epoch)
            self.epoch_step = torch.zeros_like(self.epoch_step)
            self.dependent = torch.zeros_like(self.dependent)
        self._ratio = amco_mask_ratio(step.epoch, int(self.epoch_step), self.eps, self.growth)
        self._generator = step_generator(self.seed, self.num_steps)
        self._logit_mask = None
        # new tensors: a saved state_dict is not mutated
        self.epoch_step = self.epoch_step + 1
        self.num_steps = self.num_steps + 1
        if self.active(step.epoch):
            step.metrics["balance/amco/ratio"] = self._ratio
            dep = self.dependent.tolist()
            step.metrics.update(
                {f"balance/amco/dependent/{m}": float(d) for m, d in zip(self.modalities, dep, strict=True)}
            )

    def transform_features(self, step: BalanceStep, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """With ``target=features``: zero ``⌊p·d_m⌋`` channels of each dependent modality's features."""
        if self.target is not AMCoTarget.FEATURES or not self.active(step.epoch) or self._ratio <= 0:
            return features
        out = dict(features)
        for m in self.dependent_modalities():
            if m not in features:
                raise InputError(f"AMCo: no features for {m!r}; it was built for {list(self.modalities)}")
            phi = features[m]
            mask = amco_mask(phi.shape[1], self._ratio, self._next_generator()).to(phi.device, phi.dtype)
            out[m] = phi * mask.view(1, -1, *[1] * (phi.dim() - 2))
        return out

    def _next_generator(self) -> torch.Generator:
        if self._generator is None:
            raise RuntimeError("AMCo: a hook ran before before_forward")
        return self._generator

    def masked_logits(
        self, logits: Tensor, unimodal: Mapping[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(z̃, {m: õ^m})``: with ``target=logits`` the dependent modalities' class logits masked by one
        shared mask (drawn here), the fused logits less what was masked; otherwise unchanged."""
        missing = [m for m in self.modalities if m not in unimodal]
        if missing:
            raise InputError(
                f"AMCo: no unimodal logits for {missing}; it was built for {list(self.modalities)}"
            )
        out = {m: unimodal[m] for m in self.modalities}
        dependent = self.dependent_modalities()
        if self.target is not AMCoTarget.LOGITS or not dependent or self._ratio <= 0:
            return logits, out
        mask = amco_mask(logits.shape[1], self._ratio, self._next_generator()).to(logits.device, logits.dtype)
        self._logit_mask = mask
        for m in dependent:
            out[m] = unimodal[m] * mask
            logits = logits - unimodal[m] * (1 - mask)
        return logits, out

    def adjust_loss(self, step: BalanceStep, output: Any, loss: Tensor) -> Tensor:
        """Swap the fused cross-entropy for the masked one (``target=logits``), add every modality's
        unimodal cross-entropy, and set the next step's dependent modalities from this step's shares."""
        if not self.active(step.epoch):
            return loss
        labels = step.labels.to(output.logits.device)
        fused, unimodal = self.masked_logits(output.logits, output.unimodal_logits)
        if fused is not output.logits:
            loss = loss - F.cross_entropy(output.logits, labels) + F.cross_entropy(fused, labels)
        loss = loss + sum(F.cross_entropy(unimodal[m], labels) for m in self.modalities)
        shares = dependence_shares(unimodal)
        step.metrics.update({f"balance/amco/share/{m}": float(s) for m, s in shares.items()})
        flags = torch.stack([shares[m] > self.sigma for m in self.modalities])
        self.dependent = flags.to(self.dependent.device)
        return loss


__all__ = ["AMCo", "AMCoSettings", "AMCoTarget", "amco_mask", "amco_mask_ratio", "dependence_shares"]
