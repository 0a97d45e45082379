"""Contrastive losses of tri-modal pre-training: symmetric InfoNCE and MIL-NCE.

``nce_from_scores`` and ``mil_nce_from_scores`` hold the maths for any pair score (the fine-grained loss
uses them with attention-pooled token scores).

Both return one loss per local sample with ``reduction="none"`` (the harmonizer and the noisy-pair audit
work per sample) and take negatives from every data-parallel rank through :func:`gather_with_grad`.
Embeddings are used as given: L2-normalize them first for cosine similarities.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from harmonia.losses.gather import gather_with_grad
from harmonia.precision import in_float32

Reduction = Literal["mean", "sum", "none"]


def _reduce(per_sample: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _check(name: str, x: Tensor, dims: int) -> None:
    if x.dim() != dims or not x.is_floating_point():
        raise ValueError(
            f"{name}: expected a floating-point tensor with {dims} dims, got {x.dtype} {tuple(x.shape)}"
        )
    if x.shape[0] == 0:
        raise ValueError(
            f"{name}: the batch is empty (shape {tuple(x.shape)}); a contrastive loss needs pairs"
        )


def check_temperature(name: str, value: float) -> None:
    """Refuse a temperature that is not a positive finite number (a logit divided by it must be finite)."""
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number (the papers use 0.07), got {value!r}")


def _similarity(queries: Tensor, keys: Tensor, offset: int, own_only: bool) -> Tensor:
    """queries @ keysᵀ; with ``own_only`` every key but the query's own pair (at column offset + i) is
    detached, so that sample i's loss has gradients only through sample i's own embeddings."""
    if not own_only:
        return queries @ keys.T
    own = keys[offset : offset + queries.shape[0]]
    sim = queries @ keys.detach().T
    diagonal = (queries * (own - own.detach())).sum(-1)  # zero in value, carries the own key's gradient
    rows = torch.arange(queries.shape[0], device=queries.device)
    return sim + torch.zeros_like(sim).index_put((rows, rows + offset), diagonal)


@in_float32
def nce(
    a: Tensor,
    b: Tensor,
    temperature: float = 0.07,
    reduction: Reduction = "mean",
    *,
    gather: bool = True,
    own_gradients_only: bool = False,
) -> Tensor:
    """Symmetric InfoNCE between paired rows of ``a`` [B, D] and ``b`` [B, D] (VATT's L_va, CLIP's loss).

    With s_ij = a_i · b_j / τ over the global batch (all ranks when ``gather``), sample i's loss is

        ℓ_i = ½ [ −log softmax_j(s_ij)[i] − log softmax_j(s_ji)[i] ].

    ``own_gradients_only`` keeps the values but lets ℓ_i's gradient reach only a_i and b_i (the other
    samples, as negatives, are constants): then ∂(Σ_i ℓ_i)/∂a_i = ∂ℓ_i/∂a_i, sample i's own gradient.
    """
    _check("nce: a", a, 2)
    _check("nce: b", b, 2)
    check_temperature("nce: temperature", temperature)
    if a.shape != b.shape:
        raise ValueError(
            f"nce: a and b must be paired rows of one shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    a_all, offset = gather_with_grad(a) if gather else (a, 0)
    b_all, _ = gather_with_grad(b) if gather else (b, 0)
    rows = _similarity(a, b_all, offset, own_gradients_only)
    cols = _similarity(b, a_all, offset, own_gradients_only)
    return _reduce(nce_from_scores(rows, cols, offset, temperature), reduction)


def nce_from_scores(rows: Tensor, cols: Tensor, offset: int, temperature: float) -> Tensor:
    """Per-sample symmetric InfoNCE [B] from any pair scores: ``rows[i, j]`` = s(a_i, b_j) and
    ``cols[i, j]`` = s(a_j, b_i) for the B local samples i (at global index offset + i) and all N samples j.

        ℓ_i = ½ [ −log softmax_j(rows[i] / τ)[offset + i] − log softmax_j(cols[i] / τ)[offset + i] ]
    """
    targets = torch.arange(rows.shape[0], device=rows.device) + offset
    a_to_b = F.cross_entropy(rows / temperature, targets, reduction="none")
    b_to_a = F.cross_entropy(cols / temperature, targets, reduction="none")
    return 0.5 * (a_to_b + b_to_a)


@in_float32
def mil_nce(
    video: Tensor,
    text: Tensor,
    mask: Tensor | None = None,
    temperature: float = 0.07,
    reduction: Reduction = "mean",
    *,
    gather: bool = True,
    own_gradients_only: bool = False,
) -> Tensor:
    """MIL-NCE (Miech et al., CVPR 2020) between clips ``video`` [B, D] and their candidate bags ``text``
    [B, K, D]; ``mask`` [B, K] marks the real candidates (default: all).

    With x_ijk = v_i · t_jk / τ over the global batch, sample i's loss is

        ℓ_i = logsumexp({x_ijk : all j, k} ∪ {x_jik : all j, k}) − logsumexp_k x_iik,

    the positives being the clip's own candidates and the negatives every other clip's candidates (as
    rows) and every other clip against this clip's candidates (as columns), as in the authors' code.
    """
    _check("mil_nce: video", video, 2)
    _check("mil_nce: text", text, 3)
    check_temperature("mil_nce: temperature", temperature)
    if text.shape[0] != video.shape[0] or text.shape[2] != video.shape[1]:
        raise ValueError(
            f"mil_nce: text must be [B, K, D] for video [B, D] = {tuple(video.shape)}, "
            f"got {tuple(text.shape)}"
        )
    if mask is None:
        mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
    if mask.shape != text.shape[:2] or mask.dtype != torch.bool:
        raise ValueError(
            f"mil_nce: mask must be bool {tuple(text.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}"
        )
    if not bool(mask.any(1).all()):
        raise ValueError(
            "mil_nce: every clip needs at least one real text candidate (a row of mask is all False)"
        )
    b = video.shape[0]
    v_all, offset = gather_with_grad(video) if gather else (video, 0)
    t_all, _ = gather_with_grad(text) if gather else (text, 0)
    m_all = gather_with_grad(mask.float())[0].bool() if gather else mask
    own = torch.arange(b, device=video.device) + offset
    rows = torch.einsum(
        "id,jkd->ijk", video, t_all.detach() if own_gradients_only else t_all
    )  # clip i vs bags
    cols = torch.einsum(
        "jd,ikd->ijk", v_all.detach() if own_gradients_only else v_all, text
    )  # clips vs bag i
    if own_gradients_only:  # zero in value: puts back the gradient through sample i's own pair only
        local = torch.arange(b, device=video.device)
        rows = rows.index_put(
            (local, own), torch.einsum("id,ikd->ik", video, text - text.detach()), accumulate=True
        )
        cols = cols.index_put(
            (local, own), torch.einsum("id,ikd->ik", video - video.detach(), text), accumulate=True
        )
    return _reduce(mil_nce_from_scores(rows, cols, m_all, mask, offset, temperature), reduction)


def mil_nce_from_scores(
    rows: Tensor, cols: Tensor, row_mask: Tensor, col_mask: Tensor, offset: int, temperature: float
) -> Tensor:
    """Per-sample MIL-NCE [B] from any clip-candidate scores: ``rows[i, j, k]`` = s(clip i, candidate k of
    bag j) and ``cols[i, j, k]`` = s(clip j, candidate k of bag i), for the B local clips i (global index
    offset + i) and all N clips j. ``row_mask`` [N, K] and ``col_mask`` [B, K] mark real candidates.

        ℓ_i = logsumexp({rows[i]} ∪ {cols[i]}) / τ − logsumexp_k rows[i, offset + i, k] / τ
    """
    rows = (rows / temperature).masked_fill(~row_mask[None], float("-inf"))
    cols = (cols / temperature).masked_fill(~col_mask[:, None], float("-inf"))
    local = torch.arange(rows.shape[0], device=rows.device)
    numerator = torch.logsumexp(rows[local, local + offset], dim=1)
    denominator = torch.logsumexp(torch.cat([rows.flatten(1), cols.flatten(1)], dim=1), dim=1)
    return denominator - numerator
