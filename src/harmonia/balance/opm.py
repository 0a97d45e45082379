"""On-the-fly prediction modulation, OPM (Wei, Hu, Du, Wen, TPAMI 2025, Eq. 8 and Alg. 1).

The dominant modality's features are dropped at random during training, so the fused prediction must rely
on the others. With the discrepancy ratio ρ^m of the previous step, the drop probability is

    q^m = min(1, q_base · (1 + λ·tanh(ρ^m - 1)))  if ρ^m > 1, else 0.

With probability ``p_exe`` per step, each sample's feature of modality m is set to zero with probability q^m;
kept features are rescaled by 1/(1 - q^m) so the expected input of the fusion head is unchanged; a sample
never loses all its modalities (the modality with the lowest q is kept). In eval mode OPM is the identity.

As a :class:`~harmonia.balance.method.BalancingMethod`, OPM drops in ``transform_features`` and computes
the step's shared ρ there, on the features before any is dropped (so OGM, when combined, sees an unbiased
ρ); its settings are :class:`OPMSettings` (config: ``balance: [{name: opm, q_base: 0.5}]``).

The official code (``GeWu-Lab/BML_TPAMI2024``, ``code/models/Classifier.py`` and ``code/main.py``) differs
from the defaults here in three ways, each available as a setting:

* it rescales every kept feature by ``1/(1 - θ)`` with ``θ = Σ_m d_m q^m / Σ_m d_m`` (``d_m`` the feature
  size of modality m), not modality m's by ``1/(1 - q^m)`` (``rescale_with: mean_q``);
* it computes q from the current batch, before dropping, not from the previous step (``q_from: current``);
* it does not drop during the first 6 epochs (``warmup_epochs: 6``).

A fourth difference is not offered: the official code removes from the batch the samples that lost every
modality, where OPM here keeps the modality with the lowest q for them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from harmonia.balance.method import BalanceStep, BalancingMethod, step_generator, unimodal_heads
from harmonia.balance.scores import discrepancy_ratio
from harmonia.distributed import rank_and_world
from harmonia.errors import ConfigError, InputError
from harmonia.settings import coerce_enums, setting

UnimodalHeads = Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]]


def opm_drop_probability(ratio: Tensor, q_base: float = 0.5, lam: float = 0.5) -> Tensor:
    """``q = min(1, q_base·(1 + λ·tanh(ρ - 1)))`` where ``ρ > 1``, else 0 (elementwise)."""
    ratio = torch.as_tensor(ratio, dtype=torch.float32)
    q = (q_base * (1 + lam * torch.tanh(ratio - 1))).clamp(max=1.0)
    return torch.where(ratio > 1, q, torch.zeros_like(ratio))


class RescaleWith(str, enum.Enum):
    """How kept features are rescaled: by their own modality's q, or by the size-weighted mean q θ."""

    OWN_Q = "own_q"
    MEAN_Q = "mean_q"


class QFrom(str, enum.Enum):
    """Which batch the drop probabilities of a step come from."""

    PREVIOUS = "previous"
    CURRENT = "current"


@dataclass
class OPMSettings:
    """OPM hyper-parameters (defaults: TPAMI 2025 Eq. 8 / Alg. 1; the official code's choices as options)."""

    q_base: float = setting(0.5, help="base drop probability", ge=0, le=1)
    lam: float = setting(0.5, help="λ: how fast q grows with ρ", ge=0)
    p_exe: float = setting(0.7, help="probability that dropping is executed in a step", ge=0, le=1)
    rescale: bool = setting(True, help="rescale kept features (inverted dropout)")
    rescale_with: RescaleWith = setting(
        RescaleWith.OWN_Q,
        help="own_q: modality m's features by 1/(1-q^m); mean_q: all by 1/(1-θ), θ = Σ d_m q^m / Σ d_m "
        "(the official code)",
    )
    q_from: QFrom = setting(
        QFrom.PREVIOUS, help="previous: q of the previous step (Alg. 1); current: of this batch (the code)"
    )
    warmup_epochs: int = setting(0, help="epochs without dropping at the start (the code: 6)", ge=0)

    def __post_init__(self) -> None:
        coerce_enums(self)


