"""``harmonia bench finegrained``: coarse vs fine-grained contrastive loss on partially irrelevant clips.

The pre-training recipe (:data:`~harmonia.bench.pretrain.PRETRAIN_RECIPE`) on tri-modal AV-Digits where
half of the training clips have half of their frames taken from another digit's clip (a contiguous block;
captions and audio describe the clip's own digit). For each batch size and seed, each variant is trained
and scored on the clean test split: digit linear probe of the frozen video backbone and zero-shot
video↔text R@1/5/10 (each model ranks by the score it was trained with). For each batch size: the paired
median step time of each variant (same batches, interleaved) and the peak memory of one training step (the
growth of the resident set of a fresh process during the step). For every trained model, the attention of
each caption word over the partial clips' tubelets shows whether the unrelated frames get less weight.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from harmonia.bench.common import fmt, mean_std, paired_step_times, run_variant
from harmonia.bench.pretrain import PRETRAIN_RECIPE
from harmonia.config import load_config
from harmonia.eval.attention import frame_attention, plot_frame_attention
from harmonia.train import build_trainer
from harmonia.train.pretrain import PretrainTrainer

PARTIAL = ["data.trimodal.partial_rate=0.5", "data.trimodal.partial_fraction=0.5"]
VARIANTS: dict[str, list[str]] = {
    "coarse": [],
    "finegrained": ["pretrain.vt_loss=finegrained", "pretrain.pool_direction=over_a"],
    "finegrained-both": ["pretrain.vt_loss=finegrained", "pretrain.pool_direction=both"],
    "finegrained-av": [
        "pretrain.vt_loss=finegrained",
        "pretrain.va_loss=finegrained",
        "pretrain.pool_direction=over_a",
    ],
}
DEFAULT_VARIANTS = ("coarse", "finegrained")
BATCH_SIZES = (16, 32, 128)


def _overrides(variant: str, batch_size: int, overrides: Sequence[str]) -> list[str]:
    return [
        *PRETRAIN_RECIPE,
        *PARTIAL,
        *VARIANTS[variant],
        *overrides,
        f"train.batch_size={batch_size}",
        "train.eval_every=1000",  # only after the last epoch: fine-grained scoring of a split is slow
    ]


def run_finegrained_benchmark(
    seeds: int = 3,
    out_dir: str | Path = "bench-results",
    variants: Sequence[str] = DEFAULT_VARIANTS,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    overrides: Sequence[str] = (),
    speed_steps: int = 20,
    speed_rounds: int = 5,
    progress: bool = True,
) -> dict[str, Any]:
    """Train every variant at every batch size for ``seeds`` seeds, time and measure the steps; write
    ``finegrained.{md,json,png}`` and ``attention.png``."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    out = Path(out_dir) / "finegrained"
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    speed: dict[str, dict[str, Any]] = {}
    jobs = [(b, v) for b in batch_sizes for v in variants]
    for batch_size, variant in tqdm(jobs, desc="finegrained benchmark", disable=not progress, unit="variant"):
        cfg = load_config(
            None,
            [
                *_overrides(variant, batch_size, overrides),
                f"name={variant}_b{batch_size}",
                f"out_dir={out / 'runs'}",
            ],
        )
        results = run_variant(cfg, list(range(seeds)), progress)
        for seed, result in zip(range(seeds), results, strict=True):
            result["attention"] = _attention(result["run_dir"], cfg, seed, out, variant, batch_size)
        runs.setdefault(str(batch_size), {})[variant] = results
    for batch_size in batch_sizes:
        speed[str(batch_size)] = measure_speed(
            variants, batch_size, overrides, speed_steps, speed_rounds, progress
        )
    summary = {
        "seeds": list(range(seeds)),
        "variants": list(variants),
        "overrides": list(overrides),
        "runs": runs,
        "speed": speed,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "finegrained.json").write_text(json.dumps(summary, indent=1))
    command = " ".join(
        [
            "harmonia bench finegrained",
            *overrides,
            f"--seeds {seeds}",
            f"--speed-steps {speed_steps} --speed-rounds {speed_rounds}",
            f"--out {out_dir}",
        ]
    )
    if tuple(variants) != DEFAULT_VARIANTS:
        command += " --variants " + " ".join(variants)
    if tuple(batch_sizes) != BATCH_SIZES:
        command += " --batch-sizes " + " ".join(map(str, batch_sizes))
    report = format_report(summary, command)
    (out / "finegrained.md").write_text(report)
    _plot(summary, out / "finegrained.png")
    print(report)
    return summary


def _attention(
    run_dir: str, cfg: Any, seed: int, out: Path, variant: str, batch_size: int
) -> dict[str, float]:
    """Relevant vs irrelevant attention of the trained model of ``run_dir`` (and a picture for seed 0)."""
    import dataclasses

    from harmonia.train.checkpoint import load_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(dataclasses.replace(cfg, out_dir=tmp), progress=False)
    assert isinstance(trainer, PretrainTrainer)
    trainer.model.load_state_dict(load_checkpoint(Path(run_dir) / "checkpoints" / "last.pt")["model"])
    split = trainer.dataset.split("train")
    attention = frame_attention(
        trainer.model, split, cfg.pretrain.tau_att, cfg.pretrain.tubelet[0], device=trainer.device
    )
    stats = attention.mean_weight()
    if seed == 0:
        out.mkdir(parents=True, exist_ok=True)
        plot_frame_attention(
            attention,
            split,
            str(out / f"attention_{variant}_b{batch_size}.png"),
            title=f"{variant}, batch {batch_size}: attention of caption words over frames "
            f"(relevant {stats['relevant']:.2f}x uniform, unrelated {stats['irrelevant']:.2f}x)",
        )
    return stats


