"""MMCosine: Multi-Modal Cosine loss (Xu et al., ICASSP 2023).

Ruize Xu, Ruoxuan Feng, Shi-xiong Zhang, Di Hu, *MMCosine: Multi-Modal Cosine Loss Towards Balanced
Audio-Visual Fine-Grained Learning*, ICASSP 2023 (arXiv:2303.05338). Official code:
github.com/GeWu-Lab/MMCosine_ICASSP23 (``main_CD.py``, ``train_epoch`` with ``--mmcosine``; ``--scaling``,
default 10). BalanceMM: GeWu-Lab/BalanceBenchmark, ``balancemm/trainer/MMCosine_trainer.py``
(``configs/trainer_config.yaml``: ``scaling: 15``). Only the paper's abstract was readable here ("a
modality-wise L2 normalization to features and weights"); the equations below are read from the official
code.

**Logits.** A late-fusion linear head ``f(x) = Σ_m W^m φ^m + b`` lets a modality win by the *norms* of its
features and class weights; MMCosine removes them. With the head's per-modality block ``W^m`` (``[C, d_m]``,
row ``W^m_c`` for class c) and the modality's features ``φ^m``,

    o^m_c = s · cos(W^m_c, φ^m) = s · ⟨W^m_c / ||W^m_c||, φ^m / ||φ^m||⟩,      z = Σ_m o^m,

with no bias and one constant scale ``s`` (not learnt; default 10, the official ``--scaling`` default), and
the loss is the cross-entropy ``CE(z, y)`` (the trainer's own loss, unchanged). Every unimodal logit lies in
``[-s, s]``, so no modality can dominate the fused logits by growing its norms.

**harmonia's model.** :meth:`MMCosine.build` replaces the model's ``concat`` or ``sum`` fusion head by a
:class:`~harmonia.models.fusion.CosineFusion` whose per-modality weights start as the old head's blocks
(``fc.weight[:, block_m]`` of ``concat``, ``heads[m].weight`` of ``sum``; the bias is dropped). The model's
own output is then ``z`` in training *and* evaluation (evaluation calls the model without hooks), its
``unimodal_logits`` are ``o^m`` (summing to ``z`` exactly, so OGM, OPM, ... see the cosine logits), and the
head's weights are model parameters: the optimiser, the checkpoint and ``--resume`` handle them as any other
(the method itself has no state). ``film`` and ``gated`` heads are refused at build.

Differences from the sources: the official ``main_CD.py`` computes the cosine logits in the training loop
and evaluates the *fused* accuracy with the plain linear head's output (``W[a; v] + b``), only the unimodal
accuracies with the cosine logits; here, as in BalanceMM's ``val_loop``, evaluation uses ``z``. BalanceMM
applies the cosine logits only between ``modulation_starts`` and ``modulation_ends`` (0 and 80) and trains
the plain head outside that window; here the head is cosine throughout. The official code's optional
supervised-contrastive term (``NCELoss``, weight ``--lam``, default 0, "used in supplementary material") is
not included.

Logs ``balance/mmcosine/cos/<m>`` (the batch mean of ``cos(W^m_y, φ^m)``, the cosine to the true class) and
``balance/mmcosine/weight_norm/<m>`` (the mean L2 norm of the rows of ``W^m``, which the cosine ignores but
the paper's analysis follows).
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from harmonia.balance.method import BalanceStep, BalancingMethod
from harmonia.errors import ConfigError, InputError
from harmonia.models.fusion import ConcatFusion, CosineFusion, SumFusion
from harmonia.settings import setting


@dataclass
class MMCosineSettings:
    """MMCosine settings (see the module docstring)."""

    scale: float = setting(
        10.0, gt=0, help="scale s of the logits s·Σ_m cos(W^m_c, φ^m) (official default 10; BalanceMM 15)"
    )


def cosine_head_from(fusion: nn.Module, scale: float) -> CosineFusion:
    """A :class:`CosineFusion` for the modalities of ``fusion`` (a ``concat`` or ``sum`` head, or a cosine
    head), with the per-modality weights copied from it (the bias is dropped)."""
    if isinstance(fusion, (CosineFusion, SumFusion)):
        blocks: dict[str, Tensor] = {
            m: typing.cast(nn.Linear, fusion.heads[m]).weight for m in fusion.modalities
        }
    elif isinstance(fusion, ConcatFusion):
        blocks, start = {}, 0  # type: ignore[var-annotated]
        for m in fusion.modalities:
            stop = start + fusion.feature_dims[m]
            blocks[m] = fusion.fc.weight[:, start:stop]
            start = stop
    else:
        kind = type(fusion).__name__ if fusion is not None else "no 'fusion' head"
        raise ConfigError(
            "MMCosine replaces the per-modality linear blocks of the fusion head by cosine heads, which "
            f"needs a concat or sum fusion head; this model has {kind}: set model.fusion=concat (or sum)"
        )
    head = CosineFusion(fusion.modalities, fusion.feature_dims, fusion.num_classes, scale=scale)
    first = next(iter(blocks.values()))
    head = head.to(device=first.device, dtype=first.dtype)
    with torch.no_grad():
        for m, w in blocks.items():
            typing.cast(nn.Linear, head.heads[m]).weight.copy_(w)
    return head


class MMCosine(BalancingMethod):
    """MMCosine: the model's fusion head predicts ``s · Σ_m cos(W^m_c, φ^m)``.

    Args:
        head: the model's :class:`CosineFusion` head (held by reference, not as a sub-module: its
            parameters belong to the model).
    """

    Settings: ClassVar[type[Any]] = MMCosineSettings

    def __init__(self, head: CosineFusion) -> None:
        super().__init__()
        if not isinstance(head, CosineFusion):
            raise ConfigError(f"MMCosine needs a CosineFusion head, got {type(head).__name__}")
        self._head = (head,)
        self.modalities: tuple[str, ...] = head.modalities

    @property
    def head(self) -> CosineFusion:
        return self._head[0]

    @classmethod
    def build(cls, model: nn.Module, settings: MMCosineSettings | None = None, seed: int = 0) -> MMCosine:
        """MMCosine for ``model``, whose ``concat`` or ``sum`` fusion head it replaces by a cosine head."""
        s = settings or MMCosineSettings()
        if not s.scale > 0:
            raise ConfigError(f"MMCosine: scale must be > 0, got {s.scale}")
        fusion = getattr(model, "fusion", None)
        head = cosine_head_from(fusion, s.scale)  # type: ignore[arg-type]
        model.fusion = head
        return cls(head)

    def after_backward(self, step: BalanceStep, output: Any) -> None:
        """Log the batch mean cosine to the true class and the mean class-weight norm per modality."""
        unimodal: Mapping[str, Tensor] = output.unimodal_logits
        missing = [m for m in self.modalities if m not in unimodal]
        if missing:
            raise InputError(f"MMCosine: no unimodal logits for {missing}; built for {list(self.modalities)}")
        labels = step.labels.view(-1, 1)
        with torch.no_grad():
            for m in self.modalities:
                cos = unimodal[m].detach().float().gather(1, labels) / self.head.scale
                step.metrics[f"balance/mmcosine/cos/{m}"] = float(cos.mean())
                weight = typing.cast(nn.Linear, self.head.heads[m]).weight
                norms = torch.linalg.vector_norm(weight.detach().float(), dim=1)
                step.metrics[f"balance/mmcosine/weight_norm/{m}"] = float(norms.mean())
