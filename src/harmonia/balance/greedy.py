"""Balanced multi-modal learning against the greedy nature of learning (``greedy``).

Nan Wu, Stanisław Jastrzębski, Kyunghyun Cho, Krzysztof J. Geras, "Characterizing and Overcoming the Greedy
Nature of Learning in Multi-modal Deep Neural Networks", ICML 2022 (PMLR 162, pp. 24043-24055);
arXiv:2202.05306. Official code: github.com/nyukat/greedy_multimodal_learning (``src/callbacks.py``
``Bias_Mitigation_Strong``, ``src/balanced_mmtm.py``, ``configs/training_guided.gin``).

**Conditional utilisation rate** (the paper's diagnosis). With ``A(m0, m1)`` the accuracy of the model given
both modalities and ``A(m0)`` its accuracy when m1's information is replaced by its average,

    u(m1 | m0) = (A(m0, m1) - A(m0)) / A(m0, m1),

the relative gain from adding m1; a *greedy* model has ``u(m1|m0)`` and ``u(m0|m1)`` far apart. It needs
a pass over held-out data, so training uses a proxy.

**Conditional learning speed** (the proxy). The paper's model has two branches joined by MMTM fusion
layers; branch m0's parameters split into its own ("main", ``θ_0``) and the fusion parameters that carry
m1 into it ("bypass", ``θ'_0``). A parameter group's learning speed at step t is its relative change,
which for plain SGD (the official optimiser: no momentum, no weight decay; ``Δθ = -η∇θ``) is, up to η²,

    μ_t(θ) = Σ_{p∈θ} ‖∇_p L_t‖² / Σ_{p∈θ} ‖p_t‖²,

and the official code sums it over all regular steps since the first (``S(θ) = Σ_t μ_t(θ)``):

    v(m1 | m0) = log10 S(θ'_0) / S(θ_0),        d = v(m1 | m0) - v(m0 | m1).

**Switching rule** (official callback). After the backward pass of every *regular* step, once the warm-up
is over: if ``|d| > α`` the next ``Q`` steps are *re-balancing* steps for m0 (``d > 0``) or m1 (``d < 0``),
the modality the model learns less from; re-balancing steps neither add to ``S`` nor decide. In a
re-balancing step for m0, the MMTM scales of branch m0 are replaced by their running average (detached),
so branch m0 predicts from m0 alone while branch m1 still sees both; the loss is ``CE(ŷ_0) + CE(ŷ_1)``
as in a regular step.

**harmonia's late-fusion adaptation.** harmonia's :class:`~harmonia.models.MultimodalClassifier` fuses
after the encoders (``ŷ = f(φ^1(x^1), ..., φ^M(x^M))``, one prediction); MMTM's mid-fusion bypass does
not exist there and is not reproduced. The other modalities reach the prediction only through their own
encoders, so harmonia reads "the model learns from m_j" as encoder j's speed: with ``S^m`` the sum over
regular steps of ``μ_t`` over encoder m's trainable parameters and ``ℓ^m = log10 S^m``,

    v(m_j | m_i) = ℓ^j - ℓ^i,      d = max_{i,j} [v(m_j | m_i) - v(m_i | m_j)] = 2 (max_m ℓ^m - min_m ℓ^m),

which for M = 2 is the official ``|d|`` (its sign only names the modality): re-balancing starts
when ``d > α`` and is for ``m* = argmin_m ℓ^m``. The single prediction plays every branch's role, so a
regular step's loss ``L`` is the mean of M identical branch losses; a re-balancing step for m* cuts
m*'s branch off the others, replacing their features by their running means ``φ̄^j`` (detached; the mean
over every training sample seen so far, as the official code averages the MMTM scales over all passes):

    L_rebalance = ((M - 1) · L + CE(f(φ^{m*}, φ̄^{-m*}), y)) / M.

Extra cost: the squared norms of the encoders' weights and gradients in regular steps, one fusion-head pass
in re-balancing steps; every encoder keeps its gradient (no unused parameters under DistributedDataParallel).
Only the paper's abstract could be read here; the formulas follow the official code.

Official code vs BalanceMM (GeWu-Lab/BalanceBenchmark, ``balancemm/trainer/Greedy_trainer.py``,
``BaseClassifierGreedyModel`` and ``MMTM`` in ``balancemm/models/avclassify_model.py``): BalanceMM puts an
MMTM after each of the four ResNet-18 stages of exactly two encoders (official: after stages 2-4) and feeds
the pooled features to one concat head (one prediction, ``CE(ŷ)``; official: one head per branch and the
summed losses); its speed and switching rule are the official ones with ``alpha: 0.001`` and no warm-up
(its ``modulation_starts``/``ends`` select between two identical calls). In the snapshot read here its
``MMTM.forward`` empties the running averages at the start of every call and then reads them, so it cannot
run as written. The official code has a typo too: the second modality's running average is computed from
the first's scales. harmonia follows the official rule, with the averages meant.

Defaults and sources:

* ``alpha = 0.01``: ε of the official ``configs/training_guided.gin`` (ModelNet40); BalanceMM 0.001;
* ``rebalance_steps = 5``: Q, the official ``curation_windowsize`` (BalanceMM ``window_size`` 5);
* ``start_epoch = 1``: the official ``starting_epoch = 2`` counts epochs from 1, so the first epoch only
  measures speeds; BalanceMM starts at once (``start_epoch: 0``);
* ``end_epoch = None``: the official code re-balances until training ends;
* ``utilization_split = None``: harmonia's diagnostic, off by default: at every epoch end, log
  ``u(m | rest) = (A(all) - A(m replaced by φ̄^m)) / A(all)`` on that split (the paper's ``u(m1|m0)`` for
  M = 2), one extra pass of the encoders over it.

Distributed: the speeds come from the gradients after DistributedDataParallel has averaged them and from
the replicated weights, so they and the decisions are the same on every rank without any collective; the
feature means are a statistic over samples and are all-reduced (one collective of ``Σ_m d_m + 1`` numbers
per step). Logged per step: ``balance/greedy/speed/<m>`` (``ℓ^m``), ``balance/greedy/gap`` (d) and
``balance/greedy/rebalance/<m>`` (1 in a re-balancing step for m); per epoch with ``utilization_split``:
``balance/greedy/utilization/<m>``. All state is in buffers: a ``state_dict`` resumes exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harmonia.balance.agm import fused_head
from harmonia.balance.method import BalanceStep, BalancingMethod, SplitFeatures, in_epoch_window
from harmonia.distributed import all_reduce_sum
from harmonia.errors import ConfigError, InputError
from harmonia.settings import setting

FusedHead = Callable[[Mapping[str, Tensor]], Tensor]

#: rows of a split's features passed to the fusion head at once (the utilisation diagnostic)
EVAL_CHUNK = 4096


@dataclass
class GreedySettings:
    """Balanced multi-modal learning hyper-parameters (defaults: the official code; module docstring)."""

    alpha: float = setting(
        0.01,
        help="α: re-balance when the gap d of conditional learning speeds exceeds it (official ε 0.01; "
        "BalanceMM 0.001)",
        ge=0,
    )
    rebalance_steps: int = setting(
        5, help="Q: re-balancing steps taken each time d > α (official curation_windowsize 5)", ge=1
    )
    start_epoch: int = setting(
        1,
        help="first epoch that may re-balance; earlier ones only measure speeds (official: 1 warm-up epoch)",
        ge=0,
    )
    end_epoch: int | None = setting(None, help="no re-balancing from this epoch on (null: never stops)", ge=1)
    utilization_split: str | None = setting(
        None,
        help="log each modality's conditional utilisation rate on this split at every epoch end (e.g. val; "
        "one extra encoder pass over it; null: off)",
    )


def learning_speed(params: Iterable[Tensor]) -> Tensor:
    """``μ = Σ_p ‖∇p‖² / Σ_p ‖p‖²`` (float64, on the CPU) of a parameter group; a missing gradient counts
    as zero."""
    group = list(params)
    if not group:
        raise InputError("learning_speed: give at least one parameter")
    weight_sq = torch.stack([p.detach().double().pow(2).sum() for p in group]).sum()
    grads = [p.grad.detach().double().pow(2).sum() for p in group if p.grad is not None]
    grad_sq = torch.stack(grads).sum() if grads else torch.zeros_like(weight_sq)
    weight_sq, grad_sq = weight_sq.cpu(), grad_sq.cpu()
    if float(weight_sq) <= 0:
        raise InputError(
            "learning_speed: the parameters are all zero (‖θ‖ = 0), so their relative change is undefined; "
            "initialise the encoder's weights"
        )
    return grad_sq / weight_sq


def conditional_learning_speeds(cumulative: Tensor) -> Tensor:
    """``v[i, j] = v(m_j | m_i) = log10(S^j / S^i)`` from the summed learning speeds ``S`` ``[M]``."""
    log_s = cumulative.double().clamp_min(torch.finfo(torch.float64).tiny).log10()
    return log_s[None, :] - log_s[:, None]


def speed_gap(cumulative: Tensor) -> tuple[float, int]:
    """``(d, i)``: ``d = max_{i,j} [v(m_j|m_i) - v(m_i|m_j)]`` and the i of that pair, the modality the model
    learns least from (``argmin_m S^m``), which a re-balancing step accelerates."""
    if cumulative.numel() < 2:
        raise ConfigError(
            f"greedy compares modalities: give at least 2 learning speeds, got {cumulative.numel()}"
        )
    v = conditional_learning_speeds(cumulative)
    diff = v - v.T
    flat = int(diff.argmax())
    return float(diff.flatten()[flat]), flat // diff.shape[1]


def conditional_utilization_rate(joint_accuracy: float, reduced_accuracy: float) -> float:
    """``u(m1 | m0) = (A(m0, m1) - A(m0)) / A(m0, m1)``: the relative accuracy gain from adding m1, with
    ``joint_accuracy = A(m0, m1)`` and ``reduced_accuracy = A(m0)`` (m1's information averaged out)."""
    if not joint_accuracy > 0:
        raise InputError(
            f"conditional_utilization_rate: the joint accuracy must be > 0 (it divides), got {joint_accuracy}"
        )
    return (joint_accuracy - reduced_accuracy) / joint_accuracy


def impute(
    features: Mapping[str, Tensor], means: Mapping[str, Tensor], keep: Iterable[str]
) -> dict[str, Tensor]:
    """``features`` with every modality outside ``keep`` replaced by its mean ``[d_m]`` (broadcast over the
    batch, no gradient)."""
    kept = set(keep)
    out: dict[str, Tensor] = {}
    for m, f in features.items():
        if m in kept:
            out[m] = f
        else:
            out[m] = means[m].detach().to(device=f.device, dtype=f.dtype).expand(f.shape[0], -1)
    return out


class Greedy(BalancingMethod):
    """Re-balancing steps for the modality the model learns least from (module docstring).

    Args:
        encoders: modality name -> encoder module (its trainable parameters give the learning speed).
        fuse: ``features -> fused logits`` (:func:`~harmonia.balance.agm.fused_head`), run once more in a
            re-balancing step on the imputed features, and by the utilisation diagnostic.
        alpha, rebalance_steps, start_epoch, end_epoch, utilization_split: see :class:`GreedySettings`.

    Buffers: ``speed_sums`` ``[M]`` (``S^m``), ``feature_sums_<i>`` ``[d_i]`` and ``feature_count`` (the
    running feature means; sized at the first step, re-sized on load), ``remaining`` (re-balancing steps
    left) and ``target`` (their modality's index).
    """

    Settings: ClassVar[type[Any]] = GreedySettings
    speed_sums: Tensor
    feature_count: Tensor
    remaining: Tensor
    target: Tensor

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        fuse: FusedHead | None = None,
        alpha: float = 0.01,
        rebalance_steps: int = 5,
        start_epoch: int = 1,
        end_epoch: int | None = None,
        utilization_split: str | None = None,
    ) -> None:
        super().__init__()
        if len(encoders) < 2:
            raise ConfigError(
                f"greedy balances modalities (it compares their learning speeds): give at least 2 encoders, "
                f"got {list(encoders)}"
            )
        if alpha < 0:
            raise ConfigError(f"greedy alpha must be >= 0, got {alpha}")
        if rebalance_steps < 1:
            raise ConfigError(f"greedy rebalance_steps must be >= 1, got {rebalance_steps}")
        self.modalities: tuple[str, ...] = tuple(encoders)
        self.params = {m: [p for p in encoders[m].parameters() if p.requires_grad] for m in self.modalities}
        frozen = [m for m, ps in self.params.items() if not ps]
        if frozen:
            raise ConfigError(
                f"greedy measures how fast each encoder learns, but the encoder(s) of {frozen} have no "
                "trainable parameters; unfreeze them or leave greedy out"
            )
        self.fuse = fuse
        self.alpha, self.rebalance_steps = alpha, rebalance_steps
        self.start_epoch, self.end_epoch = start_epoch, end_epoch
        self.utilization_split = utilization_split
        self.register_buffer("speed_sums", torch.zeros(len(self.modalities), dtype=torch.float64))
        for i in range(len(self.modalities)):
            self.register_buffer(f"feature_sums_{i}", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("feature_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("remaining", torch.zeros((), dtype=torch.long))
        self.register_buffer("target", torch.full((), -1, dtype=torch.long))
        self._step_target: int | None = None  # this step's re-balanced modality (-1: a regular step)

    @classmethod
    def build(cls, model: nn.Module, settings: GreedySettings | None = None, seed: int = 0) -> Greedy:
        """Balanced multi-modal learning over ``model``'s encoders and fusion head."""
        s = settings or GreedySettings()
        try:
            fuse = fused_head(model)
        except ConfigError:
            raise ConfigError(
                "greedy's re-balancing steps run the fusion head on imputed features: "
                f"{type(model).__name__} has no fusion head (model.fusion) nor a fuse(features) method; "
                "add one"
            ) from None
        method = cls(
            dict(model.encoders),  # type: ignore[arg-type]
            fuse=fuse,
            alpha=s.alpha,
            rebalance_steps=s.rebalance_steps,
            start_epoch=s.start_epoch,
            end_epoch=s.end_epoch,
            utilization_split=s.utilization_split,
        )
        return method.to(next(model.parameters()).device)

    # ----------------------------------------------------------------------------------------------
    # state

    def feature_sums(self, i: int) -> Tensor:
        return getattr(self, f"feature_sums_{i}")  # type: ignore[no-any-return]

    def feature_means(self) -> dict[str, Tensor]:
        """``φ̄^m``: the mean features of every training sample seen so far, per modality."""
        if float(self.feature_count) <= 0:
            raise InputError(
                "greedy has seen no training features yet (transform_features runs before adjust_loss in "
                "every training step): run the hooks in the trainer's order"
            )
        return {m: self.feature_sums(i) / self.feature_count for i, m in enumerate(self.modalities)}

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        for name, buffer in list(self._buffers.items()):
            saved = state_dict.get(prefix + name)
            if buffer is not None and isinstance(saved, Tensor) and saved.shape != buffer.shape:
                self._buffers[name] = torch.empty(saved.shape, dtype=buffer.dtype, device=buffer.device)
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[arg-type]

    def is_active(self, epoch: int) -> bool:
        return in_epoch_window(epoch, self.start_epoch, self.end_epoch)

    # ----------------------------------------------------------------------------------------------
    # hooks

    @torch.no_grad()
    def transform_features(self, step: BalanceStep, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """Add the (global) batch's features to the running means; the features pass unchanged."""
        missing = [m for m in self.modalities if m not in features]
        if missing:
            raise InputError(f"greedy: the features lack modality(ies) {missing}; got {list(features)}")
        feats = [features[m].detach().double().flatten(1) for m in self.modalities]
        count = torch.tensor([float(feats[0].shape[0])], dtype=torch.float64, device=feats[0].device)
        flat = all_reduce_sum(torch.cat([f.sum(0) for f in feats] + [count]))  # one collective
        start = 0
        for i, f in enumerate(feats):
            size = f.shape[1]
            part = flat[start : start + size].to(self.speed_sums.device)
            sums = self.feature_sums(i)
            if sums.numel() not in (0, size):
                raise InputError(
                    f"greedy holds {sums.numel()} mean features for modality '{self.modalities[i]}' but the "
                    f"batch has {size}"
                )
            setattr(
                self, f"feature_sums_{i}", part.clone() if sums.numel() == 0 else sums + part
            )  # new tensors
            start += size
        self.feature_count = self.feature_count + flat[-1].to(self.feature_count.device)
        return features

    def adjust_loss(self, step: BalanceStep, output: Any, loss: Tensor) -> Tensor:
        """In a re-balancing step for m*: ``((M-1)·L + CE(f(φ^{m*}, φ̄^{-m*}), y)) / M``; else ``L``."""
        rebalancing = int(self.remaining) > 0 and self.is_active(step.epoch)
        self._step_target = int(self.target) if rebalancing else -1
        if not rebalancing:
            return loss
        if self.fuse is None:
            raise ConfigError(
                "greedy's re-balancing steps need the model's fusion head: build it with Greedy.build(model, "
                "settings) or pass fuse=model.fusion"
            )
        features = getattr(output, "features", None)
        if not isinstance(features, Mapping) or any(m not in features for m in self.modalities):
            raise InputError(
                "greedy needs the model output's per-modality features (output.features, as "
                "MultimodalClassifier returns them)"
            )
        kept = self.modalities[self._step_target]
        means = self.feature_means()
        logits = self.fuse(impute({m: features[m] for m in self.modalities}, means, [kept]))
        unimodal = F.cross_entropy(logits, step.labels)
        count = len(self.modalities)
        return ((count - 1) * loss + unimodal) / count

    def after_backward(self, step: BalanceStep, output: Any) -> None:
        """A regular step adds its learning speeds and decides; a re-balancing step counts down."""
        if self._step_target is None:
            raise ConfigError("greedy.after_backward before adjust_loss: the step's kind is unknown")
        target, self._step_target = self._step_target, None
        if target >= 0:
            self.remaining = self.remaining - 1
            gap, _ = speed_gap(self.speed_sums)
        else:
            speeds = torch.stack([learning_speed(self.params[m]) for m in self.modalities])
            self.speed_sums = self.speed_sums + speeds.to(self.speed_sums.device)
            gap, slowest = speed_gap(self.speed_sums)
            if self.is_active(step.epoch) and gap > self.alpha:
                self.remaining = torch.full_like(self.remaining, self.rebalance_steps)
                self.target = torch.full_like(self.target, slowest)
            else:
                self.remaining = torch.zeros_like(self.remaining)
        log_s = self.speed_sums.clamp_min(torch.finfo(torch.float64).tiny).log10()
        step.metrics["balance/greedy/gap"] = gap
        for i, m in enumerate(self.modalities):
            step.metrics[f"balance/greedy/speed/{m}"] = float(log_s[i])
            step.metrics[f"balance/greedy/rebalance/{m}"] = 1.0 if target == i else 0.0

    # ----------------------------------------------------------------------------------------------
    # diagnostic

    @torch.no_grad()
    def utilization(self, features: Mapping[str, Tensor], labels: Tensor) -> dict[str, float]:
        """``u(m | rest) = (A(all) - A(m replaced by φ̄^m)) / A(all)`` per modality, with the fusion head in
        eval mode over ``features`` ``{m: [N, d_m]}`` and ``labels`` ``[N]`` (empty when ``A(all) = 0``)."""
        if self.fuse is None:
            raise ConfigError("greedy's utilisation diagnostic needs the model's fusion head (Greedy.build)")
        means = self.feature_means()
        owner = getattr(self.fuse, "__self__", None)
        head = owner if isinstance(owner, nn.Module) else None
        was_training = head.training if head is not None else False
        device = self.speed_sums.device
        correct = torch.zeros(len(self.modalities) + 1, dtype=torch.float64)
        if head is not None:
            head.eval()
        try:
            for start in range(0, labels.shape[0], EVAL_CHUNK):
                rows = {m: features[m][start : start + EVAL_CHUNK].to(device) for m in self.modalities}
                y = labels[start : start + EVAL_CHUNK].to(device)
                variants = [rows] + [
                    impute(rows, means, [k for k in self.modalities if k != m]) for m in self.modalities
                ]
                for j, feats in enumerate(variants):
                    correct[j] += float((self.fuse(feats).argmax(1) == y).sum())
        finally:
            if head is not None:
                head.train(was_training)
        accuracy = correct / max(labels.shape[0], 1)
        joint = float(accuracy[0])
        if not joint > 0:  # u is undefined: nothing to log
            return {}
        return {
            m: conditional_utilization_rate(joint, float(accuracy[i + 1]))
            for i, m in enumerate(self.modalities)
        }

    def on_epoch_end(self, epoch: int, features: SplitFeatures, metrics: dict[str, float]) -> None:
        """With ``utilization_split``: log ``balance/greedy/utilization/<m>`` on that split."""
        if self.utilization_split is None or float(self.feature_count) <= 0:
            return
        feats, labels = features(self.utilization_split)
        for m, u in self.utilization(feats, labels).items():
            metrics[f"balance/greedy/utilization/{m}"] = u

    def extra_repr(self) -> str:
        return (
            f"modalities={list(self.modalities)}, alpha={self.alpha}, "
            f"rebalance_steps={self.rebalance_steps}, start_epoch={self.start_epoch}, "
            f"end_epoch={self.end_epoch}"
        )
