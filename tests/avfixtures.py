"""Tiny real media files written with PyAV, in the raw layouts of the papers' datasets."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np


def write_video(
    path: Path,
    seconds: float = 3.0,
    fps: int = 10,
    size: int = 32,
    container: str | None = None,
    codec: str = "mpeg4",
    tone_hz: float | None = None,
    sample_rate: int = 22050,
) -> Path:
    """A clip whose k-th frame has its first 3k mod size columns bright; with ``tone_hz``, an AAC sine."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format=container) as out:
        video = out.add_stream(codec, rate=fps)
        video.width = video.height = size
        video.pix_fmt = "yuv420p"
        audio = None
        if tone_hz:
            audio = out.add_stream("aac", rate=sample_rate)
            audio.layout = "mono"
        for k in range(int(seconds * fps)):
            image = np.zeros((size, size, 3), np.uint8)
            image[:, : (3 * k) % size] = 200
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        if audio is not None:
            t = np.arange(int(seconds * sample_rate)) / sample_rate
            x = (0.3 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)
            for start in range(0, len(x) - 1024 + 1, 1024):
                frame = av.AudioFrame.from_ndarray(
                    x[None, start : start + 1024], format="fltp", layout="mono"
                )
                frame.sample_rate, frame.pts = sample_rate, start
                for packet in audio.encode(frame):
                    out.mux(packet)
            for packet in audio.encode():
                out.mux(packet)
    return path


def write_wav(path: Path, seconds: float = 2.0, sample_rate: int = 22050, tone_hz: float = 440.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    x = (0.3 * np.sin(2 * np.pi * tone_hz * t) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(x.tobytes())
    return path


def write_corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"definitely not a video " * 64)
    return path


# --------------------------------------------------------------------------------------------------
# each dataset's raw layout: two classes, training and test clips (and validation where the dataset has
# one), plus one corrupt file that prep must report and skip

TONES = {0: 300.0, 1: 900.0}


def raw_cremad(src: Path) -> None:
    splits = {"train": [], "test": []}
    clips = [("ANG", "train"), ("HAP", "train")] * 2 + [("ANG", "test"), ("HAP", "test")]
    for n, (emotion, split) in enumerate(clips):
        clip_id = f"10{n:02d}_DFA_{emotion}_XX"
        write_video(src / "VideoFlash" / f"{clip_id}.flv", container="flv", codec="flv")
        write_wav(src / "AudioWAV" / f"{clip_id}.wav", tone_hz=TONES[emotion == "HAP"])
        splits[split].append(f"{clip_id},{emotion}")
    write_corrupt(src / "VideoFlash" / "1099_DFA_SAD_XX.flv")
    write_wav(src / "AudioWAV" / "1099_DFA_SAD_XX.wav")
    splits["train"].append("1099_DFA_SAD_XX,SAD")
    for split, rows in splits.items():
        (src / f"{split}.csv").write_text("\n".join(rows) + "\n")


def raw_kinetics_sounds(src: Path) -> None:
    for split, per_class in (("train", 2), ("val", 1), ("test", 1)):
        for c, label in enumerate(("playing_drums", "dog_barking")):
            for k in range(per_class):
                write_video(src / split / label / f"{split}{k}.mp4", tone_hz=TONES[c])
    write_corrupt(src / "train" / "dog_barking" / "broken.mp4")


def raw_ave(src: Path) -> None:
    lists: dict[str, list[str]] = {"trainSet.txt": [], "valSet.txt": [], "testSet.txt": []}
    header = "Category&VideoID&Quality&StartTime&EndTime"
    for name, per_class in (("trainSet.txt", 2), ("valSet.txt", 1), ("testSet.txt", 1)):
        for c, label in enumerate(("Church bell", "Dog bark")):
            for k in range(per_class):
                video_id = f"{name[:-7]}{c}{k}"
                write_video(src / "AVE" / f"{video_id}.mp4", seconds=10.0, fps=2, tone_hz=TONES[c])
                lists[name].append(f"{label}&{video_id}&good&0&10")
    write_corrupt(src / "AVE" / "broken.mp4")
    lists["trainSet.txt"].append("Dog bark&broken&good&0&10")
    for name, rows in lists.items():
        (src / name).write_text("\n".join([header, *rows]) + "\n")


def raw_vggsound(src: Path) -> None:
    rows = []
    for split, per_class in (("train", 2), ("test", 1)):
        for c, label in enumerate(("playing violin", "dog barking")):
            for k in range(per_class):
                youtube_id = f"{split}{c}{k}"
                write_video(src / "video" / f"{youtube_id}_000010.mp4", tone_hz=TONES[c])
                rows.append(f"{youtube_id},10,{label},{split}")
    write_corrupt(src / "video" / "broken_000000.mp4")
    rows.append("broken,0,dog barking,train")
    (src / "vggsound.csv").write_text("\n".join(rows) + "\n")


RAW_LAYOUTS = {
    "cremad": raw_cremad,
    "kinetics_sounds": raw_kinetics_sounds,
    "ave": raw_ave,
    "vggsound": raw_vggsound,
}
