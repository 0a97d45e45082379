"""``harmonia bench data``: is the data pipeline fast enough for the training step?

Measured on generated clips (:mod:`harmonia.app.bench.clips`; by default 48 clips of 10 s, 640 × 360 at
25 fps, H.264 with AAC sound, in the Kinetics-Sounds layout):

1. ``harmonia prep kinetics_sounds`` in clips per second with 1 and 2 worker processes, against the
   decode-only floor: PyAV decoding every video frame and the sound of the same files in as many processes
   and doing nothing else (:mod:`harmonia.app.bench.data_prep`); then where prep's time goes per clip.
2. The loaders in samples per second at the configs' batch sizes, with 0, 1 and 2 DataLoader workers: the
   prepared-folder loader on the clips prepared with the CREMA-D and the Kinetics-Sounds settings, and the
   shard stream on the clips written as pre-training shards (:mod:`harmonia.app.bench.data_loaders`). The
   files are in the page cache: reading from a cold disk is not measured.
3. The training step's consumption in samples per second: the trainer of ``configs/cremad_baseline.yaml``,
   ``configs/kinetics_sounds_baseline.yaml`` (each with the paper's number of classes) and
   ``configs/shards_pretrain.yaml`` timing its ``train_step`` on a batch of its loader.

A row is data-bound when its loader delivers fewer samples per second than the step consumes.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from harmonia.app.bench.clips import ClipSpec, generate_clips, parse_size
from harmonia.app.bench.data_loaders import (
    MEMORY_SHARE,
    measure_classification,
    measure_pretrain,
)
from harmonia.app.bench.data_prep import FLOOR_STAGE, measure_prep, profile_prep
from harmonia.app.bench.pipeline import BenchReport, bench_command, figure, unless_default
from harmonia.app.config import ExperimentConfig, load_config
from harmonia.data.prep import PrepSettings, prepare
from harmonia.data.raw_layouts import scan
from harmonia.data.shards import ShardSettings, write_shards
from harmonia.errors import HarmoniaError, InputError

#: the classification configs measured, with the paper's number of classes
CLASSIFY = {
    "cremad": ("configs/cremad_baseline.yaml", 6),
    "kinetics_sounds": ("configs/kinetics_sounds_baseline.yaml", 31),
}
PRETRAIN = "configs/shards_pretrain.yaml"
#: each dataset's prep settings (the TPAMI recipe: 1 fps, 3 s or 10 s of sound)
PREP = {"cremad": PrepSettings(fps=1.0, seconds=3.0), "kinetics_sounds": PrepSettings(fps=1.0, seconds=10.0)}
CLIPS = 48
WORKERS = (1, 2)
LOADER_WORKERS = (0, 1, 2)
CLIP_SECONDS = 10.0
CLIP_SIZE = "640x360"
ROUNDS = 3
PROFILE_CLIPS = 8


def run_data_benchmark(
    clips: int = CLIPS,
    workers: Sequence[int] = WORKERS,
    loader_workers: Sequence[int] = LOADER_WORKERS,
    clip_seconds: float = CLIP_SECONDS,
    clip_size: str = CLIP_SIZE,
    rounds: int = ROUNDS,
    out_dir: str | Path = "bench-results",
    overrides: Sequence[str] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Measure prep, the loaders and the training steps (see the module docstring); write
    ``data.json``, ``data.md`` and ``data.png`` into ``<out_dir>/data/`` (the clips and what was prepared
    from them into its ``work/``; the clips are reused by the next run with the same ones)."""
    if rounds < 1 or not workers or min(workers) < 1 or not loader_workers or min(loader_workers) < 0:
        raise InputError("--rounds and --workers must be at least 1, and --loader-workers at least 0")
    if clips < 2:
        raise InputError(f"--clips must be at least 2 (a training and a test clip), got {clips}")
    bench = BenchReport("data", out_dir)
    width, height = parse_size(clip_size)
    spec = ClipSpec(seconds=clip_seconds, width=width, height=height)
    work = bench.folder / "work"
    if progress:
        tqdm.write(f"clips: {clips} of {spec.describe()} in {work / 'clips'}")
    paths = generate_clips(work / "clips", clips, spec)
    raw = scan("kinetics_sounds", work / "clips").clips  # as harmonia prep kinetics_sounds does
    configs = {name: _config(path, overrides, bench.runs_dir) for name, (path, _) in CLASSIFY.items()}
    pretrain = _config(PRETRAIN, overrides, bench.runs_dir)  # config errors before the long part

    prep = measure_prep(
        "kinetics_sounds", raw, work / "prep", PREP["kinetics_sounds"], workers, rounds, progress
    )
    profile = profile_prep(raw[:PROFILE_CLIPS], work / "profile", PREP["kinetics_sounds"])
    shutil.rmtree(work / "prep" / "cremad", ignore_errors=True)
    prepare("cremad", raw, work / "prep" / "cremad", PREP["cremad"], max(workers), progress=False)
    shards = work / "shards"
    shutil.rmtree(shards, ignore_errors=True)
    settings = ShardSettings(shard_size=max(1, math.ceil(clips / 8)))  # a shard per reading stream at least
    write_shards(work / "clips", shards, settings, max(workers), progress=False)
    rows = [
        measure_classification(cfg, work / "prep" / name, CLASSIFY[name][1], loader_workers, progress)
        for name, cfg in configs.items()
    ]
    rows.append(measure_pretrain(pretrain, shards, loader_workers, progress))

    command = bench_command(
        "data",
        overrides,
        *([f"--clips {clips}"] if clips != CLIPS else []),
        *unless_default("--workers", workers, WORKERS),
        *unless_default("--loader-workers", loader_workers, LOADER_WORKERS),
        *([f"--clip-seconds {clip_seconds:g}"] if clip_seconds != CLIP_SECONDS else []),
        *([f"--clip-size {clip_size}"] if clip_size != CLIP_SIZE else []),
        *([f"--rounds {rounds}"] if rounds != ROUNDS else []),
        f"--out {out_dir}",
    )
    summary = {
        "command": command,
        "cpus": os.cpu_count() or 1,
        "clips": clips,
        "clip_spec": asdict(spec),
        "clip_description": spec.describe(),
        "clip_kbps": statistics.median(p.stat().st_size * 8 / spec.seconds / 1000 for p in paths),
        "prep_settings": asdict(PREP["kinetics_sounds"]),
        "rounds": rounds,
        "prep": prep,
        "profile": profile,
        "profile_clips": min(clips, PROFILE_CLIPS),
        "loaders": rows,
    }
    bench.write(summary, format_report, PLOTS)
    return summary


