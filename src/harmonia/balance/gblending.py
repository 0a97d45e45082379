"""Gradient-Blending (Wang, Tran, Feiszli, CVPR 2020), online, estimated from the model's own heads.

Weiyao Wang, Du Tran, Matt Feiszli, "What Makes Training Multi-Modal Classification Networks Hard?",
CVPR 2020 (arXiv:1905.12681), Sections 2.2-2.4 and Algorithms 1-3. BalanceMM's version:
github.com/GeWu-Lab/BalanceBenchmark (``balancemm/trainer/GBlending_trainer.py``). There is no official code.

The paper attaches a classifier to every modality's features and one to the fused features (M + 1 heads,
its Fig. 2c) and trains the blended loss (its Eq. 7)

    L_blend = w_fused · CE(z, y) + Σ_m w_m · CE(o^m, y),        Σ_k w_k = 1,

with z the fused logits and o^m modality m's unimodal logits. The weights come from each head's
over-fitting and generalisation between two checkpoints N and N + n (its Eq. 3 and Fig. 3), with L^T the
average loss over the (fixed) training set and L^V the loss on held-out data (standing in for the true
loss L*):

    O_N = L^V_N - L^T_N,    ΔO = O_{N+n} - O_N,    ΔG = L^V_N - L^V_{N+n},    OGR = |ΔO / ΔG|,

and minimising an infinitesimal OGR² over the blend (its Proposition 1, Eq. 6, for heads whose over-fitting
is uncorrelated) gives w_k ∝ <∇L*, v_k> / σ_k², estimated per head as (Algorithm 1)

    w_k = (1/Z) · ΔG_k / ΔO_k²,     Z = Σ_j ΔG_j / ΔO_j²   (so that Σ_k w_k = 1).

(The paper prints ``Z = Σ_k <∇L*, v_k> / (2σ_k²)``, which would make the weights sum to 2 against its own
constraint Σ w_k = 1; OGR² is invariant to the scale of w, so only the constraint fixes it: harmonia, like
BalanceMM, normalises to 1.) The fused head is one of the M + 1 heads and gets its weight by the same rule.

Offline G-Blend (Algorithm 2) estimates the weights once; online G-Blend (Algorithm 3) re-estimates them
every super-epoch of n epochs (the paper's Kinetics runs: a first, warm-up super-epoch of 10 epochs, then
5).

How harmonia estimates ΔO and ΔG (differs from the paper and BalanceMM): Algorithm 1 estimates the weights
for the super-epoch starting at N *ahead*: it copies the checkpoint into M + 1 single-head networks, trains
each alone for n epochs and measures its ΔO, ΔG. BalanceMM does the same (each modality's copy trained with
the other modalities' inputs zero-padded; the "pre" losses taken after the copy's first epoch; losses
summed over batches; weight |ΔG / ΔO²|). That costs M + 1 extra trainings per super-epoch, which a
balancing method's hooks cannot run. Harmonia instead looks *back*: at the end of a super-epoch it measures
each head of the jointly trained model on the whole train and validation splits (the encoders' eval-mode
features from :meth:`BalancingMethod.on_epoch_end`, the unimodal heads and ``model.fusion``; no extra
encoder pass) and takes ΔO, ΔG between the previous estimate's checkpoint and now, i.e. the heads'
behaviour under the last super-epoch's blended training. So the weights of super-epoch i come from
super-epoch i-1 rather than from a trial run of super-epoch i.

Schedule (``t`` = epochs completed, i.e. after training epoch ``e = t - 1``): the losses of every head are
recorded at ``t = 1`` (the first point the hook sees), and the weights are re-estimated at
``t = first_super_epoch`` and then every ``super_epoch`` epochs (``online``; with ``online: false`` only at
``t = first_super_epoch``, then kept: offline G-Blend), each time from the change since the previous
record. Before the first estimate every head has weight 1/(M + 1) (harmonia's choice; the paper starts from
an estimate). Defaults: ``first_super_epoch = 10`` and ``super_epoch = 5`` (the paper's online setting).

Heads: the unimodal logits ``o^m`` are the model's (``harmonia.balance.unimodal_heads``): for ``sum`` fusion
separate per-modality classifiers as in the paper; for ``concat`` fusion the blocks of the fused
classifier (``W[:, block_m] φ^m + b/M``, as in BalanceMM), so there the unimodal and fused heads share
parameters; ``film`` / ``gated`` heads give zero-out estimates.

Further choices: a head whose validation loss rose (ΔG < 0) would get a negative weight (the paper allows
w_k ∈ R); ``negative_gain: clip`` (default) gives it 0, ``abs`` uses |ΔG| (BalanceMM's ``abs(g / o²)``).
``eps`` is added to ΔO² against division by zero. If no head has a positive raw weight, the weights are
kept. Losses are per-sample means in float64 of the head in eval mode.

State and distribution: the weights and the last record's losses are buffers (a resume is exact). Every
rank extracts the same whole splits (``encoder_features`` reads ``eval_batches``, the whole split, on every
rank); the estimate is nevertheless made from rank 0's losses (an all-reduce of rank 0's values), so every
rank uses identical weights. The method *replaces* the loss it is given by ``L_blend`` (a method listed
before it in ``balance`` loses its added terms; list G-Blend first). Logs every step
``balance/gblending/weight/<m|fused>``, and at each record ``balance/gblending/{loss_train,loss_val}/<k>``,
at each estimate also ``balance/gblending/{delta_o,delta_g,ogr}/<k>``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harmonia.balance.method import BalanceStep, BalancingMethod, SplitFeatures, unimodal_heads
from harmonia.distributed import from_rank_zero
from harmonia.errors import ConfigError, InputError
from harmonia.settings import coerce_enums, setting

#: the name of the fused head among the blended heads (the modalities come first)
FUSED = "fused"


class GBlendingGain(str, enum.Enum):
    """What a negative generalisation ΔG (the validation loss rose) contributes."""

    CLIP = "clip"
    ABS = "abs"


@dataclass
class GBlendingSettings:
    """Gradient-Blending settings (see the module docstring)."""

    super_epoch: int = setting(5, help="re-estimate the weights every this many epochs (paper 5)", ge=1)
    first_super_epoch: int = setting(
        10, help="the first estimate after this many epochs (paper's warm-up super-epoch 10)", ge=2
    )
    online: bool = setting(True, help="re-estimate every super-epoch (false: once, offline G-Blend)")
    negative_gain: GBlendingGain = setting(
        GBlendingGain.CLIP, help="ΔG < 0: clip gives weight 0, abs uses |ΔG| (BalanceMM)"
    )
    eps: float = setting(1e-8, help="added to ΔO² in w_k ∝ ΔG_k / ΔO_k²", ge=0)
    train_split: str = setting("train", help="the split whose loss is L^T")
    val_split: str = setting("val", help="the held-out split whose loss is L^V")

    def __post_init__(self) -> None:
        coerce_enums(self)


# --------------------------------------------------------------------------------------------------
# the maths


def ogr_terms(
    train_before: Tensor, val_before: Tensor, train_now: Tensor, val_now: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(ΔO, ΔG, OGR)`` per head between two checkpoints (paper Eq. 3):
    ``ΔO = (L^V_now - L^T_now) - (L^V_before - L^T_before)``, ``ΔG = L^V_before - L^V_now``,
    ``OGR = |ΔO / ΔG|`` (inf where ΔG = 0)."""
    delta_o = (val_now - train_now) - (val_before - train_before)
    delta_g = val_before - val_now
    return delta_o, delta_g, (delta_o / delta_g).abs()


