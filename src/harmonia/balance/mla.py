"""MLA: Multimodal Learning with Alternating unimodal adaptation (Zhang et al., CVPR 2024).

Xiaohui Zhang, Jaehong Yoon, Mohit Bansal, Huaxiu Yao, *Multimodal Representation Learning by Alternating
Unimodal Adaptation*, CVPR 2024, pp. 27456-27466 (arXiv:2311.10707). Official code:
github.com/Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation (``main.py``, ``train_epoch``
with ``--gs_flag``; ``utils/utils.py``, ``GSPlugin``). BalanceMM: GeWu-Lab/BalanceBenchmark,
``balancemm/trainer/MLA_trainer.py``. Only the paper's abstract was readable here; the equations below are
read from the official code (and agree with the paper as far as its abstract describes it).

**Alternating unimodal learning through one shared head.** Every modality's features go through the *same*
linear head ``h(φ) = W φ + b`` (``W`` of shape ``[C, d]``): the unimodal prediction is ``o^m = h(φ^m)`` and
modality m is trained on its own cross-entropy ``CE(o^m, y)``. The official trainer takes, for each batch,
the modalities in a fixed order and makes one optimiser step per modality (M steps per batch). harmonia's
trainer makes one step per batch, so two schedules are offered:

* ``per_batch`` (default, the official order): every modality on every batch; the step's loss is
  ``Σ_m CE(o^m, y)``. The encoders are disjoint, so each encoder gets exactly its own unimodal gradient; the
  shared head gets the sum of the modalities' projected gradients (below), each projected with the projector
  as it stood after that modality's update, in the official order. (The official code steps the head between
  modalities; here the modalities' head gradients are all taken at the step's head.)
* ``per_step``: round robin, step t trains modality ``t mod M`` only (``CE(o^m, y)``), one modality per
  optimiser step as in the official code, but on a different batch each.

**Gradient modification (OWM, Zeng et al., Nature Machine Intelligence 2019).** A projector ``P`` (``[d, d]``,
``P_0 = I``) records the directions the head has been trained on: before modality m's update, with
``r = mean_i φ^m_i`` the batch mean of its (detached) features,

    k = P r,    P <- P - k kᵀ / (α + rᵀ k),    P <- P / ||P||_F     (normalisation: official code),

and the head weight's gradient from that modality is replaced by ``∇_W L^m Pᵀ`` (the bias is not projected).
Without the normalisation this is recursive least squares: ``P_n = α (α I + Σ_j r_j r_jᵀ)⁻¹``, so the update
of ``W`` is (nearly, for α → 0) orthogonal to every stored feature direction: ``P r_j → 0``, and the head's
responses to earlier modalities' features are kept. As in the official code the very first modality update
of training is neither recorded nor projected, and each later one is projected with a ``P`` that already
contains its own batch mean. α: the official code decays it within each epoch, ``α = 0.1^(1 + i/N)`` (batch
i of N, from 0.1 to 0.01); a balancing method does not know N, so α is a constant setting (default 0.1, the
value at the start of every epoch). Under ``torch.distributed`` r is the mean over the global batch.

**Test-time fusion.** MLA predicts with the unimodal predictions of the shared head, weighted by their
uncertainty: with the entropy ``e^m = -Σ_c p^m_c log p^m_c`` of ``p^m = softmax(o^m)``,

    λ^m = exp(max_v e^v - e^m) / Σ_u exp(max_v e^v - e^u)  (= softmax_m(-e^m)),    ŷ = Σ_m λ^m o^m.

:func:`mla_fuse` computes it per sample (``mode="sample"``, the formula above); ``mode="batch"``
reproduces the official ``calculate_gating_weights``, which takes the softmax over the *batch* axis and
one entropy summed over the whole batch, so all samples of a batch share the weights. The official code
also has a *fixed* fusion (``--gs_flag`` without ``--dynamic``): ``Σ_m a_m o^m`` with constant weights
(0.5 / 0.5 for two modalities).

**harmonia's model.** MLA needs one head shared by the modalities; harmonia's heads have none, so
:meth:`MLA.build` *ties* the per-modality linear heads of a ``sum`` fusion head (:class:`SumFusion`,
``f = Σ_m (W^m φ^m + b^m)``): every ``W^m, b^m`` becomes the first modality's parameter (all feature dims must
be equal). The model's own prediction is then ``Σ_m h(φ^m)``, MLA's fixed fusion with equal weights (up to
the factor M), and that is what the trainer evaluates and reports (evaluation calls the model without
hooks). The dynamic fusion is not what the reported accuracy uses: apply :func:`mla_fuse` to the model's
``unimodal_logits`` (which, with the tied head, are ``h(φ^m)``) to get it. ``concat``, ``film`` and ``gated``
heads are refused at build.

Differences of BalanceMM's trainer: it *adds* the projected gradient to the raw one (``g <- g + g Pᵀ``)
instead of replacing it, and trains only between ``modulation_starts`` and ``modulation_ends`` (0 and 80),
with plain fused training outside. Defaults here follow the official code (replace; all epochs).

The method *replaces* the loss it is given: list MLA first in ``balance``. Its state (``P``, the counts of
modality updates and of steps) is in buffers, so a resumed run is exact. Logs ``balance/mla/loss/<m>``
(``CE(o^m, y)`` of the modalities trained in the step) and ``balance/mla/weight/<m>`` (the batch mean of the
per-sample dynamic-fusion weights λ^m of the training batch).
"""

