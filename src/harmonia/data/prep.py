"""``harmonia prep``: turn a raw audio-visual dataset into the layout harmonia reads.

For every clip of the raw layout (:mod:`harmonia.data.raw_layouts` lists them), one worker process decodes
the video with PyAV, keeps frames at ``fps`` (1 fps, as the papers) resized so that the shorter side is
``frame_size`` pixels, and computes the TPAMI spectrogram of its audio at 16 kHz. The output folder holds::

    meta.json                 dataset, settings, classes
    index.csv                 id, label, split, frames   (the clips that were prepared)
    frames/<id>/000.jpg ...   RGB frames
    audio/<id>.npy            float32 [257, T] spectrogram
    prep_report.json          what was prepared, skipped as done, and failed (file and reason)

Each clip is written to temporary names and renamed when complete (the frames folder last), so a killed run
leaves no half clip behind and a rerun prepares only what is missing: prep is idempotent and resumable. A
clip that cannot be decoded, or whose audio or video file is missing, is reported with its file and the
reason and skipped — never a silent drop, never a crash halfway.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harmonia.data.media import MediaError, read_audio, read_frames, tpami_spectrogram
from harmonia.data.workers import init_bound_worker
from harmonia.errors import InputError
from harmonia.extras import progress_bar


@dataclass(frozen=True)
class RawClip:
    """One clip of a raw dataset: its ``id``, the files holding its ``video`` and ``audio`` (the same file
    for videos with sound; ``None`` when the layout lacks it), its ``label`` and its ``split``."""

    id: str
    video: Path | None
    audio: Path | None
    label: str
    split: str


@dataclass(frozen=True)
class PrepSettings:
    """How clips are prepared (defaults: the TPAMI recipe for CREMA-D)."""

    fps: float = 1.0
    max_frames: int | None = None
    frame_size: int = 256
    sample_rate: int = 16000
    seconds: float = 3.0

    def __post_init__(self) -> None:
        if not self.fps > 0:
            raise InputError(
                f"--fps must be above 0 (frames kept per second; the papers use 1), got {self.fps}"
            )
        if self.max_frames is not None and self.max_frames < 1:
            raise InputError(f"max_frames must be at least 1 or None, got {self.max_frames}")
        if self.frame_size < 1 or self.sample_rate < 1 or not self.seconds > 0:
            raise InputError(
                f"frame_size and sample_rate must be at least 1 and seconds above 0, got {self.frame_size}, "
                f"{self.sample_rate}, {self.seconds}"
            )


@dataclass
class PrepReport:
    prepared: list[str] = field(default_factory=list)
    already_done: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"prepared {len(self.prepared)} clips, {len(self.already_done)} already done, "
            f"{len(self.failed)} skipped"
        ]
        for f in self.failed[:20]:
            lines.append(f"  skipped {f['id']}: {f['reason']} ({f['file']})")
        if len(self.failed) > 20:
            lines.append(f"  ... and {len(self.failed) - 20} more: see prep_report.json")
        return "\n".join(lines)


def clip_done(dst: Path, clip_id: str) -> bool:
    return (dst / "frames" / clip_id).is_dir() and (dst / "audio" / f"{clip_id}.npy").is_file()


def decode_clip(clip: RawClip, settings: PrepSettings) -> tuple[np.ndarray, np.ndarray]:
    """The kept frames [T, H, W, 3] and the mono waveform at ``settings.sample_rate`` of one clip. Raises
    :class:`MediaError`."""
    for kind, path in (("video", clip.video), ("audio", clip.audio)):
        if path is None or not Path(path).is_file():
            raise MediaError(f"missing {kind} file")
    assert clip.video is not None and clip.audio is not None
    frames = read_frames(clip.video, settings.fps, settings.max_frames)
    return frames, read_audio(clip.audio, settings.sample_rate)


def write_spectrogram(spectrogram: np.ndarray, dst: Path, clip_id: str) -> None:
    """``audio/<clip_id>.npy``, written under a temporary name and renamed."""
    audio_dir = dst / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    tmp_audio = audio_dir / f".{clip_id}.{os.getpid()}.npy"
    np.save(tmp_audio, spectrogram)
    os.replace(tmp_audio, audio_dir / f"{clip_id}.npy")


def write_frames(frames: np.ndarray, dst: Path, clip_id: str, frame_size: int) -> None:
    """``frames/<clip_id>/000.jpg ...``: each frame resized so that its shorter side is ``frame_size``
    (JPEG quality 90), written into a temporary folder renamed when complete (the clip's completion
    marker)."""
    from PIL import Image

    frames_dir = dst / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    tmp_frames = frames_dir / f".{clip_id}.{os.getpid()}.tmp"
    shutil.rmtree(tmp_frames, ignore_errors=True)
    tmp_frames.mkdir()
    for k, frame in enumerate(frames):
        image = Image.fromarray(frame)
        scale = frame_size / min(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
        image.save(tmp_frames / f"{k:03d}.jpg", quality=90)
    final = frames_dir / clip_id
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp_frames, final)


def prepare_clip(clip: RawClip, dst: Path, settings: PrepSettings) -> int:
    """Decode and write one clip (its spectrogram, then its frames folder: the completion marker, written
    last); returns its number of frames. Raises :class:`MediaError`."""
    frames, wave = decode_clip(clip, settings)
    spectrogram = tpami_spectrogram(wave, settings.sample_rate, settings.seconds)
    write_spectrogram(spectrogram, dst, clip.id)
    write_frames(frames, dst, clip.id, settings.frame_size)
    return len(frames)


def failure_reason(exc: Exception) -> str:
    """What a report says about a clip that failed: a :class:`MediaError`'s message, or, for an unexpected
    decoder failure (which must not stop the other clips), its type and message."""
    return str(exc) if isinstance(exc, MediaError) else f"{type(exc).__name__}: {exc}"


def _worker(clip: RawClip, dst: str, settings: PrepSettings) -> tuple[str, int | None, str]:
    try:
        return clip.id, prepare_clip(clip, Path(dst), settings), ""
    except Exception as exc:
        return clip.id, None, failure_reason(exc)


def prepare(
    dataset: str,
    clips: Sequence[RawClip],
    dst: str | Path,
    settings: PrepSettings,
    workers: int = 1,
    progress: bool = True,
    problems: Sequence[dict[str, str]] = (),
) -> PrepReport:
    """Prepare every clip not yet done into ``dst``; write ``meta.json``, ``index.csv`` and the report.

    ``problems`` are clips the layout scan already found broken (a file without its counterpart); they
    are reported like decoding failures.
    """
    dst = make_output_folder(dst)
    finished = any((dst / "frames").glob("[!.]*")) if (dst / "frames").is_dir() else False
    refuse_other_settings(dst / "meta.json", asdict(settings), f"harmonia prep {dataset}", finished)
    report = PrepReport(failed=list(problems))
    todo: list[RawClip] = []
    for clip in clips:
        if clip_done(dst, clip.id):
            report.already_done.append(clip.id)
        else:
            todo.append(clip)
    by_id = {c.id: c for c in clips}
    frame_counts = _indexed_frame_counts(dst)  # clips done in earlier runs; this run's are added below
    bar = progress_bar(total=len(todo), desc=f"prep {dataset}", disable=not progress, unit="clip")
    pool_context = (
        ProcessPoolExecutor(workers, initializer=init_bound_worker, initargs=(os.getpid(),))
        if workers > 1
        else None
    )
    with pool_context or contextlib.nullcontext() as pool:
        if pool is None:
            results = (_worker(c, str(dst), settings) for c in todo)
        else:
            futures = [pool.submit(_worker, c, str(dst), settings) for c in todo]
            results = (f.result() for f in as_completed(futures))
        for result in results:
            _record(result, by_id, report, frame_counts)
            bar.update()
    bar.close()
    rows = []
    for clip in sorted(clips, key=lambda c: c.id):
        if not clip_done(dst, clip.id):
            continue
        n = frame_counts.get(clip.id)
        if n is None:  # done by a run killed before it wrote the index
            n = len(list((dst / "frames" / clip.id).glob("*.jpg")))
        rows.append((clip.id, clip.label, clip.split, n))
    classes = sorted({c.label for c in clips})
    (dst / "meta.json").write_text(
        json.dumps({"dataset": dataset, "settings": asdict(settings), "classes": classes}, indent=1)
    )
    tmp_index = dst / ".index.csv.tmp"
    with open(tmp_index, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "label", "split", "frames"])
        writer.writerows(rows)
    os.replace(tmp_index, dst / "index.csv")
    report.prepared.sort()
    report.already_done.sort()
    (dst / "prep_report.json").write_text(json.dumps(asdict(report), indent=1))
    return report


def make_output_folder(dst: str | Path) -> Path:
    """Create ``dst`` (and its parents), with an error that names the problem when it cannot be a folder."""
    folder = Path(dst)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--dst {folder} is a file, not a folder; give the path of a new or existing folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the output folder --dst {folder}: {exc.strerror or exc}") from exc
    if not os.access(folder, os.W_OK):
        raise InputError(f"the output folder --dst {folder} is not writable; choose another --dst")
    return folder


def refuse_other_settings(index: Path, settings: dict[str, Any], command: str, finished: bool = True) -> None:
    """Refuse to add to a folder written with other settings (its finished parts would be mixed in).

    ``finished``: whether the folder holds any finished part; a folder without one (e.g. every clip failed)
    is simply rewritten with the new settings.
    """
    if not index.is_file() or not finished:
        return
    try:
        earlier = json.loads(index.read_text()).get("settings")
    except json.JSONDecodeError:
        return  # a damaged index is rewritten at the end
    if earlier is not None and earlier != settings:
        changed = ", ".join(
            f"{k}: {earlier.get(k)} -> {v}" for k, v in settings.items() if earlier.get(k) != v
        )
        raise InputError(
            f"{index.parent} was written by {command} with other settings ({changed}); rerun with the same "
            f"settings to resume it, or write to a new --dst"
        )


def _indexed_frame_counts(dst: Path) -> dict[str, int]:
    """Frame counts of the clips listed in an earlier run's ``index.csv`` (none without one)."""
    if not (dst / "index.csv").is_file():
        return {}
    with open(dst / "index.csv", newline="") as fh:
        return {row["id"]: int(row["frames"]) for row in csv.DictReader(fh)}


def _record(
    result: tuple[str, int | None, str],
    by_id: dict[str, RawClip],
    report: PrepReport,
    frame_counts: dict[str, int],
) -> None:
    clip_id, frames, reason = result
    if frames is None:
        clip = by_id[clip_id]
        files = {str(f) for f in (clip.video, clip.audio) if f is not None}
        report.failed.append({"id": clip_id, "file": ", ".join(sorted(files)), "reason": reason})
    else:
        report.prepared.append(clip_id)
        frame_counts[clip_id] = frames
