"""Sample-level modality valuation with re-sampling of low-contributing modalities.

Wei, Feng, Wang, Hu, *Enhancing Multimodal Cooperation via Sample-level Modality Valuation*, CVPR 2024
(arXiv:2309.06255); official code https://github.com/GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation
(``code/sample_level.py``, ``code/datasets/dataloader.py``), also in BalanceMM
(GeWu-Lab/BalanceBenchmark, ``balancemm/trainer/Sample_trainer.py``, ``evaluation/modalitys.py``,
``datasets/__init__.py: create_dataset_sample_level``).

**Contribution** (Shapley value of correctness). With ``v_i(S)`` the value of the prediction of sample i
when the modalities outside ``S`` are muted (their features set to zero, as the official code does),

    v_i(S) = |S| · [argmax fuse(x_i restricted to S) = y_i],   v_i(∅) = 0,
    φ^m_i = sum_{S ⊆ M∖{m}} |S|!(M-|S|-1)!/M! · [v_i(S ∪ {m}) - v_i(S)],

so ``sum_m φ^m_i = v_i(M)``. Two modalities (official): ``φ^a = (v(a) + v(a,v) - v(v)) / 2`` with
``v(a,v) = 2`` when the fused prediction is right, so ``φ ∈ {-0.5, 0, 0.5, 1, 1.5}``.
``scale_by_size: false`` uses ``v_i(S) = [correct]`` instead (BalanceMM, whose values are half as large).

**Re-sampling rule** (official, every modality of every sample): a copy of sample i that keeps only
modality m (the others zeroed) is added ``c(φ^m_i)`` times to the next epoch's training set, with

    c(φ) = 1 if 0.4 < φ < 1,   2 if -0.1 < φ < 0.4,   3 if φ < -0.1,   0 otherwise

(φ = 0.5, 0, -0.5 give 1, 2, 3 copies; a modality contributing fully, φ ≥ 1, none). The contributions
are recomputed once per epoch on the training set in eval mode, from the end of epoch ``warmup - 1`` on,
and the re-sampled set is used from epoch ``warmup`` (official default 5) on.

**Here** (no sampler control): the method cannot add copies to the data set, so it adds them to the
batch's objective. At each step it computes ``φ^m_i`` for the batch (fusion head in eval mode on the
step's detached features, ``2^M`` head passes, reusing :func:`~harmonia.balance.agm.mono_modal_responses`)
and returns the mean loss over the batch enlarged by the copies:

    L = (B · L_fused + sum_m sum_i c(φ^m_i) · CE(fuse(x_i with only m), y_i)) / (B + sum_{m,i} c(φ^m_i)),

the copies' single-modality logits computed with gradient (the head in its training mode), so that they
train encoder m and the head as the copies would. ``B`` and the count of copies are summed over the global
batch under ``torch.distributed`` (the local numerator is divided by the global denominator over the world
size, so that averaging gradients across ranks gives the global mean). Differences from the official
code: the contributions are those of the current model on the current batch (official: of the model at
the end of the previous epoch, on un-augmented training data), an epoch keeps its number of steps
(official: the re-sampled epoch is longer by the copies), and copies sit in the batch of their original.
The rule is the official one for any number of modalities; the paper and code give two.

Defaults: ``start_epoch=5`` (official ``--warmup 5``), ``scale_by_size=true`` (official). Logs
``balance/valuation/contribution/<m>`` (batch mean of φ^m) and ``balance/valuation/copies/<m>`` (mean
copies per sample; 0 before ``start_epoch``). Config: ``balance: [{name: valuation, start_epoch: 5}]``.
No state: nothing to resume.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harmonia.balance.agm import FusedHead, fused_head, mono_modal_responses
from harmonia.balance.method import BalanceStep, BalancingMethod, in_epoch_window
from harmonia.distributed import all_reduce_sum, rank_and_world
from harmonia.errors import ConfigError, InputError
from harmonia.settings import setting


def sample_contributions(
    fuse: FusedHead, features: Mapping[str, Tensor], labels: Tensor, scale_by_size: bool = True
) -> dict[str, Tensor]:
    """``φ^m_i`` ``[B]`` (module docstring): Shapley values of the correctness of ``fuse`` on muted features.

    ``fuse`` maps ``{m: [B, d_m]}`` to logits ``[B, C]``; a muted modality's features are zeros.
    """
    full = dict(features)

    def value(kept: Mapping[str, Tensor]) -> Tensor:
        # mono_modal_responses passes a kept modality's own tensor, a muted one as new zeros
        size = sum(1 for m, f in kept.items() if f is full[m])
        if size == 0:
            return torch.zeros(labels.shape[0], 1, dtype=torch.float64, device=labels.device)
        correct = (fuse(kept).argmax(dim=1) == labels).to(torch.float64)
        return (correct * (size if scale_by_size else 1)).unsqueeze(1)

    return {m: phi.squeeze(1) for m, phi in mono_modal_responses(value, full).items()}


def resample_copies(contributions: Tensor) -> Tensor:
    """``c(φ)`` per entry: 1 for 0.4 < φ < 1, 2 for -0.1 < φ < 0.4, 3 for φ < -0.1, else 0 (official)."""
    phi = contributions
    copies = torch.zeros_like(phi, dtype=torch.long)
    copies[(phi > 0.4) & (phi < 1)] = 1
    copies[(phi > -0.1) & (phi < 0.4)] = 2
    copies[phi < -0.1] = 3
    return copies


@dataclass
class SampleValuationSettings:
    """Sample-level valuation hyper-parameters (defaults: the official CVPR 2024 code)."""

    start_epoch: int = setting(5, help="first epoch with re-sampled copies (official --warmup 5)", ge=0)
    end_epoch: int | None = setting(None, help="no copies from this epoch on (null: never stop)", ge=1)
    scale_by_size: bool = setting(
        True, help="value of a correct subset S is |S| (official); false: 1 (BalanceMM)"
    )


class SampleValuation(BalancingMethod):
    """Add each sample's single-modality copies ``c(φ^m_i)`` times to the objective (module docstring).

    Args:
        modalities: the modalities balanced (at least 2).
        fuse: ``features -> fused logits`` (see :func:`~harmonia.balance.agm.fused_head`).
        start_epoch, end_epoch: add copies in epochs ``start_epoch <= epoch < end_epoch`` (``None``: no end).
        scale_by_size: ``v(S) = |S|·[correct]`` (official) or ``[correct]`` (BalanceMM).
    """

    Settings: ClassVar[type[Any]] = SampleValuationSettings

    def __init__(
        self,
        modalities: list[str] | tuple[str, ...],
        fuse: FusedHead | None = None,
        start_epoch: int = 5,
        end_epoch: int | None = None,
        scale_by_size: bool = True,
    ) -> None:
        super().__init__()
        if len(modalities) < 2:
            raise ConfigError(
                f"sample-level valuation balances modalities: give at least 2, got {list(modalities)}"
            )
        if start_epoch < 0 or (end_epoch is not None and end_epoch < 1):
            raise ConfigError(
                f"valuation epochs: need start_epoch >= 0, end_epoch >= 1 or null; got {start_epoch}, "
                f"{end_epoch}"
            )
        self.modalities: tuple[str, ...] = tuple(modalities)
        self.fuse = fuse
        self.start_epoch, self.end_epoch = start_epoch, end_epoch
        self.scale_by_size = scale_by_size
        self._features: dict[str, Tensor] | None = None

    @classmethod
    def build(
        cls, model: nn.Module, settings: SampleValuationSettings | None = None, seed: int = 0
    ) -> SampleValuation:
        """The method for every encoder of ``model``, muting features before its fusion head."""
        s = settings or SampleValuationSettings()
        return cls(
            list(model.encoders),  # type: ignore[arg-type]
            fuse=fused_head(model),
            start_epoch=s.start_epoch,
            end_epoch=s.end_epoch,
            scale_by_size=s.scale_by_size,
        )

    def is_active(self, epoch: int) -> bool:
        return in_epoch_window(epoch, self.start_epoch, self.end_epoch)

    def _head(self) -> nn.Module | None:
        owner = getattr(self.fuse, "__self__", None)
        return owner if isinstance(owner, nn.Module) else None

    def contributions(self, features: Mapping[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        """``φ^m_i`` of the batch: the fusion head in eval mode on detached features, no gradient."""
        if self.fuse is None:
            raise ConfigError(
                "sample-level valuation needs the model's fusion head: build it with "
                "SampleValuation.build(model, settings) or pass fuse=model.fusion"
            )
        missing = [m for m in self.modalities if m not in features]
        if missing:
            raise InputError(f"SampleValuation: no features for {missing}; got {list(features)}")
        head = self._head()
        was_training = head.training if head is not None else False
        if head is not None:
            head.eval()  # the official valuation runs the model in eval mode
        try:
            with torch.no_grad():
                return sample_contributions(
                    self.fuse,
                    {m: features[m].detach() for m in self.modalities},
                    labels,
                    self.scale_by_size,
                )
        finally:
            if head is not None:
                head.train(was_training)

    def transform_features(self, step: BalanceStep, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """Keep the step's features (with gradient) for :meth:`adjust_loss`; features pass unchanged."""
        self._features = {m: features[m] for m in self.modalities}
        return features

    def resampled_loss(
        self, features: Mapping[str, Tensor], labels: Tensor, loss: Tensor, active: bool = True
    ) -> tuple[Tensor, dict[str, float], dict[str, float]]:
        """``(L, {m: mean φ^m}, {m: mean copies})`` of the batch (module docstring), global means;
        ``active`` False: no copies (``L`` is ``loss``, copies 0), the contributions still measured."""
        phi = self.contributions(features, labels)
        copies = {
            m: resample_copies(phi[m]) if active else torch.zeros_like(phi[m], dtype=torch.long)
            for m in self.modalities
        }
        batch = labels.shape[0]
        extra = loss.new_zeros(())
        for m in self.modalities:
            weights = copies[m].to(loss.dtype)
            if not bool(weights.any()):
                continue
            kept = {o: features[o] if o == m else torch.zeros_like(features[o]) for o in self.modalities}
            assert self.fuse is not None
            ce = F.cross_entropy(self.fuse(kept), labels, reduction="none")
            extra = extra + (weights * ce).sum()
        device = labels.device
        stats = torch.stack(
            [
                torch.tensor(float(batch), dtype=torch.float64, device=device),
                *(phi[m].sum().to(device) for m in self.modalities),
                *(copies[m].sum().to(device, torch.float64) for m in self.modalities),
            ]
        )
        totals = all_reduce_sum(stats)
        count = len(self.modalities)
        total_batch = totals[0]
        total_copies = totals[1 + count :].sum()
        world = rank_and_world()[1]
        denominator = float((total_batch + total_copies) / world)
        new_loss = (batch * loss + extra) / denominator if active else loss
        mean_phi = {m: float(totals[1 + j] / total_batch) for j, m in enumerate(self.modalities)}
        mean_copies = {m: float(totals[1 + count + j] / total_batch) for j, m in enumerate(self.modalities)}
        return new_loss, mean_phi, mean_copies

    def adjust_loss(self, step: BalanceStep, output: Any, loss: Tensor) -> Tensor:
        """The mean loss over the batch and its re-sampled copies (inside the epoch window); logs
        ``balance/valuation/contribution/<m>`` and ``balance/valuation/copies/<m>``."""
        features, self._features = self._features, None
        if features is None:
            raise ConfigError("SampleValuation.adjust_loss before transform_features: no features this step")
        loss, phi, copies = self.resampled_loss(features, step.labels, loss, self.is_active(step.epoch))
        step.metrics.update({f"balance/valuation/contribution/{m}": v for m, v in phi.items()})
        step.metrics.update({f"balance/valuation/copies/{m}": v for m, v in copies.items()})
        return loss

    def extra_repr(self) -> str:
        return (
            f"modalities={list(self.modalities)}, start_epoch={self.start_epoch}, "
            f"end_epoch={self.end_epoch}, scale_by_size={self.scale_by_size}"
        )
