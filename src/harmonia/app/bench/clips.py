"""Generated video clips for the data benchmarks: H.264 video with AAC sound, as the papers' datasets store
them, in the Kinetics-Sounds raw layout (``<split>/<class>/<clip>.mp4``; every eighth clip and the last
in ``test``), each with a transcript beside it
(``<clip>.txt``) so that the same folder also feeds ``harmonia prep shards``.

The picture is a smooth random texture panning a pixel or two per frame, with a bright block crossing it and
film grain, so that the encoder has real motion and detail to code (a flat or static picture would decode
unrealistically fast); the sound is a tone in noise. The clips are written once into a folder and reused
while ``clips.json`` records the same :class:`ClipSpec`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from harmonia.errors import InputError

WORDS = ("play", "the", "drum", "dog", "barks", "at", "a", "violin", "church", "bell", "rings", "loud")
CLASSES = ("playing_drums", "dog_barking", "playing_violin", "church_bell")


@dataclass(frozen=True)
class ClipSpec:
    """What each generated clip holds: ``seconds`` of ``width`` × ``height`` video at ``fps`` (H.264,
    yuv420p, CRF 23) and AAC sound at ``sample_rate`` Hz with ``channels`` channels."""

    seconds: float = 10.0
    fps: int = 25
    width: int = 640
    height: int = 360
    sample_rate: int = 44100
    channels: int = 2

    def __post_init__(self) -> None:
        if not self.seconds > 0 or self.fps < 1:
            raise InputError(f"clips need seconds > 0 and fps >= 1, got {self.seconds} s at {self.fps} fps")
        if self.width < 16 or self.height < 16 or self.width % 2 or self.height % 2:
            raise InputError(
                f"clip size {self.width}x{self.height}: width and height must be even and at least 16 "
                f"(H.264 in yuv420p), e.g. 640x360"
            )

    def describe(self) -> str:
        layout = "stereo" if self.channels == 2 else f"{self.channels} channels"
        return (
            f"{self.seconds:g} s, {self.width}×{self.height} at {self.fps} fps (H.264, CRF 23), "
            f"AAC {self.sample_rate / 1000:g} kHz {layout}"
        )


def parse_size(text: str) -> tuple[int, int]:
    """``"640x360"`` → (640, 360)."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise InputError(f"--clip-size {text!r}: give WIDTHxHEIGHT, e.g. 640x360")
    return int(width), int(height)


def generate_clips(folder: str | Path, count: int, spec: ClipSpec = ClipSpec()) -> list[Path]:
    """``count`` clips in the Kinetics-Sounds layout under ``folder`` (reused when ``clips.json`` records
    the same ``count`` and ``spec``); returns the video paths."""
    if count < 1:
        raise InputError(f"--clips must be at least 1, got {count}")
    folder = Path(folder)
    manifest = {"count": count, "spec": asdict(spec)}
    paths = [folder / _split(i, count) / CLASSES[i % len(CLASSES)] / f"clip{i:05d}.mp4" for i in range(count)]
    record = folder / "clips.json"
    if record.is_file() and json.loads(record.read_text()) == manifest and all(p.is_file() for p in paths):
        return paths
    shutil.rmtree(folder, ignore_errors=True)
    for i, path in enumerate(paths):
        write_clip(path, spec, seed=i)
        words = np.random.default_rng(i).choice(WORDS, size=(3, 6))
        path.with_suffix(".txt").write_text("\n".join(" ".join(line) for line in words) + "\n")
    record.write_text(json.dumps(manifest, indent=1))
    return paths


def _split(i: int, count: int) -> str:
    """Every eighth clip, and the last, in ``test``; the others in ``train``."""
    return "test" if i % 8 == 7 or i == count - 1 else "train"


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth random RGB texture [height, width, 3] (float32, 0-255): coarse noise, bilinearly enlarged."""
    cell = 8
    coarse = rng.uniform(0, 255, (height // cell + 2, width // cell + 2, 3)).astype(np.float32)
    ys = np.arange(height, dtype=np.float32) / cell
    xs = np.arange(width, dtype=np.float32) / cell
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
    bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def write_clip(path: Path, spec: ClipSpec, seed: int = 0) -> Path:
    """One clip at ``path`` (see the module docstring)."""
    import av

    rng = np.random.default_rng(seed)
    w, h, pan = spec.width, spec.height, 64
    texture = _texture(rng, h + pan, w + pan)
    grain = rng.normal(0, 4, (8, h, w, 3)).astype(np.float32)  # cycled: cheap, still noisy
    block = max(4, h // 6)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=spec.fps, options={"crf": "23", "preset": "veryfast"})
        video.width, video.height, video.pix_fmt = w, h, "yuv420p"
        audio = out.add_stream("aac", rate=spec.sample_rate)
        audio.layout = "stereo" if spec.channels == 2 else "mono"
        for k in range(int(round(spec.seconds * spec.fps))):
            dx, dy = int(k * 1.5) % pan, int(k * 0.5) % pan
            image = texture[dy : dy + h, dx : dx + w] + grain[k % len(grain)]
            left = (k * 7 + seed * 31) % (w - block)
            image[h // 3 : h // 3 + block, left : left + block] = 235
            frame = av.VideoFrame.from_ndarray(np.clip(image, 0, 255).astype(np.uint8), format="rgb24")
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        t = np.arange(int(round(spec.seconds * spec.sample_rate))) / spec.sample_rate
        tone = 0.2 * np.sin(2 * np.pi * (220 + 40 * (seed % 10)) * t) + 0.03 * rng.normal(size=t.shape)
        samples = np.repeat(tone.astype(np.float32)[None], spec.channels, axis=0)
        step = audio.codec_context.frame_size or 1024
        for start in range(0, samples.shape[1], step):
            chunk = np.ascontiguousarray(samples[:, start : start + step])
            sound = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=audio.layout.name)
            sound.sample_rate, sound.pts = spec.sample_rate, start
            for packet in audio.encode(sound):
                out.mux(packet)
        for packet in audio.encode():
            out.mux(packet)
    return path
