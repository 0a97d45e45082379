"""``harmonia prep`` against the decode-only floor, for ``harmonia bench data``.

The floor (:func:`decode_only`) decodes every video frame and the sound of a file with PyAV, with the
decoder settings prep uses, and does nothing else. :func:`measure_prep` runs the floor and
:func:`~harmonia.data.prep.prepare` on the same clips with the same number of worker processes, in
interleaved rounds (floor, prep, floor); :func:`profile_prep` splits prep's cost per clip into its stages.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from harmonia.data.media import tpami_spectrogram
from harmonia.data.prep import PrepSettings, RawClip, decode_clip, prepare, write_frames, write_spectrogram
from harmonia.data.workers import init_bound_worker
from harmonia.errors import HarmoniaError

FLOOR_STAGE = "floor: decode every video frame and the sound"


def decode_only(path: str) -> int:
    """The floor: decode every frame of the first video stream and of the first audio stream of ``path``
    in one pass over the file, and nothing else; returns the number of frames decoded."""
    import av

    decoded = 0
    with av.open(path) as container:
        streams = [*container.streams.video[:1], *container.streams.audio[:1]]
        for packet in container.demux(*streams):
            for _ in packet.decode():
                decoded += 1
    return decoded


def in_workers(function: Callable[[Any], Any], items: Sequence[Any], workers: int) -> float:
    """Seconds to apply ``function`` to every item in ``workers`` processes started as prep starts its
    pool (in this process for 1, as prep)."""
    start = time.perf_counter()
    if workers == 1:
        for item in items:
            function(item)
    else:
        with ProcessPoolExecutor(workers, initializer=init_bound_worker, initargs=(os.getpid(),)) as pool:
            for future in [pool.submit(function, item) for item in items]:
                future.result()
    return time.perf_counter() - start


def measure_prep(
    dataset: str,
    clips: Sequence[RawClip],
    folder: Path,
    settings: PrepSettings,
    workers: Sequence[int],
    rounds: int,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """For each worker count: clips per second of the floor and of ``prepare(dataset, clips, ...)`` into
    a fresh ``folder / dataset``, in ``rounds`` rounds of floor, prep, floor. Medians over rounds of each
    rate, of prep's rate over the mean of its round's two floors, and of the first floor over the second
    (the A/A control: 1 on a quiet machine)."""
    files = [str(c.video) for c in clips]
    decode_only(files[0])  # imports and one-time set-ups, outside the timings
    shutil.rmtree(folder / "warm-up", ignore_errors=True)
    prepare(dataset, clips[:1], folder / "warm-up", settings, 1, progress=False)
    results = []
    bar = tqdm(total=len(workers) * rounds, desc="prep vs floor", disable=not progress, unit="round")
    for n in workers:
        floors, preps, ratios, controls = [], [], [], []
        for _ in range(rounds):
            first = in_workers(decode_only, files, n)
            shutil.rmtree(folder / dataset, ignore_errors=True)
            start = time.perf_counter()
            report = prepare(dataset, clips, folder / dataset, settings, n, progress=False)
            took = time.perf_counter() - start
            second = in_workers(decode_only, files, n)
            if report.failed:
                raise HarmoniaError(f"prep failed on a generated clip: {report.failed[0]}")
            floors += [len(files) / first, len(files) / second]
            preps.append(len(files) / took)
            ratios.append((first + second) / 2 / took)
            controls.append(second / first)
            bar.update()
        floor, prep = statistics.median(floors), statistics.median(preps)
        results.append(
            {
                "workers": n,
                "floor_clips_per_s": floor,
                "prep_clips_per_s": prep,
                "floor_per_worker": floor / n,
                "prep_per_worker": prep / n,
                "prep_over_floor": statistics.median(ratios),
                "aa_floor_over_floor": statistics.median(controls),
            }
        )
    bar.close()
    return results


def profile_prep(clips: Sequence[RawClip], folder: Path, settings: PrepSettings) -> dict[str, float]:
    """CPU milliseconds per clip (medians over ``clips``) of the floor and of each stage of
    :func:`~harmonia.data.prep.prepare_clip`, in this process. CPU time: what a stage costs, less disturbed
    than wall time by other work on the machine."""
    stages: dict[str, list[float]] = {}

    @contextmanager
    def stage(name: str) -> Iterator[None]:
        start = time.process_time()
        yield
        stages.setdefault(name, []).append((time.process_time() - start) * 1000)

    shutil.rmtree(folder, ignore_errors=True)
    for clip in clips:
        with stage(FLOOR_STAGE):
            decode_only(str(clip.video))
        with stage("decode the kept frames (RGB) and the sound (16 kHz mono)"):
            frames, wave = decode_clip(clip, settings)
        with stage("spectrogram"):
            spectrogram = tpami_spectrogram(wave, settings.sample_rate, settings.seconds)
        with stage("write the spectrogram (.npy)"):
            write_spectrogram(spectrogram, folder, clip.id)
        with stage("frames: resize, JPEG, write"):
            write_frames(frames, folder, clip.id, settings.frame_size)
    return {name: statistics.median(values) for name, values in stages.items()}
