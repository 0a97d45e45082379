"""Tri-modal AV-Digits: video, audio and text triplets for contrastive pre-training.

Built from the cached AV-Digits images and voices (``data.avdigits`` recipe) and, for the default
``speech: digit_and_motion``, spoken descriptions cached by :mod:`harmonia.data.spoken` (about 10 s to
synthesize once):

* **video** [1, T, S, S]: the sample's digit image moving in one of four directions while it grows or
  shrinks; the digit is brighter in the frames during which its name is spoken (``sync_contrast``), so
  video and audio share a timing cue as well as their meaning, as real clips do;
* **audio** [1, n_mels, frames]: log-mel spectrogram of the clip's speech, in its AV-Digits voice (voices
  are disjoint between train, validation and test). ``digit_and_motion``: the digit and the motion,
  ``"seven, moving left"`` (what it says is kept in ``split.transcripts``); ``digit``: the AV-Digits clip,
  only the digit's name;
* **text** [K, L] word ids (+ mask): K caption candidates from different templates, most of which say
  what the clip shows (``"digit 7 shrinks while moving left"``), some only the digit.

Noise, on the training split only (validation and test stay clean, so evaluation and every choice made on
validation measure what was learned): ``misalign_rate`` replaces the text, the audio or both of exactly
``round(rate * N)`` triplets with those of a sample of another digit and keeps per-sample flags;
``partial_rate`` replaces a contiguous block of ``partial_fraction`` of the frames of exactly
``round(rate * N)`` clips with another digit's frames and keeps a per-frame relevance mask.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from harmonia.data import captions as cap
from harmonia.data import spoken
from harmonia.data.avdigits import NUM_CLASSES, SPLITS, AVDigits, AVDigitsRecipe, load_avdigits
from harmonia.errors import DataError
from harmonia.settings import coerce_enums, setting


class MisalignKind(str, enum.Enum):
    """Which modality of a misaligned triplet comes from another sample."""

    TEXT = "text"
    AUDIO = "audio"
    BOTH = "both"


class SpeechKind(str, enum.Enum):
    """What the audio of a tri-modal AV-Digits clip says."""

    DIGIT_AND_MOTION = "digit_and_motion"
    DIGIT = "digit"


@dataclass
class TriModalRecipe:
    """Tri-modal AV-Digits: video made from the digit image, speech, and captions."""

    frames: int = setting(8, help="frames per video clip, spread over the audio clip's duration", ge=2)
    frame_size: int = setting(16, help="side of each square frame in pixels", ge=8)
    captions: int = setting(3, help="caption candidates per clip (the bag of MIL-NCE)", ge=1)
    speech: SpeechKind = setting(
        SpeechKind.DIGIT_AND_MOTION,
        help="digit_and_motion: the audio says the digit and the motion, as the captions do ('seven, "
        "moving left'); digit: the AV-Digits clip, which says only the digit",
    )
    clips_per_image: int = setting(
        1,
        help="training clips made from each training image, each with a motion and a training voice of "
        "its own (validation and test: one clip per image)",
        ge=1,
    )
    speech_seconds: float = setting(
        2.0, help="digit_and_motion: length of the spoken clip in seconds", ge=1.0, le=4.0
    )
    sync_contrast: float = setting(
        0.6,
        help="how much brighter the digit is in frames during which the word is spoken (0: no "
        "audio-visual synchrony cue)",
        ge=0,
        le=1,
    )
    misalign_rate: float = setting(
        0.0, help="fraction of training triplets with a modality taken from another sample", ge=0, le=1
    )
    misalign_modality: MisalignKind = setting(
        MisalignKind.TEXT, help="which modality misaligned triplets swap: text, audio or both"
    )
    partial_rate: float = setting(
        0.0, help="fraction of training clips with some frames replaced by unrelated content", ge=0, le=1
    )
    partial_fraction: float = setting(
        0.5, help="fraction of a partial clip's frames that are replaced (a contiguous block)", gt=0, lt=1
    )
    seed: int = setting(0, help="seed of motion, captions, misalignment and partial replacement")

    def __post_init__(self) -> None:
        coerce_enums(self)


TRIMODAL_MODALITIES = ("video", "audio", "text")
MOTION_AMPLITUDE = 0.3  # translation from -A to +A along the direction, in [-1, 1] image coordinates
SCALE_RANGE = (0.6, 1.0)  # digit scale at the small and the large end of a zoom


@dataclass
class TriModalSplit:
    """One split: model inputs, labels, and the ground truth of the injected noise.

    ``inputs`` holds ``video`` [N, 1, T, S, S], ``audio`` [N, 1, n_mels, frames], ``text`` [N, K, L] word
    ids and ``text_mask`` [N, K, L] (True on real words). ``labels`` is the digit of the video;
    ``modality_labels[m]`` the digit modality m actually shows (different where it was swapped).
    ``directions`` and ``zooms`` [N] index :data:`~harmonia.data.captions.DIRECTIONS` and ``ZOOMS``: the
    clip's motion. ``transcripts[i]`` is what clip i's audio says (the donor's where the audio was
    swapped), ``captions[i]`` its caption candidates, ``voices[i]`` the voice the clip itself was given
    (splits never share a voice).
    """

    inputs: dict[str, Tensor]
    labels: Tensor
    modality_labels: dict[str, Tensor]
    misaligned: dict[str, Tensor]  # "audio", "text": bool [N]
    relevant_frames: Tensor  # bool [N, T]: False where a partial clip shows unrelated frames
    captions: list[list[str]] = field(default_factory=list)
    transcripts: list[str] = field(default_factory=list)
    directions: Tensor | None = None
    zooms: Tensor | None = None
    voices: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def noisy(self) -> Tensor:
        """Per-sample flag: the triplet has a misaligned modality."""
        return self.misaligned["audio"] | self.misaligned["text"]


@dataclass
class TriModalAVDigits:
    config: TriModalRecipe
    base: AVDigits
    splits: dict[str, TriModalSplit]
    modalities: tuple[str, ...] = TRIMODAL_MODALITIES
    num_classes: int = NUM_CLASSES
    vocabulary: tuple[str, ...] = cap.VOCABULARY

    def split(self, name: str) -> TriModalSplit:
        if name not in self.splits:
            raise DataError(f"tri-modal AV-Digits has no split {name!r}; splits: {', '.join(SPLITS)}")
        return self.splits[name]

    @property
    def train_noise(self) -> Tensor:
        """Ground truth of the injected noise: per training triplet, whether a modality was swapped."""
        return self.splits["train"].noisy


def load_trimodal_avdigits(
    cfg: TriModalRecipe | None = None,
    base_cfg: AVDigitsRecipe | None = None,
    *,
    base: AVDigits | None = None,
    progress: bool = True,
) -> TriModalAVDigits:
    """Tri-modal AV-Digits from the AV-Digits recipe ``base_cfg`` (built and cached when needed)."""
    cfg = cfg or TriModalRecipe()
    base = base or load_avdigits(base_cfg, progress=progress)
    clips = {name: _clips_of(cfg, base, code, name) for code, name in enumerate(SPLITS)}
    speech = _speech(cfg, base, clips, progress)
    splits = {}
    for name in SPLITS:
        c = clips[name]
        rng, directions, zooms, source = c.rng, c.directions, c.zooms, torch.from_numpy(c.source)
        n = len(source)
        labels = base.splits[name].labels[source]
        audio, span, clip_seconds, transcripts = speech[name]
        brightness = frame_brightness(span, cfg.frames, clip_seconds, cfg.sync_contrast)
        images = base.splits[name].inputs["image"][source, 0]
        video = render_videos(images, cfg.frames, cfg.frame_size, directions, zooms, brightness)
        texts = cap.sample_captions(labels.numpy(), directions, zooms, cfg.captions, rng)
        ids, mask = cap.tokenize([t for clip in texts for t in clip])
        split = TriModalSplit(
            inputs={
                "video": video,
                "audio": audio.clone(),  # misalignment edits it in place
                "text": ids.view(n, cfg.captions, -1),
                "text_mask": mask.view(n, cfg.captions, -1),
            },
            labels=labels.clone(),
            modality_labels={m: labels.clone() for m in TRIMODAL_MODALITIES},
            misaligned={m: torch.zeros(n, dtype=torch.bool) for m in ("audio", "text")},
            relevant_frames=torch.ones(n, cfg.frames, dtype=torch.bool),
            captions=texts,
            transcripts=list(transcripts),
            directions=torch.from_numpy(directions),
            zooms=torch.from_numpy(zooms),
            voices=c.voices,
        )
        if name == "train":
            misalign(split, cfg.misalign_rate, cfg.misalign_modality, np.random.default_rng([cfg.seed, 10]))
            replace_partially(
                split, cfg.partial_rate, cfg.partial_fraction, np.random.default_rng([cfg.seed, 11])
            )
        splits[name] = split
    return TriModalAVDigits(config=cfg, base=base, splits=splits)


@dataclass
class _Clips:
    """The clips of one split before rendering: which AV-Digits sample each shows (``source``), its voice
    and motion, and the split's generator (captions are drawn from it next)."""

    rng: np.random.Generator
    source: np.ndarray
    directions: np.ndarray
    zooms: np.ndarray
    voices: list[str]


