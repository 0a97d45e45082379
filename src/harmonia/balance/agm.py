"""Adaptive gradient modulation, AGM.

Li, Li, Hu, Lei, Li, Zhou, *Boosting Multi-modal Model Performance with Adaptive Gradient Modulation*,
ICCV 2023 (arXiv:2308.07686); official code https://github.com/lihong2303/AGM_ICCV2023. What follows is
the method as the official code runs it (``run/CREMAD_main.py`` for two modalities,
``run/URFunny_main.py`` for three).

**Mono-modal responses** (Shapley attribution). With ``v(S)`` the fused logits when the modalities outside
``S`` are muted (their features set to zero here; the official code zeroes the *inputs*), modality m's
response among the M modalities is its Shapley value plus an equal share of the all-muted output:

    o^m = sum_{S ⊆ M∖{m}} |S|!(M-|S|-1)!/M! · [v(S ∪ {m}) - v(S)] + v(∅)/M,

so that ``sum_m o^m = v(M)``, the fused output (two modalities: ``o^a = ½(v(a,b) - v(b) + v(a))``).

**Scores.** ``s^m = mean_i -log max(softmax(o^m_i)[y_i], 1e-8)`` over the (global) batch, the cross-entropy
of the response: low means modality m alone already predicts well.

**Coefficient.** With the batch mean ``s̄ = mean_m s^m`` and the running average ``S^m_{t-1}`` of ``s^m``
over all previous training steps (``S̄`` its mean over modalities; ``S^m_0 = 0``),

    r^m = exp(M/(M-1) · (s̄ - s^m)),      r̄^m = exp(M/(M-1) · (S̄ - S^m_{t-1})),
    k^m = exp(α · min(r̄^m - r^m, c)),     S^m_t = S^m_{t-1}·(t-1)/t + s^m/t,

so a modality that is ahead of the others by more than it has been on average (``r^m > r̄^m``) is slowed
(``k^m < 1``) and one that fell behind is sped up (``k^m > 1``); ``c`` caps the boost (official: 10 for
CREMA-D, 7 for UR-Funny, none for AV-MNIST, AVE, MOSEI; ``clip: null`` here). The running average is
updated every step, including outside the modulation window.

**Where k is applied.** The official code writes the output as ``sum_m o^m`` and scales the gradient
flowing into each ``o^m`` by ``k^m`` with backward hooks (the forward output is unchanged). For a linear
late-fusion head on zero-muted features that scales exactly the gradient reaching encoder m by ``k^m``
(and, besides, the head's weight block of modality m by ``k^m`` and its bias by ``mean_m k^m``). Here,
as in BalanceMM, AGM multiplies every gradient of encoder m by ``k^m`` after backward and leaves the fusion
head alone; the loss is the plain cross-entropy of the fused output. The muted passes run the head in
eval mode (as the official code does), without gradient.

BalanceMM (GeWu-Lab/BalanceBenchmark, ``AGM_trainer.py``) differs: its ratio is ``exp(M/(M-1)(s^m - s̄))``,
the opposite sign of the official code (it boosts the modality that pulls ahead); it caps at 7, skips
1-D parameters (biases, norms) and matches parameters by modality name, never stops modulating, and
clips the gradient norm to 5 (official: to 1 when a head gradient leaves [-1, 1]; not part of AGM here,
use the trainer's gradient clipping).

Defaults: ``alpha=1.0`` (the official code's argparse default; BalanceMM's config uses 0.1), ``clip=10``
(official CREMA-D), modulation in every epoch (the official argparse default modulates the first 20
epochs: ``end_epoch: 20``). Extra cost per step: ``2^M`` evaluations of the fusion head on the features,
no extra encoder pass, and one all-reduce of ``M + 1`` numbers under ``torch.distributed``.

As a :class:`~harmonia.balance.method.BalancingMethod`, AGM computes scores and coefficients in
``transform_features`` (returning the features unchanged) and scales the encoders' ``.grad`` in
``after_backward``; it logs ``balance/agm/score/<m>`` (``s^m``) and ``balance/agm/coef/<m>`` (the ``k^m``
applied, 1.0 outside the modulation window). Config: ``balance: [{name: agm, alpha: 1.0}]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harmonia.balance.method import BalanceStep, BalancingMethod, in_epoch_window
from harmonia.distributed import all_reduce_sum
from harmonia.errors import ConfigError, InputError
from harmonia.settings import setting

FusedHead = Callable[[Mapping[str, Tensor]], Tensor]

#: probabilities of the true class below this count as this (official code: 1e-8)
MIN_PROBABILITY = 1e-8


def mono_modal_responses(fuse: FusedHead, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Shapley mono-modal responses ``o^m`` (module docstring) of ``fuse`` at ``features``.

    ``fuse`` maps ``{m: [B, d_m]}`` to logits ``[B, C]``; a muted modality's features are zeros. Calls
    ``fuse`` once per subset of modalities (``2^M`` times). ``sum_m o^m`` equals ``fuse(features)``.
    """
    names = list(features)
    count = len(names)
    if count < 1:
        raise InputError("mono_modal_responses: give the features of at least one modality")
    zeros = {m: torch.zeros_like(f) for m, f in features.items()}
    value: dict[int, Tensor] = {}
    for mask in range(1 << count):
        kept = {m: features[m] if mask >> j & 1 else zeros[m] for j, m in enumerate(names)}
        value[mask] = fuse(kept)
    out: dict[str, Tensor] = {}
    for j, m in enumerate(names):
        bit = 1 << j
        response = value[0] / count
        for mask in range(1 << count):
            if mask & bit:
                continue
            size = bin(mask).count("1")
            weight = math.factorial(size) * math.factorial(count - size - 1) / math.factorial(count)
            response = response + weight * (value[mask | bit] - value[mask])
        out[m] = response
    return out