class OPM(BalancingMethod):
    """Drop dominant modalities' features before fusion; call :meth:`update` each step to adapt q.

    Args:
        modalities: the modality names, in a fixed order.
        q_base, lam: drop-probability parameters (paper defaults 0.5, 0.5).
        p_exe: probability that dropping is executed in a step (code default 0.7).
        rescale: divide kept features by 1 - q (inverted dropout).
        seed: the drop pattern of step t comes from a generator seeded with (seed, t): reproducible and
            resumable (the step counter and q are buffers, saved with ``state_dict``).
        unimodal_logits: ``features -> unimodal logits`` of the model, used by the
            :meth:`transform_features` hook to compute ρ before dropping (set by :meth:`build`).
    """

    Settings: ClassVar[type[Any]] = OPMSettings
    q: Tensor
    num_steps: Tensor

    def __init__(
        self,
        modalities: Sequence[str],
        q_base: float = 0.5,
        lam: float = 0.5,
        p_exe: float = 0.7,
        rescale: bool = True,
        seed: int = 0,
        unimodal_logits: UnimodalHeads | None = None,
        rescale_with: RescaleWith | str = RescaleWith.OWN_Q,
        q_from: QFrom | str = QFrom.PREVIOUS,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__()
        if len(modalities) < 2:
            raise ConfigError(f"OPM balances modalities: give at least 2, got {list(modalities)}")
        for name, value in (("q_base", q_base), ("p_exe", p_exe)):
            if not 0 <= value <= 1:
                raise ConfigError(f"OPM {name} must be in [0, 1], got {value}")
        if lam < 0:
            raise ConfigError(f"OPM lam must be >= 0, got {lam}")
        self.modalities = tuple(modalities)
        self.q_base, self.lam, self.p_exe, self.rescale, self.seed = q_base, lam, p_exe, rescale, seed
        self.register_buffer("q", torch.zeros(len(self.modalities)))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        self.unimodal_logits = unimodal_logits
        self.rescale_with, self.q_from = RescaleWith(rescale_with), QFrom(q_from)
        if warmup_epochs < 0:
            raise ConfigError(f"OPM warmup_epochs must be >= 0, got {warmup_epochs}")
        self.warmup_epochs = warmup_epochs
        self._last_features: dict[str, Tensor] | None = None

    @classmethod
    def build(cls, model: nn.Module, settings: OPMSettings | None = None, seed: int = 0) -> OPM:
        """OPM over the modalities of ``model``, with its unimodal heads for the pre-drop ρ."""
        s = settings or OPMSettings()
        opm = cls(
            tuple(model.modalities),  # type: ignore[arg-type]
            q_base=s.q_base,
            lam=s.lam,
            p_exe=s.p_exe,
            rescale=s.rescale,
            seed=seed,
            unimodal_logits=unimodal_heads(model),
            rescale_with=s.rescale_with,
            q_from=s.q_from,
            warmup_epochs=s.warmup_epochs,
        )
        return opm.to(next(model.parameters()).device)

    def transform_features(self, step: BalanceStep, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """Drop with the previous step's q, then set q from this step's ρ (computed here, on the features
        before dropping, unless another method computed it already); with ``q_from=current``, set q from
        this step's ρ first. No dropping in the first ``warmup_epochs`` epochs. Logs ``balance/q/<m>``."""
        if not step.has_ratios:
            if self.unimodal_logits is None:
                raise ConfigError(
                    "OPM as a training hook needs the model's unimodal heads: build it with "
                    "OPM.build(model, settings) or pass unimodal_logits=model.fusion.unimodal_logits"
                )
            with torch.no_grad():
                step.ratios(self.unimodal_logits({m: f.detach() for m, f in features.items()}))
        ratios = step.ratios({})
        if self.q_from is QFrom.CURRENT:
            self.set_ratios(ratios)
        if step.epoch < self.warmup_epochs:
            step.metrics.update({f"balance/q/{m}": 0.0 for m in self.modalities})
            self.set_ratios(ratios)
            return features
        step.metrics.update({f"balance/q/{m}": q for m, q in self.drop_probabilities().items()})
        dropped = self.drop(features)
        self.set_ratios(ratios)
        return dropped

    def drop_probabilities(self) -> dict[str, float]:
        return {m: float(q) for m, q in zip(self.modalities, self.q, strict=True)}

    @torch.no_grad()
    def update(self, unimodal_logits: Mapping[str, Tensor], labels: Tensor) -> dict[str, float]:
        """Set q for the next step from this batch's discrepancy ratios; returns the ratios."""
        missing = [m for m in self.modalities if m not in unimodal_logits]
        if missing:
            raise InputError(
                f"OPM.update: no unimodal logits for {missing}; OPM was built for {list(self.modalities)} "
                f"and got {list(unimodal_logits)}. Pass one [B, C] tensor per modality, keyed by the same "
                "names"
            )
        ratios = discrepancy_ratio({m: unimodal_logits[m] for m in self.modalities}, labels)
        self.set_ratios(ratios)
        return {m: float(r) for m, r in ratios.items()}

    @torch.no_grad()
    def step(self, labels: Tensor) -> dict[str, float]:
        """Set q for the next step from the discrepancy ratios of the features that the last training-mode
        call (``model(inputs, transform=opm)``) saw *before* dropping; returns the ratios, ready for
        ``OGM.modulate`` in the same step. Needs the model's unimodal heads (:meth:`build` sets them)."""
        if self.unimodal_logits is None:
            raise ConfigError(
                "OPM.step needs the model's unimodal heads: build OPM with "
                "OPM.build(model, OPMSettings(...)) or pass unimodal_logits=model.fusion.unimodal_logits; "
                "or call opm.update(unimodal_logits, labels) with logits you computed"
            )
        if self._last_features is None:
            raise ConfigError(
                "OPM.step: no features seen since the last step; call the model with transform=opm (or "
                "attach it, model.feature_transform = opm) in training mode before opm.step(labels)"
            )
        features, self._last_features = self._last_features, None
        return self.update(self.unimodal_logits(features), labels)

    @torch.no_grad()
    def set_ratios(self, ratios: Mapping[str, Tensor | float]) -> None:
        """Set q for the next step from discrepancy ratios computed elsewhere."""
        rho = torch.stack([torch.as_tensor(ratios[m], dtype=torch.float32) for m in self.modalities])
        self.q.copy_(opm_drop_probability(rho.to(self.q.device), self.q_base, self.lam))

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """In training mode: remember the features (detached, for :meth:`step`) and :meth:`drop`; in eval
        mode: the identity."""
        if self.training:
            self._last_features = {m: f.detach() for m, f in features.items()}
        return self.drop(features)

    def drop(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Drop each sample's modality-m features with probability q^m (identity in eval mode)."""
        if set(features) != set(self.modalities):
            raise InputError(f"OPM expects features of {list(self.modalities)}, got {list(features)}")
        if not self.training:
            return dict(features)
        step = int(self.num_steps)
        self.num_steps = self.num_steps + 1  # a new tensor: a saved state_dict is not mutated
        if not bool((self.q > 0).any()):
            return dict(features)
        batch = next(iter(features.values())).shape[0]
        generator = step_generator(self.seed, step)
        if torch.rand((), generator=generator) >= self.p_exe:
            return dict(features)
        q = self.q.cpu()
        # drawn for the global batch (all ranks), so that data-parallel ranks drop what one process would
        rank, world = rank_and_world()
        draws = torch.rand(batch * world, len(self.modalities), generator=generator)
        keep = draws[rank * batch : (rank + 1) * batch] >= q
        lost_all = ~keep.any(dim=1)
        keep[lost_all, int(q.argmin())] = True
        scales = [1.0 / (1.0 - float(qm)) if float(qm) < 1.0 else 1.0 for qm in q]
        if self.rescale_with is RescaleWith.MEAN_Q:
            sizes = torch.tensor([float(features[m][0].numel()) for m in self.modalities])
            theta = float((sizes * q).sum() / sizes.sum())
            scales = [1.0 / (1.0 - theta) if theta < 1.0 else 1.0] * len(self.modalities)
        out = {}
        for j, m in enumerate(self.modalities):
            mask = keep[:, j].to(features[m].device, features[m].dtype)
            scale = scales[j] if self.rescale else 1.0
            out[m] = features[m] * mask.view(-1, *([1] * (features[m].dim() - 1))) * scale
        return out
