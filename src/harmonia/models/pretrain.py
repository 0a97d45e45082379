"""Tri-modal pre-training model (VATT-style): tokenizers, transformer backbone(s) and VATT heads.

Each modality is cut into tokens by its own tokenizer — video tubelets, spectrogram patches, words — and
encoded either by **one modality-agnostic transformer shared by all three** (``BackboneKind.SHARED``, the
setting the harmonization paper studies; a learned modality embedding tells the modalities apart) or by
one transformer per modality (``SPECIFIC``). Pooled token outputs go through VATT's heads:

    video → e_va (video–audio space) → e_vt (video–text space);  audio → e_a;  text → e_t,

all L2-normalized. With ``return_tokens=True`` the same heads are applied to every token, for token-level
(fine-grained) losses.

Video tokens are ``global`` (every tubelet attends to the whole clip) or ``time_local``
(``pretrain.video_tokens``): each tubelet token then attends only to the tokens of its own time slot — an
attention mask in the video transformer (in the shared backbone, applied to video inputs only) — so that
every token output stays a local feature-map cell, as the CNN cells a fine-grained loss was designed for. A
clip is mixed across time only by the mean pooling of the coarse embedding.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harmonia.data import captions as native_captions
from harmonia.errors import ConfigError, InputError
from harmonia.losses.scale import LogitScale
from harmonia.models.text import MiniLMTextEncoder

PRETRAIN_MODALITIES = ("video", "audio", "text")


class BackboneKind(str, enum.Enum):
    SHARED = "shared"
    SPECIFIC = "specific"


class VTHeadKind(str, enum.Enum):
    MLP = "mlp"
    SHARED = "shared"


class VideoTokensKind(str, enum.Enum):
    GLOBAL = "global"
    TIME_LOCAL = "time_local"


class TextEncoderKind(str, enum.Enum):
    NATIVE = "native"
    MINILM = "minilm"


class VideoTokenizer(nn.Module):
    """[B, C, T, H, W] clips (C = 1 grey or 3 RGB) → [B, (T/t)(H/h)(W/w), D] tubelet tokens plus learned
    positions."""

    def __init__(
        self, frames: int, size: int, tubelet: tuple[int, int, int], width: int, channels: int = 1
    ) -> None:
        super().__init__()
        grid = (frames // tubelet[0], size // tubelet[1], size // tubelet[2])
        if min(grid) < 1 or frames % tubelet[0] or size % tubelet[1] or size % tubelet[2]:
            raise InputError(
                f"pretrain.tubelet {list(tubelet)} must divide the clip [frames {frames}, {size}x{size}]; "
                f"choose divisors, e.g. [2, 4, 4]"
            )
        self.shape = (channels, frames, size, size)
        self.grid = grid
        self.proj = nn.Conv3d(channels, width, kernel_size=tubelet, stride=tubelet)
        self.position = nn.Parameter(torch.zeros(1, grid[0] * grid[1] * grid[2], width))
        nn.init.normal_(self.position, std=0.02)

    def forward(self, video: Tensor) -> Tensor:
        if tuple(video.shape[1:]) != self.shape:
            raise InputError(
                f"video: expected [B, {', '.join(map(str, self.shape))}], got {list(video.shape)}"
            )
        return self.proj(video).flatten(2).transpose(1, 2) + self.position

    def time_slots(self) -> Tensor:
        """The time slot of each token [S] (tokens are ordered time slot first, then rows, then columns)."""
        return torch.arange(self.grid[0]).repeat_interleave(self.grid[1] * self.grid[2])

    def time_local_mask(self) -> Tensor:
        """Boolean attention mask [S, S] of time-local tokens: True where token q may **not** attend to
        token k, i.e. where their time slots differ (PyTorch's ``mask`` convention)."""
        slots = self.time_slots()
        return slots[:, None] != slots[None, :]


class SpectrogramTokenizer(nn.Module):
    """[B, 1, F, T] log-mel → [B, (F/f)(⌈T/t⌉), D] patch tokens (time zero-padded to a multiple of t)."""

    def __init__(self, n_mels: int, frames: int, patch: tuple[int, int], width: int) -> None:
        super().__init__()
        if n_mels % patch[0]:
            raise InputError(f"pretrain.audio_patch[0]={patch[0]} must divide the {n_mels} mel bands")
        self.n_mels, self.frames, self.patch = n_mels, frames, patch
        self.pad = -frames % patch[1]
        self.proj = nn.Conv2d(1, width, kernel_size=patch, stride=patch)
        n_tokens = (n_mels // patch[0]) * ((frames + self.pad) // patch[1])
        self.position = nn.Parameter(torch.zeros(1, n_tokens, width))
        nn.init.normal_(self.position, std=0.02)

    def forward(self, audio: Tensor) -> Tensor:
        if tuple(audio.shape[1:]) != (1, self.n_mels, self.frames):
            raise InputError(f"audio: expected [B, 1, {self.n_mels}, {self.frames}], got {list(audio.shape)}")
        x = F.pad(audio.float(), (0, self.pad))
        return self.proj(x).flatten(2).transpose(1, 2) + self.position


class TextTokenizer(nn.Module):
    """[N, L] word ids → [N, L, D] word embeddings plus learned positions (id 0 is padding)."""

    def __init__(self, vocabulary_size: int, length: int, width: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary_size, width, padding_idx=0)
        self.position = nn.Parameter(torch.zeros(1, length, width))
        nn.init.normal_(self.position, std=0.02)
        self.length = length

    def forward(self, ids: Tensor) -> Tensor:
        if ids.dtype != torch.long or ids.shape[-1] > self.length:
            raise InputError(
                f"text: expected int64 word ids [..., <= {self.length}], got {ids.dtype} {list(ids.shape)}"
            )
        return self.embed(ids) + self.position[:, : ids.shape[-1]]


def _transformer(width: int, depth: int, heads: int, dropout: float) -> nn.Module:
    layer = nn.TransformerEncoderLayer(
        width, heads, dim_feedforward=2 * width, dropout=dropout, batch_first=True, norm_first=True
    )
    return nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(width), enable_nested_tensor=False)


def masked_mean(tokens: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over the token axis (dim -2) of the positions where ``mask`` is True."""
    if mask is None:
        return tokens.mean(-2)
    weights = mask.to(tokens.dtype)[..., None]
    return (tokens * weights).sum(-2) / weights.sum(-2).clamp(min=1)


@dataclass
class PretrainOutput:
    """What :class:`TriModalPretrainModel` returns.

    * ``video_va``, ``video_vt``, ``audio`` [B, E] and ``text`` [B, K, E]: L2-normalized embeddings;
    * ``text_mask`` [B, K]: caption candidates that hold at least one word;
    * ``features``: pooled backbone outputs before the heads, ``video``/``audio`` [B, D], ``text`` [B, K, D]
      — ``features["video"]`` is the anchor both coarse losses flow through (the harmonizer's z_v) — and
      the video backbone's token outputs ``video_tokens`` [B, S_v, D], the anchor of fine-grained losses;
    * ``tokens`` / ``token_masks`` (only with ``return_tokens``): per-token normalized embeddings
      ``video_va``/``video_vt`` [B, S_v, E], ``audio`` [B, S_a, E], ``text`` [B, K, L, E];
    * ``logit_scale``: the learnable scale s = exp(t) of the contrastive losses (0-dim) when the model has
      one (``logit_scale=...``), else None (the losses use their fixed temperature).
    """

    video_va: Tensor
    video_vt: Tensor
    audio: Tensor
    text: Tensor
    text_mask: Tensor
    features: dict[str, Tensor]
    tokens: dict[str, Tensor] = field(default_factory=dict)
    token_masks: dict[str, Tensor] = field(default_factory=dict)
    logit_scale: Tensor | None = None


class TriModalPretrainModel(nn.Module):
    """Video, audio and text encoders with VATT heads, sharing one transformer or not (``backbone``).

    Args:
        video_shape: (frames, frame size) of the clips.
        audio_shape: (mel bands, frames) of the spectrograms.
        vocabulary_size, text_length: word vocabulary and maximum caption length.
        video_channels: 1 (grey, tri-modal AV-Digits) or 3 (RGB, shards of real video).
        backbone: ``shared`` (one modality-agnostic transformer) or ``specific`` (one per modality).
        width, depth, heads, dropout: the transformer(s); ``width`` must be divisible by ``heads``.
        embed_dim: dimension of the common embedding spaces.
        text_encoder: ``native`` (word embeddings into the backbone) or ``minilm`` (pretrained
            all-MiniLM-L6-v2, frozen unless ``text_finetune``).
        tubelet: video patch size (frames, height, width); audio_patch: (mel bands, frames).
        video_tokens: ``global`` or ``time_local`` attention of the video tokens.
        vt_head: ``mlp`` (VATT's e_vt = Linear(ReLU(e_va))) or ``shared`` (e_vt = e_va).
        logit_scale: the initial value of a learnable logit scale for the contrastive losses (a
            :class:`~harmonia.losses.scale.LogitScale`, CLIP's 1/0.07), returned in every output; None (the
            default): no scale, the losses divide by their fixed temperature.
        max_logit_scale: the cap :meth:`clamp_logit_scale` holds the scale to (CLIP: 100).
    """

    def __init__(
        self,
        video_shape: tuple[int, int],
        audio_shape: tuple[int, int],
        vocabulary_size: int,
        text_length: int,
        video_channels: int = 1,
        *,
        backbone: BackboneKind | str = BackboneKind.SHARED,
        width: int = 64,
        depth: int = 2,
        heads: int = 4,
        embed_dim: int = 64,
        text_encoder: TextEncoderKind | str = TextEncoderKind.NATIVE,
        text_finetune: bool = False,
        dropout: float = 0.0,
        tubelet: Sequence[int] = (2, 4, 4),
        audio_patch: Sequence[int] = (8, 4),
        video_tokens: VideoTokensKind | str = VideoTokensKind.GLOBAL,
        vt_head: VTHeadKind | str = VTHeadKind.MLP,
        logit_scale: float | None = None,
        max_logit_scale: float = 100.0,
    ) -> None:
        super().__init__()
        if width % heads:
            raise ConfigError(f"width={width} must be divisible by heads={heads}")
        for key, value, n in (("tubelet", tubelet, 3), ("audio_patch", audio_patch, 2)):
            if len(value) != n or min(value) < 1:
                raise ConfigError(f"{key}: expected {n} positive integers, got {list(value)}")
        self.backbone_kind = BackboneKind(backbone)
        self.video_tokens = VideoTokensKind(video_tokens)
        self.tokenizers = nn.ModuleDict(
            {
                "video": VideoTokenizer(
                    *video_shape,  # type: ignore[arg-type]
                    tuple(tubelet),  # type: ignore[arg-type]
                    width,
                    video_channels,
                ),
                "audio": SpectrogramTokenizer(*audio_shape, tuple(audio_patch), width),  # type: ignore[arg-type]
            }
        )
        self.minilm: MiniLMTextEncoder | None = None
        if TextEncoderKind(text_encoder) is TextEncoderKind.MINILM:
            self.minilm = MiniLMTextEncoder(width, finetune=text_finetune)
        else:
            self.tokenizers["text"] = TextTokenizer(vocabulary_size, text_length, width)
        if self.backbone_kind is BackboneKind.SHARED:
            self.backbone = _transformer(width, depth, heads, dropout)
            self.modality_embedding = nn.ParameterDict(
                {m: nn.Parameter(torch.zeros(1, 1, width)) for m in PRETRAIN_MODALITIES}
            )
        else:
            self.backbones = nn.ModuleDict(
                {m: _transformer(width, depth, heads, dropout) for m in PRETRAIN_MODALITIES}
            )
        time_local = self.video_tokens is VideoTokensKind.TIME_LOCAL
        self.video_mask: Tensor | None
        video_tokenizer = self.tokenizers["video"]
        assert isinstance(video_tokenizer, VideoTokenizer)
        self.register_buffer(
            "video_mask", video_tokenizer.time_local_mask() if time_local else None, persistent=False
        )
        e = embed_dim
        self.head_va = nn.Linear(width, e)
        self.head_vt = (
            nn.Sequential(nn.ReLU(), nn.Linear(e, e))
            if VTHeadKind(vt_head) is VTHeadKind.MLP
            else nn.Identity()
        )
        self.head_audio = nn.Linear(width, e)
        self.head_text = nn.Linear(width, e)
        self.logit_scale = None if logit_scale is None else LogitScale(logit_scale, max_logit_scale)

    def clamp_logit_scale(self) -> None:
        """Hold the learnable logit scale within [1, max_logit_scale] (after every optimizer step); a no-op
        without one."""
        if self.logit_scale is not None:
            self.logit_scale.clamp_()

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters an optimizer should not decay: the logit scale (as open_clip)."""
        return {"logit_scale.log_scale"} if self.logit_scale is not None else set()

    def video_anchor(self, video: Tensor, pooled: bool = True) -> Tensor:
        """The anchor z_v: the pooled video backbone output [B, width] (``features["video"]``), or with
        ``pooled=False`` its tokens [B, S_v, width] (``features["video_tokens"]``)."""
        tokens = self.encode_video(video)
        return self.pool_video(tokens) if pooled else tokens

    def pool_video(self, tokens: Tensor) -> Tensor:
        """The clip feature ``features["video"]`` [B, width] from the video backbone's tokens [B, S_v,
        width]: their mean."""
        return tokens.mean(1)

    def encode_video(self, video: Tensor) -> Tensor:
        """Video clips [B, C, T, H, W] → backbone token outputs [B, S_v, width] (time-local when
        ``pretrain.video_tokens`` is ``time_local``)."""
        return self.encode_tokens("video", self.tokenizers["video"](video), attention_mask=self.video_mask)

    def anchor_parameters(self) -> list[nn.Parameter]:
        """Parameters upstream of the video anchor ``features["video"]``: the video tokenizer and the video
        backbone (in the shared setting, the whole shared transformer and the video modality embedding)."""
        params = list(self.tokenizers["video"].parameters())
        if self.backbone_kind is BackboneKind.SHARED:
            return [*params, *self.backbone.parameters(), self.modality_embedding["video"]]
        return [*params, *self.backbones["video"].parameters()]

    def tokenize_captions(self, captions: list[list[str]], k: int | None = None) -> tuple[Tensor, Tensor]:
        """Caption bags → ids [N, K, L] and word mask [N, K, L] for this text encoder. Bags may differ in
        size (transcripts): each is cut or padded to K (default: the largest bag) with candidates whose
        mask is all False, which the losses leave out."""
        k = k or max((len(bag) for bag in captions), default=0)
        sizes = torch.tensor([min(len(bag), k) for bag in captions])
        flat = [c for bag in captions for c in (list(bag[:k]) + [""] * (k - len(bag)))]
        if self.minilm is not None:
            ids, mask = self.minilm.tokenize(flat)
        else:
            ids, mask = native_captions.tokenize(flat)
        ids, mask = ids.view(len(captions), k, -1), mask.view(len(captions), k, -1)
        padded = torch.arange(k)[None, :] >= sizes[:, None]  # [N, K]
        return ids.masked_fill(padded[..., None], 0), mask & ~padded[..., None]

    def encode_tokens(
        self,
        modality: str,
        tokens: Tensor,
        padding: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Run ``modality``'s tokens [N, S, D] through its backbone; ``padding`` [N, S] is True on pads and
        ``attention_mask`` [S, S] is True where a token may not attend to another."""
        if self.backbone_kind is BackboneKind.SHARED:
            return self.backbone(
                tokens + self.modality_embedding[modality], mask=attention_mask, src_key_padding_mask=padding
            )
        return self.backbones[modality](tokens, mask=attention_mask, src_key_padding_mask=padding)

    def encode(self, inputs: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor | None]]:
        """Backbone token outputs and token masks (True = real token) of each modality."""
        missing = [k for k in ("video", "audio", "text") if k not in inputs]
        if missing:
            raise InputError(
                f"pre-training inputs lack {missing}; expected video, audio, text (and text_mask)"
            )
        video = self.encode_video(inputs["video"])
        audio = self.encode_tokens("audio", self.tokenizers["audio"](inputs["audio"]))
        ids = inputs["text"]
        if ids.dim() != 3:
            raise InputError(f"text: expected word ids [B, K candidates, L], got {list(ids.shape)}")
        b, k, length = ids.shape
        word_mask = inputs.get("text_mask", ids != 0).reshape(b * k, length)
        if self.minilm is not None:  # MiniLM is the text transformer; the backbone sees video and audio
            text = self.minilm(ids.reshape(b * k, length), word_mask)
        else:
            # a candidate without words (padding of the bag) attends to its first position, not to nothing
            attend = word_mask.clone()
            attend[:, 0] = True
            text = self.encode_tokens("text", self.tokenizers["text"](ids.reshape(b * k, length)), ~attend)
        return {
            "video": (video, None),
            "audio": (audio, None),
            "text": (text.view(b, k, length, -1), word_mask.view(b, k, length)),
        }

    def forward(
        self,
        inputs: dict[str, Tensor],
        return_tokens: bool = False,
        transform: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
    ) -> PretrainOutput:
        """The embeddings of ``inputs`` (see :class:`PretrainOutput`); with ``return_tokens`` also per-token
        ones. ``transform`` edits the backbone features (``video``, ``audio``, ``text``, ``video_tokens``)
        before the heads see them, as a classifier's ``transform`` does between encoders and fusion (a
        compiled training step runs an eager one there, so that the video anchor lies between two compiled
        graphs: the gradient harmonizer differentiates the losses with respect to it)."""
        encoded = self.encode(inputs)
        (video, _), (audio, _), (text, word_mask) = encoded["video"], encoded["audio"], encoded["text"]
        assert word_mask is not None
        features = {
            "video": self.pool_video(video),
            "audio": audio.mean(1),
            "text": masked_mean(text, word_mask),
            "video_tokens": video,
        }
        if transform is not None:
            features = transform(features)
        va = self.head_va(features["video"])
        out = PretrainOutput(
            video_va=F.normalize(va, dim=-1),
            video_vt=F.normalize(self.head_vt(va), dim=-1),
            audio=F.normalize(self.head_audio(features["audio"]), dim=-1),
            text=F.normalize(self.head_text(features["text"]), dim=-1),
            text_mask=word_mask.any(-1),
            features=features,
            logit_scale=self.logit_scale() if self.logit_scale is not None else None,
        )
        if return_tokens:
            token_va = self.head_va(features["video_tokens"])
            out.tokens = {
                "video_va": F.normalize(token_va, dim=-1),
                "video_vt": F.normalize(self.head_vt(token_va), dim=-1),
                "audio": F.normalize(self.head_audio(audio), dim=-1),
                "text": F.normalize(self.head_text(text), dim=-1),
            }
            out.token_masks = {"text": word_mask}
        return out


class VideoAnchor(nn.Module):
    """``video -> z_v`` of a :class:`TriModalPretrainModel` as a module of its own (shares its parameters),
    for per-sample parameter gradients with ``torch.func`` (the harmonizer's parameter mode); the pooled
    anchor or, with ``pooled=False``, the video tokens."""

    def __init__(self, model: TriModalPretrainModel, pooled: bool = True) -> None:
        super().__init__()
        self.model, self.pooled = model, pooled

    def forward(self, video: Tensor) -> Tensor:
        return self.model.video_anchor(video, self.pooled)

    def anchor_named_parameters(self) -> dict[str, nn.Parameter]:
        ids = {id(p) for p in self.model.anchor_parameters()}
        return {n: p for n, p in self.named_parameters() if id(p) in ids}
