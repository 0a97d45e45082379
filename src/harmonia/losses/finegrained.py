"""Fine-grained, attention-weighted contrastive loss (Wang & Karout, BMVC 2021).

Wang & Karout, *Fine-grained Multi-Modal Self-Supervised Learning*, BMVC 2021 (arXiv 2112.12182): compare
two items token by token instead of through one pooled vector each. For an item with L2-normalized tokens
a_1..a_K (video tubelets, spectrogram patches) and one with tokens b_1..b_J (words, patches), the token
similarities S_kj = a_k · b_j are pooled with attention into one score:

    over_a:  α_kj = softmax_k(S_kj / τ_att),   s_a = mean_j Σ_k α_kj S_kj   (each b-token picks a's tokens)
    over_b:  β_kj = softmax_j(S_kj / τ_att),   s_b = mean_k Σ_j β_kj S_kj   (each a-token picks b's tokens)
    both:    s = ½ (s_a + s_b).

Softmaxes and means run over real tokens only (padding masks). In ``over_a`` a stretch of a clip that
matches no word gets little attention and barely moves s: the noisy part of a partially relevant clip is
down-weighted. With K = J = 1, s is the cosine and the loss is the coarse one.

s(·,·) takes the place of the clip-level cosine in InfoNCE (:func:`~harmonia.losses.nce.nce`'s
pairs) or MIL-NCE (bags of candidates). The [N_a, N_b, K, J] similarity tensor is built in chunks of rows
of a and recomputed in backward, whose gradient is written by hand
(:mod:`harmonia.losses.pooled_scores`): memory stays O(chunk · N_b · K · J) whatever the batch.
"""

from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from harmonia.losses.gather import gather_with_grad
from harmonia.losses.nce import (
    Reduction,
    _reduce,
    check_temperature,
    mil_nce_from_scores,
    nce_from_scores,
    resolve_scale,
)
from harmonia.losses.pooled_compiled import CompiledChunk
from harmonia.losses.pooled_scores import pooled_scores
from harmonia.precision import in_float32

#: with ``chunk_size=None``, chunks hold at most this many token similarities (4 MiB in float32): a chunk's
#: few temporaries stay in cache-sized blocks, which is faster on CPU than one big chunk and keeps the
#: loss's memory small next to the encoder's (``harmonia bench finegrained-speed``)
CHUNK_ELEMENTS = 2**20


class PoolDirection(str, enum.Enum):
    """Which tokens the attention picks: ``over_a`` (softmax over a's tokens, for each of b's),
    ``over_b`` (the reverse), or ``both`` (the mean of the two scores)."""

    OVER_A = "over_a"
    OVER_B = "over_b"
    BOTH = "both"


