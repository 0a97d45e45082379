"""Tri-modal contrastive pre-training: the trainer of ``task: pretrain``.

Each step minimizes VATT's ``w_va · NCE(video_va, audio) + w_vt · MIL-NCE(video_vt, captions)``. Every
epoch logs zero-shot retrieval R@1/5/10 (video↔text, video↔audio) on validation and test; at the end a
linear probe of the digit is fit on each frozen backbone's pooled features. Run folder, checkpoints, resume
and logging come from :class:`~harmonia.app.train.base.BaseTrainer`.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from harmonia.app.build import model_allocation
from harmonia.app.config import (
    CurriculumStartKind,
    HarmonizeConfig,
    HarmonizeModeKind,
    PretrainConfig,
    TextEncoderKind,
)
from harmonia.app.train.base import BaseTrainer
from harmonia.app.train.gate import LearnabilityGate
from harmonia.app.train.harmonize import HarmonizeCallback
from harmonia.data.loader import BatchLoader, local_batch_size
from harmonia.data.shards import ShardCorpus, ShardLoader, ShardSplit, ShardStream
from harmonia.data.trimodal import TriModalAVDigits, TriModalSplit, load_trimodal_avdigits
from harmonia.errors import ConfigError
from harmonia.gradients.curriculum import ConflictCurriculum
from harmonia.gradients.harmonizer import GradientHarmonizer
from harmonia.losses import ContrastiveGrain, FineGrainedNCE, VATTLoss, VATTLossOutput
from harmonia.losses.finegrained import token_scores
from harmonia.metrics.probe import linear_probe
from harmonia.metrics.retrieval import retrieval_metrics_from_scores
from harmonia.models.pretrain import PretrainOutput, TriModalPretrainModel, VideoAnchor

INPUT_KEYS = ("video", "audio", "text", "text_mask")


def build_harmonize_callback(
    cfg: HarmonizeConfig, model: TriModalPretrainModel, steps_per_epoch: int, pretrain: PretrainConfig
) -> HarmonizeCallback | None:
    """The harmonizer ``harmonize`` asks for (``None`` for ``mode: none``). Its anchor is the pooled video
    feature, or the video tokens when a loss is fine-grained (its gradient bypasses the pooled feature)."""
    if cfg.mode is HarmonizeModeKind.NONE:
        return None
    pooled = ContrastiveGrain.FINEGRAINED not in (pretrain.va_loss, pretrain.vt_loss)
    anchor = VideoAnchor(model, pooled=pooled)
    curriculum = None
    if cfg.curriculum:
        curriculum = ConflictCurriculum(
            cfg.curriculum_start,
            cfg.curriculum_end,
            steps=max(1, round(cfg.curriculum_epochs * steps_per_epoch)),
            shape=cfg.curriculum_shape,
            keep=cfg.curriculum_keep,
            start_fraction=cfg.curriculum_start_fraction,
            warmup_steps=round(cfg.curriculum_warmup_epochs * steps_per_epoch),
            deferred=cfg.curriculum_start_when is CurriculumStartKind.GATE,
        )
    harmonizer = GradientHarmonizer(
        mode=cfg.mode.value,
        rule=cfg.rule,
        curriculum=curriculum,
        params=model.anchor_parameters() if cfg.mode is HarmonizeModeKind.BATCH else None,
        gradvac_beta=cfg.gradvac_beta,
        anchor_module=anchor if cfg.mode is HarmonizeModeKind.PARAMETER else None,
        anchor_params=anchor.anchor_named_parameters() if cfg.mode is HarmonizeModeKind.PARAMETER else None,
    )
    return HarmonizeCallback(
        harmonizer,
        {"va": pretrain.weight_va, "vt": pretrain.weight_vt},
        anchor_key="video" if pooled else "video_tokens",
    )


class PretrainTrainer(BaseTrainer):
    """Pre-train a :class:`~harmonia.models.pretrain.TriModalPretrainModel` on tri-modal AV-Digits.

    Arguments as :class:`~harmonia.app.train.base.BaseTrainer`; ``dataset`` may be a loaded
    :class:`~harmonia.data.trimodal.TriModalAVDigits`.
    """

    model: TriModalPretrainModel

    @property
    def find_unused_parameters(self) -> bool:  # type: ignore[override]
        """MiniLM encodes the text: the shared backbone's text modality embedding gets no gradient."""
        return self.cfg.pretrain.text_encoder is TextEncoderKind.MINILM

    def setup(self, dataset: TriModalAVDigits | None) -> None:
        cfg = self.cfg
        if cfg.data.name == "shards":
            self._setup_shards()
        else:
            self._setup_trimodal(dataset)
        p = cfg.pretrain
        self.loss = VATTLoss(
            p.temperature,
            p.weight_va,
            p.weight_vt,
            va=p.va_loss,
            vt=p.vt_loss,
            finegrained=FineGrainedNCE(p.temperature, p.tau_att, p.pool_direction, p.chunk_size or None),
        )
        self.last_losses: VATTLossOutput | None = None
        self.harmonize = build_harmonize_callback(
            cfg.harmonize, self.model, len(self.train_loader), cfg.pretrain
        )
        if self.harmonize is not None:
            self.callbacks.insert(0, self.harmonize)
        self.gate: LearnabilityGate | None = None
        if cfg.data.name == "trimodal_avdigits" and p.gate:
            self.gate = LearnabilityGate(seed=cfg.train.seed)
            self.callbacks.append(self.gate)
            curriculum = self.harmonize.harmonizer.curriculum if self.harmonize is not None else None
            if curriculum is not None and curriculum.deferred:
                harmonizer = self.harmonize.harmonizer  # type: ignore[union-attr]
                self.gate.on_pass.append(lambda _epoch: curriculum.begin(harmonizer.num_steps))

    def _setup_trimodal(self, dataset: TriModalAVDigits | None) -> None:
        cfg = self.cfg
        self.dataset = dataset or load_trimodal_avdigits(
            cfg.data.trimodal_recipe(), cfg.data.avdigits_recipe(), progress=self.progress
        )
        self.modalities = list(self.dataset.modalities)
        train = self.dataset.split("train")
        audio, text = train.inputs["audio"], train.inputs["text"]
        with model_allocation("pretrain.width, pretrain.embed_dim, pretrain.depth"):
            self.model = TriModalPretrainModel(
                video_shape=(cfg.data.trimodal.frames, cfg.data.trimodal.frame_size),
                audio_shape=(int(audio.shape[2]), int(audio.shape[3])),
                vocabulary_size=len(self.dataset.vocabulary),
                text_length=int(text.shape[-1]),
                **cfg.pretrain.architecture(),
            )
        self.model = self.prepare_model(self.model)  # type: ignore[assignment]
        if cfg.pretrain.text_encoder is not TextEncoderKind.NATIVE:
            for split in self.dataset.splits.values():  # captions as this text encoder tokenizes them
                split.inputs["text"], split.inputs["text_mask"] = self.model.tokenize_captions(split.captions)
        self.train_loader = BatchLoader(
            {k: train.inputs[k] for k in INPUT_KEYS},
            train.labels,
            cfg.train.batch_size,
            shuffle=True,
            seed=cfg.train.seed,
            drop_last=True,  # contrastive batches of one size (and equal per rank under DDP)
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        if len(self.train_loader) == 0:
            raise ConfigError(
                f"train.batch_size={cfg.train.batch_size} exceeds the {len(train)} training triplets; "
                f"lower train.batch_size"
            )

    def _setup_shards(self) -> None:
        """Pre-train on the shards ``harmonia prep shards`` wrote (RGB video, log-mel audio, transcripts);
        retrieval is evaluated on their test split, and there is no probe (shards carry no labels)."""
        cfg, data = self.cfg, self.cfg.data
        assert data.root is not None  # the config checks it
        corpus = ShardCorpus(data.root, captions=data.captions, words=data.words)
        self.dataset = corpus
        self.modalities = list(corpus.modalities)
        self.eval_splits = ("test",)
        with model_allocation("pretrain.width, pretrain.embed_dim, pretrain.depth"):
            self.model = TriModalPretrainModel(
                video_shape=(corpus.frames, corpus.frame_size),
                audio_shape=(corpus.n_mels, corpus.audio_frames),
                vocabulary_size=len(corpus.vocabulary),
                text_length=data.words,
                video_channels=3,
                **cfg.pretrain.architecture(),
            )
        self.model = self.prepare_model(self.model)  # type: ignore[assignment]
        retokenize = None
        if cfg.pretrain.text_encoder is not TextEncoderKind.NATIVE:
            retokenize = functools.partial(self.model.tokenize_captions, k=data.captions)
            test = corpus.split("test")
            test.inputs["text"], test.inputs["text_mask"] = retokenize(test.captions)
        world, batch = self.dist.world_size, cfg.train.batch_size
        steps = corpus.samples("train") // batch
        if steps == 0:
            raise ConfigError(
                f"train.batch_size={batch} exceeds the {corpus.samples('train')} training clips of "
                f"{corpus.root}; lower train.batch_size"
            )
        local = local_batch_size(batch, world)
        stream = ShardStream(corpus, local, steps, cfg.train.seed, self.dist.rank, world, data.shuffle_buffer)
        self.train_loader = ShardLoader(stream, data.num_workers, retokenize)

    def forward(self, inputs: dict[str, Tensor]) -> PretrainOutput:
        """The model's output, with token outputs when a loss is fine-grained (through
        DistributedDataParallel in training)."""
        model = self.parallel_model if self.model.training else self.model
        output: PretrainOutput = model(inputs, return_tokens=self.loss.needs_tokens)
        return output

    def compute_loss(self, output: PretrainOutput) -> VATTLossOutput:
        return self.loss.from_output(output)

    def train_step(self, batch: dict[str, Any]) -> tuple[Any, float]:
        self.step_metrics = {}
        for cb in self.callbacks:
            cb.before_forward(self, batch)
        output = self.forward(batch["inputs"])
        losses = self.compute_loss(output)
        if not torch.isfinite(losses.loss):
            self._raise_non_finite(losses.loss, batch)
        self.optimizer.zero_grad(set_to_none=True)
        if self.harmonize is None:
            losses.loss.backward()
        else:
            self.harmonize.backward(self, batch, losses, output)
        for cb in self.callbacks:
            cb.after_backward(self, batch, output)
        self._finish_step()
        self.last_losses = losses
        return output, float(losses.loss.detach())

    def epoch_tally(self) -> dict[str, float]:
        return {"loss_va": 0.0, "loss_vt": 0.0}

    def tally_step(self, tally: dict[str, float], batch: dict[str, Any], output: Any) -> None:
        assert self.last_losses is not None
        for key, per_sample in self.last_losses.per_sample.items():
            tally[f"loss_{key}"] += float(per_sample.detach().sum())

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
                out = self.forward(inputs)
                bag = out.text_mask.to(out.text.dtype)[..., None]
                text = F.normalize((out.text * bag).sum(1), dim=-1)
                text_features = (out.features["text"] * bag).sum(1) / bag.sum(1).clamp(min=1)
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