from __future__ import annotations

import enum
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harmonia.balance.method import BalanceStep, BalancingMethod
from harmonia.distributed import all_reduce_sum
from harmonia.errors import ConfigError, InputError
from harmonia.models.fusion import SumFusion
from harmonia.settings import coerce_enums, setting


class MLASchedule(str, enum.Enum):
    """Which modalities a training step trains."""

    PER_BATCH = "per_batch"
    PER_STEP = "per_step"


class MLAFusionMode(str, enum.Enum):
    """How :func:`mla_fuse` measures each modality's uncertainty."""

    SAMPLE = "sample"
    BATCH = "batch"


@dataclass
class MLASettings:
    """MLA settings (see the module docstring)."""

    alpha: float = setting(
        0.1, gt=0, help="α of the projector update P <- P - P r rᵀ P / (α + rᵀ P r); official: 0.1 to 0.01"
    )
    schedule: MLASchedule = setting(
        MLASchedule.PER_BATCH,
        help="per_batch: all modalities each batch (official order); per_step: modality t mod M at step t",
    )
    normalize: bool = setting(True, help="divide P by its Frobenius norm after every update (official code)")

    def __post_init__(self) -> None:
        coerce_enums(self)


def owm_update(projector: Tensor, r: Tensor, alpha: float, normalize: bool = True) -> Tensor:
    """The projector after recording the direction ``r`` (``[d]``): ``P - k kᵀ / (α + rᵀ k)`` with
    ``k = P r``, divided by its Frobenius norm when ``normalize``."""
    r = r.reshape(-1, 1).to(projector.dtype)
    k = projector @ r
    out = projector - (k @ k.T) / (alpha + (r.T @ k))
    if normalize:
        out = out / torch.linalg.matrix_norm(out)
    return out


def mla_weights(
    unimodal_logits: Mapping[str, Tensor], mode: MLAFusionMode | str = MLAFusionMode.SAMPLE
) -> dict[str, Tensor]:
    """The dynamic-fusion weights ``λ^m = softmax_m(-e^m)`` (``[B]`` per modality for ``sample``, a scalar
    for ``batch``); they sum to 1 over the modalities."""
    mode = MLAFusionMode(mode)
    names = list(unimodal_logits)
    if not names:
        raise InputError("mla_fuse needs the unimodal logits of at least one modality")
    entropies = []
    for m in names:
        o = unimodal_logits[m].float()
        if mode is MLAFusionMode.SAMPLE:
            logp = F.log_softmax(o, dim=1)
            entropies.append(-(logp.exp() * logp).sum(dim=1))
        else:  # the official calculate_entropy: softmax over the batch axis, one sum over everything
            logp = F.log_softmax(o, dim=0)
            entropies.append(-(logp.exp() * logp).sum())
    lam = torch.softmax(-torch.stack(entropies), dim=0)
    return {m: lam[i] for i, m in enumerate(names)}


def mla_fuse(
    unimodal_logits: Mapping[str, Tensor], mode: MLAFusionMode | str = MLAFusionMode.SAMPLE
) -> Tensor:
    """MLA's test-time fusion ``Σ_m λ^m o^m`` of the unimodal logits ``{m: [B, C]}`` (see the module
    docstring); apply it to the ``unimodal_logits`` of a model trained with MLA."""
    weights = mla_weights(unimodal_logits, mode)
    return torch.stack([weights[m].reshape(-1, 1) * unimodal_logits[m].float() for m in unimodal_logits]).sum(
        0
    )


def tie_sum_fusion(model: nn.Module) -> nn.Linear:
    """Make the per-modality heads of ``model.fusion`` (a :class:`SumFusion`) one shared head: every head's
    weight and bias become the first modality's. Returns the shared ``nn.Linear``."""
    fusion = getattr(model, "fusion", None)
    if not isinstance(fusion, SumFusion):
        kind = type(fusion).__name__ if fusion is not None else f"{type(model).__name__} (no 'fusion' head)"
        raise ConfigError(
            "MLA trains every modality through one shared linear head, which harmonia builds by tying the "
            f"per-modality heads of a sum fusion head; this model has {kind}: set model.fusion=sum"
        )
    dims = dict(fusion.feature_dims)
    if len(set(dims.values())) > 1:
        raise ConfigError(
            f"MLA's shared head needs every modality's features to have one size, got {dims}: give the "
            "encoders one feature_dim"
        )
    first = fusion.heads[fusion.modalities[0]]
    for m in fusion.modalities[1:]:
        head = fusion.heads[m]
        head.weight = first.weight
        head.bias = first.bias
    return typing.cast(nn.Linear, first)


