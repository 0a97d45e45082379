"""LFM: dynamically weighting label fitting against cross-modal matching (Yang et al., NeurIPS 2024).

Yang Yang, Fengqiang Wan, Qing-Yuan Jiang, Yi Xu, *Facilitating Multimodal Classification via Dynamically
Learning Modality Gap*, NeurIPS 2024 (openreview QbsPz0SnyV); official code github.com/njustkmg/NeurIPS24-LFM
(``Crema_epoch.py``, ``Crema_epoch_learnable.py``). The paper's diagnosis: modalities converge at different
rates because fitting the category labels is harder for some; an unsupervised matching loss between the
modalities, weighted against the supervised loss by a weight that changes over training, corrects this.

Objective of one step (official code, ``train_audio_video``), for unimodal logits ``z^m`` and fused logits
``z``::

    L = s · ( α(e) · CE(z, y) + (1 - α(e)) · L_match )

    L_match = mean over pairs m < n of  JS'(z^m, z^n)
    JS'(z^m, z^n) = 1/B Σ_i ½ [ KL(r_i ‖ p_i) + KL(r_i ‖ q_i) ]
    p = softmax z^m,  q = softmax z^n,  r = (p + q) / 2

with ``s = 2``. The "modality matching" term of the code is this Jensen-Shannon-type divergence between
the modalities' *predicted class distributions* (the code's ``Alignment``; note that
``F.kl_div(p.log(), r)`` is ``KL(r ‖ p)``, so it is the mixture-first form JS', not the textbook
``½[KL(p‖r) + KL(q‖r)]``, and unlike it unbounded: it grows with the logit gap when the two predictions are
confidently different); it is not an InfoNCE loss over the batch and has no learnable parameters. For
M > 2 modalities it is the mean over the M(M-1)/2 pairs (as BalanceMM and ModalBed generalise it). ``CE`` is
the trainer's loss (cross-entropy of the fused logits), so it reaches the encoders and the fusion head;
``L_match`` reaches each modality's encoder and its part of the fusion head (harmonia's
``MultimodalOutput.unimodal_logits``; the official model's ``cls_a`` / ``cls_v``).

The classification weight α(e) is a function of the epoch e (counted from 0), one of:

* ``fitted`` (default; official ``Crema_epoch.py``, ``getAlpha_Learnable_Fitted``): the learned α of the
  paper's learning-based strategy fitted by a degree-5 polynomial on CREMA-D over 200 epochs,
  ``α(e) = Σ_k c_k t^k`` with ``t = min(e · epoch_scale, 200)`` and ``c`` = (2.04623704e-1, 3.35472727e-3,
  1.22989557e-4, -2.92947416e-6, 2.23835486e-8, -5.39717505e-11): 0.205 at e = 0, 0.54 at 100, 0.90 at 160.
  ``epoch_scale`` (default 1) stretches it onto a run of other length (200 / epochs follows the same curve in
  #epoch / #total, the paper's Fig. 3 axis);
* ``heuristic``: ``α(e) = 1 - exp(-decay · e)``, decay 0.3: the matching weight decays exponentially. This
  is ModalBed's reading of the paper's heuristic strategy (``getAlpha_heritic``); the official repository does
  not contain the heuristic strategy, and the paper's formula could not be checked;
* ``constant``: ``α = cls_weight``.

α is then clipped to ``[min_weight, max_weight]`` = [0.05, 0.95], the official learning-based code's bounds
(and ModalBed's). For ``fitted`` this clip changes the official schedule only at epochs 167-196, where the
polynomial overshoots to 1.01 (a negative matching weight; the learned α it approximates is bounded by 0.95);
the argument bound ``t <= 200`` keeps the polynomial inside the range it was fitted on (it diverges after).

Not implemented: the learning-based strategy itself (``getAlpha_Learnable``: once per epoch, a hypergradient
step on α from a Hessian-vector product on a held-out batch of 16 training samples, α_match initialised to
0.95, ``lr_alpha = 1e-4`` halved every 20 epochs). It needs a held-out batch the hooks do not see, a double
backward over all parameters, and its update uses the mean of the product's *first parameter tensor* only, a
quantity that depends on the order of the model's parameters. The ``fitted`` schedule is the official
repository's stand-in for it.

BalanceMM (GeWu-Lab/BalanceBenchmark, ``LFM_trainer.py``) differs: it runs the learning-based update (on the
first quarter of a validation batch) and starts from α_cls = 0.95, α_match = 0.05, the reverse of the
official initialisation (0.05, 0.95).

Every term is a per-sample mean, so no statistic crosses samples: under ``torch.distributed`` each rank
averages its local batch and the data-parallel gradient average is the global batch's (equal local batch
sizes), as for the trainer's cross-entropy. Nothing is kept between steps (α depends on the epoch only), so a
resumed run is exact. Logs ``balance/lfm/cls_weight`` (α), ``balance/lfm/match_weight`` (1 - α) and
``balance/lfm/match_loss`` (L_match, unweighted).

The method rescales the loss it is given: a method listed before it in ``balance`` has its added terms scaled
by ``s · α`` too.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from harmonia.balance.method import BalanceStep, BalancingMethod
from harmonia.errors import ConfigError, InputError
from harmonia.precision import in_float32
from harmonia.settings import setting

# official Crema_epoch.py, getAlpha_Learnable_Fitted: the classification weight's coefficients of t^0 ... t^5
FITTED_COEFFICIENTS = (
    2.04623704e-01,
    3.35472727e-03,
    1.22989557e-04,
    -2.92947416e-06,
    2.23835486e-08,
    -5.39717505e-11,
)
FITTED_EPOCHS = 200  # the CREMA-D run the polynomial was fitted on (official data/crema.json)


class LFMSchedule(str, enum.Enum):
    """How the classification weight α changes with the epoch."""

    FITTED = "fitted"
    HEURISTIC = "heuristic"
    CONSTANT = "constant"


def lfm_cls_weight(
    epoch: float,
    schedule: LFMSchedule | str = LFMSchedule.FITTED,
    epoch_scale: float = 1.0,
    decay: float = 0.3,
    cls_weight: float = 0.5,
    min_weight: float = 0.05,
    max_weight: float = 0.95,
) -> float:
    """α(e): the weight of the classification loss at epoch ``epoch`` (the matching loss gets ``1 - α``)."""
    schedule = LFMSchedule(schedule)
    if schedule is LFMSchedule.FITTED:
        t = min(max(epoch * epoch_scale, 0.0), float(FITTED_EPOCHS))
        alpha = sum(c * t**k for k, c in enumerate(FITTED_COEFFICIENTS))
    elif schedule is LFMSchedule.HEURISTIC:
        alpha = 1.0 - math.exp(-decay * epoch)
    else:
        alpha = cls_weight
    return min(max(alpha, min_weight), max_weight)


@in_float32
def js_divergence(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """``1/B Σ_i ½[KL(r_i‖p_i) + KL(r_i‖q_i)]`` for ``p = softmax(logits_a)``, ``q = softmax(logits_b)``,
    ``r = (p + q)/2`` (the official code's ``Alignment``), computed in log space."""
    if logits_a.shape != logits_b.shape or logits_a.ndim != 2:
        raise InputError(
            f"js_divergence needs two [B, C] logits of one shape, got {list(logits_a.shape)} and "
            f"{list(logits_b.shape)}"
        )
    log_p = logits_a.log_softmax(dim=-1)
    log_q = logits_b.log_softmax(dim=-1)
    log_r = torch.logaddexp(log_p, log_q) - math.log(2.0)
    r = log_r.exp()
    per_sample = 0.5 * (r * (2 * log_r - log_p - log_q)).sum(dim=-1)
    return per_sample.mean()


def matching_loss(unimodal_logits: Mapping[str, Tensor], modalities: Sequence[str]) -> Tensor:
    """``L_match``: the mean of :func:`js_divergence` over the pairs ``m < n`` of ``modalities``."""
    pairs = list(combinations(modalities, 2))
    if not pairs:
        raise InputError(f"LFM's matching loss needs at least 2 modalities, got {list(modalities)}")
    missing = [m for m in modalities if m not in unimodal_logits]
    if missing:
        raise InputError(f"LFM: no unimodal logits for {missing}; it was built for {list(modalities)}")
    return torch.stack([js_divergence(unimodal_logits[m], unimodal_logits[n]) for m, n in pairs]).mean()


@dataclass
class LFMSettings:
    """LFM hyper-parameters (defaults: the official code; see the module docstring)."""

    schedule: LFMSchedule = setting(
        LFMSchedule.FITTED,
        help="α(e): fitted (official polynomial), heuristic (1 - exp(-decay·e), ModalBed) or constant",
    )
    epoch_scale: float = setting(
        1.0,
        help="fitted: evaluate the 200-epoch polynomial at epoch·epoch_scale (200/epochs: whole curve)",
        gt=0,
    )
    decay: float = setting(0.3, help="heuristic: decay rate of the matching weight exp(-decay·e)", ge=0)
    cls_weight: float = setting(0.5, help="constant: the classification weight α", ge=0, le=1)
    min_weight: float = setting(0.05, help="lower clip of α (official learning-based code: 0.05)", ge=0, le=1)
    max_weight: float = setting(0.95, help="upper clip of α (official learning-based code: 0.95)", ge=0, le=1)
    scale: float = setting(2.0, help="s: overall factor of the weighted loss (official code: 2)", gt=0)


class LFM(BalancingMethod):
    """LFM: ``loss -> s · (α(e) · loss + (1 - α(e)) · L_match)`` with L_match the mean pairwise
    Jensen-Shannon divergence between the modalities' predicted class distributions.

    Args:
        modalities: the modality names (at least 2).
        schedule, epoch_scale, decay, cls_weight, min_weight, max_weight, scale: see :class:`LFMSettings`.
    """

    Settings: ClassVar[type[Any]] = LFMSettings

    def __init__(
        self,
        modalities: Sequence[str],
        schedule: LFMSchedule | str = LFMSchedule.FITTED,
        epoch_scale: float = 1.0,
        decay: float = 0.3,
        cls_weight: float = 0.5,
        min_weight: float = 0.05,
        max_weight: float = 0.95,
        scale: float = 2.0,
    ) -> None:
        super().__init__()
        if len(modalities) < 2:
            raise ConfigError(
                f"LFM balances modalities (it matches their predictions pairwise): give at least 2, got "
                f"{list(modalities)}"
            )
        if min_weight > max_weight:
            raise ConfigError(f"LFM min_weight ({min_weight}) must be <= max_weight ({max_weight})")
        if epoch_scale <= 0 or scale <= 0 or decay < 0:
            raise ConfigError(
                f"LFM needs epoch_scale > 0, scale > 0 and decay >= 0, got {epoch_scale}, {scale}, {decay}"
            )
        self.modalities = tuple(modalities)
        self.schedule = LFMSchedule(schedule)
        self.epoch_scale, self.decay, self.cls_weight = epoch_scale, decay, cls_weight
        self.min_weight, self.max_weight, self.scale = min_weight, max_weight, scale

    @classmethod
    def build(cls, model: nn.Module, settings: LFMSettings | None = None, seed: int = 0) -> LFM:
        """LFM over the modalities of ``model`` (it uses the output's ``unimodal_logits``; no randomness)."""
        s = settings or LFMSettings()
        return cls(
            tuple(model.modalities),  # type: ignore[arg-type]
            schedule=s.schedule,
            epoch_scale=s.epoch_scale,
            decay=s.decay,
            cls_weight=s.cls_weight,
            min_weight=s.min_weight,
            max_weight=s.max_weight,
            scale=s.scale,
        )

    def cls_weight_at(self, epoch: float) -> float:
        """α(e) of this method's schedule."""
        return lfm_cls_weight(
            epoch,
            self.schedule,
            self.epoch_scale,
            self.decay,
            self.cls_weight,
            self.min_weight,
            self.max_weight,
        )

    def adjust_loss(self, step: BalanceStep, output: Any, loss: Tensor) -> Tensor:
        """Return ``s · (α · loss + (1 - α) · L_match)`` and log α, 1 - α and L_match."""
        alpha = self.cls_weight_at(step.epoch)
        match = matching_loss(output.unimodal_logits, self.modalities)
        step.metrics["balance/lfm/cls_weight"] = alpha
        step.metrics["balance/lfm/match_weight"] = 1.0 - alpha
        step.metrics["balance/lfm/match_loss"] = float(match.detach())
        return self.scale * (alpha * loss + (1.0 - alpha) * match)
