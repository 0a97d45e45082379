"""An opt-in ``torch.compile`` of the elementwise passes of the fine-grained loss's kernel.

Eager, a chunk of :mod:`harmonia.losses.pooled_scores` materializes the shared exponential
E = m^a m^b exp(T − c) and E∘T before reducing them, and its backward multiplies the coefficients
into the stored E: several passes over [ca, K, Nb, J] tensors. Compiled (TorchInductor), the pooled
statistics Σ_k E, Σ_k E T, Σ_j E, Σ_j E T come out of fused loops that recompute the exponential instead
of storing it, and ∂L/∂S = E ∘ Σ (shift + T ∘ slope) is one loop: a chunk reads S a few times and writes ∂S
once. The matmuls (T, ∂S·b, ∂Sᵀ·a) stay as they are. Same formulas as eager, equal up to rounding (tested
in float64). The first call for each set of shapes compiles, which takes seconds to a minute on a CPU and
needs a C++ compiler there.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from harmonia.losses.pooled_scores import _Chunk


def _exp(shifted: Tensor, a_mask: Tensor | None, b_mask: Tensor | None) -> Tensor:
    e = torch.exp2(shifted)  # the kernel works in units of U = T·log₂e
    for mask in (a_mask, b_mask):  # broadcast to [ca, K, J, Nb] already
        if mask is not None:
            e = e * mask
    return e


def _pool(
    t: Tensor, high: Tensor, a_mask: Tensor | None, b_mask: Tensor | None, over_a: bool, over_b: bool
) -> tuple[Tensor | None, ...]:
    e = _exp(t - high, a_mask, b_mask)
    z_a = p = z_b = q = None
    if over_a:
        total = e.sum(1)
        z_a = torch.where(total == 0, 1.0, total)  # rows of padding only: α = 0, not 0/0
        p = (e * t).sum(1) / z_a
    if over_b:
        total = e.sum(2)
        z_b = torch.where(total == 0, 1.0, total)
        q = (e * t).sum(2) / z_b
    return z_a, p, z_b, q


def _combine(
    t: Tensor,
    high: Tensor,
    a_mask: Tensor | None,
    b_mask: Tensor | None,
    coefficients: list[tuple[Tensor, Tensor]],
) -> Tensor:
    total = sum(shift + t * slope for shift, slope in coefficients)
    return _exp(t - high, a_mask, b_mask) * total


@functools.cache
def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    return torch.compile(fn, fullgraph=True)


class CompiledChunk(_Chunk):
    """A chunk of :class:`~harmonia.losses.pooled_scores.PooledScores` whose elementwise passes are
    compiled; E is recomputed where it is needed, never stored."""

    def pool(self) -> None:
        high = self.t.new_tensor(self.high)  # a tensor: a new maximum is no new compilation
        self.z_a, self.p, self.z_b, self.q = _compiled(_pool)(
            self.t, high, *self.masks, self.over_a, self.over_b
        )

    def combine(self, coefficients: list[tuple[Tensor, Tensor]]) -> Tensor:
        high = self.t.new_tensor(self.high)
        return _compiled(_combine)(self.t, high, *self.masks, coefficients)  # type: ignore[no-any-return]
