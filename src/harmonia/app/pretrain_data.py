"""Builders of the pre-training datasets the config names (``data.name``), registered in
:mod:`harmonia.app.registry`. Each sets, on the pre-training trainer (``self``), ``dataset``,
``modalities``, ``model`` (its input shapes come from the data) and ``train_loader``."""

from __future__ import annotations

import functools
from typing import Any

from harmonia.app.memory import model_allocation
from harmonia.data.loader import BatchLoader, local_batch_size
from harmonia.data.shards import ShardCorpus, ShardLoader, ShardStream
from harmonia.data.trimodal import TriModalAVDigits, load_trimodal_avdigits
from harmonia.errors import ConfigError
from harmonia.models.pretrain import TextEncoderKind, TriModalPretrainModel

INPUT_KEYS = ("video", "audio", "text", "text_mask")


def trimodal_avdigits(self: Any, dataset: TriModalAVDigits | None) -> None:
    """Tri-modal AV-Digits (built and cached on first use), or ``dataset`` when one is given."""
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
    if TextEncoderKind(cfg.pretrain.text_encoder) is not TextEncoderKind.NATIVE:
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


def shards(self: Any, dataset: Any = None) -> None:
    """Pre-train on the shards ``harmonia prep shards`` wrote (RGB video, log-mel audio, transcripts), read
    through webdataset from ``data.shards`` (a folder, .tar paths or patterns, ``pipe:`` URLs); retrieval is
    evaluated on their test split, and there is no probe (shards carry no labels)."""
    cfg, data = self.cfg, self.cfg.data
    assert data.shards is not None  # the config checks it
    corpus = ShardCorpus(data.shards, data.captions, data.words, data.shards_meta, data.test_shards)
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
    if TextEncoderKind(cfg.pretrain.text_encoder) is not TextEncoderKind.NATIVE:
        retokenize = functools.partial(self.model.tokenize_captions, k=data.captions)
        test = corpus.split("test")
        test.inputs["text"], test.inputs["text_mask"] = retokenize(test.captions)
    world, batch = self.dist.world_size, cfg.train.batch_size
    steps = corpus.samples("train") // batch
    if steps == 0:
        raise ConfigError(
            f"train.batch_size={batch} exceeds the {corpus.samples('train')} training clips of "
            f"{corpus.source}; lower train.batch_size"
        )
    local = local_batch_size(batch, world)
    stream = ShardStream(corpus, local, steps, cfg.train.seed, self.dist.rank, world, data.shuffle_buffer)
    self.train_loader = ShardLoader(stream, data.num_workers, retokenize)
