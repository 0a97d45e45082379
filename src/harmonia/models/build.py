"""Build the standard multimodal classifier from plain arguments."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from harmonia.models.classifier import MultimodalClassifier
from harmonia.models.encoders import ConvEncoder, EncoderKind, ResNet18Encoder
from harmonia.models.fusion import FusionKind, build_fusion


def build_classifier(
    modalities: Sequence[str],
    input_channels: Mapping[str, int],
    num_classes: int,
    *,
    encoder: EncoderKind | str = EncoderKind.CONV,
    feature_dim: int = 64,
    encoder_widths: Sequence[int] = (16, 32, 64),
    fusion: FusionKind | str = FusionKind.CONCAT,
    hidden_dim: int = 128,
) -> MultimodalClassifier:
    """One encoder per modality (in ``modalities`` order: ``conv`` or ``resnet18``, each with
    ``input_channels[m]`` input channels and ``feature_dim`` outputs) and a ``fusion`` head."""
    encoders: dict[str, nn.Module] = {}
    for m in modalities:
        if EncoderKind(encoder) is EncoderKind.CONV:
            encoders[m] = ConvEncoder(input_channels[m], widths=list(encoder_widths), feature_dim=feature_dim)
        else:
            encoders[m] = ResNet18Encoder(input_channels[m], feature_dim=feature_dim)
    head = build_fusion(
        fusion, list(modalities), {m: feature_dim for m in modalities}, num_classes, hidden_dim=hidden_dim
    )
    return MultimodalClassifier(encoders, head)
