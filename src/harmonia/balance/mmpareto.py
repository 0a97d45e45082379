"""MMPareto: multimodal and unimodal gradients of each encoder integrated without conflict.

Wei, Hu, *MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance*, ICML 2024
(arXiv:2405.17730; official code github.com/GeWu-Lab/MMPareto_ICML2024, ``code/MMPareto.py``). The model is
trained on the multimodal loss plus one unimodal cross-entropy per modality, ``L = L_mm + sum_m L_m``, but
the two gradients reaching modality m's encoder θ^m,

    g_mm = ∇_θ^m L_mm,    g_u = ∇_θ^m L_m,

are integrated per encoder (all its parameters flattened into one vector, as the official code does):

* no conflict, ``cos(g_mm, g_u) > 0``: equal weights ``α_mm = α_u = 1/2``;
* conflict, ``cos <= 0``: the Pareto (MGDA min-norm) weights of the two gradients,
  ``α_mm = argmin_{α∈[0,1]} ‖α·g_mm + (1-α)·g_u‖² = ((g_u - g_mm)·g_u) / ‖g_mm - g_u‖²``, ``α_u = 1 - α_mm``
  (as the official ``MinNormSolver``: 0.999 / 0.001 at the degenerate ends);

then, for every parameter tensor p of the encoder, the direction ``h = 2·(α_mm·g_mm + α_u·g_u)`` gets at
least the magnitude of the plain sum and is scaled by γ (the "enhanced magnitude"):

    grad_p = γ · max(1, ‖g_mm,p + g_u,p‖ / ‖h_p‖) · h_p.

Without conflict this is ``γ·(g_mm + g_u)``. The fusion head keeps the plain gradient of the trainer's loss
(the multimodal one): harmonia's unimodal classifiers are the fusion head's per-modality parts
(``MultimodalOutput.unimodal_logits``), so the unimodal losses reach only the encoders. Defaults: γ = 1.5
(official code, hard-coded ``gamma=1.5``; BalanceMM's ``alpha: 1.5``).

As a :class:`~harmonia.balance.method.BalancingMethod`: ``adjust_loss`` takes each ``g_u`` with one extra
backward pass per modality (``torch.autograd.grad``, all-reduced over data-parallel ranks) and returns the
loss unchanged; the trainer's backward leaves ``g_mm`` in ``.grad``; ``after_backward`` writes the integrated
gradient there. Logs ``balance/mmpareto/cos/<m>``, ``balance/mmpareto/w_mm/<m>``,
``balance/mmpareto/w_uni/<m>`` and ``balance/mmpareto/uni_loss/<m>``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harmonia.balance.method import BalanceStep, BalancingMethod
from harmonia.distributed import all_reduce_sum, rank_and_world
from harmonia.errors import ConfigError
from harmonia.settings import setting


@dataclass
class MMParetoSettings:
    """MMPareto hyper-parameters (default: the official code's)."""

    gamma: float = setting(
        1.5, help="γ: scale of the encoders' integrated gradient (official code and BalanceMM: 1.5)", ge=0
    )


def _flat(grads: Sequence[Tensor]) -> Tensor:
    return torch.cat([g.reshape(-1) for g in grads]) if grads else torch.zeros(0)


def pareto_weights(g_mm: Tensor, g_uni: Tensor) -> tuple[float, float, float]:
    """``(cos, α_mm, α_u)`` for the flattened gradients of one encoder.

    ``cos > 0``: ``(1/2, 1/2)``; else the min-norm point of the segment between the two gradients (the
    official ``MinNormSolver._min_norm_element_from2``, with its 0.999 / 0.001 at the degenerate ends).
    """
    g1, g2 = g_mm.double().reshape(-1), g_uni.double().reshape(-1)
    v11, v12, v22 = float(g1 @ g1), float(g1 @ g2), float(g2 @ g2)
    norms = (v11 * v22) ** 0.5
    cos = v12 / norms if norms > 0 else 0.0
    if cos > 0:
        return cos, 0.5, 0.5
    if v12 >= v11:
        w = 0.999
    elif v12 >= v22:
        w = 0.001
    else:
        w = (v22 - v12) / (v11 + v22 - 2 * v12)
    return cos, w, 1.0 - w


def integrate(
    g_mm: Sequence[Tensor], g_uni: Sequence[Tensor], w_mm: float, w_uni: float, gamma: float
) -> list[Tensor]:
    """Per parameter tensor: ``γ · max(1, ‖g_mm + g_u‖ / ‖h‖) · h`` with ``h = 2(w_mm·g_mm + w_uni·g_u)``."""
    out = []
    for a, b in zip(g_mm, g_uni, strict=True):
        h = 2 * w_mm * a + 2 * w_uni * b
        h_norm = h.norm()
        ratio = (a + b).norm() / h_norm if h_norm > 0 else h_norm.new_ones(())
        out.append(h * (gamma * torch.clamp(ratio, min=1.0)))
    return out


class MMPareto(BalancingMethod):
    """MMPareto on the encoders of a model; the fusion head's gradient is left as it is.

    Args:
        encoders: modality name -> the encoder module (or its parameters) whose gradients are integrated.
        gamma: scale γ of the integrated gradient (official: 1.5).
    """

    Settings: ClassVar[type[Any]] = MMParetoSettings

    def __init__(
        self, encoders: Mapping[str, nn.Module | Iterable[nn.Parameter]], gamma: float = 1.5
    ) -> None:
        super().__init__()
        if len(encoders) < 2:
            raise ConfigError(f"MMPareto balances modalities: give at least 2 encoders, got {list(encoders)}")
        if gamma < 0:
            raise ConfigError(f"MMPareto gamma must be >= 0, got {gamma}")
        self.gamma = gamma
        self.params: dict[str, list[nn.Parameter]] = {}
        for m, source in encoders.items():
            params = source.parameters() if isinstance(source, nn.Module) else source
            self.params[m] = [p for p in params if p.requires_grad]
            if not self.params[m]:
                raise ConfigError(f"MMPareto: the encoder of modality '{m}' has no trainable parameter")
        self._unimodal_grads: dict[str, list[Tensor]] | None = None

    @classmethod
    def build(cls, model: nn.Module, settings: MMParetoSettings | None = None, seed: int = 0) -> MMPareto:
        """MMPareto of every encoder of ``model`` (a :class:`~harmonia.models.MultimodalClassifier`)."""
        encoders = getattr(model, "encoders", None)
        if not isinstance(encoders, Mapping | nn.ModuleDict):
            raise ConfigError(
                f"MMPareto needs the model's per-modality encoders (model.encoders); "
                f"{type(model).__name__} has none"
            )
        return cls(dict(encoders), gamma=(settings or MMParetoSettings()).gamma)

    def unimodal_gradients(
        self, unimodal_logits: Mapping[str, Tensor], labels: Tensor, loss_scale: float = 1.0
    ) -> dict[str, Any]:
        """``g_u`` of each encoder (averaged over data-parallel ranks) and the unimodal losses.

        ``loss_scale`` S (a float16 gradient scaler's): the gradients are taken of S times the loss and
        divided by S, so that small ones do not flush to zero in float16."""
        missing = set(self.params) - set(unimodal_logits)
        if missing:
            raise ConfigError(f"MMPareto: the model gives no unimodal logits for {sorted(missing)}")
        grads: dict[str, list[Tensor]] = {}
        losses: dict[str, Tensor] = {}
        for m, params in self.params.items():
            loss = F.cross_entropy(unimodal_logits[m].float(), labels)
            got = torch.autograd.grad(loss * loss_scale, params, retain_graph=True, allow_unused=True)
            grads[m] = [
                torch.zeros_like(p) if g is None else g.detach() / loss_scale
                for g, p in zip(got, params, strict=True)
            ]
            losses[m] = loss.detach()
        world = rank_and_world()[1]
        if world > 1:  # .grad is averaged over ranks by DDP; autograd.grad is local: one all-reduce
            order = list(grads)
            flat_grads = [_flat(grads[m]) for m in order]
            stacked = torch.stack([losses[m] for m in order]).to(flat_grads[0])
            flat = all_reduce_sum(torch.cat([*flat_grads, stacked])) / world
            offset = 0
            for m in order:
                for i, g in enumerate(grads[m]):
                    grads[m][i] = flat[offset : offset + g.numel()].view_as(g).to(g.dtype)
                    offset += g.numel()
            losses = dict(zip(order, flat[offset:], strict=True))
        return {"grads": grads, "losses": {m: float(v) for m, v in losses.items()}}

    def adjust_loss(self, step: BalanceStep, output: Any, loss: Tensor) -> Tensor:
        """Take the unimodal gradients of the encoders; the loss is returned unchanged."""
        if self.training and loss.requires_grad:
            result = self.unimodal_gradients(output.unimodal_logits, step.labels, step.loss_scale)
            self._unimodal_grads = result["grads"]
            step.metrics.update({f"balance/mmpareto/uni_loss/{m}": v for m, v in result["losses"].items()})
        return loss

    @torch.no_grad()
    def after_backward(self, step: BalanceStep, output: Any) -> None:
        """Replace each encoder's ``.grad`` (the multimodal gradient) by the integrated gradient."""
        uni, self._unimodal_grads = self._unimodal_grads, None
        if uni is None:
            return
        for m, params in self.params.items():
            g_mm = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
            cos, w_mm, w_uni = pareto_weights(_flat(g_mm), _flat(uni[m]))
            for p, g in zip(params, integrate(g_mm, uni[m], w_mm, w_uni, self.gamma), strict=True):
                if p.grad is None:
                    p.grad = g.to(p.dtype)
                else:
                    p.grad.copy_(g)
            step.metrics[f"balance/mmpareto/cos/{m}"] = cos
            step.metrics[f"balance/mmpareto/w_mm/{m}"] = w_mm
            step.metrics[f"balance/mmpareto/w_uni/{m}"] = w_uni
