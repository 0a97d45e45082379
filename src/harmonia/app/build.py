"""Build the model, balancing methods, optimizer and schedule an experiment config describes (through the
registries of :mod:`harmonia.app.registry`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from harmonia.app.callbacks.balance import BalancingCallback
from harmonia.app.config import ModelConfig, OptimConfig, OptimizerKind, ScheduleKind
from harmonia.app.memory import model_allocation
from harmonia.app.registry import BALANCING, MODELS
from harmonia.errors import ConfigError


def build_model(
    cfg: ModelConfig, modalities: list[str], input_channels: Mapping[str, int], num_classes: int
) -> nn.Module:
    """The classifier ``model`` names (``classifier``: one encoder per modality and the fusion head)."""
    with model_allocation("model.feature_dim, model.hidden_dim, model.encoder_widths"):
        return MODELS.get(getattr(cfg, "name", "classifier"))(cfg, modalities, input_channels, num_classes)


def build_balancing(
    entries: Sequence[tuple[str, Any]], model: nn.Module, seed: int
) -> BalancingCallback | None:
    """The balancing methods of ``balance`` (``(name, settings)`` pairs, in order) in one callback
    (``None`` when the list is empty)."""
    if not entries:
        return None
    methods = [BALANCING.get(name).build(model, settings, seed=seed) for name, settings in entries]
    return BalancingCallback(methods, [name for name, _ in entries])


def parameter_groups(model: nn.Module) -> list[nn.Parameter] | list[dict[str, Any]]:
    """The model's parameters, as one list; or, when the model names parameters to keep out of weight
    decay (a ``no_weight_decay()`` method, timm's convention: the learnable logit scale), two groups,
    the second with ``weight_decay`` 0."""
    no_decay = getattr(model, "no_weight_decay", None)
    names: set[str] = set(no_decay()) if callable(no_decay) else set()
    if not names:
        return list(model.parameters())
    named = list(model.named_parameters())
    groups: list[dict[str, Any]] = [
        {"params": [p for n, p in named if n not in names]},
        {"params": [p for n, p in named if n in names], "weight_decay": 0.0},
    ]
    return groups


def build_optimizer(
    cfg: OptimConfig, params: list[nn.Parameter] | list[dict[str, Any]]
) -> torch.optim.Optimizer:
    if cfg.name is OptimizerKind.SGD:
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name is OptimizerKind.ADAM:
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name is OptimizerKind.ADAMW:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ConfigError(f"optim.name: unknown optimizer {cfg.name!r}")


def build_scheduler(
    cfg: OptimConfig, optimizer: torch.optim.Optimizer, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-epoch schedule: constant, step decay (OGM-GE's StepLR(70, 0.1) style) or cosine to zero."""
    if cfg.schedule is ScheduleKind.STEP:
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.schedule is ScheduleKind.COSINE:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if cfg.schedule is ScheduleKind.NONE:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    raise ConfigError(f"optim.schedule: unknown schedule {cfg.schedule!r}")
