"""Fusion heads: map per-modality features ``{m: phi^m [B, d_m]}`` to class logits ``[B, C]``.

Every head also gives per-modality (unimodal) logits ``o^m``, which modality-balancing methods
(OGM-GE, OPM/OGM in Wei et al., "On-the-Fly Modulation for Balanced Multimodal Learning",
TPAMI 2025) use to score how much each modality contributes. For a fused linear head

    f(x) = sum_m W^m phi^m + b,

Eq. 6 of that paper takes ``o^m = W^m phi^m + b / M``, so that ``sum_m o^m = f(x)`` exactly.
Heads without such a decomposition use the *zero-out estimator*: ``o^m`` is the head's output
when every other modality's features are replaced by zeros.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harmonia.errors import ConfigError, InputError


class FusionHead(nn.Module):
    """Base class: stores the modality order, validates features, provides the zero-out estimator.

    Subclasses implement :meth:`fuse`, which may assume validated features.
    """

    def __init__(self, modalities: Sequence[str], feature_dims: Mapping[str, int], num_classes: int) -> None:
        super().__init__()
        names = tuple(modalities)
        if not names:
            raise ConfigError(
                "a fusion head needs at least one modality; pass e.g. modalities=('audio', 'image')"
            )
        if len(set(names)) != len(names):
            raise ConfigError(f"modality names must be unique, got {list(names)}; remove the duplicates")
        for name in names:
            if not isinstance(name, str) or not name or "." in name:
                raise ConfigError(
                    f"invalid modality name {name!r}; use a non-empty string without '.' (e.g. 'audio')"
                )
        missing = [m for m in names if m not in feature_dims]
        if missing:
            raise ConfigError(
                f"feature_dims lacks modality(ies) {', '.join(missing)}; give the encoder output size of "
                "every modality, e.g. feature_dims={'audio': 128, 'image': 128}"
            )
        dims = {m: int(feature_dims[m]) for m in names}
        bad = {m: d for m, d in dims.items() if d < 1}
        if bad:
            raise ConfigError(f"feature dims must be >= 1, got {bad}; set them to the encoders' feature_dim")
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}; set it to the number of labels")
        self.modalities: tuple[str, ...] = names
        self.feature_dims: dict[str, int] = dims
        self.num_classes = int(num_classes)

    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def check_features(self, features: Mapping[str, Tensor]) -> None:
        """Raise :class:`InputError` unless ``features`` maps the head's modalities (only) to ``[B, d_m]``."""
        expected = ", ".join(self.modalities)
        missing = [m for m in self.modalities if m not in features]
        if missing:
            raise InputError(
                f"features lack modality(ies) {', '.join(missing)}; the fusion head expects {expected}: "
                "pass features for every modality (zeros for an absent one)"
            )
        extra = [m for m in features if m not in self.feature_dims]
        if extra:
            raise InputError(
                f"features have unexpected modality(ies) {', '.join(map(str, extra))}; the fusion head "
                f"expects {expected}: drop them or build the head with them"
            )
        for m in self.modalities:
            phi = features[m]
            if not isinstance(phi, Tensor):
                raise InputError(f"modality '{m}': features must be a torch.Tensor, got {type(phi).__name__}")
            d = self.feature_dims[m]
            if phi.ndim != 2 or phi.shape[1] != d:
                raise InputError(
                    f"modality '{m}': expected features of shape [B, {d}], got {list(phi.shape)}; "
                    f"make the encoder output {d} features or build the head with feature_dims['{m}']="
                    f"{phi.shape[-1] if phi.ndim else 'its size'}"
                )
        sizes = {m: features[m].shape[0] for m in self.modalities}
        if len(set(sizes.values())) > 1:
            listed = ", ".join(f"{m}: {b}" for m, b in sizes.items())
            raise InputError(
                f"feature batch sizes differ across modalities ({listed}); every modality must hold the "
                "same examples in the same order"
            )

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        """Fused logits ``[B, num_classes]``."""
        self.check_features(features)
        return self.fuse(features)

    def unimodal_logits(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Zero-out estimator: ``o^m = f(phi^m, 0, ..., 0)`` (other modalities' features set to zero)."""
        self.check_features(features)
        out: dict[str, Tensor] = {}
        for m in self.modalities:
            only_m = {c: features[c] if c == m else torch.zeros_like(features[c]) for c in self.modalities}
            out[m] = self.fuse(only_m)
        return out


class ConcatFusion(FusionHead):
    """Linear classifier on the concatenation: ``f(x) = W [phi^1; ...; phi^M] + b``.

    Unimodal logits (Wei et al. 2025, Eq. 6): ``o^m = W[:, block_m] phi^m + b / M``.
    """

    def __init__(self, modalities: Sequence[str], feature_dims: Mapping[str, int], num_classes: int) -> None:
        super().__init__(modalities, feature_dims, num_classes)
        self.fc = nn.Linear(sum(self.feature_dims.values()), self.num_classes)

    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        return self.fc(torch.cat([features[m] for m in self.modalities], dim=1))

    def unimodal_logits(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        self.check_features(features)
        bias = self.fc.bias / len(self.modalities)
        out: dict[str, Tensor] = {}
        start = 0
        for m in self.modalities:
            stop = start + self.feature_dims[m]
            out[m] = F.linear(features[m], self.fc.weight[:, start:stop], bias)
            start = stop
        return out


class SumFusion(FusionHead):
    """One linear head per modality, outputs summed: ``f(x) = sum_m (W^m phi^m + b^m)``.

    Unimodal logits: ``o^m = W^m phi^m + b^m``, so ``sum_m o^m = f(x)`` exactly.
    """

    def __init__(self, modalities: Sequence[str], feature_dims: Mapping[str, int], num_classes: int) -> None:
        super().__init__(modalities, feature_dims, num_classes)
        self.heads = nn.ModuleDict(
            {m: nn.Linear(self.feature_dims[m], self.num_classes) for m in self.modalities}
        )

    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        return torch.stack([self.heads[m](features[m]) for m in self.modalities]).sum(dim=0)

    def unimodal_logits(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        self.check_features(features)
        return {m: self.heads[m](features[m]) for m in self.modalities}


class CosineFusion(FusionHead):
    """Scaled sum of per-modality cosine similarities (MMCosine; Xu et al., ICASSP 2023):

        f(x)_c = s * sum_m cos(W^m_c, phi^m) = s * sum_m <W^m_c / ||W^m_c||, phi^m / ||phi^m||>,

    one bias-free linear head ``W^m`` (``[C, d_m]``) per modality, rows and features L2-normalised, one
    scale ``s`` (a constant, not learnt). Unimodal logits: ``o^m = s * cos(W^m, phi^m)``, so that
    ``sum_m o^m = f(x)`` exactly. A zero feature vector has cosine 0 with every class (as
    ``F.normalize`` leaves it zero).
    """

    def __init__(
        self,
        modalities: Sequence[str],
        feature_dims: Mapping[str, int],
        num_classes: int,
        scale: float = 10.0,
    ) -> None:
        super().__init__(modalities, feature_dims, num_classes)
        if not scale > 0:
            raise ConfigError(f"the cosine head's scale must be > 0, got {scale}; e.g. use 10")
        self.scale = float(scale)
        self.heads = nn.ModuleDict(
            {m: nn.Linear(self.feature_dims[m], self.num_classes, bias=False) for m in self.modalities}
        )

    def _weight(self, m: str) -> Tensor:
        head = self.heads[m]
        assert isinstance(head, nn.Linear)
        return head.weight

    def cosines(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``cos(W^m_c, phi^m)`` per modality, ``[B, C]`` with values in [-1, 1]."""
        self.check_features(features)
        return {
            m: F.linear(F.normalize(features[m], dim=1), F.normalize(self._weight(m), dim=1))
            for m in self.modalities
        }

    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        return torch.stack(list(self.unimodal_logits(features).values())).sum(dim=0)

    def unimodal_logits(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {m: self.scale * c for m, c in self.cosines(features).items()}

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class FiLMFusion(FusionHead):
    """Feature-wise linear modulation (Perez et al., "FiLM", AAAI 2018), as in the OGM-GE code base.

    The target modality ``t`` is projected, ``h = W_t phi^t + b_t`` (``[B, d]``); each other modality
    ``c`` in order modulates it: ``[gamma_c, beta_c] = W_c phi^c + b_c``, ``h <- gamma_c * h + beta_c``;
    logits are ``W_o h + b_o``. Unimodal logits use the zero-out estimator.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        feature_dims: Mapping[str, int],
        num_classes: int,
        hidden_dim: int = 256,
        target: str | None = None,
    ) -> None:
        super().__init__(modalities, feature_dims, num_classes)
        if hidden_dim < 1:
            raise ConfigError(f"FiLM hidden_dim must be >= 1, got {hidden_dim}; e.g. use 256")
        target = self.modalities[0] if target is None else target
        if target not in self.feature_dims:
            raise ConfigError(
                f"FiLM target modality {target!r} is not one of {', '.join(self.modalities)}; "
                "pick one of them or leave target=None for the first"
            )
        self.target = target
        self.conditioners: tuple[str, ...] = tuple(m for m in self.modalities if m != target)
        self.hidden_dim = hidden_dim
        self.project = nn.Linear(self.feature_dims[target], hidden_dim)
        self.film = nn.ModuleDict(
            {c: nn.Linear(self.feature_dims[c], 2 * hidden_dim) for c in self.conditioners}
        )
        self.out = nn.Linear(hidden_dim, self.num_classes)

    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        h = self.project(features[self.target])
        for c in self.conditioners:
            gamma, beta = self.film[c](features[c]).chunk(2, dim=1)
            h = gamma * h + beta
        return self.out(h)


class GatedFusion(FusionHead):
    """Gated Multimodal Unit (Arevalo et al., ICLR-W 2017), generalised to M modalities.

    ``v_m = tanh(W_m phi^m)``, ``z = softmax_m(W_z [phi^1; ...; phi^M])`` (``[B, M, d]``, softmax over
    the modality axis), ``h = sum_m z_m * v_m``, logits ``W_o h + b_o``. For M = 2 the softmax is the
    GMU's sigmoid gate ``z`` and ``1 - z``. Unimodal logits use the zero-out estimator.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        feature_dims: Mapping[str, int],
        num_classes: int,
        hidden_dim: int = 256,
    ) -> None:
        super().__init__(modalities, feature_dims, num_classes)
        if hidden_dim < 1:
            raise ConfigError(f"gated fusion hidden_dim must be >= 1, got {hidden_dim}; e.g. use 256")
        self.hidden_dim = hidden_dim
        self.values = nn.ModuleDict({m: nn.Linear(self.feature_dims[m], hidden_dim) for m in self.modalities})
        self.gate = nn.Linear(sum(self.feature_dims.values()), len(self.modalities) * hidden_dim)
        self.out = nn.Linear(hidden_dim, self.num_classes)

    def gates(self, features: Mapping[str, Tensor]) -> Tensor:
        """Gate weights ``z`` of shape ``[B, M, hidden_dim]``; they sum to 1 over the modality axis."""
        joint = torch.cat([features[m] for m in self.modalities], dim=1)
        return self.gate(joint).view(joint.shape[0], len(self.modalities), self.hidden_dim).softmax(dim=1)

    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        v = torch.stack([torch.tanh(self.values[m](features[m])) for m in self.modalities], dim=1)
        return self.out((self.gates(features) * v).sum(dim=1))


class FusionKind(str, Enum):
    """Names accepted by :func:`build_fusion`."""

    CONCAT = "concat"
    SUM = "sum"
    FILM = "film"
    GATED = "gated"


def build_fusion(
    kind: FusionKind | str,
    modalities: Sequence[str],
    feature_dims: Mapping[str, int],
    num_classes: int,
    hidden_dim: int = 256,
) -> FusionHead:
    """Build a fusion head by name; ``hidden_dim`` is used by ``film`` and ``gated`` only."""
    try:
        key = kind if isinstance(kind, FusionKind) else FusionKind(str(kind).lower())
    except ValueError:
        valid = ", ".join(k.value for k in FusionKind)
        raise ConfigError(f"unknown fusion kind {kind!r}; valid kinds are: {valid}") from None
    if key is FusionKind.CONCAT:
        return ConcatFusion(modalities, feature_dims, num_classes)
    if key is FusionKind.SUM:
        return SumFusion(modalities, feature_dims, num_classes)
    if key is FusionKind.FILM:
        return FiLMFusion(modalities, feature_dims, num_classes, hidden_dim=hidden_dim)
    return GatedFusion(modalities, feature_dims, num_classes, hidden_dim=hidden_dim)


__all__ = [
    "ConcatFusion",
    "CosineFusion",
    "FiLMFusion",
    "FusionHead",
    "FusionKind",
    "GatedFusion",
    "SumFusion",
    "build_fusion",
]
