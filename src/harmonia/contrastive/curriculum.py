"""Gradient-based curriculum (DESIGN §1.6): train first on triplets whose objectives agree.

Sample i's conflict score is c_i = cos(g^va_i, g^vt_i), the cosine the realignment computes anyway; a low
c_i marks a likely misaligned triplet. At step t a sample is kept when

* ``keep="threshold"``: c_i ≥ γ(t), with γ annealed from ``start`` (e.g. 0: only agreeing pairs) to ``end``
  (−1: every pair) over ``steps`` steps;
* ``keep="top_fraction"``: c_i is among the ⌈p(t)·B⌉ highest, with p annealed from ``start_fraction`` to 1.

The schedule s(u), u = min(t / steps, 1), is ``linear`` (s = u) or ``cosine`` (s = (1 − cos πu) / 2).
At least one sample is always kept.
"""

from __future__ import annotations

import enum
import math

import torch
from torch import Tensor


class CurriculumShape(str, enum.Enum):
    LINEAR = "linear"
    COSINE = "cosine"


class CurriculumKeep(str, enum.Enum):
    THRESHOLD = "threshold"
    TOP_FRACTION = "top_fraction"


class ConflictCurriculum:
    """Which samples of a batch to train on, from their conflict scores and the step."""

    def __init__(
        self,
        start: float = 0.0,
        end: float = -1.0,
        steps: int = 1000,
        shape: CurriculumShape | str = CurriculumShape.LINEAR,
        keep: CurriculumKeep | str = CurriculumKeep.THRESHOLD,
        start_fraction: float = 0.5,
    ) -> None:
        if steps < 1:
            raise ValueError(f"ConflictCurriculum: steps must be >= 1, got {steps}")
        if not -1 <= end <= start <= 1:
            raise ValueError(
                f"ConflictCurriculum: need -1 <= end <= start <= 1, got start={start}, end={end}"
            )
        if not 0 < start_fraction <= 1:
            raise ValueError(f"ConflictCurriculum: start_fraction must be in (0, 1], got {start_fraction}")
        self.start, self.end, self.steps = start, end, steps
        self.shape, self.keep = CurriculumShape(shape), CurriculumKeep(keep)
        self.start_fraction = start_fraction

    def progress(self, step: int) -> float:
        """s(u) in [0, 1]."""
        u = min(max(step, 0) / self.steps, 1.0)
        return u if self.shape is CurriculumShape.LINEAR else (1 - math.cos(math.pi * u)) / 2

    def threshold(self, step: int) -> float:
        """γ(t) = start + (end − start) s(u)."""
        return self.start + (self.end - self.start) * self.progress(step)

    def fraction(self, step: int) -> float:
        """p(t) = start_fraction + (1 − start_fraction) s(u)."""
        return self.start_fraction + (1 - self.start_fraction) * self.progress(step)

    def keep_mask(self, cos: Tensor, step: int) -> Tensor:
        """Boolean [B]: the samples trained on at ``step``."""
        if self.keep is CurriculumKeep.THRESHOLD:
            mask = cos >= self.threshold(step)
        else:
            k = max(1, math.ceil(self.fraction(step) * cos.numel()))
            mask = torch.zeros_like(cos, dtype=torch.bool)
            mask[cos.topk(k).indices] = True
        if not bool(mask.any()):
            mask[cos.argmax()] = True
        return mask

    def __repr__(self) -> str:
        return (
            f"ConflictCurriculum(start={self.start}, end={self.end}, steps={self.steps}, "
            f"shape={self.shape.value}, keep={self.keep.value}, start_fraction={self.start_fraction})"
        )
