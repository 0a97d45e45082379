"""Spoken descriptions of tri-modal AV-Digits clips: the speech says the digit and the motion.

Each clip's audio is a short sentence synthesized with eSpeak NG in the clip's AV-Digits voice (so the
validation and test speakers stay unheard in training): the digit word, a pause, then a phrase saying the
direction the digit moves and, in some phrasings, whether it grows or shrinks — ``"seven, moving left"``,
``"three, going up, growing"``. Audio and captions thus carry the same meaning (digit and motion), and the
digit word's position in the clip stays an instance-level timing cue for the video (which is brighter while
the digit is spoken).

The clip of sample i, of ``speech_seconds`` s, is built as::

    [silence: offset_i] [digit word] [pause_i] [motion phrase] [silence]

with offset and pause drawn at random (the pause within :data:`PAUSE_RANGE`; when the sentence is longer
than the clip the pause shrinks to its minimum and the phrase's end is cut: ``cut`` counts such clips).
Noise at the AV-Digits recipe's SNR is added, then the log-mel spectrogram (same front-end as AV-Digits).

Synthesis takes about 3 ms per clip, so the full dataset (1,797 clips) builds in about 10 s; it is cached
under ``$HARMONIA_CACHE/trimodal_speech/<key>/`` with the key hashing :data:`RECIPE_VERSION`, the
AV-Digits recipe and the spoken-speech settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from harmonia.data import speech
from harmonia.data.audio_features import add_noise_at_snr, log_mel_spectrogram, resample
from harmonia.data.avdigits import AVDigitsRecipe, build_lock, cache_root, file_sha256, recipe_key
from harmonia.data.captions import DIGIT_WORDS, DIRECTIONS
from harmonia.errors import DataError
from harmonia.extras import progress_bar
from harmonia.settings import to_plain

#: bump when the spoken recipe changes: every cached spoken dataset is rebuilt
RECIPE_VERSION = 1
PAUSE_RANGE = (0.05, 0.2)  # seconds between the digit word and the motion phrase
ZOOMING = ("growing", "shrinking")
#: motion phrasings; every one says the direction, some also the zoom
PHRASES = (
    "moving {direction}",
    "going {direction}",
    "heading {direction}",
    "{direction}",
    "moving {direction}, {zooming}",
    "{direction}, {zooming}",
)


def motion_phrase(phrase: int, direction: int, zoom: int) -> str:
    return PHRASES[phrase].format(direction=DIRECTIONS[direction], zooming=ZOOMING[zoom])


def transcript(digit: int, phrase: int, direction: int, zoom: int) -> str:
    """What the clip's audio says, e.g. ``"seven, moving left"``."""
    return f"{DIGIT_WORDS[digit]}, {motion_phrase(phrase, direction, zoom)}"


@dataclass
class SpokenClips:
    """Spoken audio of a set of clips: log-mel [N, 1, n_mels, frames], the digit word's span [N, 2]
    (seconds) and what each clip says."""

    audio: Tensor
    digit_span: Tensor
    transcripts: list[str]
    cut: int = 0


def _trim(wave: np.ndarray, threshold: float = 0.02) -> np.ndarray:
    """``wave`` without leading and trailing samples below ``threshold`` of its peak."""
    if not len(wave):
        return wave
    loud = np.flatnonzero(np.abs(wave) > threshold * np.abs(wave).max())
    return wave[loud[0] : loud[-1] + 1] if len(loud) else wave[:0]


def speak(
    text_parts: tuple[str, str], voice: str, rate: int, pitch: int, sample_rate: int
) -> tuple[np.ndarray, np.ndarray]:
    """The two parts (digit word, motion phrase) spoken separately, trimmed, as float waves at
    ``sample_rate``."""
    out = []
    for text in text_parts:
        raw = speech.synthesize(text, voice, rate, pitch).astype(np.float32) / 32768.0
        out.append(_trim(resample(raw, speech.SAMPLE_RATE, sample_rate)))
    return out[0], out[1]


def assemble(
    word: np.ndarray, phrase: np.ndarray, clip_len: int, sample_rate: int, rng: np.random.Generator
) -> tuple[np.ndarray, tuple[float, float], bool]:
    """Place ``word``, a pause and ``phrase`` at a random offset in a clip of ``clip_len`` samples.

    Returns the clip, the digit word's (onset, end) in seconds and whether the phrase's end was cut.
    """
    lo, hi = (round(s * sample_rate) for s in PAUSE_RANGE)
    pause = int(rng.integers(lo, hi + 1))
    cut = False
    if len(word) + lo + len(phrase) > clip_len:
        pause, cut = lo, True
        word = word[:clip_len]
        phrase = phrase[: max(0, clip_len - len(word) - pause)]
    pause = min(pause, clip_len - len(word) - len(phrase))
    total = len(word) + pause + len(phrase)
    offset = int(rng.integers(0, clip_len - total + 1))
    clip = np.zeros(clip_len, dtype=np.float32)
    clip[offset : offset + len(word)] = word
    start = offset + len(word) + pause
    clip[start : start + len(phrase)] = phrase
    return clip, (offset / sample_rate, (offset + len(word)) / sample_rate), cut