def _clips_of(cfg: TriModalRecipe, base: AVDigits, code: int, name: str) -> _Clips:
    """Each AV-Digits sample once (training: ``clips_per_image`` times, the copies with a motion and a
    voice of the training voices of their own)."""
    data = base.splits[name]
    copies = cfg.clips_per_image if name == "train" else 1
    source = np.repeat(np.arange(len(data)), copies)
    rng = np.random.default_rng([cfg.seed, code])
    n = len(source)
    directions, zooms = rng.integers(0, len(cap.DIRECTIONS), n), rng.integers(0, len(cap.ZOOMS), n)
    voices = [data.voices[i] for i in source]
    if copies > 1:
        pool = sorted(set(data.voices))
        other = np.random.default_rng([cfg.seed, code, 1]).integers(0, len(pool), n)
        voices = [
            v if j % copies == 0 else pool[o] for j, (v, o) in enumerate(zip(voices, other, strict=True))
        ]
    return _Clips(rng, source, directions, zooms, voices)


def _speech(
    cfg: TriModalRecipe, base: AVDigits, clips: dict[str, _Clips], progress: bool
) -> dict[str, tuple[Tensor, Tensor, float, list[str]]]:
    """Per split: audio [N, 1, n_mels, frames], the digit word's span [N, 2] in seconds, the clip length
    and what each clip says."""
    if cfg.speech is SpeechKind.DIGIT:
        out = {}
        for name in SPLITS:
            data, source = base.splits[name], torch.from_numpy(clips[name].source)
            if data.speech_span is None:  # pragma: no cover - every cache of recipe version >= 3 has it
                raise DataError(
                    "this AV-Digits cache has no speech timing; rebuild it with `harmonia data avdigits`"
                )
            words = [cap.DIGIT_WORDS[int(d)] for d in data.labels[source]]
            out[name] = (
                data.inputs["audio"][source],
                data.speech_span[source],
                base.config.clip_seconds,
                words,
            )
        return out
    build = {
        name: (base.splits[name].labels.numpy()[c.source], c.directions, c.zooms, c.voices)
        for name, c in clips.items()
    }
    settings = {
        "seed": cfg.seed,
        "speech_seconds": cfg.speech_seconds,
        "clips_per_image": cfg.clips_per_image,
    }
    spoken_clips = spoken.load_spoken(settings, base.config, build, cfg.speech_seconds, cfg.seed, progress)
    return {
        name: (c.audio, c.digit_span, cfg.speech_seconds, c.transcripts) for name, c in spoken_clips.items()
    }


