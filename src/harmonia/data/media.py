"""Decoding real video and audio files with PyAV (the ``av`` wheel ships FFmpeg: no system package), and the
TPAMI audio front-end.

* :func:`read_frames`: RGB frames sampled at ``fps`` (1 fps in the papers' preprocessing: the first frame at
  or after each time k / fps), without decoding the pictures nothing needs;
* :func:`read_audio`: the first audio stream as mono float32 at ``sample_rate`` Hz (16 kHz in the papers);
* :func:`tpami_spectrogram`: ``scipy.signal.spectrogram(x, nperseg=512, noverlap=353)`` of the waveform
  tiled or cut to ``seconds``, then log(· + 1e-7) and a per-clip z-normalization: 257 × 299 for 3 s
  (CREMA-D), 257 × 1004 for 10 s.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from harmonia.extras import require


class MediaError(Exception):
    """A file that cannot be decoded (corrupt, empty, or without the stream asked for)."""


def _open(path: str | Path):  # type: ignore[no-untyped-def]
    import av

    try:
        return av.open(str(path))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise MediaError(f"cannot open {path}: {exc}") from exc


def read_frames(path: str | Path, fps: float = 1.0, max_frames: int | None = None) -> np.ndarray:
    """Frames [T, H, W, 3] uint8 of the first video stream, one per 1 / ``fps`` seconds.

    A picture that lies before the next time sought is never kept (that time only grows); when no other
    picture refers to it either (FFmpeg's ``skip_frame = NONREF``: about half the pictures of an H.264
    stream with B-frames), the decoder skips it. The kept frames are those of decoding every picture, for
    less work.
    """
    import av

    with _open(path) as container:
        if not container.streams.video:
            raise MediaError(f"{path} has no video stream")
        stream = container.streams.video[0]
        frames: list[np.ndarray] = []
        next_time = 0.0
        try:
            for packet in container.demux(stream):
                early = packet.pts is not None and packet.time_base is not None
                early = early and float(packet.pts * packet.time_base) + 1e-6 < next_time
                stream.codec_context.skip_frame = "NONREF" if early else "DEFAULT"
                for frame in packet.decode():
                    t = float(frame.time) if frame.time is not None else len(frames) / fps
                    if t + 1e-6 < next_time:
                        continue
                    frames.append(frame.to_ndarray(format="rgb24"))
                    next_time += 1.0 / fps
                    if max_frames is not None and len(frames) >= max_frames:
                        break
                if max_frames is not None and len(frames) >= max_frames:
                    break
        except av.error.FFmpegError as exc:
            raise MediaError(f"cannot decode the video of {path}: {exc}") from exc
    if not frames:
        raise MediaError(f"{path}: no video frame could be decoded")
    return np.stack(frames)


def read_audio(path: str | Path, sample_rate: int = 16000) -> np.ndarray:
    """The first audio stream of ``path`` (a video or an audio file) as mono float32 at ``sample_rate``."""
    import av

    with _open(path) as container:
        if not container.streams.audio:
            raise MediaError(f"{path} has no audio stream")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks: list[np.ndarray] = []
        try:
            for frame in container.decode(container.streams.audio[0]):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
        except av.error.FFmpegError as exc:
            raise MediaError(f"cannot decode the audio of {path}: {exc}") from exc
    if not chunks or sum(len(c) for c in chunks) == 0:
        raise MediaError(f"{path}: no audio sample could be decoded")
    return np.concatenate(chunks).astype(np.float32)


def tpami_spectrogram(wave: np.ndarray, sample_rate: int = 16000, seconds: float = 3.0) -> np.ndarray:
    """Log spectrogram [257, frames] float32 of ``wave`` tiled (if shorter) or cut to ``seconds``.

    ``scipy.signal.spectrogram(x, nperseg=512, noverlap=353)``, ``log(S + 1e-7)``, then z-normalized over
    the clip (Wei et al., TPAMI 2025; the OGM-GE preprocessing at 16 kHz).
    """
    length = int(round(seconds * sample_rate))
    if len(wave) == 0:
        raise MediaError("empty waveform")
    x = np.tile(wave, -(-length // len(wave)))[:length].astype(np.float64)
    spectrogram = require("scipy.signal", "spectrograms").spectrogram
    _, _, power = spectrogram(x, nperseg=512, noverlap=353)
    logs = np.log(power + 1e-7)
    return ((logs - logs.mean()) / (logs.std() + 1e-9)).astype(np.float32)
