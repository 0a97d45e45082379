"""Cross-modality gradient harmonization (Wu et al., NeurIPS 2022).

:class:`GradientHarmonizer` replaces ``loss.backward()`` for two per-sample objectives that flow through a
shared quantity — VATT's L_va and L_vt through the video anchor z_v:

* ``mode="feature"`` (default): g^k = ∂(w_k · mean_i ℓ^k_i)/∂z [B, D] by one ``torch.autograd.grad`` per loss
  (row i is sample i's gradient; only the small graph between z and the losses is traversed), realigned row
  by row (:func:`~harmonia.gradients.realign.realign`), optionally filtered by a
  :class:`~harmonia.gradients.curriculum.ConflictCurriculum`, then one backward through everything:
  the anchor's upstream (the video backbone) receives the realigned rows, every other branch (heads, audio,
  text) the ordinary gradient of the kept samples' loss. No second forward pass.
* ``mode="parameter"``: the same, but the conflict is measured and resolved on per-sample gradients with
  respect to the anchor's upstream parameters, J_iᵀ g^k_i, computed with ``torch.func`` (``vmap(grad)``: a
  second, batched pass through the anchor's branch). Faithful to "per-sample gradients" and expensive.
* ``mode="batch"``: PCGrad on the whole-batch gradients of the two losses with respect to ``params`` (the
  multi-task baseline; two backward passes). Parameters outside ``params`` get the plain summed gradient.

With ``rule="none"`` and no curriculum, the gradients equal a plain ``(sum of losses).backward()``.
Statistics of every call (per-sample cosine, conflict and kept fractions) come back as
:class:`HarmonizeStats`; they are what ``harmonia audit`` ranks.

When samples are dropped by the curriculum, the loss is the mean over the kept samples, and the realigned
anchor rows of the kept samples are rescaled by B / kept to match it (rows were computed for the mean over
the whole batch); dropped rows get zero.

Under data parallelism (``torchrun``) the per-sample realignment is local — row i only needs sample i's two
gradients — while everything that depends on the whole batch is global: curriculum decisions (on all ranks'
cosines), the kept count, GradVac's moving target, the logged fractions, batch mode's two gradients and
parameter mode's summed rows. With contrastive negatives gathered across ranks, a step then equals one
process's step on the global batch (tested with 2 gloo processes).

Under mixed precision (``torch.autocast``, inside or outside the autocast region) the rows are realigned in
float32 whatever the anchor's dtype. With a float16 gradient scaler, pass weights multiplied by its scale S
(``scaler.get_scale()``): realignment is scale-equivariant (PCGrad and GradVac map (S·g_a, S·g_b) to S times
their images), so every gradient the harmonizer leaves is S times the true one, for ``scaler.unscale_``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from harmonia.distributed import all_gather_rows, all_reduce_sum, rank_and_world
from harmonia.gradients.curriculum import ConflictCurriculum
from harmonia.gradients.realign import RealignRule, realign, row_cosine
from harmonia.precision import upcast


class HarmonizeMode(str, enum.Enum):
    FEATURE = "feature"
    PARAMETER = "parameter"
    BATCH = "batch"


def per_sample_parameter_grads(
    module: torch.nn.Module, params: Mapping[str, Tensor], inputs: Tensor, rows: Tensor
) -> dict[str, Tensor]:
    """Per-sample gradients J_iᵀ g_i [B, *param.shape] of ``z_i = module(inputs[i])`` pulled back from
    ``rows`` g_i = ∂L/∂z_i, with ``torch.func.vmap(grad(...))`` over the samples (one batched pass).

    Since ∂L/∂θ = Σ_i J_iᵀ g_i, these sum to the batch gradient reaching ``params`` through z.
    """
    from torch.func import functional_call, grad, vmap

    def pulled_back(p: dict[str, Tensor], x: Tensor, g: Tensor) -> Tensor:
        return (functional_call(module, p, (x[None],), strict=False)[0] * g).sum()

    from torch.nn.attention import SDPBackend, sdpa_kernel

    detached = {k: v.detach() for k, v in params.items()}
    # the math attention kernel is made of ops vmap can batch; the fused CPU kernels have no batching rule
    with sdpa_kernel(SDPBackend.MATH):
        return vmap(grad(pulled_back), in_dims=(None, 0, 0))(detached, inputs, rows.detach())


def per_sample_parameter_rows(
    module: torch.nn.Module, params: Mapping[str, Tensor], inputs: Tensor, rows: Tensor
) -> Tensor:
    """:func:`per_sample_parameter_grads` flattened and concatenated in ``params`` order: [B, Σ numel]."""
    grads = per_sample_parameter_grads(module, params, inputs, rows)
    return torch.cat([grads[name].flatten(1) for name in params], 1)


def _add_flat_gradient(params: Sequence[Tensor], flat: Tensor) -> None:
    """Add ``flat`` (the concatenation of one gradient per parameter, in order) to each ``param.grad``."""
    offset = 0
    for p in params:
        g = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
        p.grad = g.clone() if p.grad is None else p.grad + g


@dataclass
class HarmonizeStats:
    """One call's statistics: ``cosine`` [B] (feature mode; one value in batch mode), ``kept`` [B] bool."""

    cosine: Tensor
    kept: Tensor
    conflict_fraction: float
    kept_fraction: float
    threshold: float | None = None
    curriculum_active: bool | None = None  # None: no curriculum

    def metrics(self) -> dict[str, float]:
        out = {
            "harmonize/conflict_fraction": self.conflict_fraction,
            "harmonize/kept_fraction": self.kept_fraction,
            "harmonize/mean_cosine": float(self.cosine.mean()),
        }
        if self.threshold is not None:
            out["harmonize/threshold"] = self.threshold
        if self.curriculum_active is not None:
            out["harmonize/curriculum_active"] = float(self.curriculum_active)
        return out