def frame_brightness(speech_span: Tensor, frames: int, clip_seconds: float, contrast: float) -> Tensor:
    """[N, T] brightness: 1 in frames that overlap the spoken word fully, ``1 - contrast`` in silent ones.

    Frame t covers [t, t + 1) * clip_seconds / T; its brightness is ``1 - contrast * (1 - overlap)`` with
    ``overlap`` the fraction of the frame's time during which the word is spoken.
    """
    width = clip_seconds / frames
    starts = torch.arange(frames, dtype=torch.float32) * width
    onset, end = speech_span[:, :1].float(), speech_span[:, 1:].float()
    overlap = (torch.minimum(end, starts + width) - torch.maximum(onset, starts)).clamp(min=0) / width
    return 1.0 - contrast * (1.0 - overlap)


def render_videos(
    images: Tensor,
    frames: int,
    size: int,
    directions: np.ndarray,
    zooms: np.ndarray,
    brightness: Tensor,
) -> Tensor:
    """[N, 1, T, size, size] clips: each image translated along its direction and scaled over T frames.

    Frame t (progress u = t / (T - 1)) shows the digit at scale s(u) (growing from 0.6 to 1.0 or shrinking
    back) and offset ``A (2u - 1) d`` along the unit direction d, sampled bilinearly with zero background.
    """
    n = images.shape[0]
    u = torch.linspace(0, 1, frames)
    unit = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])[torch.from_numpy(directions)]
    offset = MOTION_AMPLITUDE * (2 * u - 1)[None, :, None] * unit[:, None, :]  # [N, T, 2]
    lo, hi = SCALE_RANGE
    grow = lo + (hi - lo) * u
    scale = torch.where(torch.from_numpy(zooms == 0)[:, None], grow[None], grow.flip(0)[None])  # [N, T]
    theta = torch.zeros(n, frames, 2, 3)
    theta[..., 0, 0] = theta[..., 1, 1] = 1 / scale
    theta[..., :, 2] = -offset / scale[..., None]
    grid = F.affine_grid(theta.view(-1, 2, 3), [n * frames, 1, size, size], align_corners=False)
    source = (
        images.float()[:, None, None]
        .expand(n, frames, 1, *images.shape[1:])
        .reshape(n * frames, 1, *images.shape[1:])
    )
    video = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    video = video.view(n, frames, size, size) * brightness[:, :, None, None]
    return video[:, None].contiguous()


