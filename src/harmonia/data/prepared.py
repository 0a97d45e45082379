"""Reading a dataset that ``harmonia prep`` wrote: frames and spectrograms streamed from disk.

:class:`PreparedAVDataset` is a ``torch.utils.data.Dataset`` over one split of a prepared folder. Each item
is ``{"inputs": {"audio": [1, 257, T], "visual": [F, 3, S, S]}, "label": int, "index": int}`` (frames first,
the ``[B, T, C, H, W]`` layout harmonia's encoders fold into the batch):

* audio: the TPAMI log spectrogram as prepared (z-normalized per clip);
* visual: F frames of the clip — the papers' choice per dataset (:data:`FRAMES`: one for CREMA-D, three
  for Kinetics-Sounds and VGGSound, ten for AVE) — at random positions in training (sorted) and evenly
  spaced in evaluation; in training a random resized crop (scale 0.08–1) and horizontal flip shared by all
  frames of a clip, in evaluation the center S × S crop; ImageNet mean and standard deviation.

:class:`GlobalBatchSampler` gives a ``torch.utils.data.DataLoader`` the batches of
:class:`~harmonia.data.loader.BatchLoader`: an order that depends only on (seed, epoch) and, under data
parallelism, each rank's contiguous share of every global batch.
"""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from harmonia.data.loader import GlobalBatchSampler
from harmonia.errors import InputError

FRAMES = {"cremad": 1, "kinetics_sounds": 3, "vggsound": 3, "ave": 10}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PreparedAVDataset(Dataset):
    """One ``split`` of a folder written by ``harmonia prep`` (see the module docstring).

    Args:
        root: the prepared folder (holding ``index.csv`` and ``meta.json``).
        split: ``train``, ``val`` or ``test``.
        train: random frames and augmentation (default: when ``split == "train"``).
        frames: frames per clip (default: the paper's choice for the dataset).
        image_size: side S of the square crops.
        seed: base seed of the random choices; item i of epoch e draws from (seed, epoch, i).
        modalities: which of ``audio`` and ``visual`` to read (a unimodal run reads one).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        train: bool | None = None,
        frames: int | None = None,
        image_size: int = 224,
        seed: int = 0,
        modalities: tuple[str, ...] | list[str] = ("audio", "visual"),
    ) -> None:
        self.root = Path(root)
        self.modalities = tuple(modalities)
        for name in ("index.csv", "meta.json"):
            if not (self.root / name).is_file():
                raise InputError(
                    f"{self.root / name} not found: prepare the dataset with harmonia prep first"
                )
        self.meta = json.loads((self.root / "meta.json").read_text())
        self.classes: list[str] = list(self.meta["classes"])
        with open(self.root / "index.csv", newline="") as fh:
            every = list(csv.DictReader(fh))
        #: the splits that have clips in this folder
        self.available_splits = sorted({r["split"] for r in every})
        rows = [r for r in every if r["split"] == split]
        if not rows:
            raise InputError(f"{self.root}/index.csv has no clip in split {split!r}")
        self.ids = [r["id"] for r in rows]
        self.labels = torch.tensor([self.classes.index(r["label"]) for r in rows])
        self.frame_counts = [int(r["frames"]) for r in rows]
        self.split, self.train = split, split == "train" if train is None else train
        self.frames = frames or FRAMES.get(self.meta["dataset"], 3)
        self.image_size, self.seed, self.epoch = image_size, seed, 0
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def frame_positions(self, available: int, rng: random.Random) -> list[int]:
        """Which of a clip's ``available`` frames are used (repeating frames of a short clip)."""
        if self.train:
            if available >= self.frames:
                return sorted(rng.sample(range(available), self.frames))
            return sorted(rng.choice(range(available)) for _ in range(self.frames))
        return [
            min(available - 1, math.floor((k + 0.5) * available / self.frames)) for k in range(self.frames)
        ]

    def __getitem__(self, i: int) -> dict[str, Any]:
        inputs = {}
        try:
            if "audio" in self.modalities:
                inputs["audio"] = torch.from_numpy(np.load(self.root / "audio" / f"{self.ids[i]}.npy"))[None]
            if "visual" in self.modalities:
                inputs["visual"] = self._visual(i)
        except (OSError, ValueError) as exc:  # a file damaged or removed after prep
            raise InputError(
                f"clip {self.ids[i]} of {self.root}: cannot read its prepared files ({exc}); delete "
                f"{self.root / 'frames' / self.ids[i]} and run harmonia prep again to rebuild this clip"
            ) from exc
        return {"inputs": inputs, "label": int(self.labels[i]), "index": i}

    def _visual(self, i: int) -> torch.Tensor:
        """[F, 3, S, S]: the clip's chosen frames, cropped (and flipped) alike, ImageNet-normalized."""
        from PIL import Image

        rng = random.Random(f"{self.seed}:{self.epoch}:{i}")
        clip = self.ids[i]
        images = [
            Image.open(self.root / "frames" / clip / f"{k:03d}.jpg").convert("RGB")
            for k in self.frame_positions(self.frame_counts[i], rng)
        ]
        box, flip = self._crop(images[0].size, rng)
        size = (self.image_size, self.image_size)
        arrays = []
        for image in images:
            image = image.resize(size, Image.Resampling.BILINEAR, box=box)
            if flip:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            arrays.append(np.asarray(image, dtype=np.float32) / 255.0)
        visual = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # [F, 3, S, S]
        return (visual - self._mean) / self._std

    def _crop(
        self, size: tuple[int, int], rng: random.Random
    ) -> tuple[tuple[float, float, float, float], bool]:
        """(left, top, right, bottom) of the crop and whether to flip: random resized crop in training."""
        width, height = size
        if not self.train:
            side = min(width, height) * 224 / 256  # the center crop of a 256-pixel short side, as ImageNet
            left, top = (width - side) / 2, (height - side) / 2
            return (left, top, left + side, top + side), False
        area = width * height
        for _ in range(10):
            target = area * rng.uniform(0.08, 1.0)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = math.sqrt(target * ratio), math.sqrt(target / ratio)
            if w <= width and h <= height:
                left, top = rng.uniform(0, width - w), rng.uniform(0, height - h)
                return (left, top, left + w, top + h), rng.random() < 0.5
        side = min(width, height)
        return (
            (width - side) / 2,
            (height - side) / 2,
            (width + side) / 2,
            (height + side) / 2,
        ), rng.random() < 0.5


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Items of :class:`PreparedAVDataset` into a trainer batch ``{"inputs", "labels", "indices"}``."""
    return {
        "inputs": {m: torch.stack([it["inputs"][m] for it in items]) for m in items[0]["inputs"]},
        "labels": torch.tensor([it["label"] for it in items]),
        "indices": torch.tensor([it["index"] for it in items]),
    }


__all__ = ["FRAMES", "GlobalBatchSampler", "PreparedAVDataset", "collate"]