def measure_speed(
    variants: Sequence[str],
    batch_size: int,
    overrides: Sequence[str],
    steps: int,
    rounds: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Paired step times of the variants at ``batch_size`` and each one's peak step memory (MiB)."""
    with tempfile.TemporaryDirectory() as tmp:
        trainers = [
            build_trainer(
                load_config(None, [*_overrides(v, batch_size, overrides), f"out_dir={tmp}", f"name=s{i}"]),
                progress=False,
            )
            for i, v in enumerate(variants)
        ]
        batches = [b for _, b in zip(range(steps), trainers[0].train_loader, strict=False)]
        times = paired_step_times(trainers, batches, rounds, progress)
    memory = [step_memory_mib(_overrides(v, batch_size, overrides)) for v in variants]
    return {v: {**t, "peak_mib": m} for v, t, m in zip(variants, times, memory, strict=True)}


def step_memory_mib(overrides: Sequence[str]) -> float:
    """Peak memory of one training step (MiB): how far the resident set of a fresh process grows above
    its size before the step (Linux; glibc is told to return every freed block of >= 64 KiB to the
    system, so that the resident set follows the live tensors)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    previous = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        process = context.Process(target=_memory_worker, args=(list(overrides), queue))
        process.start()
    finally:
        if previous is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = previous
    result = queue.get(timeout=600)
    process.join()
    return float(result)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _memory_worker(overrides: list[str], queue: Any) -> None:
    import gc

    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(load_config(None, [*overrides, f"out_dir={tmp}"]), progress=False)
        batch = next(iter(trainer.train_loader))
        trainer.train_step(batch)  # optimizer state and one-time allocations
        gc.collect()
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak resident set (VmHWM) to the current one
        before = _status_kib("VmRSS")
        trainer.train_step(batch)
        queue.put((_status_kib("VmHWM") - before) / 1024)


def format_report(summary: dict[str, Any], command: str) -> str:
    n = len(summary["seeds"])
    variants = summary["variants"]
    lines = [
        "# Coarse vs fine-grained contrastive loss on partially irrelevant clips",
        "",
        f"Measured with `{command}` (mean ± std over {n} seeds). Training data: 50 % of the clips have a "
        "contiguous half of their frames taken from another digit's clip; test split clean.",
        "",
        "| batch | variant | video probe (%) | video→text R@1 | R@5 | R@10 | text→video R@1 "
        "| attention relevant / unrelated (× uniform) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for batch_size, by_variant in summary["runs"].items():
        for v in variants:
            results = by_variant[v]
            relevant = fmt([r["attention"]["relevant"] for r in results], 1, 2)
            unrelated = fmt([r["attention"]["irrelevant"] for r in results], 1, 2)
            lines.append(
                f"| {batch_size} | {v} | {fmt([r['probe']['video'] for r in results])} | "
                + " | ".join(fmt([r["test"][f"video_to_text/R@{k}"] for r in results]) for k in (1, 5, 10))
                + f" | {fmt([r['test']['text_to_video/R@1'] for r in results])}"
                + f" | {relevant} / {unrelated} |"
            )
    lines += [
        "",
        "Step time (median over the timed steps, paired with the first variant on the same batches) and peak "
        "memory of one training step (growth of a fresh process's resident set during the step):",
        "",
        "| batch | variant | step (ms) | × " + variants[0] + " | peak step memory (MiB) |",
        "|---|---|---|---|---|",
    ]
    for batch_size, by_variant in summary["speed"].items():
        for v in variants:
            s = by_variant[v]
            lines.append(
                f"| {batch_size} | {v} | {s['seconds'] * 1000:.0f} | {s['ratio']:.2f} | {s['peak_mib']:.0f} |"
            )
    seconds = [r["seconds"] for by in summary["runs"].values() for rs in by.values() for r in rs]
    lines += ["", f"A training run took {statistics.median(seconds):.0f} s (median over all runs)."]
    return "\n".join(lines) + "\n"


def _plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = summary["variants"]
    batches = list(summary["runs"])
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    width = 0.8 / len(variants)
    panels = (
        ("video→text R@1 (%)", lambda r: r["test"]["video_to_text/R@1"] * 100),
        ("video probe (%)", lambda r: r["probe"]["video"] * 100),
    )
    for ax, (label, value) in zip(axes[:2], panels, strict=True):
        for j, v in enumerate(variants):
            stats = [mean_std([value(r) for r in summary["runs"][b][v]]) for b in batches]
            ax.bar(
                [i + j * width for i in range(len(batches))],
                [s[0] for s in stats],
                width,
                yerr=[s[1] for s in stats],
                capsize=3,
                label=v,
            )
        ax.set_xticks([i + width * (len(variants) - 1) / 2 for i in range(len(batches))], batches)
        ax.set(xlabel="batch size", ylabel=label)
        ax.legend(fontsize=8)
    for ax, key, label in (
        (axes[2], "seconds", "step time (ms)"),
        (axes[3], "peak_mib", "peak step memory (MiB)"),
    ):
        for v in variants:
            scale = 1000 if key == "seconds" else 1
            ax.plot(
                [int(b) for b in summary["speed"]],
                [summary["speed"][b][v][key] * scale for b in summary["speed"]],
                marker="o",
                label=v,
            )
        ax.set(xlabel="batch size", ylabel=label, xscale="log")
        ax.minorticks_off()
        ax.set_xticks([int(b) for b in summary["speed"]], list(summary["speed"]))
        ax.legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
