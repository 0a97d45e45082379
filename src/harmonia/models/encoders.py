"""Per-modality encoders: a small conv net for tiny inputs and a ResNet-18 as in the OGM/OPM papers.

Every encoder maps ``[B, C, H, W]`` to ``[B, feature_dim]``. A frame sequence ``[B, T, C, H, W]``
is encoded frame by frame (``T`` folded into the batch) and the features are averaged over ``T``:

    phi(x) = (1/T) sum_t phi(x_t)

This is the temporal average pooling of the OGM-GE / OPM code bases, which pool the
``[B, C, T, H, W]`` feature map with ``adaptive_avg_pool3d``; since global average pooling and the
final linear layer are both affine, averaging per-frame features is the same operation.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from harmonia.errors import ConfigError, InputError

ENCODER_KINDS = ("conv", "resnet18")


class EncoderKind(str, enum.Enum):
    """Encoder architecture of every modality of a :class:`~harmonia.models.MultimodalClassifier`."""

    CONV = "conv"
    RESNET18 = "resnet18"


class ModalityEncoder(nn.Module):
    """Base class: input validation and temporal folding shared by all encoders.

    Subclasses implement :meth:`encode_frames`, mapping ``[N, C, H, W]`` to ``[N, feature_dim]``.
    """

    in_channels: int
    feature_dim: int

    def __init__(self, in_channels: int, feature_dim: int) -> None:
        super().__init__()
        if in_channels < 1:
            raise ConfigError(f"encoder in_channels must be >= 1, got {in_channels}; use 1 for spectrograms")
        if feature_dim < 1:
            raise ConfigError(f"encoder feature_dim must be >= 1, got {feature_dim}; e.g. use 128")
        self.in_channels = in_channels
        self.feature_dim = feature_dim

    def encode_frames(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def check_input(self, x: Tensor, modality: str = "input") -> None:
        """Raise :class:`InputError` unless ``x`` is a float ``[B, C, H, W]`` or ``[B, T, C, H, W]``."""
        c = self.in_channels
        expected = f"[B, {c}, H, W] or [B, T, {c}, H, W]"
        shape = list(x.shape)
        if not x.is_floating_point():
            raise InputError(
                f"modality '{modality}': expected a floating-point tensor, got dtype {x.dtype}; "
                "convert it with x.float() (scale uint8 images to [0, 1] first)"
            )
        if x.ndim not in (4, 5):
            raise InputError(
                f"modality '{modality}': expected a float tensor of shape {expected}, got shape {shape}; "
                + _rank_fix(x.ndim, c)
            )
        channels = x.shape[1] if x.ndim == 4 else x.shape[2]
        if channels != c:
            raise InputError(
                f"modality '{modality}': expected a float tensor of shape {expected} ({c} channel(s)), "
                f"got shape {shape} with {channels} channel(s); " + _channel_fix(x, c)
            )
        if x.numel() == 0:
            raise InputError(
                f"modality '{modality}': got an empty tensor of shape {shape}; "
                "every dimension (batch, frames, height, width) must be at least 1"
            )

    def forward(self, x: Tensor) -> Tensor:
        """Encode ``[B, C, H, W]`` or ``[B, T, C, H, W]`` into ``[B, feature_dim]``."""
        if x.ndim == 5:
            b, t = x.shape[:2]
            frames = self.encode_frames(x.reshape(b * t, *x.shape[2:]))
            return frames.reshape(b, t, -1).mean(dim=1)
        return self.encode_frames(x)


def _rank_fix(ndim: int, channels: int) -> str:
    if ndim == 3 and channels == 1:
        return "add a channel dimension with x.unsqueeze(1)"
    if ndim == 3:
        return "add a batch dimension with x.unsqueeze(0) if this is a single example"
    if ndim == 2:
        return "add batch and channel dimensions, e.g. x.unsqueeze(0).unsqueeze(0) for a single example"
    return "reshape it to [batch, channels, height, width] (or [batch, frames, channels, height, width])"


def _channel_fix(x: Tensor, channels: int) -> str:
    if x.ndim == 4 and x.shape[-1] == channels:
        return "the input looks channels-last: move channels first with x.permute(0, 3, 1, 2)"
    if x.ndim == 5 and x.shape[-1] == channels:
        return "the input looks channels-last: move channels first with x.permute(0, 1, 4, 2, 3)"
    got = x.shape[1] if x.ndim == 4 else x.shape[2]
    return f"build the encoder with in_channels={got} or convert the input to {channels} channel(s)"


class _HalvingMaxPool(nn.Module):
    """2x2 max pooling that leaves a spatial dim of size 1 alone and rounds odd sizes up."""

    def forward(self, x: Tensor) -> Tensor:
        kh, kw = min(2, x.shape[-2]), min(2, x.shape[-1])
        if kh == 1 and kw == 1:
            return x
        return F.max_pool2d(x, kernel_size=(kh, kw), stride=(kh, kw), ceil_mode=True)


def _conv_bn_relu(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]


class ConvEncoder(ModalityEncoder):
    """Small VGG-style net for tiny inputs (16x16 images, 40x~100 log-mel spectrograms).

    Each stage is ``conv3x3-BN-ReLU, conv3x3-BN-ReLU, maxpool 2``; then global average pooling and a
    linear layer to ``feature_dim`` (no activation on the output).
    """

    def __init__(
        self, in_channels: int = 1, widths: Sequence[int] = (32, 64, 128), feature_dim: int = 128
    ) -> None:
        super().__init__(in_channels, feature_dim)
        if len(widths) == 0 or any(w < 1 for w in widths):
            raise ConfigError(
                f"ConvEncoder widths must be a non-empty list of positive ints, got {list(widths)}"
            )
        layers: list[nn.Module] = []
        prev = in_channels
        for width in widths:
            layers += [*_conv_bn_relu(prev, width), *_conv_bn_relu(width, width), _HalvingMaxPool()]
            prev = width
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(prev, feature_dim)

    def encode_frames(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean(dim=(-2, -1)))


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class ResNet18Encoder(ModalityEncoder):
    """ResNet-18 trunk (He et al. 2016) as used by OGM-GE (Peng et al. 2022) and OPM (Wei et al. 2025).

    Stem ``conv7x7/2-BN-ReLU-maxpool3x3/2``, four stages of two :class:`BasicBlock` s with widths
    64-128-256-512 (strides 1, 2, 2, 2), global average pooling -> ``[B, 512]``. A linear projection
    is added only when ``feature_dim != 512``. Works on 1-channel spectrograms or 3-channel frames.
    """

    def __init__(self, in_channels: int = 1, feature_dim: int = 512) -> None:
        super().__init__(in_channels, feature_dim)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages: list[nn.Module] = []
        prev = 64
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(prev, width, stride), BasicBlock(width, width)))
            prev = width
        self.layers = nn.Sequential(*stages)
        self.proj: nn.Module = nn.Identity() if feature_dim == 512 else nn.Linear(512, feature_dim)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def encode_frames(self, x: Tensor) -> Tensor:
        return self.proj(self.layers(self.stem(x)).mean(dim=(-2, -1)))


def build_encoder(kind: str, in_channels: int, feature_dim: int) -> ModalityEncoder:
    """Build an encoder by name: ``"conv"`` (:class:`ConvEncoder`), ``"resnet18"`` (:class:`ResNet18Encoder`).

    ``kind`` is case-insensitive.
    """
    key = str(kind).lower()
    if key == "conv":
        return ConvEncoder(in_channels=in_channels, feature_dim=feature_dim)
    if key == "resnet18":
        return ResNet18Encoder(in_channels=in_channels, feature_dim=feature_dim)
    raise ConfigError(f"unknown encoder kind {kind!r}; valid kinds are: {', '.join(ENCODER_KINDS)}")


__all__ = [
    "ENCODER_KINDS",
    "BasicBlock",
    "ConvEncoder",
    "ModalityEncoder",
    "ResNet18Encoder",
    "build_encoder",
]
