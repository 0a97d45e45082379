"""The raw layouts the papers' datasets come in, scanned into :class:`~harmonia.data.prep.RawClip` lists.

Each scanner returns the clips, the problems it found (a clip whose audio or video file is missing), and
the preparation settings of the TPAMI recipe for that dataset. Where users obtain each dataset and how to
lay it out: docs/datasets.md.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harmonia.data.prep import PrepSettings, RawClip
from harmonia.errors import InputError

CREMAD_EMOTIONS = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")


@dataclass
class Scan:
    clips: list[RawClip]
    problems: list[dict[str, str]]
    settings: PrepSettings


def _require(path: Path, what: str) -> None:
    if not path.exists():
        raise InputError(f"{path} not found: expected {what} (see docs/datasets.md for the raw layout)")


def _hashed_split(clip_id: str, test_fraction: float, seed: int = 0) -> str:
    """A split that depends only on the clip id (stable across machines and reruns)."""
    digest = hashlib.sha1(f"{seed}:{clip_id}".encode()).digest()
    return "test" if int.from_bytes(digest[:4], "big") / 2**32 < test_fraction else "train"


def scan_cremad(src: Path) -> Scan:
    """CREMA-D: ``VideoFlash/<id>.flv`` and ``AudioWAV/<id>.wav``, ids like ``1001_DFA_ANG_XX`` (the third
    field is the emotion). Splits: ``train.csv`` / ``test.csv`` in ``src`` when present (first column: clip
    id, as the OGM-GE repository's lists), else a fixed 90 / 10 split by clip id (6,698 / 744 in the
    papers). An optional ``val.csv`` (the Diagnosing & Re-learning repository's held-out part of the OGM-GE
    training list) makes a validation split: its clips go to ``val`` even when ``train.csv`` lists them too
    (methods that read a validation split, e.g. ``relearn`` and ``gblending``, need one)."""
    videos, audios = src / "VideoFlash", src / "AudioWAV"
    _require(videos, "the CREMA-D folder VideoFlash/ with the .flv videos")
    _require(audios, "the CREMA-D folder AudioWAV/ with the .wav audio")
    listed: dict[str, str] = {}
    for split in ("train", "test", "val"):  # later lists win: val.csv may carve clips out of train.csv
        if (src / f"{split}.csv").is_file():
            with open(src / f"{split}.csv", newline="") as fh:
                listed.update({row[0]: split for row in csv.reader(fh) if row and row[0] != "id"})
    by_video = {p.stem: p for p in videos.glob("*.flv")}
    by_audio = {p.stem: p for p in audios.glob("*.wav")}
    clips, problems = [], []
    for clip_id in sorted(set(by_video) | set(by_audio)):
        parts = clip_id.split("_")
        file = str(by_video.get(clip_id) or by_audio.get(clip_id))
        if len(parts) < 3 or parts[2] not in CREMAD_EMOTIONS:
            reason = f"the name holds none of the emotions {CREMAD_EMOTIONS}"
            problems.append({"id": clip_id, "file": file, "reason": reason})
            continue
        if clip_id not in by_video or clip_id not in by_audio:
            missing = "video (VideoFlash/*.flv)" if clip_id not in by_video else "audio (AudioWAV/*.wav)"
            problems.append({"id": clip_id, "file": file, "reason": f"missing {missing}"})
            continue
        if listed and clip_id not in listed:
            continue  # not in the user's split lists
        split = listed[clip_id] if listed else _hashed_split(clip_id, 0.1)
        clips.append(RawClip(clip_id, by_video[clip_id], by_audio[clip_id], parts[2], split))
    return Scan(clips, problems, PrepSettings(fps=1.0, seconds=3.0))


def scan_kinetics_sounds(src: Path) -> Scan:
    """Kinetics-Sounds: ``<split>/<class>/<clip>.mp4`` (videos with their sound); splits train, val, test."""
    clips = []
    for split in ("train", "val", "test"):
        for path in sorted((src / split).glob("*/*.mp4")) if (src / split).is_dir() else []:
            clips.append(RawClip(f"{path.parent.name}__{path.stem}", path, path, path.parent.name, split))
    if not clips:
        raise InputError(f"no {src}/<train|val|test>/<class>/<clip>.mp4 videos found (see docs/datasets.md)")
    return Scan(clips, [], PrepSettings(fps=1.0, seconds=10.0))


def scan_ave(src: Path) -> Scan:
    """AVE: ``AVE/<VideoID>.mp4`` and the split lists ``trainSet.txt``, ``valSet.txt``, ``testSet.txt`` with
    lines ``Category&VideoID&Quality&StartTime&EndTime``; 10 frames (1 fps over the 10 s clip)."""
    _require(src / "AVE", "the AVE/ folder of .mp4 videos")
    clips, problems = [], []
    for split, name in (("train", "trainSet.txt"), ("val", "valSet.txt"), ("test", "testSet.txt")):
        _require(src / name, f"the AVE split list {name}")
        for line in (src / name).read_text().splitlines():
            fields = line.strip().split("&")
            if len(fields) < 2 or fields[1] == "VideoID":
                continue
            category, video_id = fields[0], fields[1]
            path = src / "AVE" / f"{video_id}.mp4"
            if not path.is_file():
                problems.append({"id": video_id, "file": str(path), "reason": "missing video"})
                continue
            clips.append(RawClip(video_id, path, path, category, split))
    return Scan(clips, problems, PrepSettings(fps=1.0, max_frames=10, seconds=10.0))


def scan_vggsound(src: Path) -> Scan:
    """VGGSound: ``vggsound.csv`` (rows ``youtube_id,start_seconds,label,split``) and
    ``video/<youtube_id>_<start:06d>.mp4``."""
    _require(src / "vggsound.csv", "vggsound.csv")
    clips, problems = [], []
    with open(src / "vggsound.csv", newline="") as fh:
        for row in csv.reader(fh):
            if len(row) < 4 or not row[1].strip().isdigit():
                continue
            clip_id = f"{row[0]}_{int(row[1]):06d}"
            path = src / "video" / f"{clip_id}.mp4"
            if not path.is_file():
                problems.append({"id": clip_id, "file": str(path), "reason": "missing video"})
                continue
            clips.append(RawClip(clip_id, path, path, row[2].strip(), row[3].strip()))
    return Scan(clips, problems, PrepSettings(fps=1.0, seconds=10.0))


SCANNERS: dict[str, Callable[[Path], Scan]] = {
    "cremad": scan_cremad,
    "kinetics_sounds": scan_kinetics_sounds,
    "ave": scan_ave,
    "vggsound": scan_vggsound,
}


def scan(dataset: str, src: str | Path) -> Scan:
    if dataset not in SCANNERS:
        raise InputError(f"unknown dataset {dataset!r}; harmonia prep knows {sorted(SCANNERS)}")
    src = Path(src)
    if not src.is_dir():
        raise InputError(f"--src {src} is not a folder")
    return SCANNERS[dataset](src)
