"""The contract of a modality-balancing method: hook points, a shared per-step statistic, own settings.

A balancing method is one ``nn.Module`` subclass of :class:`BalancingMethod`. It is built from the model it
balances and its own settings dataclass (fields from :func:`harmonia.settings.setting`, so that the
application validates a config entry ``{name: ogm, alpha: 0.8}`` against it), keeps whatever must survive
a resume in buffers or ``get_extra_state``, and overrides only the hooks it needs. One training step
calls, in this order::

    step = BalanceStep(labels, epoch, inputs=inputs)
    method.before_forward(step)                        # every method
    features -> method.transform_features(step, f)     # between the encoders and the fusion head
    loss = method.adjust_loss(step, output, loss)      # objective-level methods add their terms
    loss.backward()
    method.after_backward(step, output)                # gradients are in .grad
    optimizer.step()

and once per epoch, after the epoch's evaluation and before its checkpoint,
``method.on_epoch_end(epoch, features, metrics)``, where ``features(split)`` gives every encoder's
eval-mode features over a whole split (methods that diagnose the encoders on the data, e.g. Relearn).

Methods that need the discrepancy ratio ρ (OGM, OPM, ...) ask :meth:`BalanceStep.ratios` for it: the first
call computes it (one all-reduce under ``torch.distributed``), every later call in the step gets the same
tensors, so combined methods see one ρ, computed once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from harmonia.balance.scores import discrepancy_ratio

SplitFeatures = Callable[[str], tuple[dict[str, Tensor], Tensor]]
"""``features(split) -> ({modality: [N, d] features}, [N] labels)``: each encoder's features over a
whole split of the data (eval mode, no augmentation, a fixed order; the same on every rank)."""


@dataclass
class BalanceStep:
    """One training step as balancing methods see it.

    Attributes:
        labels: class indices of the (local) batch.
        epoch: the epoch being trained, counted from 0.
        metrics: per-step values to log (``balance/<statistic>/<modality>``); the trainer logs them.
        inputs: the batch's inputs ``{modality: tensor}`` (for methods that run extra forward passes).
        loss_scale: the factor S a float16 gradient scaler multiplies the loss by before the backward pass
            (1 without one). A method that takes gradients of its own (``torch.autograd.grad``) scales its
            loss by S and divides the result by S, so that small gradients survive float16 as the
            trainer's do; the gradients in ``.grad`` are already unscaled when ``after_backward`` runs.
    """

    labels: Tensor
    epoch: int
    metrics: dict[str, float] = field(default_factory=dict)
    inputs: Mapping[str, Tensor] | None = None
    loss_scale: float = 1.0
    _ratios: dict[str, Tensor] | None = None

    @property
    def has_ratios(self) -> bool:
        return self._ratios is not None

    def ratios(self, unimodal_logits: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The step's discrepancy ratio ρ^m (TPAMI 2025 Eq. 7) of the global batch.

        Computed from ``unimodal_logits`` at the first call of the step and logged as
        ``balance/rho/<m>``; later calls return the same values whatever logits they pass.
        """
        if self._ratios is None:
            self._ratios = discrepancy_ratio(unimodal_logits, self.labels)
            self.metrics.update({f"balance/rho/{m}": float(r) for m, r in self._ratios.items()})
        return self._ratios


class BalancingMethod(nn.Module):
    """Base class of balancing methods; each hook's default does nothing.

    Subclasses set ``Settings`` (a dataclass of their hyper-parameters, defaults from the paper) and
    take ``(model, settings, seed=...)`` in ``__init__``.
    """

    Settings: ClassVar[type[Any]]

    @classmethod
    def leaves_parameters_unused(cls, settings: Any) -> bool:
        """Whether a step with ``settings`` may leave some model parameters without gradient (e.g. a
        method that trains one modality at a time): DistributedDataParallel must then look for them."""
        return False

    @classmethod
    def build(cls, model: nn.Module, settings: Any = None, seed: int = 0) -> BalancingMethod:
        """The method for ``model`` (its encoders, modalities, heads) with ``settings`` (an instance of
        :attr:`Settings`, ``None``: the defaults); ``seed`` seeds any randomness it has."""
        raise NotImplementedError(f"{cls.__name__} must define build(model, settings, seed)")

    def before_forward(self, step: BalanceStep) -> None:
        """Before the encoders run."""

    def transform_features(self, step: BalanceStep, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """Between the encoders and the fusion head; return the (possibly edited) features."""
        return features

    def adjust_loss(self, step: BalanceStep, output: Any, loss: Tensor) -> Tensor:
        """Before ``loss.backward()``: return the loss to minimise (objective-level methods add their
        terms; ``output`` is the model's output for the batch)."""
        return loss

    def after_backward(self, step: BalanceStep, output: Any) -> None:
        """After ``loss.backward()``; ``output`` has ``logits`` and ``unimodal_logits`` (a
        :class:`~harmonia.models.MultimodalOutput`)."""

    def on_epoch_end(self, epoch: int, features: SplitFeatures, metrics: dict[str, float]) -> None:
        """After training and evaluating ``epoch`` (counted from 0), before its checkpoint. ``features``
        gives the encoders' features over a split (``"train"``, ``"val"``, ...); values put in ``metrics``
        are logged with the epoch's."""


def in_epoch_window(epoch: int, start: int, end: int | None) -> bool:
    """Whether ``epoch`` lies in the window ``start <= epoch < end`` (``end`` None: no end)."""
    return epoch >= start and (end is None or epoch < end)


def step_generator(seed: int, step: int | Tensor, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of a method's random draws at ``step``, seeded with (seed, step): every data-parallel
    rank draws the same numbers, and a resumed run continues the same sequence."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + int(step))


def unimodal_heads(model: nn.Module) -> Any:
    """The function ``features -> unimodal logits`` of a model: its ``unimodal_logits`` method, or its
    fusion head's (:class:`~harmonia.models.MultimodalClassifier`)."""
    for owner in (model, getattr(model, "fusion", None)):
        fn = getattr(owner, "unimodal_logits", None)
        if callable(fn):
            return fn
    raise TypeError(
        f"{type(model).__name__} has no unimodal_logits(features) method (nor a fusion head with one); "
        "a balancing method that works on features needs it: add it to the model"
    )