def response_scores(responses: Mapping[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
    """``s^m``: mean over the global batch of ``-log max(p_true, 1e-8)`` of each response (one all-reduce
    under ``torch.distributed``)."""
    names = list(responses)
    sums = []
    for m in names:
        nll = -F.log_softmax(responses[m].detach().double(), dim=1).gather(1, labels.view(-1, 1)).squeeze(1)
        sums.append(nll.clamp(max=-math.log(MIN_PROBABILITY)).sum())
    count = torch.tensor(float(labels.shape[0]), dtype=torch.float64, device=labels.device)
    totals = all_reduce_sum(torch.stack([*sums, count.to(sums[0].device)]))
    return {m: totals[j] / totals[-1] for j, m in enumerate(names)}


def agm_coefficients(
    scores: Tensor, running: Tensor, alpha: float, clip: float | None = 10.0
) -> tuple[Tensor, Tensor, Tensor]:
    """``(k, r, r̄)`` from the batch scores ``s`` ``[M]`` and the running averages ``S_{t-1}`` ``[M]``."""
    count = scores.numel()
    if count < 2:
        raise ConfigError(f"AGM balances modalities: give at least 2, got {count}")
    scale = count / (count - 1)
    ratio = torch.exp(scale * (scores.mean() - scores))
    optimal = torch.exp(scale * (running.mean() - running))
    gap = optimal - ratio
    if clip is not None:
        gap = gap.clamp(max=clip)
    return torch.exp(alpha * gap), ratio, optimal


def fused_head(model: nn.Module) -> FusedHead:
    """The function ``features -> fused logits`` of a model: its fusion head (``model.fusion``), or its
    ``fuse`` method's ``logits`` (:class:`~harmonia.models.MultimodalClassifier`)."""
    fusion = getattr(model, "fusion", None)
    if isinstance(fusion, nn.Module):
        return fusion.__call__  # a bound method: AGM does not register the head as its submodule
    fuse = getattr(model, "fuse", None)
    if callable(fuse):
        return lambda features: fuse(features).logits
    raise ConfigError(
        f"AGM needs the fused logits of muted features: {type(model).__name__} has no fusion head "
        "(model.fusion) nor a fuse(features) method; add one"
    )


@dataclass
class AGMSettings:
    """AGM hyper-parameters (defaults: the official ICCV 2023 code)."""

    alpha: float = setting(1.0, help="modulation strength α (official code default 1.0; BalanceMM 0.1)", ge=0)
    clip: float | None = setting(
        10.0,
        help="cap c in k = exp(α·min(r_avg - r, c)) (official: 10 CREMA-D, 7 UR-Funny; null: no cap)",
        ge=0,
    )
    start_epoch: int = setting(0, help="first epoch in which AGM modulates", ge=0)
    end_epoch: int | None = setting(None, help="AGM stops modulating at this epoch (null: never)", ge=1)


class AGM(BalancingMethod):
    """Scale each encoder's gradient by ``k^m`` from its Shapley mono-modal response (module docstring).

    Args:
        encoders: modality name -> the encoder module whose gradients are scaled.
        fuse: ``features -> fused logits`` (see :func:`fused_head`), evaluated on muted features.
        alpha, clip: the coefficient's strength and cap.
        start_epoch, end_epoch: modulate in epochs ``start_epoch <= epoch < end_epoch`` (``None``: no end).

    The running averages ``S^m`` and the step count are buffers: ``state_dict`` resumes them.
    """

    Settings: ClassVar[type[Any]] = AGMSettings
    running_scores: Tensor
    num_steps: Tensor

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        fuse: FusedHead | None = None,
        alpha: float = 1.0,
        clip: float | None = 10.0,
        start_epoch: int = 0,
        end_epoch: int | None = None,
    ) -> None:
        super().__init__()
        if len(encoders) < 2:
            raise ConfigError(f"AGM balances modalities: give at least 2 encoders, got {list(encoders)}")
        if alpha < 0:
            raise ConfigError(f"AGM alpha must be >= 0, got {alpha}")
        if clip is not None and clip < 0:
            raise ConfigError(f"AGM clip must be >= 0 or null, got {clip}")
        self.modalities: tuple[str, ...] = tuple(encoders)
        self.params = {m: list(encoders[m].parameters()) for m in self.modalities}
        self.fuse = fuse
        self.alpha, self.clip = alpha, clip
        self.start_epoch, self.end_epoch = start_epoch, end_epoch
        self.register_buffer("running_scores", torch.zeros(len(self.modalities), dtype=torch.float64))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        self._coefficients: Tensor | None = None

    @classmethod
    def build(cls, model: nn.Module, settings: AGMSettings | None = None, seed: int = 0) -> AGM:
        """AGM of every encoder of ``model``, muting features before its fusion head."""
        s = settings or AGMSettings()
        agm = cls(
            dict(model.encoders),  # type: ignore[arg-type]
            fuse=fused_head(model),
            alpha=s.alpha,
            clip=s.clip,
            start_epoch=s.start_epoch,
            end_epoch=s.end_epoch,
        )
        return agm.to(next(model.parameters()).device)

    def is_active(self, epoch: int) -> bool:
        return in_epoch_window(epoch, self.start_epoch, self.end_epoch)

    @torch.no_grad()
    def update(self, responses: Mapping[str, Tensor], labels: Tensor) -> tuple[dict[str, float], Tensor]:
        """Scores of this batch's responses, the coefficients ``k`` from the running averages so far, then
        the running averages updated; returns ``({m: s^m}, k [M])``."""
        missing = [m for m in self.modalities if m not in responses]
        if missing:
            raise InputError(f"AGM.update: no mono-modal responses for {missing}; got {list(responses)}")
        scores = response_scores({m: responses[m] for m in self.modalities}, labels)
        s = torch.stack([scores[m] for m in self.modalities]).to(self.running_scores.device)
        k, _, _ = agm_coefficients(s, self.running_scores, self.alpha, self.clip)
        t = int(self.num_steps) + 1
        # new tensors: a saved state_dict is not mutated
        self.running_scores = self.running_scores * (t - 1) / t + s / t
        self.num_steps = self.num_steps + 1
        return {m: float(v) for m, v in zip(self.modalities, s, strict=True)}, k

    def transform_features(self, step: BalanceStep, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """Responses (fusion head on muted, detached features), scores and coefficients of the step;
        features pass unchanged. Logs ``balance/agm/score/<m>``."""
        if self.fuse is None:
            raise ConfigError(
                "AGM as a training hook needs the model's fusion head: build it with AGM.build(model, "
                "settings) or pass fuse=model.fusion"
            )
        owner = getattr(self.fuse, "__self__", None)
        head = owner if isinstance(owner, nn.Module) else None
        was_training = head.training if head is not None else False
        if head is not None:
            head.eval()  # the official code runs the muted passes in eval mode
        try:
            with torch.no_grad():
                responses = mono_modal_responses(
                    self.fuse, {m: features[m].detach() for m in self.modalities}
                )
        finally:
            if head is not None:
                head.train(was_training)
        scores, k = self.update(responses, step.labels)
        self._coefficients = k if self.is_active(step.epoch) else torch.ones_like(k)
        step.metrics.update({f"balance/agm/score/{m}": v for m, v in scores.items()})
        return features

    def after_backward(self, step: BalanceStep, output: Any) -> None:
        """Scale encoder m's gradients by ``k^m``; logs ``balance/agm/coef/<m>``."""
        if self._coefficients is None:
            raise ConfigError("AGM.after_backward before transform_features: no coefficients for this step")
        coefficients = {m: float(k) for m, k in zip(self.modalities, self._coefficients, strict=True)}
        self._coefficients = None
        self.modulate(coefficients)
        step.metrics.update({f"balance/agm/coef/{m}": k for m, k in coefficients.items()})

    @torch.no_grad()
    def modulate(self, coefficients: Mapping[str, float]) -> None:
        """Multiply every gradient of encoder m by ``coefficients[m]`` in place."""
        for m, params in self.params.items():
            k = coefficients[m]
            if k == 1.0:
                continue
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(k)

    def extra_repr(self) -> str:
        return f"modalities={list(self.modalities)}, alpha={self.alpha}, clip={self.clip}"
