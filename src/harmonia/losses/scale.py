"""A learnable logit scale for contrastive losses, as CLIP trains it (Radford et al., ICML 2021).

Instead of dividing the similarities by a fixed temperature τ, CLIP multiplies them by s = exp(t) with t
learned alongside the encoders:

    logits = s · x yᵀ,   s = exp(t),   t₀ = log(1/0.07),   t clamped to [0, log 100] after every step,

so that 1 ≤ s ≤ 100 (open_clip: ``init_logit_scale = log(1/0.07)`` and ``logit_scale.clamp_(0, log(100))``
in the training loop; the clamp keeps training stable once the scale grows). Learning t rather than s
keeps s positive and makes steps multiplicative.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

#: CLIP's initial scale, 1/0.07
DEFAULT_INIT = 1 / 0.07
#: CLIP's cap on the scale
DEFAULT_MAX = 100.0


class LogitScale(nn.Module):
    """s = exp(t) with learnable t (a scalar parameter ``log_scale``); ``module()`` returns s.

    Pass ``module()`` as ``logit_scale`` to :func:`~harmonia.losses.nce`, :func:`~harmonia.losses.mil_nce`
    or :class:`~harmonia.losses.VATTLoss`, and call :meth:`clamp_` after every optimizer step. Keep the
    module inside the model that DistributedDataParallel wraps (as
    :class:`~harmonia.models.pretrain.TriModalPretrainModel` does), so that its gradient is averaged over
    ranks like the encoders', and out of weight decay (as open_clip).

    Args:
        init: the initial scale s₀ = exp(t₀), within [min_scale, max_scale] (CLIP: 1/0.07).
        max_scale: the largest scale :meth:`clamp_` lets through (CLIP: 100).
        min_scale: the smallest (CLIP clamps t at 0: s ≥ 1).
    """

    def __init__(
        self, init: float = DEFAULT_INIT, max_scale: float = DEFAULT_MAX, min_scale: float = 1.0
    ) -> None:
        super().__init__()
        values = (init, max_scale, min_scale)
        if not all(isinstance(v, int | float) and math.isfinite(v) and v > 0 for v in values):
            raise ValueError(f"LogitScale: init, max_scale and min_scale must be positive, got {values}")
        if not min_scale <= init <= max_scale:
            raise ValueError(
                f"LogitScale: init={init} must lie in [min_scale, max_scale] = [{min_scale}, {max_scale}] "
                f"(a temperature of 1/init); raise max_scale or start from a smaller scale"
            )
        self.max_scale, self.min_scale = float(max_scale), float(min_scale)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init)))

    def forward(self) -> Tensor:
        """The scale s = exp(t), a 0-dim tensor that carries t's gradient."""
        return self.log_scale.exp()

    @torch.no_grad()
    def clamp_(self) -> LogitScale:
        """Clamp t in place to [log min_scale, log max_scale]; call after every optimizer step."""
        self.log_scale.clamp_(math.log(self.min_scale), math.log(self.max_scale))
        return self

    def extra_repr(self) -> str:
        return f"scale={float(self.log_scale.detach().exp()):.4g}, max_scale={self.max_scale:g}"