class GradientHarmonizer:
    """Backward pass that realigns two objectives' gradients per sample, with an optional curriculum.

    Args:
        mode: ``feature`` or ``batch`` (see the module docstring).
        rule: ``pcgrad``, ``gradvac`` or ``none``.
        curriculum: keep only samples whose conflict score passes its schedule (feature mode).
        params: the shared parameters PCGrad acts on (batch mode).
        anchor_module, anchor_params: parameter mode: the module mapping one sample's input to its anchor
            and the named parameters whose per-sample gradients are realigned.
        gradvac_beta: rate of the moving average of cosines that is gradvac's target φ_T.
        gradvac_target: initial φ_T.
    """

    def __init__(
        self,
        mode: HarmonizeMode | str = HarmonizeMode.FEATURE,
        rule: RealignRule | str = RealignRule.PCGRAD,
        curriculum: ConflictCurriculum | None = None,
        params: Sequence[torch.nn.Parameter] | None = None,
        gradvac_beta: float = 0.01,
        gradvac_target: float = 0.0,
        anchor_module: torch.nn.Module | None = None,
        anchor_params: Mapping[str, torch.nn.Parameter] | None = None,
    ) -> None:
        self.mode, self.rule = HarmonizeMode(mode), RealignRule(rule)
        if self.mode is HarmonizeMode.PARAMETER and (anchor_module is None or not anchor_params):
            raise ValueError(
                "GradientHarmonizer(mode='parameter') needs anchor_module (input -> anchor) and "
                "anchor_params (its named parameters to realign)"
            )
        self.anchor_module, self.anchor_params = anchor_module, dict(anchor_params or {})
        if self.mode is HarmonizeMode.BATCH:
            if not params:
                raise ValueError(
                    "GradientHarmonizer(mode='batch') needs params: the shared parameters to realign"
                )
            if curriculum is not None:
                raise ValueError("a curriculum needs per-sample conflict scores: use mode='feature'")
        self.curriculum, self.params = curriculum, list(params or [])
        self.gradvac_beta, self.gradvac_target = gradvac_beta, gradvac_target
        self.num_steps = 0

    def backward(
        self,
        losses: Mapping[str, Tensor],
        anchor: Tensor | None = None,
        weights: Mapping[str, float] | None = None,
        anchor_input: Tensor | None = None,
    ) -> HarmonizeStats:
        """Backpropagate ``Σ_k w_k mean_i losses[k]_i`` (two objectives, per-sample [B] each), harmonized.

        ``anchor`` is the [B, D] tensor both losses flow through (feature and parameter modes), or a
        [B, S, D] tensor of tokens (rows are then flattened to S·D: use the tokens when a loss is
        fine-grained, whose gradient bypasses the pooled anchor); ``anchor_input`` the anchor module's
        input (parameter mode).
        """
        if len(losses) != 2:
            raise ValueError(f"GradientHarmonizer realigns two objectives, got {list(losses)}")
        (name_a, loss_a), (name_b, loss_b) = losses.items()
        if loss_a.dim() != 1 or loss_a.shape != loss_b.shape:
            raise ValueError(
                f"GradientHarmonizer needs per-sample losses [B] (reduction='none'), "
                f"got {tuple(loss_a.shape)}, "
                f"{tuple(loss_b.shape)}"
            )
        w_a, w_b = (weights or {}).get(name_a, 1.0), (weights or {}).get(name_b, 1.0)
        if self.mode is HarmonizeMode.BATCH:
            stats = self._batch(w_a * loss_a.mean(), w_b * loss_b.mean())
        else:
            if anchor is None:
                raise ValueError(
                    "GradientHarmonizer(mode='feature') needs the anchor both losses flow through"
                )
            if self.mode is HarmonizeMode.PARAMETER and anchor_input is None:
                raise ValueError(
                    "GradientHarmonizer(mode='parameter') needs anchor_input, the anchor module's input"
                )
            stats = self._feature(w_a * loss_a, w_b * loss_b, anchor, anchor_input)
        self.num_steps += 1
        return stats

    def _target(self, cos: Tensor) -> float:
        target = self.gradvac_target
        mean = float(all_reduce_sum(cos.sum().double())) / (cos.numel() * rank_and_world()[1])
        self.gradvac_target = (1 - self.gradvac_beta) * target + self.gradvac_beta * mean
        return target

    def _feature(
        self, loss_a: Tensor, loss_b: Tensor, anchor: Tensor, anchor_input: Tensor | None = None
    ) -> HarmonizeStats:
        b = loss_a.shape[0]
        rank, world = rank_and_world()
        b_global = b * world  # under data parallelism: decisions and counts over the global batch
        g_a, g_b = (torch.autograd.grad(x.mean(), anchor, retain_graph=True)[0] for x in (loss_a, loss_b))
        in_parameter_space = self.mode is HarmonizeMode.PARAMETER
        if in_parameter_space:
            assert self.anchor_module is not None and anchor_input is not None
            rows_a, rows_b = (
                per_sample_parameter_rows(self.anchor_module, self.anchor_params, anchor_input, g)
                for g in (g_a, g_b)
            )
        else:  # an anchor of tokens [B, S, D] gives rows of S·D
            rows_a, rows_b = g_a.flatten(1), g_b.flatten(1)
        # cosines and projections in float32 (at least) even when the anchor is bfloat16/float16 (autocast)
        rows_a, rows_b = upcast(rows_a), upcast(rows_b)
        target = self._target(row_cosine(rows_a, rows_b)) if self.rule is RealignRule.GRADVAC else 0.0
        new_a, new_b, cos = realign(rows_a, rows_b, self.rule, target)
        cos = cos.detach()
        threshold, active = None, None
        if self.curriculum is None:
            kept = torch.ones(b, dtype=torch.bool, device=cos.device)
        else:
            kept = self.curriculum.keep_mask(all_gather_rows(cos), self.num_steps)[rank * b : (rank + 1) * b]
            active = self.curriculum.active(self.num_steps)
            if active:  # no threshold while it waits
                threshold = self.curriculum.threshold(self.num_steps)
        n_kept = int(all_reduce_sum(kept.sum()))
        if n_kept == b_global:
            total = loss_a.mean() + loss_b.mean()
            plain = g_a + g_b
        else:
            # the kept samples' mean loss over the global batch (data parallelism averages over ranks)
            keep = kept.to(loss_a.dtype)
            total = ((loss_a + loss_b) * keep).sum() * world / n_kept
            plain = torch.autograd.grad(total, anchor, retain_graph=True)[0]
            scale = keep[:, None] * (b_global / n_kept)
            new_a, new_b = new_a * scale, new_b * scale
        if in_parameter_space:
            # everything but the anchor path as usual; the anchor's parameters get the realigned sum
            torch.autograd.backward([total, anchor], [torch.ones_like(total), -plain.detach()])
            # per-sample rows are summed here, outside DistributedDataParallel: average over ranks
            summed = all_reduce_sum((new_a + new_b).sum(0)) / world
            _add_flat_gradient(list(self.anchor_params.values()), summed)
        elif self.rule is RealignRule.NONE and n_kept == b_global:
            total.backward()  # nothing to change: exactly the plain backward
        else:
            realigned = (new_a + new_b).view_as(plain)
            correction = (realigned - plain).detach().to(anchor.dtype)
            torch.autograd.backward([total, anchor], [torch.ones_like(total), correction])
        return HarmonizeStats(
            cosine=cos,
            kept=kept,
            conflict_fraction=float(all_reduce_sum((cos < 0).sum())) / b_global,
            kept_fraction=n_kept / b_global,
            threshold=threshold,
            curriculum_active=active,
        )

    def _batch(self, loss_a: Tensor, loss_b: Tensor) -> HarmonizeStats:
        grads_a = torch.autograd.grad(loss_a, self.params, retain_graph=True, allow_unused=True)
        grads_b = torch.autograd.grad(loss_b, self.params, retain_graph=True, allow_unused=True)
        # whole-batch gradients of the global batch: the mean of the ranks' (identical on every rank)
        world = rank_and_world()[1]
        flat_a = all_reduce_sum(torch.cat([_flat(g, p) for g, p in zip(grads_a, self.params, strict=True)]))
        flat_b = all_reduce_sum(torch.cat([_flat(g, p) for g, p in zip(grads_b, self.params, strict=True)]))
        flat_a, flat_b = (flat_a / world)[None], (flat_b / world)[None]
        target = self._target(row_cosine(flat_a, flat_b)) if self.rule is RealignRule.GRADVAC else 0.0
        new_a, new_b, cos = realign(flat_a, flat_b, self.rule, target)
        # the other parameters: plain gradient of the sum; the shared ones get the realigned sum instead
        saved = [p.grad for p in self.params]
        (loss_a + loss_b).backward()
        for p, before in zip(self.params, saved, strict=True):
            p.grad = before
        _add_flat_gradient(self.params, (new_a + new_b)[0])
        return HarmonizeStats(
            cosine=cos.detach(),
            kept=torch.ones(1, dtype=torch.bool),
            conflict_fraction=float((cos < 0).float().mean()),
            kept_fraction=1.0,
        )

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"num_steps": self.num_steps, "gradvac_target": self.gradvac_target}
        if self.curriculum is not None:
            state["curriculum"] = self.curriculum.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.num_steps = int(state["num_steps"])
        self.gradvac_target = float(state["gradvac_target"])
        if self.curriculum is not None and "curriculum" in state:
            self.curriculum.load_state_dict(state["curriculum"])


def _flat(grad: Tensor | None, param: Tensor) -> Tensor:
    return (
        torch.zeros(param.numel(), device=param.device, dtype=param.dtype)
        if grad is None
        else grad.reshape(-1)
    )
