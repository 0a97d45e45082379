"""Contrastive losses of tri-modal pre-training: symmetric InfoNCE and MIL-NCE.

``nce_from_scores`` and ``mil_nce_from_scores`` hold the maths for any pair score (the fine-grained loss
uses them with attention-pooled token scores).

Both return one loss per sample with ``reduction="none"`` (the harmonizer and the noisy-pair audit
work per sample) and take negatives from every data-parallel rank through :func:`gather_features`.
Embeddings are used as given: L2-normalize them first for cosine similarities.

The similarities are divided by a fixed temperature τ, or multiplied by a ``logit_scale`` tensor s (a
learnable :class:`~harmonia.losses.scale.LogitScale`, CLIP's s = exp(t)). Across ranks, ``local_loss``
and ``gather_with_grad`` mean what they mean in open_clip's ``ClipLoss``:

* ``local_loss=True`` (the default): each rank scores its own B samples against the gathered N = R·B, and
  returns their B losses; ``False``: every rank scores all N against all N and returns the N losses.
* ``gather_with_grad=True`` (the default): the gathered rows pass gradients back to the rank that owns
  them; ``False``: a plain all-gather, whose rows are constants, except that with ``local_loss=False``
  this rank's own rows are its local (gradient-carrying) embeddings.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from harmonia.losses.gather import gather_features
from harmonia.precision import in_float32

#: the temperature of CLIP, VATT and MIL-NCE, used when neither a temperature nor a logit scale is given
DEFAULT_TEMPERATURE = 0.07

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


def resolve_scale(name: str, temperature: float | None, logit_scale: Tensor | None) -> float | None:
    """The temperature to divide by (None: multiply by ``logit_scale``), after checking that at most one
    of the two is given and that it is valid."""
    if logit_scale is None:
        tau = DEFAULT_TEMPERATURE if temperature is None else temperature
        check_temperature(f"{name}: temperature", tau)
        return tau
    if temperature is not None:
        raise ValueError(
            f"{name}: give a temperature (logits = s_ij / τ) or a logit_scale (logits = scale · s_ij), "
            f"not both (got temperature={temperature})"
        )
    if not isinstance(logit_scale, Tensor) or logit_scale.numel() != 1 or not logit_scale.is_floating_point():
        raise ValueError(
            f"{name}: logit_scale must be a floating-point tensor of one element (LogitScale()()), "
            f"got {logit_scale!r}"
        )
    return None


def _logits(scores: Tensor, temperature: float | None, logit_scale: Tensor | None) -> Tensor:
    if temperature is not None:
        return scores / temperature
    assert logit_scale is not None
    return scores * logit_scale.reshape(())


def _check_switches(name: str, local_loss: bool, own_gradients_only: bool) -> None:
    if own_gradients_only and not local_loss:
        raise ValueError(
            f"{name}: own_gradients_only gives each of this rank's samples its own gradient; it needs "
            f"local_loss=True (with local_loss=False every rank scores the whole global batch)"
        )


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
    temperature: float | None = None,
    reduction: Reduction = "mean",
    *,
    gather: bool = True,
    own_gradients_only: bool = False,
    logit_scale: Tensor | None = None,
    local_loss: bool = True,
    gather_with_grad: bool = True,
) -> Tensor:
    """Symmetric InfoNCE between paired rows of ``a`` [B, D] and ``b`` [B, D] (VATT's L_va, CLIP's loss).

    With s_ij = a_i · b_j / τ (τ = ``temperature``, default 0.07) or s_ij = s · a_i · b_j (s =
    ``logit_scale``) over the global batch (all ranks when ``gather``), sample i's loss is

        ℓ_i = ½ [ −log softmax_j(s_ij)[i] − log softmax_j(s_ji)[i] ],

    the mean of which is open_clip's ``ClipLoss``. Returns this rank's B losses, or with
    ``local_loss=False`` (under ``torch.distributed``) the N losses of the global batch (see the module doc
    for ``local_loss`` and ``gather_with_grad``).

    ``own_gradients_only`` keeps the values but lets ℓ_i's gradient reach only a_i and b_i (the other
    samples, as negatives, are constants): then ∂(Σ_i ℓ_i)/∂a_i = ∂ℓ_i/∂a_i, sample i's own gradient.
    """
    _check("nce: a", a, 2)
    _check("nce: b", b, 2)
    temperature = resolve_scale("nce", temperature, logit_scale)
    _check_switches("nce", local_loss, own_gradients_only)
    if a.shape != b.shape:
        raise ValueError(
            f"nce: a and b must be paired rows of one shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    own_rows = not local_loss
    a_all, offset = (
        gather_features(a, with_grad=gather_with_grad, own_rows_with_grad=own_rows) if gather else (a, 0)
    )
    b_all, _ = (
        gather_features(b, with_grad=gather_with_grad, own_rows_with_grad=own_rows) if gather else (b, 0)
    )
    if not local_loss and a_all is not a:  # every rank scores the whole global batch
        rows = a_all @ b_all.T
        return _reduce(nce_from_scores(rows, rows.T, 0, temperature, logit_scale), reduction)
    rows = _similarity(a, b_all, offset, own_gradients_only)
    cols = _similarity(b, a_all, offset, own_gradients_only)
    return _reduce(nce_from_scores(rows, cols, offset, temperature, logit_scale), reduction)


def nce_from_scores(
    rows: Tensor,
    cols: Tensor,
    offset: int,
    temperature: float | None = DEFAULT_TEMPERATURE,
    logit_scale: Tensor | None = None,
) -> Tensor:
    """Per-sample symmetric InfoNCE [B] from any pair scores: ``rows[i, j]`` = s(a_i, b_j) and
    ``cols[i, j]`` = s(a_j, b_i) for the B local samples i (at global index offset + i) and all N samples j.

        ℓ_i = ½ [ −log softmax_j(rows[i] / τ)[offset + i] − log softmax_j(cols[i] / τ)[offset + i] ]

    With ``temperature=None``, the scores are multiplied by ``logit_scale`` instead of divided by τ.
    """
    targets = torch.arange(rows.shape[0], device=rows.device) + offset
    a_to_b = F.cross_entropy(_logits(rows, temperature, logit_scale), targets, reduction="none")
    b_to_a = F.cross_entropy(_logits(cols, temperature, logit_scale), targets, reduction="none")
    return 0.5 * (a_to_b + b_to_a)


@in_float32
def mil_nce(
    video: Tensor,
    text: Tensor,
    mask: Tensor | None = None,
    temperature: float | None = None,
    reduction: Reduction = "mean",
    *,
    gather: bool = True,
    own_gradients_only: bool = False,
    logit_scale: Tensor | None = None,
    local_loss: bool = True,
    gather_with_grad: bool = True,
) -> Tensor:
    """MIL-NCE (Miech et al., CVPR 2020) between clips ``video`` [B, D] and their candidate bags ``text``
    [B, K, D]; ``mask`` [B, K] marks the real candidates (default: all).

    With x_ijk = v_i · t_jk / τ (or s · v_i · t_jk with a ``logit_scale`` s) over the global batch, sample
    i's loss is

        ℓ_i = logsumexp({x_ijk : all j, k} ∪ {x_jik : all j, k}) − logsumexp_k x_iik,

    the positives being the clip's own candidates and the negatives every other clip's candidates (as
    rows) and every other clip against this clip's candidates (as columns), as in the authors' code.
    ``local_loss`` and ``gather_with_grad`` as in :func:`nce` (with ``local_loss=False``, the N losses of
    the global batch).
    """
    _check("mil_nce: video", video, 2)
    _check("mil_nce: text", text, 3)
    temperature = resolve_scale("mil_nce", temperature, logit_scale)
    _check_switches("mil_nce", local_loss, own_gradients_only)
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
    # reading the mask's values would split a compiled graph (train.compile): compiled, a clip without
    # candidates gives an infinite loss instead, which the trainer reports as a non-finite loss
    if not torch.compiler.is_compiling() and not bool(mask.any(1).all()):
        raise ValueError(
            "mil_nce: every clip needs at least one real text candidate (a row of mask is all False)"
        )
    b, own_rows = video.shape[0], not local_loss
    v_all, offset = (
        gather_features(video, with_grad=gather_with_grad, own_rows_with_grad=own_rows)
        if gather
        else (video, 0)
    )
    t_all, _ = (
        gather_features(text, with_grad=gather_with_grad, own_rows_with_grad=own_rows)
        if gather
        else (text, 0)
    )
    m_all = gather_features(mask.float())[0].bool() if gather else mask
    if not local_loss and v_all is not video:  # every rank scores the whole global batch
        scores = torch.einsum("id,jkd->ijk", v_all, t_all)  # clip i vs candidate k of bag j
        per_sample = mil_nce_from_scores(
            scores, scores.transpose(0, 1), m_all, m_all, 0, temperature, logit_scale
        )
        return _reduce(per_sample, reduction)
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
    return _reduce(mil_nce_from_scores(rows, cols, m_all, mask, offset, temperature, logit_scale), reduction)


def mil_nce_from_scores(
    rows: Tensor,
    cols: Tensor,
    row_mask: Tensor,
    col_mask: Tensor,
    offset: int,
    temperature: float | None = DEFAULT_TEMPERATURE,
    logit_scale: Tensor | None = None,
) -> Tensor:
    """Per-sample MIL-NCE [B] from any clip-candidate scores: ``rows[i, j, k]`` = s(clip i, candidate k of
    bag j) and ``cols[i, j, k]`` = s(clip j, candidate k of bag i), for the B local clips i (global index
    offset + i) and all N clips j. ``row_mask`` [N, K] and ``col_mask`` [B, K] mark real candidates.

        ℓ_i = logsumexp({rows[i]} ∪ {cols[i]}) / τ − logsumexp_k rows[i, offset + i, k] / τ

    With ``temperature=None``, the scores are multiplied by ``logit_scale`` instead of divided by τ.
    """
    rows = _logits(rows, temperature, logit_scale).masked_fill(~row_mask[None], float("-inf"))
    cols = _logits(cols, temperature, logit_scale).masked_fill(~col_mask[:, None], float("-inf"))
    local = torch.arange(rows.shape[0], device=rows.device)
    numerator = torch.logsumexp(rows[local, local + offset], dim=1)
    denominator = torch.logsumexp(torch.cat([rows.flatten(1), cols.flatten(1)], dim=1), dim=1)
    return denominator - numerator
