"""Unimodal scores and the discrepancy ratio (Wei et al., TPAMI 2025, Eq. 6-7)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from harmonia.distributed import all_reduce_sum
from harmonia.errors import InputError, NonFiniteLossError


def unimodal_scores(unimodal_logits: Mapping[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
    """Summed probability of the true class per modality: ``S^m = Σ_i softmax(o^m_i)[y_i]``.

    Under ``torch.distributed`` the sums are all-reduced (one collective for all modalities), so every rank
    sees the score of the global batch. Computed without gradient.
    """
    if not unimodal_logits:
        raise InputError("unimodal_logits is empty; pass one [B, C] tensor per modality")
    names = list(unimodal_logits)
    if labels.dim() != 1:
        raise InputError(f"labels must be a 1-D tensor of class indices, got shape {list(labels.shape)}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise InputError(
            f"labels must be integer class indices (torch.long), got {labels.dtype}; a float label would be "
            "truncated to a wrong class. Pass the class index of each sample"
        )
    for m in names:
        logits = unimodal_logits[m]
        if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
            raise InputError(
                f"unimodal logits of '{m}' must be [B, C] with B = {labels.shape[0]} labels, "
                f"got {list(logits.shape)}"
            )
    num_classes = unimodal_logits[names[0]].shape[1]
    with torch.no_grad():
        if labels.numel() and bool(((labels < 0) | (labels >= num_classes)).any()):
            raise InputError(
                f"labels must be class indices in [0, {num_classes - 1}] for {num_classes}-class logits, got "
                f"values from {int(labels.min())} to {int(labels.max())}"
            )
        index = labels.long()[:, None]
        local = torch.stack(
            [F.softmax(unimodal_logits[m].float(), dim=1).gather(1, index).sum() for m in names]
        )
        local = all_reduce_sum(local)
        finite = torch.isfinite(local).tolist()
    if not all(finite):
        bad = [m for m, ok in zip(names, finite, strict=True) if not ok]
        raise NonFiniteLossError(
            f"the unimodal logits of {bad} hold NaN or inf, so the discrepancy ratio is undefined (balancing "
            "would silently switch off); the model has diverged: lower the learning rate or clip gradients"
        )
    return dict(zip(names, local, strict=True))


def ratios_from_scores(scores: Mapping[str, Tensor], eps: float = 1e-8) -> dict[str, Tensor]:
    """``ρ^m = 1/(M-1) · Σ_{j≠m} S^m / S^j`` (TPAMI Eq. 7); for M = 2, ``ρ^a = S^a/S^v = 1/ρ^v``."""
    names = list(scores)
    if len(names) < 2:
        raise InputError(f"the discrepancy ratio compares modalities: give at least 2, got {names}")
    values = torch.stack([torch.as_tensor(scores[m]) for m in names]).float()
    quotient = values[:, None] / values[None, :].clamp_min(eps)  # [m, j] = S^m / S^j
    off_diagonal = quotient.sum(dim=1) - quotient.diagonal()
    return dict(zip(names, off_diagonal / (len(names) - 1), strict=True))


def discrepancy_ratio(unimodal_logits: Mapping[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
    """Discrepancy ratio of every modality on the (global) batch; > 1 marks a dominant modality."""
    return ratios_from_scores(unimodal_scores(unimodal_logits, labels))
