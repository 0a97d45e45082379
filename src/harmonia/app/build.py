"""Build the model, optimizer and schedule an experiment config describes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from harmonia.app.config import (
    BalanceConfig,
    BalanceMethod,
    EncoderKind,
    ModelConfig,
    OptimConfig,
    OptimizerKind,
    ScheduleKind,
)
from harmonia.app.train.balance import BalanceCallback
from harmonia.balance import OGM, OPM, conv_weights_only
from harmonia.errors import ConfigError
from harmonia.models import ConvEncoder, MultimodalClassifier, ResNet18Encoder, build_fusion


@contextlib.contextmanager
def model_allocation(sizes: str) -> Iterator[None]:
    """Turn an out-of-memory error while a model is built into a :class:`ConfigError` naming the sizes."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        if not isinstance(exc, MemoryError) and "alloc" not in str(exc).lower():
            raise
        raise ConfigError(
            f"the model does not fit in memory ({str(exc).splitlines()[0][:200]}); lower its sizes ({sizes})"
        ) from None


def build_model(
    cfg: ModelConfig, modalities: list[str], input_channels: Mapping[str, int], num_classes: int
) -> MultimodalClassifier:
    """One encoder per modality (in ``modalities`` order) and the configured fusion head."""
    with model_allocation("model.feature_dim, model.hidden_dim, model.encoder_widths"):
        return _build_model(cfg, modalities, input_channels, num_classes)


def _build_model(
    cfg: ModelConfig, modalities: list[str], input_channels: Mapping[str, int], num_classes: int
) -> MultimodalClassifier:
    encoders: dict[str, nn.Module] = {}
    for m in modalities:
        if cfg.encoder is EncoderKind.CONV:
            encoders[m] = ConvEncoder(
                input_channels[m], widths=cfg.encoder_widths, feature_dim=cfg.feature_dim
            )
        else:
            encoders[m] = ResNet18Encoder(input_channels[m], feature_dim=cfg.feature_dim)
    fusion = build_fusion(
        cfg.fusion,
        modalities,
        {m: cfg.feature_dim for m in modalities},
        num_classes,
        hidden_dim=cfg.hidden_dim,
    )
    return MultimodalClassifier(encoders, fusion)


def build_balance_callback(
    cfg: BalanceConfig, model: MultimodalClassifier, seed: int, device: torch.device
) -> BalanceCallback | None:
    """The OGM / OPM callback ``balance`` asks for (``None`` for ``method: none``)."""
    if cfg.method is BalanceMethod.NONE:
        return None
    ogm = opm = None
    if cfg.method in (BalanceMethod.OGM, BalanceMethod.OPM_OGM):
        ogm = OGM(
            dict(model.encoders),
            alpha=cfg.alpha,
            form=cfg.form,
            ge=cfg.ge,
            start_epoch=cfg.start_epoch,
            end_epoch=cfg.end_epoch,
            warmup_epochs=cfg.warmup_epochs,
            param_filter=conv_weights_only if cfg.conv_only else None,
            seed=seed,
        )
    if cfg.method in (BalanceMethod.OPM, BalanceMethod.OPM_OGM):
        opm = OPM(
            model.modalities, q_base=cfg.q_base, lam=cfg.lam, p_exe=cfg.p_exe, rescale=cfg.rescale, seed=seed
        )
        opm.to(device)
    return BalanceCallback(ogm=ogm, opm=opm)


def build_optimizer(cfg: OptimConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
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
