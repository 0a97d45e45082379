"""Multimodal classifier: one encoder per modality followed by a fusion head.

``forward(inputs, transform=None)`` is ``fuse(transform(encode(inputs)))``: methods acting on features (e.g.
OPM's feature dropping) transform them between encoders and fusion head, inside the one forward call that
DistributedDataParallel needs. A transform attached as ``model.feature_transform`` is a sub-module, so it
follows ``model.train()`` / ``model.eval()``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from harmonia.errors import ConfigError, InputError
from harmonia.models.fusion import FusionHead


@dataclass
class MultimodalOutput:
    """Fused logits ``[B, C]``, per-modality features ``[B, d_m]`` and unimodal logits ``[B, C]``."""

    logits: Tensor
    features: dict[str, Tensor]
    unimodal_logits: dict[str, Tensor]


# a pytree node, so that torch's tree utilities see the tensors inside: DistributedDataParallel with
# find_unused_parameters routes a forward's output tensors through its sink only when it can flatten the
# output, and without the sink a step whose loss leaves a modality's branch without gradient (MLA per_step,
# ReconBoost) stalls the gradient reduction ("Expected to have finished reduction in the prior iteration")
torch.export.register_dataclass(MultimodalOutput, serialized_type_name="harmonia.models.MultimodalOutput")


FeatureTransform = Callable[[dict[str, Tensor]], dict[str, Tensor]]


class MultimodalClassifier(nn.Module):
    """``logits = fusion(t({m: encoder_m(x^m)}))`` over the modalities of ``encoders`` (in dict order).

    Args:
        encoders: one encoder per modality, each mapping its input to ``[B, d_m]`` features.
        fusion: the fusion head over those features.
        feature_transform: an optional module applied to the features before fusion in every forward that
            passes no ``transform`` of its own (e.g. ``OPM``); as a sub-module it is switched to eval mode by
            ``model.eval()`` and its buffers are saved in ``model.state_dict()``. Settable later:
            ``model.feature_transform = opm``.
    """

    feature_transform: nn.Module | None

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        fusion: FusionHead,
        feature_transform: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if not encoders:
            raise ConfigError("a MultimodalClassifier needs at least one encoder; pass e.g. {'audio': enc}")
        if set(encoders) != set(fusion.modalities):
            raise ConfigError(
                f"encoders are for {', '.join(encoders)} but the fusion head expects "
                f"{', '.join(fusion.modalities)}; build both for the same modalities"
            )
        for m, enc in encoders.items():
            dim = getattr(enc, "feature_dim", None)
            if dim is not None and dim != fusion.feature_dims[m]:
                raise ConfigError(
                    f"modality '{m}': the encoder outputs {dim} features but the fusion head expects "
                    f"{fusion.feature_dims[m]}; build the head with feature_dims['{m}']={dim}"
                )
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = fusion
        self.feature_transform = feature_transform

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.encoders.keys())

    def check_inputs(self, inputs: Mapping[str, Tensor]) -> None:
        """Raise :class:`InputError` unless ``inputs`` has one valid, equally sized tensor per modality."""
        if not isinstance(inputs, Mapping):
            raise InputError(
                f"expected a mapping from modality name to tensor, got {type(inputs).__name__}; "
                f"pass e.g. {{'{self.modalities[0]}': x}}"
            )
        have = ", ".join(self.modalities)
        for m in self.modalities:
            if m not in inputs:
                raise InputError(
                    f"batch lacks modality '{m}'; the model has encoders for {have}: "
                    "add it to the batch or build the model without it"
                )
        for m in inputs:
            if m not in self.encoders:
                raise InputError(
                    f"batch has modality '{m}' but the model has encoders only for {have}: "
                    "drop it from the batch or add an encoder for it"
                )
        for m in self.modalities:
            x = inputs[m]
            if not isinstance(x, Tensor):
                raise InputError(
                    f"modality '{m}': expected a torch.Tensor, got {type(x).__name__}; "
                    "convert it with torch.as_tensor(x, dtype=torch.float32)"
                )
            check = getattr(self.encoders[m], "check_input", None)
            if callable(check):
                check(x, m)
        sizes = {m: inputs[m].shape[0] if inputs[m].ndim else 0 for m in self.modalities}
        if len(set(sizes.values())) > 1:
            listed = ", ".join(f"{m}: {b}" for m, b in sizes.items())
            raise InputError(
                f"batch sizes differ across modalities ({listed}); every modality must hold the same "
                "examples in the same order: check the dataset and collate function"
            )

    def encode(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Validate ``inputs`` and encode each modality into ``[B, d_m]`` features."""
        self.check_inputs(inputs)
        return {m: self.encoders[m](inputs[m]) for m in self.modalities}

    def fuse(self, features: Mapping[str, Tensor]) -> MultimodalOutput:
        """Fused and unimodal logits from per-modality features."""
        return MultimodalOutput(
            logits=self.fusion(features),
            features=dict(features),
            unimodal_logits=self.fusion.unimodal_logits(features),
        )

    def forward(
        self, inputs: Mapping[str, Tensor], transform: FeatureTransform | None = None
    ) -> MultimodalOutput:
        """``fuse(transform(encode(inputs)))``; ``transform`` (default: ``self.feature_transform``) edits the
        features between encoders and fusion head (OPM drops them there), inside one forward call (as
        DistributedDataParallel needs). A transform passed here that is an ``nn.Module`` keeps its own mode:
        a warning says so when it is in training mode while the model is in eval mode (OPM would still
        drop): attach it (``model.feature_transform = opm``) or call ``opm.eval()`` too."""
        if transform is None:
            transform = self.feature_transform
        elif isinstance(transform, nn.Module) and transform.training and not self.training:
            warnings.warn(
                f"{type(transform).__name__} passed as transform is in training mode while the model is in "
                "eval mode, so it still acts; attach it (model.feature_transform = ...) so that model.eval() "
                "switches it off, or call .eval() on it as well",
                stacklevel=2,
            )
        features = self.encode(inputs)
        return self.fuse(features if transform is None else transform(features))

    def encoder_parameters(self) -> dict[str, list[nn.Parameter]]:
        """All parameters of each modality's encoder, keyed by modality."""
        return {m: list(self.encoders[m].parameters()) for m in self.modalities}

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the fusion head."""
        return list(self.fusion.parameters())


__all__ = ["MultimodalClassifier", "MultimodalOutput"]
