"""Attention-pooled token scores with a hand-written backward: the fine-grained loss's inner kernel.

For items a [N_a, K, D] and b [N_b, J, D] (padding zeroed) the token similarities S_kj = a_k · b_j of every
pair (i, n) are pooled into one score (Wang & Karout, BMVC 2021):

    over_a:  α_kj = softmax_k(S_kj / τ),   s_a = Σ_j w_j p_j,   p_j = Σ_k α_kj S_kj,   w_j = m^b_j / Σ_j m^b_j
    over_b:  β_kj = softmax_j(S_kj / τ),   s_b = Σ_k v_k q_k,   q_k = Σ_j β_kj S_kj,   v_k = m^a_k / Σ_k m^a_k
    both:    s = ½ (s_a + s_b)

(m the real-token masks). The kernel works with T = S/τ and one exponential shared by both softmaxes,
E_kj = m^a_k m^b_j exp(T_kj − c): α_kj = E_kj / Σ_k E_kj and β_kj = E_kj / Σ_j E_kj. The shift c is 0 when
Cauchy–Schwarz bounds |T| by :data:`MAX_EXP_RANGE` (L2-normalized tokens: |T| ≤ 1/τ), so that exp(T) cannot
overflow; otherwise it is the chunk's largest T. The matmul of a and b·log₂e/τ gives U = T·log₂e, and
E = 2^(U − c/ln 2): exp2 costs about half of exp on CPU; the statistics below are kept in units of U and
multiplied by ln 2 where T's appear. The derivative is the softmax's Jacobian applied to S plus the direct
term,

    ∂s_a/∂S_kj = w_j α_kj (1 + T_kj − p_j/τ),        ∂s_b/∂S_kj = v_k β_kj (1 + T_kj − q_k/τ),

so with upstream gradient g, ∂L/∂S_kj = E_kj · (A_j + B_k + T_kj (C_j + D_k)) where C_j = g w_j / Σ_k E_kj,
A_j = C_j (1 − p_j/τ), and D_k, B_k the same with v_k, q_k, Σ_j E_kj. The forward keeps only these pooled
statistics (sizes [N_a, J, N_b] and [N_a, K, N_b]); a chunk's backward recomputes T (one matmul) and E, makes
∂S in four elementwise passes and runs the two matmuls ∂a = ∂S·b, ∂b = ∂Sᵀ·a that any implementation
needs. Nothing of size [N_a, N_b, K, J] is kept between forward and backward: memory is that of one chunk.

T is laid out [ca, K, J, N_b] (b's rows enter the matmul token-major): the innermost dimension is the long
one, N_b, and every broadcast of a pooled statistic (over K or over J) runs along an outer dimension, which
vectorizes well; with J innermost (8 words) the broadcasts over J and the sums over J ran several times
slower on CPU.

A row whose tokens are all padding has α (or β) = 0 here where the masked softmax of the reference gives a
uniform row; its tokens are zero, so p (or q) is 0 either way, and the entries of ∂S at padded tokens meet
only zeros in ∂S·b, ∂Sᵀ·a. When the similarities span more than ``MAX_EXP_RANGE``·τ (unnormalized tokens),
one shared exponential could underflow, and the chunk runs the row-wise stable softmaxes through autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

#: the widest (max − min)/τ of a chunk's similarities for the shared exponential (exp(−60) ≈ 1e−26 > 0)
MAX_EXP_RANGE = 60.0

#: T per unit of U = T·log₂e, the kernel's working similarity (E = 2^U = e^T)
LN2 = math.log(2.0)

Reference = Callable[[Tensor, Tensor | None, Tensor, Tensor | None], Tensor]


def exp_shift(a: Tensor, b: Tensor, tau: float) -> float | None:
    """0.0 when exp(T) needs no shift, else None (each chunk then shifts by its largest T).

    By Cauchy–Schwarz |T_kj| ≤ c = max_k ‖a_k‖ · max_j ‖b_j‖ / τ. When c ≤ :data:`MAX_EXP_RANGE`, exp(T) lies
    in [e^−60, e^60], far inside the range of float32: the chunks need neither the pass that finds their
    largest T nor the one that subtracts it.
    """
    if a.dtype not in (torch.float32, torch.float64) or a.numel() == 0 or b.numel() == 0:
        return None
    norms = [float(torch.linalg.vector_norm(x.detach(), dim=-1).max()) for x in (a, b)]
    return 0.0 if norms[0] * norms[1] / tau <= MAX_EXP_RANGE else None


def _weights(mask: Tensor | None, count: int, like: Tensor, dim: int) -> Tensor | float:
    """``m / Σ m`` over the tokens (dimension ``dim``): the masked mean's weights; 1/count without a mask."""
    if mask is None:
        return 1.0 / count
    weights = mask.to(like.dtype)
    return weights / weights.sum(dim, keepdim=True).clamp(min=1)


