"""Multimodal classifier: one encoder per modality followed by a fusion head.

``forward`` is split into :meth:`MultimodalClassifier.encode` and :meth:`MultimodalClassifier.fuse`
so that methods acting on features (e.g. OPM's feature dropping) can transform them in between.
"""

from __future__ import annotations

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


class MultimodalClassifier(nn.Module):
    """``logits = fusion({m: encoder_m(x^m)})`` over the modalities of ``encoders`` (in dict order)."""

    def __init__(self, encoders: Mapping[str, nn.Module], fusion: FusionHead) -> None:
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
        self,
        inputs: Mapping[str, Tensor],
        transform: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
    ) -> MultimodalOutput:
        """``fuse(transform(encode(inputs)))``; ``transform`` edits the features between encoders and
        fusion head (OPM drops them there), inside one forward call (as DistributedDataParallel needs)."""
        features = self.encode(inputs)
        return self.fuse(features if transform is None else transform(features))

    def encoder_parameters(self) -> dict[str, list[nn.Parameter]]:
        """All parameters of each modality's encoder, keyed by modality."""
        return {m: list(self.encoders[m].parameters()) for m in self.modalities}

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the fusion head."""
        return list(self.fusion.parameters())


__all__ = ["MultimodalClassifier", "MultimodalOutput"]