def _config(path: str, overrides: Sequence[str], runs_dir: Path) -> ExperimentConfig:
    """A config of the repository (from the working folder, else beside this source tree), on the CPU
    unless the overrides say otherwise."""
    found = Path(path)
    if not found.is_file():
        found = Path(__file__).resolve().parents[4] / path
        if not found.is_file():
            raise HarmoniaError(f"{path} not found: run harmonia bench data from the harmonia repository")
    return load_config(found, ["train.device=cpu", *overrides, f"out_dir={runs_dir}", "train.probe=false"])


def format_report(summary: dict[str, Any]) -> str:
    settings = summary["prep_settings"]
    lines = [
        "# Data-pipeline throughput",
        "",
        f"Measured with `{summary['command']}` on {summary['cpus']} CPU cores, on {summary['clips']} "
        f"generated clips of {summary['clip_description']} (median {summary['clip_kbps']:.0f} kbit/s), in "
        "the Kinetics-Sounds layout.",
        "",
        "## harmonia prep against the decode-only floor",
        "",
        f"`harmonia prep kinetics_sounds` ({settings['fps']:g} fps, shorter side {settings['frame_size']} "
        f"px, {settings['seconds']:g} s spectrogram) against the floor: PyAV decoding every video frame and "
        f"the sound of the same files in as many processes, and nothing else. Medians over "
        f"{summary['rounds']} rounds of floor, prep, floor; prep / floor is each round's prep rate over its "
        "two floors' mean, A/A the second floor's rate over the first's.",
        "",
        "| workers | floor clips/s | prep clips/s | floor per worker | prep per worker | prep / floor "
        "| A/A |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary["prep"]:
        lines.append(
            f"| {r['workers']} | {r['floor_clips_per_s']:.2f} | {r['prep_clips_per_s']:.2f} "
            f"| {r['floor_per_worker']:.2f} | {r['prep_per_worker']:.2f} | {r['prep_over_floor']:.0%} "
            f"| {r['aa_floor_over_floor']:.2f} |"
        )
    profile = dict(summary["profile"])
    floor = profile.pop(FLOOR_STAGE)
    total = sum(profile.values())
    lines += [
        "",
        f"Where prep's time goes, in one process: CPU milliseconds per clip, medians over "
        f"{summary['profile_clips']} clips (prep skips decoding the pictures it does not keep and no other "
        "picture refers to, which the floor decodes):",
        "",
        "| stage | CPU ms per clip | share of prep |",
        "|---|---|---|",
        f"| {FLOOR_STAGE} | {floor:.1f} | |",
        *(f"| {name} | {ms:.1f} | {ms / total:.0%} |" for name, ms in profile.items()),
        f"| prep, all stages | {total:.1f} | 100% |",
        "",
        "## Loaders against the training step",
        "",
        "Samples per second of each loader at its config's batch size (after two warm-up batches; the files "
        "in the page cache), and of the config's training step on one of the loader's batches "
        f"({summary['loaders'][0]['device']}, {summary['loaders'][0]['threads']} threads; median of the "
        "timed steps after a warm-up). Data-bound: the loader delivers fewer samples per second than the "
        "step consumes.",
        "",
        "| config | loader | batch | workers | loader samples/s | step samples/s | bound |",
        "|---|---|---|---|---|---|---|",
    ]
    notes = []
    for r in summary["loaders"]:
        step, at = r["step_samples_per_s"], ""
        if r["step_batch_size"] != r["batch_size"]:
            at = f" (batch {r['step_batch_size']})"
            notes.append(
                f"- {r['config']}: a step at batch {r['batch_size']} is predicted to take "
                f"{r['step_predicted_gib']:.1f} GiB, over {MEMORY_SHARE:.0%} of the memory available; its "
                f"step was timed at batch {r['step_batch_size']}."
            )
        for n, rate in r["loader_samples_per_s"].items():
            bound = "data-bound" if rate < step else "compute-bound"
            lines.append(
                f"| {r['config']} | {r['loader']} | {r['batch_size']} | {n} | {rate:.0f} | {step:.1f}{at} "
                f"| {bound} |"
            )
    lines += [*(["", *notes] if notes else []), ""]
    lines.append("On a CPU the loader's workers and the step share the cores; each was measured alone.")
    return "\n".join(lines) + "\n"


def _plot(summary: dict[str, Any], path: Path) -> None:
    rows = summary["loaders"]
    with figure(path, 1, 2, figsize=(10, 3.6)) as (_, (left, right)):
        prep = summary["prep"]
        width = 0.38
        xs = np.arange(len(prep))
        left.bar(xs - width / 2, [r["floor_per_worker"] for r in prep], width, label="decode-only floor")
        left.bar(xs + width / 2, [r["prep_per_worker"] for r in prep], width, label="harmonia prep")
        left.set_xticks(xs, [f"{r['workers']} worker{'s' if r['workers'] > 1 else ''}" for r in prep])
        left.set_ylabel("clips/s per worker")
        left.legend(frameon=False)
        left.set_title("prep vs decode floor")
        labels, loader, step = [], [], []
        for r in rows:
            for n, rate in r["loader_samples_per_s"].items():
                labels.append(f"{r['config']}, {n} workers")
                loader.append(rate)
                step.append(r["step_samples_per_s"])
        ys = np.arange(len(labels))
        right.barh(ys + width / 2, loader, width, label="loader")
        right.barh(ys - width / 2, step, width, label="training step")
        right.set_yticks(ys, labels, fontsize=8)
        right.set_xscale("log")
        right.set_xlabel("samples/s (log)")
        right.invert_yaxis()
        right.legend(frameon=False, fontsize=8)
        right.set_title("loaders vs step")


#: the figures of ``harmonia bench data`` (redrawn from ``data.json`` by ``--replot``)
PLOTS = {"data.png": _plot}