def _nonzero(z: Tensor) -> Tensor:
    """Softmax normalizers, with 1 for rows of padding only (their E is all zero: α = 0, not 0/0)."""
    return z.masked_fill_(z == 0, 1.0)


class Workspace:
    """The [chunk, K, J, N_b] buffers of one forward or backward, reused from chunk to chunk.

    A fresh 4 MiB tensor per pass would be freed and allocated again at every chunk; on CPU each new
    allocation of that size touches fresh pages (thousands of page faults per call). Buffer ``index`` holds
    ``count`` chunk blocks; :meth:`take` gives a view of ``shape`` at its start (a last, shorter chunk uses
    part of it).
    """

    def __init__(self, like: Tensor, block: int) -> None:
        self.like, self.block = like, block
        self.buffers: dict[int, Tensor] = {}

    def take(self, index: int, count: int, *shape: int) -> Tensor:
        if index not in self.buffers:
            self.buffers[index] = self.like.new_empty(count * self.block)
        return self.buffers[index][: math.prod(shape)].view(shape)


class _Chunk:
    """U = S·log₂e/τ of one chunk of a's rows ([ca, K, J, Nb] layout) and its pooled statistics.

    ``b_scaled`` is b·log₂e/τ laid out [J, Nb, D]; ``b_mask`` is [J, Nb] (or None). ``shift``: the shift of
    E = 2^(U − shift), in units of U (0, or None: the chunk's largest U, found here). Built without ``saved``
    (the forward): U (``self.t``), the statistics ``z_a`` = Σ_k E, ``p`` = Σ_k E U / z_a [ca, J, Nb] and
    ``z_b``, ``q`` [ca, K, Nb] of the directions pooled, and the scores [ca, Nb]. Built with the forward's
    :meth:`saved` statistics (the backward): U only.
    """

    def __init__(
        self,
        a: Tensor,
        b_scaled: Tensor,
        a_mask: Tensor | None,
        b_mask: Tensor | None,
        tau: float,
        over_a: bool,
        over_b: bool,
        workspace: Workspace,
        shift: float | None = None,
        saved: tuple[Any, ...] | None = None,
    ) -> None:
        ca, k, d = a.shape
        j, nb, _ = b_scaled.shape
        self.over_a, self.over_b, self.workspace = over_a, over_b, workspace
        self.masks = (
            None if a_mask is None else a_mask[:, :, None, None],
            None if b_mask is None else b_mask[None, None],
        )
        self.half = 0.5 if over_a and over_b else 1.0
        t = workspace.take(0, 1, ca * k, j * nb)
        self.t = torch.mm(a.reshape(ca * k, d), b_scaled.view(j * nb, d).T, out=t).view(ca, k, j, nb)
        self.w = _weights(b_mask, j, self.t, dim=0)  # [J, Nb] or a scalar
        v = _weights(a_mask, k, self.t, dim=1)  # [ca, K] or a scalar
        self.v = v[:, :, None] if isinstance(v, Tensor) else v
        if saved is not None:
            self.stable, self.high, self.z_a, self.p, self.z_b, self.q = saved
            return
        self.z_a = self.p = self.z_b = self.q = None
        self.stable, self.high = True, shift
        if shift is None:
            low, high = torch.aminmax(self.t)
            self.stable, self.high = float(high - low) * LN2 <= MAX_EXP_RANGE, float(high)
        if not self.stable:
            return
        self.pool()
        self.scores = self.t.new_zeros(ca, nb)
        if over_a:
            self.scores += (self.half * tau * LN2) * (self.p * self.w).sum(1)
        if over_b:
            self.scores += (self.half * tau * LN2) * (self.q * self.v).sum(1)

    def saved(self) -> tuple[Any, ...]:
        return self.stable, self.high, self.z_a, self.p, self.z_b, self.q

    def pool(self) -> None:
        """Set ``z_a``, ``p`` (over_a: softmax over K, dim 1) and ``z_b``, ``q`` (over_b: over J, dim 2).

        E and E∘T are written side by side into one buffer, so that each direction's two sums are one
        reduction."""
        stacked = self.workspace.take(1, 2, 2, *self.t.shape)  # [E, E∘T]
        shifted = torch.sub(self.t, self.high, out=stacked[0]) if self.high else self.t
        e = self.exp(torch.exp2(shifted, out=stacked[0]))
        torch.mul(e, self.t, out=stacked[1])
        padded = any(mask is not None for mask in self.masks)  # else every E > 0
        if self.over_a:
            z_a, et = stacked.sum(2)
            self.z_a, self.p = _nonzero(z_a) if padded else z_a, et
            self.p.div_(self.z_a)
        if self.over_b:
            z_b, et = stacked.sum(3)
            self.z_b, self.q = _nonzero(z_b) if padded else z_b, et
            self.q.div_(self.z_b)

    def exp(self, e: Tensor) -> Tensor:
        """The masks multiplied into E = 2^(U − shift), in place."""
        for mask in self.masks:
            if mask is not None:
                e.mul_(mask)
        return e

    def grad_sim(self, grad: Tensor) -> Tensor:
        """∂L/∂S [ca, K, J, Nb] for the upstream gradient ``grad`` [ca, Nb] (module docstring)."""
        coefficients: list[tuple[Tensor, Tensor]] = []  # (A + T C) broadcast over K, (B + T D) over J
        if self.over_a:
            c = grad[:, None] * (self.half * self.w) / self.z_a  # [ca, J, Nb]
            coefficients.append(((c * (1 - LN2 * self.p))[:, None], LN2 * c[:, None]))
        if self.over_b:
            d = grad[:, None] * (self.half * self.v) / self.z_b  # [ca, K, Nb]
            coefficients.append(((d * (1 - LN2 * self.q))[:, :, None], LN2 * d[:, :, None]))
        return self.combine(coefficients)

    def combine(self, coefficients: list[tuple[Tensor, Tensor]]) -> Tensor:
        """E ∘ Σ (shift + U ∘ slope) over the (shift, slope) pairs, each broadcast over [ca, K, J, Nb]."""
        (shift, slope), *rest = coefficients
        out = torch.addcmul(shift, self.t, slope, out=self.workspace.take(1, 1, *self.t.shape))
        for shift, slope in rest:
            out.addcmul_(self.t, slope).add_(shift)
        shifted = self.t.sub_(self.high) if self.high else self.t  # U is not needed after this: E takes it
        return out.mul_(self.exp(shifted.exp2_()))


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
        b_scaled = (b * (math.log2(math.e) / tau)).transpose(0, 1).contiguous()  # [J, Nb, D]
        b_mask_t = None if b_mask is None else b_mask.T
        workspace = Workspace(a, min(chunk_size, a.shape[0]) * a.shape[1] * b.shape[0] * b.shape[1])
        shift = exp_shift(a, b, tau)
        parts, ctx.chunks = [], []
        for start in range(0, a.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            am = None if a_mask is None else a_mask[rows]
            chunk = chunk_type(a[rows], b_scaled, am, b_mask_t, tau, over_a, over_b, workspace, shift)
            parts.append(chunk.scores if chunk.stable else reference(a[rows], am, b, b_mask))
            ctx.chunks.append(chunk.saved())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        a, b = ctx.saved_tensors
        a_mask, b_mask = ctx.masks
        tau, over_a, over_b, chunk_size, reference, chunk_type = ctx.settings
        nb, j, d = b.shape
        b_tokens = b.transpose(0, 1).contiguous()  # [J, Nb, D]: the layout of T's columns
        b_scaled, b_flat = b_tokens * (math.log2(math.e) / tau), b_tokens.view(j * nb, d)
        b_mask_t = None if b_mask is None else b_mask.T
        grad_a = torch.empty_like(a) if ctx.needs_input_grad[0] else None
        grad_b = b_tokens.new_zeros(d, j * nb) if ctx.needs_input_grad[1] else None  # ∂bᵀ: [D, J·Nb]
        workspace = Workspace(a, min(chunk_size, a.shape[0]) * a.shape[1] * nb * j)
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
                    grad_b += db.permute(2, 1, 0).reshape(d, j * nb)
                continue
            chunk = chunk_type(a_rows, b_scaled, am, b_mask_t, tau, over_a, over_b, workspace, saved=saved)
            g = chunk.grad_sim(grad[rows]).view(ca * k, j * nb)
            if grad_a is not None:
                torch.mm(g, b_flat, out=grad_a[rows].view(ca * k, d))
            if grad_b is not None:
                grad_b.addmm_(a_rows.reshape(ca * k, d).T, g)  # faster on CPU than (∂Sᵀ·a) into [J·Nb, D]
        grad_b = None if grad_b is None else grad_b.view(d, j, nb).permute(2, 1, 0).contiguous()
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