def synthesize_clips(
    digits: np.ndarray,
    directions: np.ndarray,
    zooms: np.ndarray,
    voices: list[str],
    base: AVDigitsRecipe,
    speech_seconds: float,
    rng: np.random.Generator,
    progress: bool = True,
) -> SpokenClips:
    """Speak each clip's digit and motion in its voice (rate and pitch drawn from ``base``'s ranges)."""
    n, sr = len(digits), base.sample_rate
    clip_len = int(round(speech_seconds * sr))
    phrases = rng.integers(0, len(PHRASES), n)
    rates = rng.integers(base.rate_range[0], base.rate_range[1] + 1, n)
    pitches = rng.integers(base.pitch_range[0], base.pitch_range[1] + 1, n)
    waves = np.zeros((n, clip_len), dtype=np.float32)
    spans = np.zeros((n, 2), dtype=np.float32)
    texts, cut = [], 0
    for i in progress_bar(range(n), desc="tri-modal AV-Digits: speaking", disable=not progress, unit="clip"):
        d, m, z, p = int(digits[i]), int(directions[i]), int(zooms[i]), int(phrases[i])
        word, phrase = speak(
            (DIGIT_WORDS[d], motion_phrase(p, m, z)), voices[i], int(rates[i]), int(pitches[i]), sr
        )
        clip, span, was_cut = assemble(word, phrase, clip_len, sr, rng)
        cut += was_cut
        if base.audio_snr_db is not None:
            voiced = np.concatenate([word, phrase])
            power = float(np.mean(voiced**2)) if len(voiced) else 0.0
            if power > 0:
                clip = add_noise_at_snr(clip, base.audio_snr_db, rng, power)
        waves[i], spans[i] = clip, span
        texts.append(transcript(d, p, m, z))
    audio = log_mel_spectrogram(torch.from_numpy(waves), sr, base.n_mels, hop_seconds=base.hop_seconds)
    return SpokenClips(audio[:, None].half().float(), torch.from_numpy(spans), texts, cut)


def spoken_key(base: AVDigitsRecipe, settings: dict) -> str:
    recipe = {
        "version": RECIPE_VERSION,
        "avdigits": recipe_key(base),
        "phrases": PHRASES,
        "pause": PAUSE_RANGE,
        **settings,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def load_spoken(
    key_settings: dict,
    base: AVDigitsRecipe,
    build: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]],
    speech_seconds: float,
    seed: int,
    progress: bool = True,
) -> dict[str, SpokenClips]:
    """Spoken clips of every split, from the cache or synthesized (then cached).

    ``build[split]`` = (digits, directions, zooms, voices) of the split's clips; ``key_settings`` every
    setting they were drawn from (part of the cache key with the AV-Digits recipe).
    """
    folder = cache_root() / "trimodal_speech" / spoken_key(base, key_settings)
    with build_lock(folder):
        cached = _read(folder, build)
        if cached is not None:
            return cached
        out = {}
        for code, (name, (digits, directions, zooms, voices)) in enumerate(build.items()):
            rng = np.random.default_rng([seed, 20, code])
            out[name] = synthesize_clips(
                digits, directions, zooms, voices, base, speech_seconds, rng, progress
            )
        _write(folder, out, key_settings)
    return out


def _read(folder: Path, build: dict) -> dict[str, SpokenClips] | None:
    """The cached clips, or None when the cache is missing, stale or damaged in any way (then rebuilt)."""
    meta_path, data_path = folder / "meta.json", folder / "speech.npz"
    if not meta_path.exists() or not data_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("recipe_version") != RECIPE_VERSION or meta.get("sha256") != file_sha256(data_path):
            return None
        with np.load(data_path) as z:
            arrays = {k: z[k] for k in z.files}
        out = {}
        for name, (digits, *_rest) in build.items():
            if f"{name}/audio" not in arrays or len(arrays[f"{name}/audio"]) != len(digits):
                return None
            out[name] = SpokenClips(
                torch.from_numpy(arrays[f"{name}/audio"].astype(np.float32)),
                torch.from_numpy(arrays[f"{name}/span"]),
                list(meta["transcripts"][name]),
                int(meta["cut"][name]),
            )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # e.g. meta.json not an object
        return None
    return out


def _write(folder: Path, clips: dict[str, SpokenClips], settings: dict) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        arrays = {}
        for name, c in clips.items():
            arrays[f"{name}/audio"] = c.audio.numpy().astype(np.float16)
            arrays[f"{name}/span"] = c.digit_span.numpy()
        np.savez(tmp / "speech.npz", **arrays)  # type: ignore[arg-type]
        meta = {
            "recipe_version": RECIPE_VERSION,
            "settings": to_plain(settings),
            "transcripts": {name: c.transcripts for name, c in clips.items()},
            "cut": {name: c.cut for name, c in clips.items()},
            "sha256": file_sha256(tmp / "speech.npz"),
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except OSError as exc:  # pragma: no cover - a full or read-only disk
        raise DataError(f"cannot write the spoken tri-modal cache to {folder}: {exc}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
