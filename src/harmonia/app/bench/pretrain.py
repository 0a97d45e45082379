"""``harmonia bench pretrain``: what misaligned triplets cost tri-modal contrastive pre-training.

Pre-trains the recipe of ``configs/trimodal_pretrain.yaml`` (held here as :data:`PRETRAIN_RECIPE`, so
the benchmark also runs from an installed package; a test keeps the two equal) on clean data and with
10, 30 and 50 % of the training triplets' captions taken from another digit's clip, for each seed. The
report gives mean ± std of the digit linear probe on each frozen backbone, zero-shot retrieval R@1/5/10
on the clean test split, and the median training time of an epoch; plots show probe and R@1 against the
misalignment rate.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harmonia.app.bench.common import fmt, mean_std
from harmonia.app.bench.pipeline import BenchReport, bench_command, figure, sweep, unless_default
from harmonia.app.config import ExperimentConfig, load_config
from harmonia.app.logs import read_metrics
from harmonia.data.trimodal import load_trimodal_avdigits

PRETRAIN_RECIPE = [
    "name=trimodal_pretrain",
    "task=pretrain",
    "data.name=trimodal_avdigits",
    "data.modalities=[video,audio,text]",
    "data.avdigits.audio_snr_db=10.0",
    "data.avdigits.image_occlusion=0.0",
    "data.trimodal.frames=8",
    "data.trimodal.frame_size=16",
    "data.trimodal.captions=3",
    "data.trimodal.speech=digit_and_motion",
    "data.trimodal.speech_seconds=2.0",
    "data.trimodal.clips_per_image=3",
    "data.trimodal.misalign_rate=0.0",
    "data.trimodal.misalign_modality=text",
    "pretrain.backbone=shared",
    "pretrain.width=64",
    "pretrain.depth=2",
    "pretrain.heads=4",
    "pretrain.embed_dim=64",
    "pretrain.temperature=0.07",
    "optim.name=adamw",
    "optim.lr=0.001",
    "optim.weight_decay=0.01",
    "optim.schedule=cosine",
    "train.epochs=30",
    "train.batch_size=64",
]
RATES = (0.0, 0.1, 0.3, 0.5)
RETRIEVAL = ("video_to_text", "text_to_video", "video_to_audio", "audio_to_video")


def run_pretrain_benchmark(
    seeds: int = 3,
    out_dir: str | Path = "bench-results",
    rates: Sequence[float] = RATES,
    overrides: Sequence[str] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Pre-train at each misalignment rate for ``seeds`` seeds; write ``pretrain.{md,json,png}``."""
    bench = BenchReport("pretrain", out_dir)

    def configure(rate: float) -> ExperimentConfig:
        return load_config(
            None,
            [
                *PRETRAIN_RECIPE,
                *overrides,
                f"data.trimodal.misalign_rate={rate}",
                f"name=misalign{round(rate * 100):02d}",
                f"out_dir={bench.runs_dir}",
                "train.probe=true",
            ],
        )

    def add_epoch_seconds(rate: float, results: list[dict[str, Any]]) -> None:
        for r in results:
            epochs = [m for m in read_metrics(Path(r["run_dir"]) / "metrics.jsonl") if m["kind"] == "epoch"]
            r["epoch_seconds"] = statistics.median(m["train/epoch_seconds"] for m in epochs)

    swept = sweep(
        "pretrain benchmark", rates, configure, seeds, progress, unit="rate", after=add_epoch_seconds
    )
    runs = {str(rate): results for rate, results in swept.items()}
    cfg = configure(rates[-1])
    recipes = cfg.data.trimodal_recipe(), cfg.data.avdigits_recipe()
    test_size = len(load_trimodal_avdigits(*recipes, progress=False).split("test"))
    summary = {
        "seeds": list(range(seeds)),
        "overrides": list(overrides),
        "test_size": test_size,
        "runs": runs,
    }
    command = bench_command(
        "pretrain",
        overrides,
        f"--seeds {seeds}",
        f"--out {out_dir}",
        *unless_default("--rates", rates, RATES),
    )
    bench.write(summary, lambda s: format_report(s, command), PLOTS)
    return summary


def format_report(summary: dict[str, Any], command: str) -> str:
    n = len(summary["seeds"])
    runs = summary["runs"]
    lines = [
        "# Tri-modal contrastive pre-training on AV-Digits: the cost of misaligned captions",
        "",
        f"Measured with `{command}` (mean ± std over {n} seeds; test split, always clean).",
        "",
        "Digit linear probe on each frozen backbone (%):",
        "",
        "| misaligned | video | audio | text |",
        "|---|---|---|---|",
    ]
    for rate, results in runs.items():
        probes = [fmt([r["probe"][m] for r in results]) for m in ("video", "audio", "text")]
        lines.append(f"| {float(rate):.0%} | {' | '.join(probes)} |")
    lines += [
        "",
        "Zero-shot retrieval, R@1 / R@5 / R@10 (%):",
        "",
        "| misaligned | " + " | ".join(d.replace("_to_", " → ") for d in RETRIEVAL) + " |",
        "|---|" + "---|" * len(RETRIEVAL),
    ]
    for rate, results in runs.items():
        cells = []
        for d in RETRIEVAL:
            means = [mean_std([r["test"][f"{d}/R@{k}"] for r in results])[0] * 100 for k in (1, 5, 10)]
            std1 = mean_std([r["test"][f"{d}/R@1"] for r in results])[1] * 100
            cells.append(f"{means[0]:.1f} ± {std1:.1f} / {means[1]:.1f} / {means[2]:.1f}")
        lines.append(f"| {float(rate):.0%} | {' | '.join(cells)} |")
    epoch = [r["epoch_seconds"] for results in runs.values() for r in results]
    total = [r["seconds"] for results in runs.values() for r in results]
    lines += [
        "",
        f"Chance: R@K = K / {summary['test_size']} test clips; probe 10 %. A pre-training epoch "
        f"(training steps only) takes {statistics.median(epoch):.1f} s (median over all runs); a whole run, "
        f"with evaluation after every epoch and the final probes, {statistics.median(total):.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def _plot(summary: dict[str, Any], path: Path) -> None:
    runs = summary["runs"]
    rates = [float(r) * 100 for r in runs]
    with figure(path, 1, 2, figsize=(10, 3.8)) as (_, axes):
        for m in ("video", "audio", "text"):
            stats = [mean_std([r["probe"][m] for r in results]) for results in runs.values()]
            axes[0].errorbar(
                rates,
                [s[0] * 100 for s in stats],
                [s[1] * 100 for s in stats],
                marker="o",
                capsize=3,
                label=m,
            )
        axes[0].set(
            xlabel="misaligned training triplets (%)", ylabel="probe accuracy (%)", title="digit linear probe"
        )
        for d in RETRIEVAL:
            stats = [mean_std([r["test"][f"{d}/R@1"] for r in results]) for results in runs.values()]
            axes[1].errorbar(
                rates,
                [s[0] * 100 for s in stats],
                [s[1] * 100 for s in stats],
                marker="o",
                capsize=3,
                label=d.replace("_to_", "→"),
            )
        axes[1].set(
            xlabel="misaligned training triplets (%)", ylabel="R@1 (%)", title="zero-shot retrieval (test)"
        )
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)


#: the figures of ``harmonia bench pretrain`` (redrawn from ``pretrain.json`` by ``--replot``)
PLOTS = {"pretrain.png": _plot}
