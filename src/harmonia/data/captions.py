"""Captions of tri-modal AV-Digits clips: templates, a fixed word vocabulary and tokenization.

A caption names the digit (as a word or a numeral) and, in most templates, what the clip shows: the
direction the digit moves and whether it grows or shrinks. Several templates per clip give the candidate
bag of MIL-NCE; some candidates say less than others, as transcripts do.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIRECTIONS = ("left", "right", "up", "down")
ZOOMS = ("grows", "shrinks")

TEMPLATES = (
    "the digit {word}",
    "a handwritten {word}",
    "number {numeral}",
    "a {word} moving {direction}",
    "the number {word} drifts {direction}",
    "handwritten {numeral} sliding {direction}",
    "a {word} that {zoom}",
    "digit {numeral} {zoom} while moving {direction}",
    "someone says {word}",
    "a {word} moves {direction} and {zoom}",
)

PAD, UNKNOWN = "<pad>", "<unk>"


def _template_words() -> list[str]:
    words: set[str] = set(DIGIT_WORDS) | {str(d) for d in range(10)} | set(DIRECTIONS) | set(ZOOMS)
    for template in TEMPLATES:
        words |= {w for w in template.split() if not w.startswith("{")}
    return sorted(words)


VOCABULARY: tuple[str, ...] = (PAD, UNKNOWN, *_template_words())
TOKEN_IDS = {w: i for i, w in enumerate(VOCABULARY)}
MAX_WORDS = max(len(t.split()) for t in TEMPLATES)


def caption(template: str, digit: int, direction: int, zoom: int) -> str:
    return template.format(
        word=DIGIT_WORDS[digit], numeral=str(digit), direction=DIRECTIONS[direction], zoom=ZOOMS[zoom]
    )


def tokenize(texts: list[str], length: int = MAX_WORDS) -> tuple[Tensor, Tensor]:
    """Word ids [N, length] (0 = padding, 1 = unknown word) and the mask of real words [N, length]."""
    ids = torch.zeros(len(texts), length, dtype=torch.long)
    for i, text in enumerate(texts):
        words = text.lower().split()[:length]
        ids[i, : len(words)] = torch.tensor([TOKEN_IDS.get(w, TOKEN_IDS[UNKNOWN]) for w in words])
    return ids, ids != 0


def sample_captions(
    digits: np.ndarray, directions: np.ndarray, zooms: np.ndarray, per_clip: int, rng: np.random.Generator
) -> list[list[str]]:
    """``per_clip`` captions per clip, from distinct templates chosen at random."""
    if per_clip > len(TEMPLATES):
        raise ValueError(f"at most {len(TEMPLATES)} distinct caption templates per clip, asked {per_clip}")
    return [
        [caption(TEMPLATES[t], int(d), int(m), int(z)) for t in rng.choice(len(TEMPLATES), per_clip, False)]
        for d, m, z in zip(digits, directions, zooms, strict=True)
    ]
