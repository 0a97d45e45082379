"""Attention-pooled token scores with a hand-written backward: the fine-grained loss's inner kernel.

For items a [N_a, K, D] and b [N_b, J, D] (padding zeroed) the token similarities S_kj = a_k · b_j of every
pair (i, n) are pooled into one score (Wang & Karout, BMVC 2021):

    over_a:  α_kj = softmax_k(S_kj / τ),   s_a = Σ_j w_j p_j,   p_j = Σ_k α_kj S_kj,   w_j = m^b_j / Σ_j m^b_j
    over_b:  β_kj = softmax_j(S_kj / τ),   s_b = Σ_k v_k q_k,   q_k = Σ_j β_kj S_kj,   v_k = m^a_k / Σ_k m^a_k
    both:    s = ½ (s_a + s_b)

(m the real-token masks). The kernel works with T = S/τ (the matmul of a/τ and b) and one exponential shared
by both softmaxes, E_kj = m^a_k m^b_j exp(T_kj − c), c the chunk's largest T: α_kj = E_kj / Σ_k E_kj and
β_kj = E_kj / Σ_j E_kj. The derivative is the softmax's Jacobian applied to S plus the direct term,

    ∂s_a/∂S_kj = w_j α_kj (1 + T_kj − p_j/τ),        ∂s_b/∂S_kj = v_k β_kj (1 + T_kj − q_k/τ),

so with upstream gradient g, ∂L/∂S_kj = E_kj · (A_j + B_k + T_kj (C_j + D_k)) where C_j = g w_j / Σ_k E_kj,
A_j = C_j (1 − p_j/τ), and D_k, B_k the same with v_k, q_k, Σ_j E_kj. The forward keeps only these pooled
statistics (sizes [N_a, N_b, J] and [N_a, K, N_b]); a chunk's backward recomputes T (one matmul) and E, makes
∂S in four elementwise passes and runs the two matmuls ∂a = ∂S·b, ∂b = ∂Sᵀ·a that any implementation
needs. Nothing of size [N_a, N_b, K, J] is kept between forward and backward: memory is that of one chunk.
T is laid out [ca, K, N_b, J], as the matmul gives it.

A row whose tokens are all padding has α (or β) = 0 here where the masked softmax of the reference gives a
uniform row; its tokens are zero, so p (or q) is 0 either way, and the entries of ∂S at padded tokens meet
only zeros in ∂S·b, ∂Sᵀ·a. When the similarities span more than ``MAX_EXP_RANGE``·τ (unnormalized tokens),
one shared exponential could underflow, and the chunk runs the row-wise stable softmaxes through autograd.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

#: the widest (max − min)/τ of a chunk's similarities for the shared exponential (exp(−60) ≈ 1e−26 > 0)
MAX_EXP_RANGE = 60.0

Reference = Callable[[Tensor, Tensor | None, Tensor, Tensor | None], Tensor]


def _weights(mask: Tensor | None, count: int, like: Tensor) -> Tensor | float:
    """``m / Σ m`` per item (the masked mean's weights), or 1/count without a mask."""
    if mask is None:
        return 1.0 / count
    weights = mask.to(like.dtype)
    return weights / weights.sum(-1, keepdim=True).clamp(min=1)


def _nonzero(z: Tensor) -> Tensor:
    """Softmax normalizers, with 1 for rows of padding only (their E is all zero: α = 0, not 0/0)."""
    return z.masked_fill_(z == 0, 1.0)


class _Chunk:
    """T = S/τ of one chunk of a's rows ([ca, K, Nb, J] layout) and its pooled statistics.

    Built without ``saved`` (the forward): T, its range, and the statistics ``z_a`` = Σ_k E, ``p`` (in units
    of 1/τ: Σ_k E T / z_a) [ca, Nb, J] and ``z_b``, ``q`` [ca, K, Nb] of the directions pooled, and the
    scores. Built with the forward's :meth:`saved` statistics (the backward): T only.
    """

    def __init__(
        self,
        a: Tensor,
        b: Tensor,
        a_mask: Tensor | None,
        b_mask: Tensor | None,
        tau: float,
        over_a: bool,
        over_b: bool,
        saved: tuple[Any, ...] | None = None,
    ) -> None:
        ca, k, d = a.shape
        nb, j, _ = b.shape
        self.masks, self.over_a, self.over_b = (a_mask, b_mask), over_a, over_b
        self.half = 0.5 if over_a and over_b else 1.0
        self.t = ((a * (1.0 / tau)).reshape(ca * k, d) @ b.reshape(nb * j, d).T).view(ca, k, nb, j)
        self.w = _weights(b_mask, j, self.t)  # [Nb, J] or a scalar
        v = _weights(a_mask, k, self.t)  # [ca, K] or a scalar
        self.v = v[:, :, None] if isinstance(v, Tensor) else v
        if saved is not None:
            self.stable, self.high, self.z_a, self.p, self.z_b, self.q = saved
            return
        self.z_a = self.p = self.z_b = self.q = None
        low, high = torch.aminmax(self.t)
        self.stable, self.high = float(high - low) <= MAX_EXP_RANGE, float(high)
        if not self.stable:
            return
        self.pool()
        self.scores = self.t.new_zeros(ca, nb)
        if over_a:
            self.scores += (self.half * tau) * (self.p * self.w).sum(-1)
        if over_b:
            self.scores += (self.half * tau) * (self.q * self.v).sum(1)

    def saved(self) -> tuple[Any, ...]:
        return self.stable, self.high, self.z_a, self.p, self.z_b, self.q

    def pool(self) -> None:
        """Set ``z_a``, ``p`` (over_a: softmax over K, dim 1) and ``z_b``, ``q`` (over_b: over J, dim 3)."""
        e = self.exp(self.t.sub(self.high))
        et = e * self.t
        if self.over_a:
            self.z_a = _nonzero(e.sum(1))
            self.p = et.sum(1).div_(self.z_a)
        if self.over_b:
            ones = e.new_ones(e.shape[3])
            self.z_b = _nonzero(
                e @ ones
            )  # the sums over J, the short inner dim, as one matrix-vector product
            self.q = (et @ ones).div_(self.z_b)

    def exp(self, shifted: Tensor) -> Tensor:
        """E = m^a m^b exp(T − c), computed in place in ``shifted`` = T − c."""
        e = shifted.exp_()
        a_mask, b_mask = self.masks
        if a_mask is not None:
            e.mul_(a_mask[:, :, None, None])
        if b_mask is not None:
            e.mul_(b_mask[None, None])
        return e

    def grad_sim(self, grad: Tensor) -> Tensor:
        """∂L/∂S [ca, K, Nb, J] for the upstream gradient ``grad`` [ca, Nb] (module docstring)."""
        coefficients: list[tuple[Tensor, Tensor]] = []  # (A + T C) broadcast over K, (B + T D) over J
        if self.over_a:
            c = grad[:, :, None] * (self.half * self.w) / self.z_a  # [ca, Nb, J]
            coefficients.append(((c * (1 - self.p))[:, None], c[:, None]))
        if self.over_b:
            d = grad[:, None, :] * (self.half * self.v) / self.z_b  # [ca, K, Nb]
            coefficients.append(((d * (1 - self.q))[..., None], d[..., None]))
        return self.combine(coefficients)

    def combine(self, coefficients: list[tuple[Tensor, Tensor]]) -> Tensor:
        """E ∘ Σ (shift + T ∘ slope) over the (shift, slope) pairs, each broadcast over [ca, K, Nb, J]."""
        (shift, slope), *rest = coefficients
        out = torch.addcmul(shift, self.t, slope)
        for shift, slope in rest:
            out.addcmul_(self.t, slope).add_(shift)
        return out.mul_(self.exp(self.t.sub_(self.high)))  # T is not needed after this: E takes its memory


class PooledScores(torch.autograd.Function):
    """:func:`pooled_scores` chunk by chunk over a's rows, with the hand-written backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        a: Tensor,
        b: Tensor,
        a_mask: Tensor | None,
        b_mask: Tensor | None,
        tau: float,
        over_a: bool,
        over_b: bool,
        chunk_size: int,
        reference: Reference,
        chunk_type: type[_Chunk],
    ) -> Tensor:
        ctx.save_for_backward(a, b)
        ctx.masks, ctx.settings = (a_mask, b_mask), (tau, over_a, over_b, chunk_size, reference, chunk_type)
        parts, ctx.chunks = [], []
        for start in range(0, a.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            am = None if a_mask is None else a_mask[rows]
            chunk = chunk_type(a[rows], b, am, b_mask, tau, over_a, over_b)
            parts.append(chunk.scores if chunk.stable else reference(a[rows], am, b, b_mask))
            ctx.chunks.append(chunk.saved())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        a, b = ctx.saved_tensors
        a_mask, b_mask = ctx.masks
        tau, over_a, over_b, chunk_size, reference, chunk_type = ctx.settings
        grad_a = torch.empty_like(a) if ctx.needs_input_grad[0] else None
        grad_b = torch.zeros_like(b) if ctx.needs_input_grad[1] else None
        nb, j, d = b.shape
        for index, start in enumerate(range(0, a.shape[0], chunk_size)):
            rows = slice(start, start + chunk_size)
            am = None if a_mask is None else a_mask[rows]
            a_rows = a[rows]
            ca, k = a_rows.shape[:2]
            saved = ctx.chunks[index]
            if not saved[0]:  # not stable: through autograd of the reference
                with torch.enable_grad():
                    leaf_a, leaf_b = a_rows.detach().requires_grad_(), b.detach().requires_grad_()
                    scores = reference(leaf_a, am, leaf_b, b_mask)
                    da, db = torch.autograd.grad(scores, (leaf_a, leaf_b), grad[rows])
                if grad_a is not None:
                    grad_a[rows] = da
                if grad_b is not None:
                    grad_b += db
                continue
            chunk = chunk_type(a_rows, b, am, b_mask, tau, over_a, over_b, saved)
            g = chunk.grad_sim(grad[rows]).view(ca * k, nb * j)
            if grad_a is not None:
                grad_a[rows] = (g @ b.reshape(nb * j, d)).view(ca, k, d)
            if grad_b is not None:
                grad_b.add_((g.T @ a_rows.reshape(ca * k, d)).view(nb, j, d))
        return grad_a, grad_b, None, None, None, None, None, None, None, None


def pooled_scores(
    a: Tensor,
    b: Tensor,
    a_mask: Tensor | None,
    b_mask: Tensor | None,
    tau: float,
    over_a: bool,
    over_b: bool,
    chunk_size: int,
    reference: Reference,
    chunk_type: type[_Chunk] | None = None,
) -> Tensor:
    """Attention-pooled scores [N_a, N_b] (module docstring). Masks are None when every token is real;
    padded tokens of ``a`` and ``b`` must be zero. ``reference(a, a_mask, b, b_mask)`` computes a chunk's
    scores through autograd with row-wise stable softmaxes, for chunks whose similarities span too wide a
    range for one shared exponential. ``chunk_type``: how a chunk's elementwise passes run (default: eager;
    :class:`~harmonia.losses.pooled_compiled.CompiledChunk` compiles them)."""
    chunk_type = chunk_type or _Chunk
    return PooledScores.apply(a, b, a_mask, b_mask, tau, over_a, over_b, chunk_size, reference, chunk_type)  # type: ignore[no-any-return]