def _donors(labels: np.ndarray, chosen: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each chosen sample, a random sample with a different label."""
    donors = np.empty(len(chosen), dtype=np.int64)
    for j, i in enumerate(chosen):
        others = np.flatnonzero(labels != labels[i])
        if len(others) == 0:
            raise DataError("cannot misalign: every sample of the split has the same digit")
        donors[j] = others[rng.integers(len(others))]
    return donors


def misalign(split: TriModalSplit, rate: float, kind: MisalignKind, rng: np.random.Generator) -> None:
    """Swap the text and/or audio of exactly ``round(rate * N)`` triplets with another digit's, in place."""
    n = len(split)
    chosen = np.sort(rng.choice(n, round(rate * n), replace=False))
    if len(chosen) == 0:
        return
    labels = split.labels.numpy()
    swapped = {
        MisalignKind.TEXT: ("text",),
        MisalignKind.AUDIO: ("audio",),
        MisalignKind.BOTH: ("audio", "text"),
    }
    index = torch.from_numpy(chosen)
    for m in swapped[kind]:
        donors = torch.from_numpy(_donors(labels, chosen, rng))
        keys = ("text", "text_mask") if m == "text" else ("audio",)
        for key in keys:
            split.inputs[key][index] = split.inputs[key][donors]
        split.modality_labels[m][index] = split.labels[donors]
        split.misaligned[m][index] = True
        said = split.captions if m == "text" else split.transcripts
        if said:
            before = list(said)  # a donor may itself be chosen: read what it said before the swap
            for i, d in zip(chosen.tolist(), donors.tolist(), strict=True):
                said[i] = before[d]


def replace_partially(split: TriModalSplit, rate: float, fraction: float, rng: np.random.Generator) -> None:
    """Replace a contiguous block of ``fraction`` of the frames of ``round(rate * N)`` clips, in place."""
    n, frames = split.relevant_frames.shape
    chosen = np.sort(rng.choice(n, round(rate * n), replace=False))
    if len(chosen) == 0:
        return
    block = max(1, round(fraction * frames))
    donors = _donors(split.labels.numpy(), chosen, rng)
    starts = rng.integers(0, frames - block + 1, len(chosen))
    video = split.inputs["video"]
    original = video.clone()
    for i, d, s in zip(chosen.tolist(), donors.tolist(), starts.tolist(), strict=True):
        video[i, :, s : s + block] = original[d, :, s : s + block]
        split.relevant_frames[i, s : s + block] = False