def _mask(x: Tensor, mask: Tensor | None, name: str) -> Tensor:
    if mask is None:
        return torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
    if mask.dtype != torch.bool or mask.shape != x.shape[:-1]:
        raise ValueError(
            f"{name}: mask must be bool {tuple(x.shape[:-1])} (True = real token), "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    return mask


def _masked_softmax(logits: Tensor, mask: Tensor, dim: int) -> Tensor:
    # a finite fill: a row without real tokens (a padded candidate) gives a uniform row, not NaNs
    return logits.masked_fill(~mask, torch.finfo(logits.dtype).min).softmax(dim)


def _masked_mean(x: Tensor, mask: Tensor, dim: int) -> Tensor:
    weights = mask.to(x.dtype)
    return (x * weights).sum(dim) / weights.sum(dim).clamp(min=1)


def _chunk_scores(
    a: Tensor,
    a_mask: Tensor | None,
    b: Tensor,
    b_mask: Tensor | None,
    tau_att: float,
    direction: PoolDirection,
) -> Tensor:
    # laid out [ca, Nb, J, K]: both softmaxes then run over dims with a long contiguous inner stride
    ca, k, d = a.shape
    nb, j, _ = b.shape
    sim = (a.reshape(ca * k, d) @ b.reshape(nb * j, d).T).view(ca, k, nb, j).permute(0, 2, 3, 1).contiguous()
    logits = sim / tau_att
    scores = []
    if direction is not PoolDirection.OVER_B:  # α over a's tokens (K), for each b token j
        alpha = logits.softmax(-1) if a_mask is None else _masked_softmax(logits, a_mask[:, None, None], -1)
        per_b_token = (alpha * sim).sum(-1)  # [ca, Nb, J]
        scores.append(per_b_token.mean(-1) if b_mask is None else _masked_mean(per_b_token, b_mask[None], -1))
    if direction is not PoolDirection.OVER_A:  # β over b's tokens (J), for each a token k
        beta = logits.softmax(2) if b_mask is None else _masked_softmax(logits, b_mask[None, :, :, None], 2)
        per_a_token = (beta * sim).sum(2)  # [ca, Nb, K]
        scores.append(
            per_a_token.mean(-1) if a_mask is None else _masked_mean(per_a_token, a_mask[:, None], -1)
        )
    return scores[0] if len(scores) == 1 else 0.5 * (scores[0] + scores[1])


@in_float32
def token_scores(
    a: Tensor,
    b: Tensor,
    a_mask: Tensor | None = None,
    b_mask: Tensor | None = None,
    tau_att: float = 0.1,
    direction: PoolDirection | str = PoolDirection.BOTH,
    chunk_size: int | None = None,
    compile: bool = False,
) -> Tensor:
    """Attention-pooled scores s(a_i, b_j) [N_a, N_b] of items ``a`` [N_a, K, D] and ``b`` [N_b, J, D].

    ``a_mask`` [N_a, K] and ``b_mask`` [N_b, J] are True on real tokens; padded tokens never change a score.
    ``chunk_size`` rows of a per chunk (default: as many as fit :data:`CHUNK_ELEMENTS` similarities).
    ``compile``: the elementwise passes through ``torch.compile`` (:mod:`~harmonia.losses.pooled_compiled`).
    """
    direction = PoolDirection(direction)
    if a.dim() != 3 or b.dim() != 3 or a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"token_scores: expected a [N_a, K, D] and b [N_b, J, D], got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    a_mask, b_mask = _mask(a, a_mask, "token_scores: a_mask"), _mask(b, b_mask, "token_scores: b_mask")
    a_pad = None if bool(a_mask.all()) else a_mask  # no masking work where every token is real
    b_pad = None if bool(b_mask.all()) else b_mask
    # zero the padding so that garbage (even NaN) there cannot leak into S through 0 * x
    a = a if a_pad is None else torch.where(a_mask[..., None], a, 0)
    b = b if b_pad is None else torch.where(b_mask[..., None], b, 0)
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // max(1, b.shape[0] * a.shape[1] * b.shape[1]))
    if chunk_size < 1:
        raise ValueError(f"token_scores: chunk_size must be >= 1, got {chunk_size}")
    over_a, over_b = direction is not PoolDirection.OVER_B, direction is not PoolDirection.OVER_A
    reference = functools.partial(_chunk_scores, tau_att=tau_att, direction=direction)
    chunk_type = CompiledChunk if compile else None
    return pooled_scores(a, b, a_pad, b_pad, tau_att, over_a, over_b, chunk_size, reference, chunk_type)


@in_float32
def paired_attention(
    a: Tensor,
    b: Tensor,
    a_mask: Tensor | None = None,
    b_mask: Tensor | None = None,
    tau_att: float = 0.1,
) -> dict[str, Tensor]:
    """Attention maps of each item with its own pair (a_i, b_i): ``over_a`` α [N, K, J] (sums to one over
    a's real tokens) and ``over_b`` β [N, K, J] (sums to one over b's real tokens). ``b`` may hold bags
    [N, C, J, D]; then the maps are [N, C, K, J]."""
    a_mask, b_mask = (
        _mask(a, a_mask, "paired_attention: a_mask"),
        _mask(b, b_mask, "paired_attention: b_mask"),
    )
    a, b = torch.where(a_mask[..., None], a, 0), torch.where(b_mask[..., None], b, 0)
    if b.dim() == 4:
        sim = torch.einsum("ikd,icld->ickl", a, b)
        am, bm = a_mask[:, None, :, None], b_mask[:, :, None, :]
    else:
        sim = torch.einsum("ikd,ild->ikl", a, b)
        am, bm = a_mask[:, :, None], b_mask[:, None, :]
    k_axis = sim.dim() - 2
    return {
        "over_a": _masked_softmax(sim / tau_att, am, dim=k_axis) * bm,
        "over_b": _masked_softmax(sim / tau_att, bm, dim=k_axis + 1) * am,
    }


@in_float32
def finegrained_nce(
    a: Tensor,
    b: Tensor,
    a_mask: Tensor | None = None,
    b_mask: Tensor | None = None,
    temperature: float | None = None,
    tau_att: float = 0.1,
    direction: PoolDirection | str = PoolDirection.BOTH,
    reduction: Reduction = "mean",
    *,
    chunk_size: int | None = None,
    gather: bool = True,
    logit_scale: Tensor | None = None,
    compile: bool = False,
) -> Tensor:
    """Contrastive loss of token sets ``a`` [B, K, D] and ``b`` with s(a_i, b_j) of :func:`token_scores`
    in place of the cosine (negatives from every rank when ``gather``), divided by ``temperature`` τ
    (default 0.07) or multiplied by ``logit_scale`` s.

    * ``b`` [B, J, D]: symmetric InfoNCE,
      ℓ_i = ½ [−log softmax_j(s(a_i, b_j)/τ)[i] − log softmax_j(s(a_j, b_i)/τ)[i]];
    * ``b`` [B, C, J, D] (C candidates per item, ``b_mask`` [B, C, J]; a candidate without real tokens is
      padding): MIL-NCE, the positives being item i's candidates (as :func:`~harmonia.losses.mil_nce`).

    ``compile``: the scores' elementwise passes through ``torch.compile`` (:func:`token_scores`).
    """
    if a.dim() != 3 or not a.is_floating_point():
        raise ValueError(f"finegrained_nce: a must be float [B, K, D], got {a.dtype} {tuple(a.shape)}")
    if a.shape[0] == 0:
        raise ValueError("finegrained_nce: the batch is empty; a contrastive loss needs pairs")
    temperature = resolve_scale("finegrained_nce", temperature, logit_scale)
    check_temperature("finegrained_nce: tau_att", tau_att)
    bags = b.dim() == 4
    if b.dim() not in (3, 4) or b.shape[0] != a.shape[0] or b.shape[-1] != a.shape[-1] or b.dtype != a.dtype:
        raise ValueError(
            f"finegrained_nce: b must be [B, J, D] or bags [B, C, J, D] with the B, D and dtype of a "
            f"{a.dtype} {tuple(a.shape)}, got {b.dtype} {tuple(b.shape)}"
        )
    a_mask = _mask(a, a_mask, "finegrained_nce: a_mask")
    b_mask = _mask(b, b_mask, "finegrained_nce: b_mask")
    if not bool(a_mask.any(-1).all()):
        raise ValueError("finegrained_nce: an item of a has no real token (a row of a_mask is all False)")
    real = b_mask.any(-1)  # [B] or [B, C]: candidates with at least one token
    if not bool((real.any(-1) if bags else real).all()):
        raise ValueError(
            "finegrained_nce: an item of b has no real token"
            + (" in any candidate (every bag needs one)" if bags else "")
        )
    a_all, offset = gather_with_grad(a) if gather else (a, 0)  # a itself in one process
    b_all, _ = gather_with_grad(b) if gather else (b, 0)
    a_mask_all = gather_with_grad(a_mask.float())[0].bool() if a_all is not a else a_mask
    b_mask_all = gather_with_grad(b_mask.float())[0].bool() if a_all is not a else b_mask
    candidates = b.shape[1] if bags else 1
    flat_b_all, flat_b_mask_all = b_all.reshape(-1, *b.shape[-2:]), b_mask_all.reshape(-1, b.shape[-2])
    rows = token_scores(a, flat_b_all, a_mask, flat_b_mask_all, tau_att, direction, chunk_size, compile)
    full = rows.view(a.shape[0], -1, candidates)
    if a_all is a:  # one process: s(a_j, b_i) is the same matrix read the other way
        cols = full.transpose(0, 1)
    else:
        local_b = token_scores(
            a_all,
            b.reshape(-1, *b.shape[-2:]),
            a_mask_all,
            b_mask.reshape(-1, b.shape[-2]),
            tau_att,
            direction,
            chunk_size,
            compile,
        )
        cols = local_b.view(a_all.shape[0], a.shape[0], candidates).transpose(0, 1)
    if bags:
        return _reduce(
            mil_nce_from_scores(full, cols, b_mask_all.any(-1), real, offset, temperature, logit_scale),
            reduction,
        )
    return _reduce(nce_from_scores(full[..., 0], cols[..., 0], offset, temperature, logit_scale), reduction)


@dataclass
class FineGrainedOutput:
    """``loss`` (the mean), ``per_sample`` losses [B] and, on request, the positive pairs' ``attention``
    maps (:func:`paired_attention`)."""

    loss: Tensor
    per_sample: Tensor
    attention: dict[str, Tensor] | None = None


class FineGrainedNCE(nn.Module):
    """:func:`finegrained_nce` as a module.

    Args:
        tau: temperature τ of the contrastive softmax over the batch (0.07, as the coarse losses).
        tau_att: temperature τ_att of the attention over tokens; small values attend to the best-matching
            tokens only, large ones approach mean pooling of the token similarities.
        direction: ``both``, ``over_a`` or ``over_b`` (see :class:`PoolDirection`).
        chunk_size: rows per chunk of the [B, B, K, J] similarity (default: a 4 MiB budget).
        gather: take negatives from every data-parallel rank.
        compile: run the elementwise passes of the scores through ``torch.compile``
            (:mod:`~harmonia.losses.pooled_compiled`; the first batch of each shape compiles).
    """

    def __init__(
        self,
        tau: float = 0.07,
        tau_att: float = 0.1,
        direction: PoolDirection | str = PoolDirection.BOTH,
        chunk_size: int | None = None,
        gather: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if tau <= 0 or tau_att <= 0 or not math.isfinite(tau * tau_att):
            raise ValueError(f"FineGrainedNCE: tau and tau_att must be positive, got {tau}, {tau_att}")
        self.tau, self.tau_att, self.direction = tau, tau_att, PoolDirection(direction)
        self.chunk_size, self.gather, self.compiled = chunk_size, gather, compile

    def forward(
        self,
        a: Tensor,
        b: Tensor,
        a_mask: Tensor | None = None,
        b_mask: Tensor | None = None,
        return_attention: bool = False,
        logit_scale: Tensor | None = None,
    ) -> FineGrainedOutput:
        """The loss of ``a`` and ``b`` (see :func:`finegrained_nce`); a ``logit_scale`` replaces 1/τ."""
        per_sample = finegrained_nce(
            a,
            b,
            a_mask,
            b_mask,
            self.tau if logit_scale is None else None,
            self.tau_att,
            self.direction,
            "none",
            chunk_size=self.chunk_size,
            gather=self.gather,
            logit_scale=logit_scale,
            compile=self.compiled,
        )
        attention = None
        if return_attention:
            with torch.no_grad():
                attention = paired_attention(a, b, a_mask, b_mask, self.tau_att)
        return FineGrainedOutput(per_sample.mean(), per_sample, attention)
