"""Models: per-modality encoders, fusion heads and the multimodal classifier that joins them."""

from __future__ import annotations

from harmonia.models.build import build_classifier
from harmonia.models.classifier import MultimodalClassifier, MultimodalOutput
from harmonia.models.encoders import (
    ENCODER_KINDS,
    BasicBlock,
    ConvEncoder,
    ModalityEncoder,
    ResNet18Encoder,
    build_encoder,
)
from harmonia.models.fusion import (
    ConcatFusion,
    CosineFusion,
    FiLMFusion,
    FusionHead,
    FusionKind,
    GatedFusion,
    SumFusion,
    build_fusion,
)

__all__ = [
    "ENCODER_KINDS",
    "BasicBlock",
    "ConcatFusion",
    "ConvEncoder",
    "CosineFusion",
    "FiLMFusion",
    "FusionHead",
    "FusionKind",
    "GatedFusion",
    "ModalityEncoder",
    "MultimodalClassifier",
    "MultimodalOutput",
    "ResNet18Encoder",
    "SumFusion",
    "build_classifier",
    "build_encoder",
    "build_fusion",
]
