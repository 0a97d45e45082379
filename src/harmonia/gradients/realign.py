"""Per-sample gradient realignment between two objectives.

Given row-wise gradients g_a, g_b [B, D] of two losses (e.g. L_va and L_vt) with respect to the same
per-sample quantity, each row is realigned on its own:

* ``pcgrad`` (Yu et al., NeurIPS 2020): where cos(g_a, g_b) < 0, project each onto the normal plane of the
  other, both from the *original* vectors,

      g_a' = g_a − (g_a·g_b / ‖g_b‖²) g_b,    g_b' = g_b − (g_a·g_b / ‖g_a‖²) g_a;

* ``gradvac`` (Wang et al., ICLR 2021, Gradient Vaccine): where cos < φ_T (a target, usually a moving average
  of past cosines), add the multiple of the other gradient that raises the cosine to exactly φ_T,

      g_a' = g_a + ‖g_a‖ (φ_T √(1−φ²) − φ √(1−φ_T²)) / (‖g_b‖ √(1−φ_T²)) · g_b,  and symmetrically;

* ``none``: leave both unchanged (the cosines are still reported).
"""

from __future__ import annotations

import enum

import torch
from torch import Tensor

EPS = 1e-12


class RealignRule(str, enum.Enum):
    PCGRAD = "pcgrad"
    GRADVAC = "gradvac"
    NONE = "none"


def row_cosine(g_a: Tensor, g_b: Tensor) -> Tensor:
    """cos(g_a,i, g_b,i) for every row i (0 where a row is zero)."""
    dot = (g_a * g_b).sum(-1)
    return dot / (g_a.norm(dim=-1) * g_b.norm(dim=-1)).clamp(min=EPS)


def realign(
    g_a: Tensor, g_b: Tensor, rule: RealignRule | str = RealignRule.PCGRAD, target: float | Tensor = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Realigned ``(g_a', g_b')`` and the original per-row cosine ``cos`` [B].

    ``target`` is φ_T of ``gradvac`` (a float or one value per row); ``pcgrad`` ignores it.
    """
    rule = RealignRule(rule)
    if g_a.shape != g_b.shape or g_a.dim() != 2:
        raise ValueError(
            f"realign: expected two [B, D] gradients of one shape, got {tuple(g_a.shape)}, {tuple(g_b.shape)}"
        )
    cos = row_cosine(g_a, g_b)
    if rule is RealignRule.NONE:
        return g_a, g_b, cos
    norm_a, norm_b = g_a.norm(dim=-1, keepdim=True), g_b.norm(dim=-1, keepdim=True)
    if rule is RealignRule.PCGRAD:
        conflict = (cos < 0).to(g_a.dtype)[:, None]
        dot = (g_a * g_b).sum(-1, keepdim=True)
        new_a = g_a - conflict * dot / (norm_b**2).clamp(min=EPS) * g_b
        new_b = g_b - conflict * dot / (norm_a**2).clamp(min=EPS) * g_a
        return new_a, new_b, cos
    phi_t = torch.as_tensor(target, dtype=g_a.dtype, device=g_a.device).expand_as(cos)
    below = (cos < phi_t).to(g_a.dtype)[:, None]
    sin, sin_t = (1 - cos**2).clamp(min=0).sqrt(), (1 - phi_t**2).clamp(min=EPS).sqrt()
    coef = ((phi_t * sin - cos * sin_t) / sin_t)[:, None]
    new_a = g_a + below * norm_a * coef / norm_b.clamp(min=EPS) * g_b
    new_b = g_b + below * norm_b * coef / norm_a.clamp(min=EPS) * g_a
    return new_a, new_b, cos
