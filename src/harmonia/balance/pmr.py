"""Prototypical Modal Rebalance, PMR (Fan, Xu, Wang, Wang, Guo, CVPR 2023).

Yunfeng Fan, Wenchao Xu, Haozhao Wang, Junxiao Wang, Song Guo, "PMR: Prototypical Modal Rebalance for
Multimodal Learning", Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition
(CVPR 2023), pp. 20029-20038; arXiv:2211.07089. Official code: github.com/fanyunfeng-bit/Modal-Imbalance-PMR
(``main_Prototype_grad.py``).

Each modality m gets a non-parametric classifier: the class prototypes ``c^m_k`` (the centroid of the
features ``z^m = φ^m(x^m)`` of class k, Eq. 6) and a softmax over negative Euclidean distances (Eq. 7)

    p^m_i(k) = exp(-d(z^m_i, c^m_k)) / Σ_k' exp(-d(z^m_i, c^m_k')).

The prototypical cross-entropy (PCE, Eq. 9) ``L^m_PCE = mean_i -log p^m_i(y_i)`` reaches only modality m's
encoder (the prototypes are detached), so it pushes the slow modality without the fused output's
interference. With the imbalance ratio of the batch (Eq. 8), ``ρ_t = Σ_i p^0_i(y_i) / Σ_i p^1_i(y_i)``,

    L_acc   = L_CE + α·β·L^0_PCE + α·γ·L^1_PCE                                          (Eq. 10)
    β = clip(0, 1/ρ_t - 1, 1), γ = 0    if ρ_t < 1;    β = 0, γ = clip(0, ρ_t - 1, 1)   if ρ_t >= 1   (Eq. 11)
    L_final = L_acc - μ·γ·H(p^0) - μ·β·H(p^1)      in the first E_r epochs (PER, Eq. 13)

so the weaker modality gets the PCE term and the dominant one an entropy bonus (its prototype predictions
are kept uncertain early on, so it converges less prematurely). The paper writes two modalities. For any
M >= 2 harmonia uses, with ``s^m = Σ_i p^m_i(y_i)`` over the (global) batch,

    β^m = clip(0, max_j s^j / s^m - 1, 1)    (PCE weight: the gap to the best modality)
    η^m = clip(0, s^m / min_j s^j - 1, 1)    (PER weight: the lead over the worst modality)

    L = L_CE + α Σ_m β^m L^m_PCE - [epoch < E_r] μ Σ_m η^m H(p^m)

which is Eqs. 10, 11 and 13 exactly for M = 2 (β^0 = β, β^1 = γ, η^0 = γ, η^1 = β). Logged as
``balance/pmr/rho/<m>`` (``s^m / max_{j≠m} s^j``: the paper's ρ_t for the first modality, 1/ρ_t for the
second), ``balance/pmr/beta/<m>``, ``balance/pmr/eta/<m>``, ``balance/pmr/pce/<m>`` (unweighted PCE),
``balance/pmr/entropy/<m>`` and ``balance/pmr/loss`` (the term added to the loss).

Prototypes (how they differ from the official code). The paper computes them "based on a subset of training
data in a momentum fashion between each training epoch", ``c_k <- ε·c_k + (1-ε)·c_k|new`` (Eq. 12), with a
subset of one tenth of the training set; the official code runs, before epoch 0 and after every epoch, a
no-grad eval-mode pass over the first tenth of the (shuffled) training loader (the validation loader for AVE
and CG-MNIST). A balancing method has no hook that sees the whole dataset, so here the prototypes are the
class means of the features of the *previous epoch's training batches* (train mode, as the model evolved
during that epoch; every batch, not a tenth): per-class sums and counts are accumulated (detached,
all-reduced over data-parallel ranks) in buffers and swapped in, with Eq. 12's momentum, at the first step of
the next epoch. Before any epoch has ended (epoch 0, where the official code uses prototypes of the
initialised model) each step uses the class means of its own global batch. Classes without a prototype are
left out of the softmax; a sample whose class has none contributes nothing. All state is in buffers, so a
``state_dict`` resumes exactly.

Official code vs paper vs BalanceMM (GeWu-Lab/BalanceBenchmark, ``PMR_trainer.py``): both code bases use
the binary coefficients ``β, γ ∈ {0, α}`` (α on the weaker modality's PCE whatever the gap) instead of
Eq. 11's clipped ones, and neither has the entropy regulariser (its file is not in the official repository);
PCE is applied only between ``modulation_starts`` and ``modulation_ends`` (official scripts 0-70 of 100-150
epochs; BalanceMM 0-80). BalanceMM computes the prototypes at the start of each epoch (a tenth of the
training loader, momentum 0.5) and, for M > 2, replaces PCE with an OGM-like gradient scaling
``1 - tanh(η·ρ)`` with noise. harmonia follows the paper's equations.

Defaults and sources:

* ``alpha = 1.0``: paper "α is set to 1 or 2" (Sec. 5.2); official ``--alpha`` default 1.0 (BalanceMM 0.6);
* ``mu = 0.01``: paper "μ is set to a small value 1e-2 or 1e-3";
* ``momentum = 0.0`` (ε of Eq. 12; no value in the paper): the official run scripts (``bash.sh``,
  ``--momentum_coef 0.0``); the official argparse default is 0.2, BalanceMM's 0.5;
* ``entropy_epochs = 10`` (E_r): the paper says only "the first few epochs" and the official code has no
  PER, so this is harmonia's choice (0 turns PER off);
* ``start_epoch = 0``, ``end_epoch = None``: Algorithm 1 applies PCE in every epoch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harmonia.balance.method import BalanceStep, BalancingMethod, in_epoch_window
from harmonia.distributed import all_reduce_sum
from harmonia.errors import ConfigError, InputError, NonFiniteLossError
from harmonia.precision import in_float32
from harmonia.settings import setting


@dataclass
class PMRSettings:
    """PMR hyper-parameters (defaults: the paper and the official code; see the module docstring)."""

    alpha: float = setting(
        1.0, help="α: weight of the prototypical CE terms (paper: 1 or 2; official 1.0)", ge=0
    )
    mu: float = setting(
        0.01, help="μ: weight of the prototype entropy regulariser (paper: 1e-2 or 1e-3)", ge=0
    )
    momentum: float = setting(
        0.0, help="ε: prototype momentum across epochs, Eq. 12 (official scripts 0.0)", ge=0, lt=1
    )
    entropy_epochs: int = setting(
        10, help="E_r: the entropy regulariser acts in epochs < E_r (paper: 'first few'; 0: off)", ge=0
    )
    start_epoch: int = setting(0, help="first epoch in which the PMR terms are added", ge=0)
    end_epoch: int | None = setting(None, help="the PMR terms stop at this epoch (null: never)", ge=1)


@in_float32
def prototype_logits(features: Tensor, prototypes: Tensor) -> Tensor:
    """``-d(z_i, c_k)``: negative Euclidean distances ``[B, K]`` of ``[B, d]`` features to ``[K, d]``
    prototypes (Eq. 7's logits; the gradient at a zero distance is 0)."""
    return -torch.cdist(features, prototypes, compute_mode="donot_use_mm_for_euclid_dist")


def pmr_coefficients(scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(ρ, β, η)`` per modality from the scores ``s^m = Σ_i p^m_i(y_i)`` (a ``[M]`` tensor, M >= 2).

    ``ρ^m = s^m / max_{j≠m} s^j``, ``β^m = clip(0, max_j s^j / s^m - 1, 1)`` (PCE weight),
    ``η^m = clip(0, s^m / min_j s^j - 1, 1)`` (entropy weight): Eq. 11 for two modalities.
    """
    s = scores.double()
    tiny = torch.finfo(torch.float64).tiny
    others = torch.stack([torch.cat([s[:m], s[m + 1 :]]).max() for m in range(s.numel())])
    rho = s / others.clamp_min(tiny)
    beta = (s.max() / s.clamp_min(tiny) - 1).clamp(0, 1)
    eta = (s / s.min().clamp_min(tiny) - 1).clamp(0, 1)
    return rho, beta, eta


@in_float32
def prototype_terms(
    logits: Tensor, labels: Tensor, rows: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(Σ_i p_i(y_i), Σ_i CE_i, Σ_i H_i)`` over the rows of ``[B, K]`` prototype logits (only ``rows``,
    a ``[B]`` bool mask, when given). Sums, so that the caller divides by the batch it means."""
    log_p = F.log_softmax(logits, dim=1)
    true = log_p.gather(1, labels[:, None]).squeeze(1)
    entropy = -(log_p.exp() * log_p).sum(dim=1)
    if rows is not None:
        keep = rows.to(log_p.dtype)
        return (true.exp() * keep).sum(), -(true * keep).sum(), (entropy * keep).sum()
    return true.exp().sum(), -true.sum(), entropy.sum()


class PMR(BalancingMethod):
    """Prototypical Modal Rebalance: prototype CE for the slow modalities, prototype entropy for the fast.

    Args:
        modalities: the modality names, in a fixed order (at least 2).
        alpha, mu, momentum, entropy_epochs, start_epoch, end_epoch: see :class:`PMRSettings`.

    The buffers (per modality i: ``prototypes_i`` [C, d_i], ``sums_i`` [C, d_i]; shared ``counts`` [C],
    ``has_prototype`` [C], ``accumulating_epoch``) are sized at the first training step (C from the logits,
    d_i from the features) and re-sized by :meth:`load_state_dict` to the saved shapes.
    """

    Settings: ClassVar[type[Any]] = PMRSettings
    counts: Tensor
    has_prototype: Tensor
    accumulating_epoch: Tensor

    def __init__(
        self,
        modalities: Sequence[str],
        alpha: float = 1.0,
        mu: float = 0.01,
        momentum: float = 0.0,
        entropy_epochs: int = 10,
        start_epoch: int = 0,
        end_epoch: int | None = None,
    ) -> None:
        super().__init__()
        if len(modalities) < 2:
            raise ConfigError(
                f"PMR balances modalities (it compares their prototype classifiers): give at least 2, got "
                f"{list(modalities)}"
            )
        if alpha < 0 or mu < 0:
            raise ConfigError(f"PMR alpha and mu must be >= 0, got alpha={alpha}, mu={mu}")
        if not 0 <= momentum < 1:
            raise ConfigError(f"PMR momentum must be in [0, 1), got {momentum}")
        self.modalities = tuple(modalities)
        self.alpha, self.mu, self.momentum = alpha, mu, momentum
        self.entropy_epochs, self.start_epoch, self.end_epoch = entropy_epochs, start_epoch, end_epoch
        for i in range(len(self.modalities)):
            self.register_buffer(f"prototypes_{i}", torch.zeros(0, 0))
            self.register_buffer(f"sums_{i}", torch.zeros(0, 0, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("has_prototype", torch.zeros(0, dtype=torch.bool))
        self.register_buffer("accumulating_epoch", torch.full((), -1, dtype=torch.long))

    @classmethod
    def build(cls, model: nn.Module, settings: PMRSettings | None = None, seed: int = 0) -> PMR:
        """PMR over the modalities of ``model`` (it reads the features of the model's output)."""
        s = settings or PMRSettings()
        pmr = cls(
            tuple(model.modalities),  # type: ignore[arg-type]
            alpha=s.alpha,
            mu=s.mu,
            momentum=s.momentum,
            entropy_epochs=s.entropy_epochs,
            start_epoch=s.start_epoch,
            end_epoch=s.end_epoch,
        )
        return pmr.to(next(model.parameters()).device)

    # ----------------------------------------------------------------------------------------------
    # state

    def prototypes(self, i: int) -> Tensor:
        return getattr(self, f"prototypes_{i}")

    def sums(self, i: int) -> Tensor:
        return getattr(self, f"sums_{i}")

    def _allocate(self, num_classes: int, dims: Sequence[int], device: torch.device) -> None:
        if self.counts.numel() == num_classes and all(
            self.sums(i).shape == (num_classes, d) for i, d in enumerate(dims)
        ):
            return
        if self.counts.numel():
            raise InputError(
                f"PMR holds prototypes for {self.counts.numel()} classes and features "
                f"{[tuple(self.sums(i).shape[1:]) for i in range(len(dims))]}, but the batch has "
                f"{num_classes} classes and feature sizes {list(dims)}"
            )
        for i, d in enumerate(dims):
            setattr(self, f"prototypes_{i}", torch.zeros(num_classes, d, device=device))
            setattr(self, f"sums_{i}", torch.zeros(num_classes, d, dtype=torch.float64, device=device))
        self.counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.has_prototype = torch.zeros(num_classes, dtype=torch.bool, device=device)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        for name, buffer in list(self._buffers.items()):
            saved = state_dict.get(prefix + name)
            if buffer is not None and isinstance(saved, Tensor) and saved.shape != buffer.shape:
                self._buffers[name] = torch.empty(saved.shape, dtype=buffer.dtype, device=buffer.device)
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[arg-type]

    def _swap_in(self) -> None:
        """End of an accumulated epoch: its class means become the prototypes (Eq. 12's momentum)."""
        seen = self.counts > 0
        if bool(seen.any()):
            both = (seen & self.has_prototype)[:, None]
            for i in range(len(self.modalities)):
                new = (self.sums(i) / self.counts.clamp_min(1)[:, None]).to(self.prototypes(i).dtype)
                old = self.prototypes(i)
                blended = torch.where(both, self.momentum * old + (1 - self.momentum) * new, new)
                setattr(self, f"prototypes_{i}", torch.where(seen[:, None], blended, old))
                setattr(self, f"sums_{i}", torch.zeros_like(self.sums(i)))
            self.has_prototype = self.has_prototype | seen
            self.counts = torch.zeros_like(self.counts)

    def accumulate(self, features: Mapping[str, Tensor], labels: Tensor, epoch: int) -> list[Tensor]:
        """Add the (global) batch's per-class feature sums to ``epoch``'s accumulators (swapping the
        previous epoch's means in first, when ``epoch`` is new); returns the batch's class sums per
        modality followed by its class counts (all-reduced, float64)."""
        feats = [features[m].detach().double() for m in self.modalities]
        num_classes = self.counts.numel()
        onehot = F.one_hot(labels, num_classes).double()  # [B, C]
        flat = torch.cat([(onehot.T @ f).reshape(-1) for f in feats] + [onehot.sum(0)])
        flat = all_reduce_sum(flat)  # one collective: every rank holds the global batch's sums
        parts, start = [], 0
        for f in feats:
            size = num_classes * f.shape[1]
            parts.append(flat[start : start + size].view(num_classes, f.shape[1]))
            start += size
        parts.append(flat[start:])
        if int(self.accumulating_epoch) != epoch:
            self._swap_in()
            self.accumulating_epoch = torch.full_like(self.accumulating_epoch, epoch)
        for i in range(len(self.modalities)):
            setattr(self, f"sums_{i}", self.sums(i) + parts[i])
        self.counts = self.counts + parts[-1]
        return parts

    # ----------------------------------------------------------------------------------------------
    # the loss

    def is_active(self, epoch: int) -> bool:
        return in_epoch_window(epoch, self.start_epoch, self.end_epoch)

    def adjust_loss(self, step: BalanceStep, output: Any, loss: Tensor) -> Tensor:
        """Accumulate this batch into the prototypes and, in PMR's epochs, add
        ``α Σ_m β^m L^m_PCE - [epoch < E_r] μ Σ_m η^m H^m``."""
        features = getattr(output, "features", None)
        missing = [m for m in self.modalities if not isinstance(features, Mapping) or m not in features]
        if missing:
            raise InputError(
                f"PMR needs the model output's per-modality features (output.features) for {missing}; "
                f"it was built for {list(self.modalities)}"
            )
        assert isinstance(features, Mapping)
        labels = step.labels.to(output.logits.device).long()
        self._allocate(output.logits.shape[1], [features[m].shape[1] for m in self.modalities], labels.device)
        batch_sums = self.accumulate(features, labels, step.epoch)
        if not self.is_active(step.epoch):
            return loss

        if bool(self.has_prototype.any()):  # the previous epochs' prototypes
            valid = self.has_prototype
            protos = [self.prototypes(i) for i in range(len(self.modalities))]
        else:  # no epoch has ended yet: the class means of this global batch
            valid = batch_sums[-1] > 0
            counts = batch_sums[-1].clamp_min(1)[:, None]
            protos = [batch_sums[i] / counts for i in range(len(self.modalities))]
        classes = valid.nonzero().squeeze(1)
        remap = torch.full_like(valid, -1, dtype=torch.long)
        remap[classes] = torch.arange(classes.numel(), device=classes.device)
        targets = remap[labels]
        rows = targets >= 0
        targets = targets.clamp_min(0)

        batch = max(labels.shape[0], 1)
        scores, pce, entropy = [], [], []
        for i, m in enumerate(self.modalities):
            z = features[m].float()
            logits = prototype_logits(z, protos[i][classes].to(z))
            s, ce, h = prototype_terms(logits, targets, None if bool(rows.all()) else rows)
            scores.append(s.detach())
            pce.append(ce / batch)  # rows without a prototype count as 0: the global mean under DDP
            entropy.append(h / batch)
        global_scores = all_reduce_sum(torch.stack(scores))
        if not bool(torch.isfinite(global_scores).all()):
            raise NonFiniteLossError(
                "PMR's prototype scores hold NaN or inf (the features have diverged): lower the learning "
                "rate or clip gradients"
            )
        rho, beta, eta = pmr_coefficients(global_scores)
        use_entropy = step.epoch < self.entropy_epochs and self.mu > 0
        term = loss.new_zeros(())
        for i, m in enumerate(self.modalities):
            term = term + self.alpha * float(beta[i]) * pce[i]
            if use_entropy:
                term = term - self.mu * float(eta[i]) * entropy[i]
            step.metrics[f"balance/pmr/rho/{m}"] = float(rho[i])
            step.metrics[f"balance/pmr/beta/{m}"] = float(beta[i])
            step.metrics[f"balance/pmr/eta/{m}"] = float(eta[i]) if use_entropy else 0.0
            step.metrics[f"balance/pmr/pce/{m}"] = float(pce[i].detach())
            step.metrics[f"balance/pmr/entropy/{m}"] = float(entropy[i].detach())
        step.metrics["balance/pmr/loss"] = float(term.detach())
        return loss + term
