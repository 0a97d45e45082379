"""VATT's tri-modal objective (Akbari et al., NeurIPS 2021), with each term coarse or fine-grained."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from harmonia.losses.finegrained import FineGrainedNCE
from harmonia.losses.nce import mil_nce, nce

if TYPE_CHECKING:
    from harmonia.models.pretrain import PretrainOutput


class ContrastiveGrain(str, enum.Enum):
    """``coarse``: one pooled embedding per clip (cosine); ``finegrained``: token sets compared with
    attention (:class:`~harmonia.losses.finegrained.FineGrainedNCE`)."""

    COARSE = "coarse"
    FINEGRAINED = "finegrained"


@dataclass
class VATTLossOutput:
    """Weighted total ``loss`` and each objective's per-sample losses ``{"va": [B], "vt": [B]}``."""

    loss: Tensor
    per_sample: dict[str, Tensor]


class VATTLoss(nn.Module):
    """VATT's objective: ``w_va · L_va(video, audio) + w_vt · L_vt(video, caption bag)``.

    Coarse terms are NCE and MIL-NCE on pooled embeddings; a ``finegrained`` term is the same loss on
    token sets scored by ``finegrained`` (a :class:`FineGrainedNCE`, whose τ is replaced by
    ``temperature``). Both terms are means of per-sample losses, which :class:`VATTLossOutput` also
    returns, so a gradient harmonizer can treat each objective per sample. ``gather=False`` takes
    negatives from the local batch only (evaluation that every data-parallel rank runs on the same data).

    A ``logit_scale`` tensor given to :meth:`forward` (or carried by the model's output, see
    :meth:`from_output`) replaces 1/``temperature`` in every term. ``local_loss`` and ``gather_with_grad``
    are open_clip's switches (see :func:`~harmonia.losses.nce.nce`); they apply to coarse terms, and
    ``False`` is refused with a fine-grained one. With ``local_loss=False`` under ``torch.distributed``,
    the per-sample losses are those of the whole global batch.
    """

    def __init__(
        self,
        temperature: float = 0.07,
        weight_va: float = 1.0,
        weight_vt: float = 1.0,
        va: ContrastiveGrain | str = ContrastiveGrain.COARSE,
        vt: ContrastiveGrain | str = ContrastiveGrain.COARSE,
        finegrained: FineGrainedNCE | None = None,
        gather: bool = True,
        local_loss: bool = True,
        gather_with_grad: bool = True,
    ) -> None:
        super().__init__()
        self.temperature, self.weight_va, self.weight_vt = temperature, weight_va, weight_vt
        self.va, self.vt = ContrastiveGrain(va), ContrastiveGrain(vt)
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad
        if self.needs_tokens and not (local_loss and gather_with_grad):
            raise ValueError(
                "VATTLoss: local_loss=False and gather_with_grad=False are implemented for coarse terms "
                "only; use local_loss=True and gather_with_grad=True with a fine-grained term"
            )
        self.finegrained = finegrained or FineGrainedNCE()
        self.finegrained.tau = temperature
        self.gather = gather
        if not gather:
            self.finegrained.gather = False

    @property
    def needs_tokens(self) -> bool:
        """Whether a term is fine-grained (call the model with ``return_tokens=True``)."""
        return ContrastiveGrain.FINEGRAINED in (self.va, self.vt)

    def forward(
        self,
        video_va: Tensor,
        audio: Tensor,
        video_vt: Tensor,
        text: Tensor,
        text_mask: Tensor | None = None,
        own_gradients_only: bool = False,
        *,
        word_mask: Tensor | None = None,
        logit_scale: Tensor | None = None,
    ) -> VATTLossOutput:
        """Coarse terms take [B, E] clips, [B, E] audio and [B, K, E] caption bags (``text_mask`` [B, K]);
        fine-grained ones take token sets: video [B, S, E], audio [B, S_a, E], captions [B, K, L, E] with
        ``word_mask`` [B, K, L]. ``logit_scale`` (e.g. a :class:`~harmonia.losses.scale.LogitScale`'s
        output) multiplies the scores in place of dividing them by ``temperature``."""
        if own_gradients_only and self.needs_tokens:
            raise ValueError("own_gradients_only is implemented for the coarse losses only")
        tau = self.temperature if logit_scale is None else None
        switches: dict[str, Any] = {
            "gather": self.gather,
            "logit_scale": logit_scale,
            "local_loss": self.local_loss,
            "gather_with_grad": self.gather_with_grad,
        }
        if self.va is ContrastiveGrain.COARSE:
            va = nce(video_va, audio, tau, "none", own_gradients_only=own_gradients_only, **switches)
        else:
            va = self.finegrained(video_va, audio, logit_scale=logit_scale).per_sample
        if self.vt is ContrastiveGrain.COARSE:
            vt = mil_nce(
                video_vt, text, text_mask, tau, "none", own_gradients_only=own_gradients_only, **switches
            )
        else:
            if word_mask is not None and text_mask is not None:
                word_mask = word_mask & text_mask[..., None]
            vt = self.finegrained(video_vt, text, None, word_mask, logit_scale=logit_scale).per_sample
        per_sample = {"va": va, "vt": vt}
        loss = self.weight_va * va.mean() + self.weight_vt * vt.mean()
        return VATTLossOutput(loss, per_sample)

    def from_output(self, output: PretrainOutput) -> VATTLossOutput:
        """The loss of a :class:`~harmonia.models.pretrain.TriModalPretrainModel` output (with its token
        outputs when a term is fine-grained, and its learnable logit scale when it has one)."""
        fine_va, fine_vt = (g is ContrastiveGrain.FINEGRAINED for g in (self.va, self.vt))
        if (fine_va or fine_vt) and not output.tokens:
            raise ValueError(
                "a fine-grained VATTLoss needs token outputs: call the model with return_tokens=True"
            )
        tokens = output.tokens
        return self(
            tokens["video_va"] if fine_va else output.video_va,
            tokens["audio"] if fine_va else output.audio,
            tokens["video_vt"] if fine_vt else output.video_vt,
            tokens["text"] if fine_vt else output.text,
            output.text_mask,
            word_mask=output.token_masks.get("text") if fine_vt else None,
            logit_scale=output.logit_scale,
        )
