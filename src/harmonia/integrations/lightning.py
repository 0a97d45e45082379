"""PyTorch Lightning integration: the balancing methods as one callback, and the gradient harmonizer under
manual optimisation (``pip install 'harmonia[lightning]'``).

:class:`Balancing` runs a list of :class:`~harmonia.balance.BalancingMethod` objects (built with
``Method.build(model, settings, seed)``, as for a plain loop) at the points harmonia's own trainer runs them,
in the same order, with one :class:`~harmonia.balance.BalanceStep` per step (so that combined methods share
one discrepancy ratio ρ, computed once):

* ``before_forward(step)``: ``Callback.on_train_batch_start``;
* ``transform_features(step, features)``: inside the model's forward, which ``training_step`` calls as
  ``model(inputs, transform=balancing.transform)``;
* ``adjust_loss(step, output, loss)``: in ``training_step``, ``loss = balancing.adjust_loss(output, loss)``;
* ``after_backward(step, output)``: ``Callback.on_before_optimizer_step`` — after backward (with the
  gradients unscaled under ``16-mixed``), before gradient clipping and the optimizer step;
* ``on_epoch_end(epoch, features, metrics)``: ``Callback.on_train_epoch_end`` — after the epoch's
  validation, before ``ModelCheckpoint`` saves;
* the methods' state: ``Callback.state_dict``, in every Lightning checkpoint, restored by
  ``trainer.fit(ckpt_path=...)``;
* their statistics (``balance/...``): ``LightningModule.log``, every step (epoch-end values every epoch).

Lightning has no hook that may replace the loss, hence the explicit ``adjust_loss`` call in
``training_step`` (it also hands the step's output to the methods that act after backward). The callback
raises when a method needs a call the module did not make.

:class:`Harmonizing` is the recipe for :class:`~harmonia.gradients.harmonizer.GradientHarmonizer` under
``automatic_optimization = False``: ``self.harmonizing.backward(self, losses.per_sample, anchor)`` takes the
place of ``self.manual_backward(loss)``, going through Lightning's own backward path (DDP's reducer
preparation, the backward hooks), with the harmonizer's backward where ``loss.backward()`` would run. Under
DDP no ``no_sync`` is needed: the harmonizer takes its per-objective gradients with ``torch.autograd.grad``
(which does not trigger DDP's all-reduce) and ends with one ordinary backward, whose gradients DDP averages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from harmonia.balance.method import BalanceStep, BalancingMethod, SplitFeatures
from harmonia.errors import CheckpointError, ConfigError, InputError
from harmonia.extras import require
from harmonia.gradients.harmonizer import GradientHarmonizer, HarmonizeStats

L: Any = require("lightning", "harmonia.integrations.lightning")

#: ``unpack(batch) -> (inputs {modality: tensor}, labels)``
Unpack = Callable[[Any], tuple[Mapping[str, Tensor], Tensor]]

__all__ = ["Balancing", "Harmonizing", "encoder_features", "harmonia_batch"]


def harmonia_batch(batch: Mapping[str, Any]) -> tuple[Mapping[str, Tensor], Tensor]:
    """Inputs and labels of a harmonia batch ``{"inputs": {modality: tensor}, "labels": tensor, ...}``."""
    return batch["inputs"], batch["labels"]


@torch.no_grad()
def encoder_features(
    model: nn.Module, batches: Iterable[Any], unpack: Unpack = harmonia_batch
) -> tuple[dict[str, Tensor], Tensor]:
    """Every encoder's features over ``batches`` (a whole split, in a fixed order), in eval mode, on the CPU,
    and the labels: what :class:`Balancing` gives the methods that diagnose the encoders at the end of an
    epoch (``model.encoders[m]`` maps modality m's input to its features)."""
    was_training = model.training
    model.eval()
    encoders: Any = model.encoders
    device = next(model.parameters()).device
    features: dict[str, list[Tensor]] = {}
    labels: list[Tensor] = []
    try:
        for batch in batches:
            inputs, y = unpack(batch)
            for m, x in inputs.items():
                features.setdefault(m, []).append(encoders[m](x.to(device)).float().cpu())
            labels.append(y.cpu())
    finally:
        model.train(was_training)
    return {m: torch.cat(v) for m, v in features.items()}, torch.cat(labels)


def _overrides(method: BalancingMethod, hook: str) -> bool:
    return getattr(type(method), hook) is not getattr(BalancingMethod, hook)


class Balancing(L.Callback):
    """Balancing methods as a Lightning callback (hook mapping: the module docstring).

    In the LightningModule (four lines)::

        self.balancing = Balancing([OPM.build(self.model), OGMGE.build(self.model)])  # __init__
        return [self.balancing]                                                         # configure_callbacks
        output = self.model(batch["inputs"], transform=self.balancing.transform)       # training_step
        loss = self.balancing.adjust_loss(output, F.cross_entropy(output.logits, y))   # training_step

    Args:
        methods: the methods, run in this order at every hook (build them on the model the module trains).
        names: their names in checkpoints and in the callback's ``state_key`` (default: class names).
        features: ``features(split) -> ({modality: [N, d]}, [N] labels)`` for methods that diagnose the
            encoders over a whole split at the end of an epoch (G-Blending, Greedy, Relearn); default: the
            LightningModule's ``encoder_features(split)`` method, when it has one (:func:`encoder_features`
            computes it).
        unpack: ``batch -> (inputs, labels)`` (default: harmonia's batch dict).
        log: log the methods' statistics through ``LightningModule.log``.
    """

    def __init__(
        self,
        methods: Sequence[BalancingMethod],
        names: Sequence[str] | None = None,
        *,
        features: SplitFeatures | None = None,
        unpack: Unpack = harmonia_batch,
        log: bool = True,
    ) -> None:
        if not methods:
            raise InputError("Balancing needs at least one balancing method")
        bad = [type(m).__name__ for m in methods if not isinstance(m, BalancingMethod)]
        if bad:
            raise InputError(
                f"Balancing takes harmonia.balance.BalancingMethod objects, got {bad}; build them with "
                "e.g. OGM.build(model, settings, seed)"
            )
        self.methods = list(methods)
        self.names = list(names) if names is not None else [type(m).__name__.lower() for m in methods]
        if len(self.names) != len(self.methods):
            raise InputError(f"Balancing: {len(self.methods)} methods but {len(self.names)} names")
        self.features, self.unpack, self._log = features, unpack, log
        self._step: BalanceStep | None = None
        self._output: Any = None
        self._transformed = self._adjusted = self._modulated = False

    @property
    def state_key(self) -> str:
        return str(self._generate_state_key(methods=self.names))

    # ----------------------------------------------------------------------------------------------
    # what the LightningModule calls

    def transform(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """The methods' feature transform (OPM's dropping, ...): pass it as the model's
        ``transform=`` in ``training_step``; outside a training step it returns ``features`` as they are."""
        if self._step is None:
            return features
        self._transformed = True
        for method in self.methods:
            features = method.transform_features(self._step, features)
        return features

    def adjust_loss(self, output: Any, loss: Tensor) -> Tensor:
        """The loss to minimise (objective-level methods add their terms); hands the step's ``output``
        (``logits``, ``unimodal_logits``, ``features``) to the methods. Call it in every
        ``training_step``; outside a training step it returns ``loss`` as it is."""
        if self._step is None:
            return loss
        needs_transform = [n for n, m in self._named() if _overrides(m, "transform_features")]
        if needs_transform and not self._transformed:
            raise InputError(
                f"{', '.join(needs_transform)} edit(s) the features between the encoders and the fusion "
                "head, but the model's forward did not run Balancing.transform: call "
                "self.model(inputs, transform=self.balancing.transform) in training_step"
            )
        self._output, self._adjusted = output, True
        for method in self.methods:
            loss = method.adjust_loss(self._step, output, loss)
        return loss

    # ----------------------------------------------------------------------------------------------
    # Lightning hooks

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if trainer.accumulate_grad_batches != 1:
            raise ConfigError(
                f"Balancing: accumulate_grad_batches={trainer.accumulate_grad_batches}; the balancing "
                "methods act on each step's gradients and statistics, so accumulate gradients with a "
                "larger batch instead (accumulate_grad_batches=1)"
            )

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # methods live on the model's device, as Method.build(model) puts them (the model has moved now)
        for method in self.methods:
            method.to(pl_module.device)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        inputs, labels = self.unpack(batch)
        self._step = BalanceStep(labels, int(trainer.current_epoch), {}, inputs=inputs)
        self._output = None
        self._transformed = self._adjusted = self._modulated = False
        for method in self.methods:
            method.before_forward(self._step)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Tensor) -> None:
        if self._step is not None and not self._adjusted:
            raise InputError(
                "Balancing: training_step did not call self.balancing.adjust_loss(output, loss); call it on "
                "the loss before returning it (methods add loss terms there and read the step's output)"
            )

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self._step is None or self._modulated:
            return
        self._modulated = True
        for method in self.methods:
            method.after_backward(self._step, self._output)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step, self._step, self._output = self._step, None, None
        if step is not None and self._log and step.metrics:
            pl_module.log_dict(
                step.metrics, on_step=True, on_epoch=False, batch_size=int(step.labels.shape[0])
            )

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        extract = self.features or getattr(pl_module, "encoder_features", None)

        def features(split: str) -> tuple[dict[str, Tensor], Tensor]:
            if extract is None:
                raise InputError(
                    f"a balancing method needs the encoders' features over the {split!r} split: give the "
                    f"LightningModule an encoder_features(split) method (harmonia.integrations.lightning."
                    f"encoder_features computes it) or pass Balancing(..., features=...)"
                )
            return extract(split)

        metrics: dict[str, float] = {}
        for method in self.methods:
            method.on_epoch_end(int(trainer.current_epoch), features, metrics)
        if self._log and metrics:
            pl_module.log_dict(metrics, on_step=False, on_epoch=True)

    # ----------------------------------------------------------------------------------------------
    # checkpoints

    def _named(self) -> list[tuple[str, BalancingMethod]]:
        return list(zip(self.names, self.methods, strict=True))

    def _keys(self) -> list[str]:
        return [f"{i}:{name}" for i, name in enumerate(self.names)]

    def state_dict(self) -> dict[str, Any]:
        return {key: dict(m.state_dict()) for key, m in zip(self._keys(), self.methods, strict=True)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != set(self._keys()):
            raise CheckpointError(
                f"the checkpoint holds the state of balancing methods {sorted(state_dict)}, this run has "
                f"{self._keys()}; resume with the same methods in the same order"
            )
        for key, method in zip(self._keys(), self.methods, strict=True):
            method.load_state_dict(state_dict[key])


class Harmonizing(L.Callback):
    """:class:`~harmonia.gradients.harmonizer.GradientHarmonizer` under Lightning's manual optimisation:
    its backward in place of ``manual_backward``, its state in every checkpoint, its statistics logged.

    In the LightningModule (``automatic_optimization = False``; return the callback from
    ``configure_callbacks``)::

        opt.zero_grad()
        self.harmonizing.backward(self, losses.per_sample, anchor=output.features["video"])
        opt.step()

    Args:
        harmonizer: the harmonizer (its mode, rule and curriculum).
        weights: each objective's weight ``{name: w}`` (default 1).
        log: log the harmonizer's statistics (``harmonize/...``) every step.
    """

    def __init__(
        self, harmonizer: GradientHarmonizer, weights: Mapping[str, float] | None = None, *, log: bool = True
    ) -> None:
        self.harmonizer, self.weights, self._log = harmonizer, dict(weights or {}), log

    def backward(
        self,
        module: Any,
        losses: Mapping[str, Tensor],
        anchor: Tensor | None = None,
        anchor_input: Tensor | None = None,
    ) -> HarmonizeStats:
        """Backpropagate ``Σ_k w_k mean_i losses[k]_i`` through the harmonizer, along Lightning's
        ``manual_backward`` path (strategy and precision hooks, DDP's reducer). ``losses`` are the two
        per-sample objectives [B]; ``anchor`` the tensor both flow through (feature and parameter modes);
        ``anchor_input`` the anchor module's input (parameter mode)."""
        if module.automatic_optimization:
            raise ConfigError(
                "Harmonizing.backward replaces manual_backward: set self.automatic_optimization = False in "
                "the LightningModule's __init__ and step the optimizer yourself"
            )
        if getattr(module.trainer.precision_plugin, "scaler", None) is not None:
            raise ConfigError(
                f"Harmonizing: precision={module.trainer.precision!r} scales the loss with a GradScaler, "
                "which the harmonizer's own backward would bypass; use precision '32-true' or 'bf16-mixed'"
            )
        total = sum(self.weights.get(k, 1.0) * loss.mean() for k, loss in losses.items())
        done: list[HarmonizeStats] = []

        def backward(loss: Tensor, *args: Any, **kwargs: Any) -> None:  # LightningModule.backward, this call
            done.append(self.harmonizer.backward(losses, anchor, self.weights, anchor_input))

        module.backward = backward
        try:
            module.manual_backward(total)
        finally:
            del module.backward
        stats = done[0]
        if self._log:
            batch = int(next(iter(losses.values())).shape[0])
            module.log_dict(stats.metrics(), on_step=True, on_epoch=False, batch_size=batch)
        return stats

    @property
    def state_key(self) -> str:
        return str(self._generate_state_key(mode=self.harmonizer.mode.value))

    def state_dict(self) -> dict[str, Any]:
        return self.harmonizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.harmonizer.load_state_dict(state_dict)
