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