def gblending_weights(
    delta_o: Tensor,
    delta_g: Tensor,
    negative_gain: GBlendingGain | str = GBlendingGain.CLIP,
    eps: float = 1e-8,
) -> Tensor | None:
    """``w_k = (ΔG_k / (ΔO_k² + eps)) / Σ_j (ΔG_j / (ΔO_j² + eps))`` (paper Eq. 6 / Algorithm 1), with a
    negative ΔG clipped to 0 (``clip``) or replaced by |ΔG| (``abs``); ``None`` if no raw weight is
    positive (nothing to normalise)."""
    gain = delta_g.clamp_min(0) if GBlendingGain(negative_gain) is GBlendingGain.CLIP else delta_g.abs()
    raw = gain / (delta_o.square() + eps)
    total = raw.sum()
    if not bool(torch.isfinite(total)) or float(total) <= 0:
        return None
    return raw / total


def blended_loss(
    fused_logits: Tensor,
    unimodal_logits: Mapping[str, Tensor],
    labels: Tensor,
    modalities: Sequence[str],
    weights: Tensor,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``Σ_m w_m·CE(o^m, y) + w_fused·CE(z, y)`` (paper Eq. 7; ``weights`` in the order of ``modalities``,
    then the fused head) and each head's CE."""
    missing = [m for m in modalities if m not in unimodal_logits]
    if missing:
        raise InputError(f"G-Blending: no unimodal logits for {missing}; it was built for {list(modalities)}")
    losses = {m: F.cross_entropy(unimodal_logits[m], labels) for m in modalities}
    losses[FUSED] = F.cross_entropy(fused_logits, labels)
    w = weights.to(device=fused_logits.device, dtype=losses[FUSED].dtype)
    return (w * torch.stack(list(losses.values()))).sum(), losses


# --------------------------------------------------------------------------------------------------
# the method


class GBlending(BalancingMethod):
    """Online Gradient-Blending: ``loss -> w_fused·CE(z, y) + Σ_m w_m·CE(o^m, y)``, the weights re-estimated
    from each head's over-fitting and generalisation every super-epoch.

    Args:
        modalities: the modality names (at least 2).
        fusion: ``features -> fused logits`` (the model's fusion head).
        heads: ``features -> {modality: unimodal logits}``.
        super_epoch, first_super_epoch, online, negative_gain, eps, train_split, val_split: see
            :class:`GBlendingSettings`.
    """

    weights: Tensor
    ref_train: Tensor
    ref_val: Tensor
    ref_epoch: Tensor

    Settings: ClassVar[type[Any]] = GBlendingSettings

    def __init__(
        self,
        modalities: Sequence[str],
        fusion: Callable[[Mapping[str, Tensor]], Tensor],
        heads: Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]],
        super_epoch: int = 5,
        first_super_epoch: int = 10,
        online: bool = True,
        negative_gain: GBlendingGain | str = GBlendingGain.CLIP,
        eps: float = 1e-8,
        train_split: str = "train",
        val_split: str = "val",
    ) -> None:
        super().__init__()
        if len(modalities) < 2:
            raise ConfigError(
                "G-Blending balances modalities (blends their heads): give at least 2, got "
                f"{list(modalities)}"
            )
        if super_epoch < 1 or first_super_epoch < 2 or eps < 0:
            raise ConfigError(
                "G-Blending needs super_epoch >= 1, first_super_epoch >= 2 and eps >= 0, got "
                f"super_epoch={super_epoch}, first_super_epoch={first_super_epoch}, eps={eps}"
            )
        try:
            self.negative_gain = GBlendingGain(negative_gain)
        except ValueError:
            choices = ", ".join(g.value for g in GBlendingGain)
            raise ConfigError(
                f"G-Blending negative_gain must be one of {choices}, got {negative_gain!r}"
            ) from None
        if FUSED in modalities:
            raise ConfigError(f"G-Blending names the fused head {FUSED!r}: rename that modality")
        self.modalities = tuple(modalities)
        self.heads_names = (*self.modalities, FUSED)
        # plain dict: the model's heads are referenced, not registered (they are not this module's state)
        self._model_heads: dict[str, Callable[..., Any]] = {"fusion": fusion, "unimodal": heads}
        self.super_epoch, self.first_super_epoch, self.online = super_epoch, first_super_epoch, online
        self.eps, self.train_split, self.val_split = eps, train_split, val_split
        k = len(self.heads_names)
        self.register_buffer("weights", torch.full((k,), 1.0 / k, dtype=torch.float64))
        self.register_buffer("ref_train", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("ref_val", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("ref_epoch", torch.tensor(-1, dtype=torch.long))  # -1: no record yet

    @classmethod
    def build(cls, model: nn.Module, settings: GBlendingSettings | None = None, seed: int = 0) -> GBlending:
        """G-Blending over the modalities of ``model``, its fusion head and its unimodal heads."""
        s = settings or GBlendingSettings()
        modalities = tuple(getattr(model, "modalities", ()))
        fusion = getattr(model, "fusion", None)
        if not callable(fusion):
            raise ConfigError(
                f"G-Blending measures the fused head on whole splits: {type(model).__name__} has no "
                "model.fusion(features) head"
            )
        return cls(
            modalities,
            fusion,
            unimodal_heads(model),
            super_epoch=s.super_epoch,
            first_super_epoch=s.first_super_epoch,
            online=s.online,
            negative_gain=s.negative_gain,
            eps=s.eps,
            train_split=s.train_split,
            val_split=s.val_split,
        )

    # ---------------------------------------------------------------------------------------- schedule

    def records_after(self, epoch: int) -> bool:
        """Whether the heads' losses are measured after training ``epoch`` (counted from 0)."""
        return epoch + 1 == 1 or self.estimates_after(epoch)

    def estimates_after(self, epoch: int) -> bool:
        """Whether the weights are re-estimated after training ``epoch`` (counted from 0)."""
        t = epoch + 1
        if t < self.first_super_epoch:
            return False
        if not self.online:
            return t == self.first_super_epoch
        return (t - self.first_super_epoch) % self.super_epoch == 0

    # ---------------------------------------------------------------------------------------- hooks

    def adjust_loss(self, step: BalanceStep, output: Any, loss: Tensor) -> Tensor:
        """Return ``w_fused·CE(z, y) + Σ_m w_m·CE(o^m, y)`` instead of ``loss``; log the weights."""
        total, _ = blended_loss(
            output.logits, output.unimodal_logits, step.labels, self.modalities, self.weights
        )
        step.metrics.update(
            {
                f"balance/gblending/weight/{k}": float(w)
                for k, w in zip(self.heads_names, self.weights, strict=True)
            }
        )
        return total

    @torch.no_grad()
    def head_losses(self, features: Mapping[str, Tensor], labels: Tensor) -> Tensor:
        """Each head's mean cross-entropy over ``features`` (modalities in order, then the fused head),
        float64, with the fusion head in eval mode."""
        fusion = self._model_heads["fusion"]
        module = fusion if isinstance(fusion, nn.Module) else None
        device = next((p.device for p in module.parameters()), labels.device) if module is not None else None
        feats = {m: f.to(device) if device is not None else f for m, f in features.items()}
        y = labels.to(device) if device is not None else labels
        was_training = module.training if module is not None else False
        if module is not None:
            module.eval()
        try:
            unimodal = self._model_heads["unimodal"](feats)
            fused = fusion(feats)
        finally:
            if module is not None:
                module.train(was_training)
        missing = [m for m in self.modalities if m not in unimodal]
        if missing:
            raise InputError(f"G-Blending: no unimodal logits for {missing}")
        logits = [unimodal[m] for m in self.modalities] + [fused]
        return torch.stack([F.cross_entropy(z.double(), y) for z in logits]).cpu()

    def on_epoch_end(self, epoch: int, features: SplitFeatures, metrics: dict[str, float]) -> None:
        """Record the heads' train and validation losses (after epoch 0 and at each estimate) and, at the end
        of a super-epoch, re-estimate the weights from their change since the previous record."""
        if not self.records_after(epoch):
            return
        values = torch.stack(
            [self.head_losses(*features(self.train_split)), self.head_losses(*features(self.val_split))]
        )
        values = from_rank_zero(values, self.weights.device)  # rank 0's losses for everyone
        train_now, val_now = values[0], values[1]
        for i, k in enumerate(self.heads_names):
            metrics[f"balance/gblending/loss_train/{k}"] = float(train_now[i])
            metrics[f"balance/gblending/loss_val/{k}"] = float(val_now[i])
        if self.estimates_after(epoch) and int(self.ref_epoch) >= 0:
            delta_o, delta_g, ogr = ogr_terms(self.ref_train.cpu(), self.ref_val.cpu(), train_now, val_now)
            weights = gblending_weights(delta_o, delta_g, self.negative_gain, self.eps)
            if weights is not None:
                self.weights.copy_(weights.to(self.weights))
            for i, k in enumerate(self.heads_names):
                metrics[f"balance/gblending/delta_o/{k}"] = float(delta_o[i])
                metrics[f"balance/gblending/delta_g/{k}"] = float(delta_g[i])
                metrics[f"balance/gblending/ogr/{k}"] = float(ogr[i])
                metrics[f"balance/gblending/weight/{k}"] = float(self.weights[i])
        self.ref_train.copy_(train_now.to(self.ref_train))
        self.ref_val.copy_(val_now.to(self.ref_val))
        self.ref_epoch.fill_(epoch)
