"""Gradient-based curriculum: train first on triplets whose objectives agree.

Sample i's conflict score is c_i = cos(g^va_i, g^vt_i), the cosine the realignment computes anyway; a low
c_i marks a likely misaligned triplet. At step t a sample is kept when

* ``keep="threshold"``: c_i ≥ γ(t), with γ annealed from ``start`` (e.g. 0: only agreeing pairs) to ``end``
  (−1: every pair) over ``steps`` steps;
* ``keep="top_fraction"``: c_i is among the ⌈p(t)·B⌉ highest, with p annealed from ``start_fraction`` to 1.

The schedule s(u), u = min((t − t_0) / steps, 1), is ``linear`` (s = u) or ``cosine``
(s = (1 − cos πu) / 2), counted from the step t_0 at which the curriculum starts. Before t_0 nothing is
dropped: the conflict score is noise until both losses have learned a semantic direction, so the
curriculum waits ``warmup_steps`` steps (t_0 = warmup_steps), or, with ``deferred=True``, until
:meth:`ConflictCurriculum.begin` is called (the trainer calls it when its learnability gate passes on
validation data; t_0 is then the later of that step and the warm-up). At least one sample is always kept.
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
        warmup_steps: int = 0,
        deferred: bool = False,
    ) -> None:
        if steps < 1:
            raise ValueError(f"ConflictCurriculum: steps must be >= 1, got {steps}")
        if not -1 <= end <= start <= 1:
            raise ValueError(
                f"ConflictCurriculum: need -1 <= end <= start <= 1, got start={start}, end={end}"
            )
        if not 0 < start_fraction <= 1:
            raise ValueError(f"ConflictCurriculum: start_fraction must be in (0, 1], got {start_fraction}")
        if warmup_steps < 0:
            raise ValueError(f"ConflictCurriculum: warmup_steps must be >= 0, got {warmup_steps}")
        self.start, self.end, self.steps = start, end, steps
        self.shape, self.keep = CurriculumShape(shape), CurriculumKeep(keep)
        self.start_fraction = start_fraction
        self.warmup_steps, self.deferred = warmup_steps, deferred
        #: t_0, the step at which dropping starts (None: deferred and not begun yet)
        self.start_step: int | None = None if deferred else warmup_steps

    def begin(self, step: int) -> None:
        """Start a deferred curriculum at ``step`` (not before the warm-up); later calls change nothing."""
        if self.start_step is None:
            self.start_step = max(step, self.warmup_steps)

    def active(self, step: int) -> bool:
        """Whether the curriculum drops anything at ``step`` (it has started: step ≥ t_0)."""
        return self.start_step is not None and step >= self.start_step

    def progress(self, step: int) -> float:
        """s(u) in [0, 1] (0 before the start)."""
        if not self.active(step):
            return 0.0
        assert self.start_step is not None
        u = min((step - self.start_step) / self.steps, 1.0)
        return u if self.shape is CurriculumShape.LINEAR else (1 - math.cos(math.pi * u)) / 2

    def threshold(self, step: int) -> float:
        """γ(t) = start + (end − start) s(u)."""
        return self.start + (self.end - self.start) * self.progress(step)

    def fraction(self, step: int) -> float:
        """p(t) = start_fraction + (1 − start_fraction) s(u)."""
        return self.start_fraction + (1 - self.start_fraction) * self.progress(step)

    def keep_mask(self, cos: Tensor, step: int) -> Tensor:
        """Boolean [B]: the samples trained on at ``step`` (all of them before the start)."""
        if not self.active(step):
            return torch.ones_like(cos, dtype=torch.bool)
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
            f"shape={self.shape.value}, keep={self.keep.value}, start_fraction={self.start_fraction}, "
            f"warmup_steps={self.warmup_steps}, deferred={self.deferred})"
        )

    def state_dict(self) -> dict[str, int | None]:
        return {"start_step": self.start_step}

    def load_state_dict(self, state: dict[str, int | None]) -> None:
        self.start_step = state.get("start_step", None if self.deferred else self.warmup_steps)