class MLA(BalancingMethod):
    """MLA: alternating unimodal cross-entropies through one shared head, whose weight gradients are
    projected away from the directions earlier modality updates used (OWM).

    Args:
        modalities: the modality names (at least 2), in the order they are trained.
        head: the shared linear head ``h(φ) = W φ + b`` (``W``: ``[C, d]``).
        alpha, schedule, normalize: see :class:`MLASettings`.
    """

    @classmethod
    def leaves_parameters_unused(cls, settings: Any) -> bool:
        s = settings or MLASettings()
        return MLASchedule(s.schedule) is MLASchedule.PER_STEP  # one modality per step

    projector: Tensor
    updates: Tensor
    steps: Tensor

    Settings: ClassVar[type[Any]] = MLASettings

    def __init__(
        self,
        modalities: Sequence[str],
        head: nn.Linear,
        alpha: float = 0.1,
        schedule: MLASchedule | str = MLASchedule.PER_BATCH,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if len(modalities) < 2:
            raise ConfigError(
                "MLA balances modalities (alternating unimodal training): give at least 2, got "
                f"{list(modalities)}"
            )
        if not alpha > 0:
            raise ConfigError(f"MLA alpha must be > 0, got {alpha}; the official code uses 0.1 to 0.01")
        try:
            self.schedule = MLASchedule(schedule)
        except ValueError:
            choices = ", ".join(s.value for s in MLASchedule)
            raise ConfigError(f"MLA schedule must be one of {choices}, got {schedule!r}") from None
        self.modalities = tuple(modalities)
        self.alpha = float(alpha)
        self.normalize = bool(normalize)
        self._head = (head,)  # a tuple: the head is the model's, not part of this module's state
        d = head.weight.shape[1]
        device = head.weight.device
        self.register_buffer("projector", torch.eye(d, device=device))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long, device=device))

    @property
    def head(self) -> nn.Linear:
        return self._head[0]

    @classmethod
    def build(cls, model: nn.Module, settings: MLASettings | None = None, seed: int = 0) -> MLA:
        """MLA over the modalities of ``model``, whose ``sum`` fusion head it ties into one shared head."""
        s = settings or MLASettings()
        modalities = tuple(model.modalities)  # type: ignore[arg-type]
        if len(modalities) < 2:
            raise ConfigError(
                "MLA balances modalities (alternating unimodal training): give at least 2, got "
                f"{list(modalities)}"
            )
        head = tie_sum_fusion(model)
        return cls(modalities, head, alpha=s.alpha, schedule=s.schedule, normalize=s.normalize)

    def active(self) -> tuple[str, ...]:
        """The modalities the next step trains, in order."""
        if self.schedule is MLASchedule.PER_BATCH:
            return self.modalities
        return (self.modalities[int(self.steps) % len(self.modalities)],)

    def adjust_loss(self, step: BalanceStep, output: Any, loss: Tensor) -> Tensor:
        """Return ``Σ_{m active} CE(h(φ^m), y)`` instead of ``loss``, with each modality's weight gradient
        projected by the projector after recording its batch-mean feature."""
        features = output.features
        missing = [m for m in self.modalities if m not in features]
        if missing:
            raise InputError(f"MLA: no features for {missing}; it was built for {list(self.modalities)}")
        weight, bias = self.head.weight, self.head.bias
        total = torch.zeros((), device=weight.device)
        for m in self.active():
            phi = features[m]
            w = weight
            if int(self.updates) > 0:
                stats = all_reduce_sum(
                    torch.cat([phi.detach().sum(0), phi.new_tensor([phi.shape[0]])]).to(self.projector.dtype)
                )
                r = stats[:-1] / stats[-1]
                self.projector.copy_(owm_update(self.projector, r, self.alpha, self.normalize))
                proj = self.projector.clone()
                w = weight.view_as(weight)
                w.register_hook(lambda g, p=proj: g @ p.T.to(g.dtype))
            loss_m = F.cross_entropy(F.linear(phi, w, bias), step.labels)
            step.metrics[f"balance/mla/loss/{m}"] = float(loss_m.detach())
            total = total + loss_m
            self.updates += 1
        self.steps += 1
        with torch.no_grad():
            logits = {m: F.linear(features[m], weight, bias) for m in self.modalities}
            lam = mla_weights(logits)
        step.metrics.update({f"balance/mla/weight/{m}": float(v.mean()) for m, v in lam.items()})
        return total
