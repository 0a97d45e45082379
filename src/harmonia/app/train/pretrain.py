"""Tri-modal contrastive pre-training: the trainer of ``task: pretrain``.

Each step minimizes VATT's ``w_va · NCE(video_va, audio) + w_vt · MIL-NCE(video_vt, captions)``, with a
fixed temperature or the model's learnable logit scale (``pretrain.learnable_scale``: clamped after every
optimizer step, logged as ``loss/logit_scale``, saved with the model). Every
epoch logs zero-shot retrieval R@1/5/10 (video↔text, video↔audio) on validation and test; at the end a
linear probe of the digit is fit on each frozen backbone's pooled features. Run folder, checkpoints, resume
and logging come from :class:`~harmonia.app.train.base.BaseTrainer`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from harmonia.app.callbacks.gate import LearnabilityGate
from harmonia.app.callbacks.harmonize import HarmonizeCallback
from harmonia.app.pretrain_data import INPUT_KEYS
from harmonia.app.registry import BACKWARD, DATASETS
from harmonia.app.train.base import BaseTrainer
from harmonia.app.train.compile import CompiledStep
from harmonia.data.shards import ShardCorpus, ShardSplit
from harmonia.data.trimodal import TriModalAVDigits, TriModalSplit
from harmonia.losses import ContrastiveGrain, FineGrainedNCE, VATTLoss, VATTLossOutput
from harmonia.losses.finegrained import token_scores
from harmonia.metrics.probe import linear_probe
from harmonia.metrics.retrieval import retrieval_metrics_from_scores
from harmonia.models.pretrain import PretrainOutput, TextEncoderKind, TriModalPretrainModel


class PretrainTrainer(BaseTrainer):
    """Pre-train a :class:`~harmonia.models.pretrain.TriModalPretrainModel` on tri-modal AV-Digits.

    Arguments as :class:`~harmonia.app.train.base.BaseTrainer`; ``dataset`` may be a loaded
    :class:`~harmonia.data.trimodal.TriModalAVDigits`.
    """

    model: TriModalPretrainModel
    modalities: list[str]  # set by the dataset's builder

    @property
    def find_unused_parameters(self) -> bool:  # type: ignore[override]
        """MiniLM encodes the text: the shared backbone's text modality embedding gets no gradient."""
        return TextEncoderKind(self.cfg.pretrain.text_encoder) is TextEncoderKind.MINILM

    def setup(self, dataset: TriModalAVDigits | None) -> None:
        cfg = self.cfg
        DATASETS.get(cfg.data.name).build(self, dataset)
        p = cfg.pretrain
        self.loss = VATTLoss(
            p.temperature,
            p.weight_va,
            p.weight_vt,
            va=p.va_loss,
            vt=p.vt_loss,
            finegrained=FineGrainedNCE(
                p.temperature,
                p.tau_att,
                p.pool_direction,
                p.chunk_size or None,
                compile=p.finegrained_compile,
            ),
            local_loss=p.local_loss,
            gather_with_grad=p.gather_with_grad,
        )
        self.last_losses: VATTLossOutput | None = None
        self.harmonize: HarmonizeCallback | None = None
        if cfg.harmonize.mode.value != "none":
            self.harmonize = BACKWARD.get("harmonize")(self)
            self.callbacks.insert(0, self.harmonize)
        self.backward_strategy = self.harmonize or BACKWARD.get("plain")(self)
        # the loss of a training step: a graph of its own under train.compile, for coarse losses in one
        # process (a data-parallel loss gathers embeddings across ranks; the fine-grained loss has its own
        # backward and branches on values, which would recompile every step: both stay eager)
        self.step_loss: Any = self.compute_loss
        if cfg.train.compile and not self.dist.enabled and not self.loss.needs_tokens:
            self.step_loss = CompiledStep(self.compute_loss, cfg.train.compile_mode, "loss")
        self.anchor_boundary: Any = None
        anchored = self.harmonize is not None and self.harmonize.harmonizer.mode.value != "batch"
        if cfg.train.compile and anchored:
            self.anchor_boundary = torch.compiler.disable(self._pool_anchor_eagerly)
        self.gate: LearnabilityGate | None = None
        if cfg.data.name == "trimodal_avdigits" and p.gate:
            self.gate = LearnabilityGate(seed=cfg.train.seed)
            self.callbacks.append(self.gate)
            curriculum = self.harmonize.harmonizer.curriculum if self.harmonize is not None else None
            if curriculum is not None and curriculum.deferred:
                harmonizer = self.harmonize.harmonizer  # type: ignore[union-attr]
                self.gate.on_pass.append(lambda _epoch: curriculum.begin(harmonizer.num_steps))

    def forward(self, inputs: dict[str, Tensor]) -> PretrainOutput:
        """The model's output, with token outputs when a loss is fine-grained (through
        DistributedDataParallel in training)."""
        if not self.model.training:
            output: PretrainOutput = self.model(inputs, return_tokens=self.loss.needs_tokens)
            return output
        output = self.step_model(inputs, return_tokens=self.loss.needs_tokens, transform=self.anchor_boundary)
        return output

    def _pool_anchor_eagerly(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """Between the compiled backbone and the compiled heads when the harmonizer differentiates the losses
        with respect to the video anchor (feature, parameter modes): the anchor must not be inside a compiled
        graph, whose outputs are one autograd node with no gradient between them. The video tokens leave the
        backbone's graph and the pooled clip feature is taken from them here, eagerly, so that both anchors
        (tokens for fine-grained losses, the pooled feature otherwise) are tensors the autograd graph passes
        through."""
        return {**features, "video": self.model.pool_video(features["video_tokens"])}

    def compute_loss(self, output: PretrainOutput) -> VATTLossOutput:
        return self.loss.from_output(output)

    def train_step(self, batch: dict[str, Any]) -> tuple[Any, float]:
        self.step_metrics = {}
        with self.precision.autocast():  # train.precision: the forward pass and the loss
            for cb in self.callbacks:
                cb.before_forward(self, batch)
            output = self.forward(batch["inputs"])
            losses = self.step_loss(output)
        if not torch.isfinite(losses.loss):
            self._raise_non_finite(losses.loss, batch)
        self.backward(batch, losses, output)
        self._finish_step()
        if self.model.logit_scale is not None:
            self.model.clamp_logit_scale()
            if self.global_step % self.cfg.train.log_every == 0:
                self.step_metrics["loss/logit_scale"] = float(self.model.logit_scale().detach())
        self.last_losses = losses
        return output, float(losses.loss.detach())

    def epoch_tally(self) -> dict[str, float]:
        return {"loss_va": 0.0, "loss_vt": 0.0}

    def tally_step(self, tally: dict[str, float], batch: dict[str, Any], output: Any) -> None:
        assert self.last_losses is not None
        local = int(batch["indices"].shape[0])
        for key, per_sample in self.last_losses.per_sample.items():
            total = per_sample.detach().sum()
            if per_sample.shape[0] != local:  # local_loss=false: the losses of the whole global batch
                total = total * (local / per_sample.shape[0])
            tally[f"loss_{key}"] += float(total)

    # ----------------------------------------------------------------------------------------------
    # evaluation

    @torch.no_grad()
    def embed(self, split: TriModalSplit | ShardSplit) -> dict[str, Tensor]:
        """Embeddings and pooled backbone features of a whole split, in eval mode, on the CPU.

        A clip's text is its caption bag: the mean of its candidates' (normalized) embeddings,
        re-normalized, and the mean of their pooled features.
        """
        was_training = self.model.training
        self.model.eval()
        parts: dict[str, list[Tensor]] = {}
        try:
            bs = self.cfg.train.eval_batch_size
            for start in range(0, len(split), bs):
                inputs = {k: split.inputs[k][start : start + bs].to(self.device) for k in INPUT_KEYS}
                with self.precision.autocast():
                    out = self.forward(inputs)
                bag = out.text_mask.float()[..., None]  # bag means in float32 (also under bf16)
                text = F.normalize((out.text.float() * bag).sum(1), dim=-1)
                text_features = (out.features["text"].float() * bag).sum(1) / bag.sum(1).clamp(min=1)
                for key, value in {
                    "video_va": out.video_va,
                    "video_vt": out.video_vt,
                    "audio": out.audio,
                    "text": text,
                    "features/video": out.features["video"],
                    "features/audio": out.features["audio"],
                    "features/text": text_features,
                    **{f"tokens/{k}": v for k, v in out.tokens.items()},
                    **{f"token_masks/{k}": v for k, v in out.token_masks.items()},
                }.items():
                    parts.setdefault(key, []).append(
                        value.cpu() if key.startswith("token_masks") else value.float().cpu()
                    )
        finally:
            self.model.train(was_training)
        return {k: torch.cat(v) for k, v in parts.items()}

    def evaluate(self, split: str) -> dict[str, float]:
        """Zero-shot retrieval R@1/5/10, video↔text (vt space) and video↔audio (va space)."""
        e = self.embed(self.dataset.split(split))
        metrics = retrieval_metrics_from_scores(
            {("video", "text"): self._scores_vt(e), ("video", "audio"): self._scores_va(e)}
        )
        return {f"{split}/{k}": v for k, v in metrics.items()}

    def _scores_va(self, e: dict[str, Tensor]) -> Tensor:
        """Clip × audio scores of a split: cosines, or the fine-grained score when L_va is fine-grained."""
        if self.loss.va is ContrastiveGrain.COARSE:
            return e["video_va"].double() @ e["audio"].double().T
        fine = self.loss.finegrained
        return token_scores(e["tokens/video_va"], e["tokens/audio"], None, None, fine.tau_att, fine.direction)

    def _scores_vt(self, e: dict[str, Tensor]) -> Tensor:
        """Clip × caption-bag scores: cosines with the mean caption embedding, or (fine-grained L_vt) the
        mean fine-grained score over the bag's real candidates."""
        if self.loss.vt is ContrastiveGrain.COARSE:
            return e["video_vt"].double() @ e["text"].double().T
        fine, text, words = self.loss.finegrained, e["tokens/text"], e["token_masks/text"]
        n, k = text.shape[:2]
        per_candidate = token_scores(
            e["tokens/video_vt"], text.flatten(0, 1), None, words.flatten(0, 1), fine.tau_att, fine.direction
        ).view(-1, n, k)
        real = words.any(-1).to(per_candidate.dtype)  # [n, k]
        return ((per_candidate * real).sum(-1) / real.sum(-1).clamp(min=1)).double()

    def probe_encoders(self) -> dict[str, float]:
        """Digit linear-probe test accuracy on each modality's frozen pooled backbone features.

        Training labels are the digit each modality actually shows (a swapped caption is labelled with
        its own digit), so the probe measures the representation, not the injected noise. Shards carry no
        labels: no probe (an empty result).
        """
        if isinstance(self.dataset, ShardCorpus):
            return {}
        train, test = self.dataset.split("train"), self.dataset.split("test")
        e_train, e_test = self.embed(train), self.embed(test)
        return {
            m: linear_probe(
                e_train[f"features/{m}"],
                train.modality_labels[m],
                e_test[f"features/{m}"],
                test.labels,
                self.dataset.num_classes,
                seed=self.cfg.train.seed,
            ).accuracy
            for m in self.modalities
        }
