"""``harmonia bench balance``: what OGM-GE, OPM and both do on the default (imbalanced) AV-Digits.

Quality: every variant (fusion head x balancing method) is trained for each seed with the defaults of
``configs/avdigits_concat.yaml``; the report gives mean ± std of test accuracy, macro-F1 and each encoder's
linear-probe accuracy, a bar plot, and ρ / k / q curves (per-epoch means of the per-step logs, seed 0).

Speed: in one process, the same fixed batches go through ``Trainer.train_step`` for every method, the
methods interleaved step by step; the report gives the median of the per-batch ratios to the baseline.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harmonia.app.bench.common import fmt, mean_std, paired_step_times
from harmonia.app.bench.pipeline import BenchReport, bench_command, figure, sweep, unless_default
from harmonia.app.config import load_config
from harmonia.app.plots import plot_balance_curves
from harmonia.app.train import Trainer
from harmonia.errors import ConfigError

METHODS = ("none", "ogm", "opm", "opm+ogm")
ALL_VARIANTS = (
    *(f"concat/{m}" for m in METHODS),
    *(f"{fusion}/{m}" for fusion in ("sum", "film") for m in ("none", "ogm", "opm")),
)


def _variant_overrides(variant: str) -> list[str]:
    fusion, method = variant.split("/")
    return [f"model.fusion={fusion}", balance_override(method), f"name={fusion}_{method.replace('+', '_')}"]


def balance_override(method: str) -> str:
    """``balance=[...]`` of a variant's method name (``none``, ``ogm``, ``opm``, ``opm+ogm``); the variants'
    ``ogm`` is OGM-GE (``ogm_ge``), as the reports' tables say."""
    names = {"ogm": "ogm_ge"}
    return f"balance=[{','.join(names.get(m, m) for m in method.split('+') if m != 'none')}]"


def run_balance_benchmark(
    seeds: int = 3,
    out_dir: str | Path = "bench-results",
    variants: Sequence[str] = ALL_VARIANTS,
    overrides: Sequence[str] = (),
    speed_steps: int = 20,
    speed_rounds: int = 5,
    progress: bool = True,
) -> dict[str, Any]:
    """Train every variant for ``seeds`` seeds, time each method; write ``balance.{md,json,png}``."""
    unknown = [v for v in variants if v not in ALL_VARIANTS]
    if unknown:
        raise ConfigError(f"unknown variants {unknown}; choose from {', '.join(ALL_VARIANTS)}")
    bench = BenchReport("balance", out_dir)
    forced = [f"out_dir={bench.runs_dir}", "train.probe=true"]
    runs = sweep(
        "balance benchmark",
        variants,
        lambda variant: load_config(None, [*overrides, *_variant_overrides(variant), *forced]),
        seeds,
        progress,
    )
    speed = measure_step_times(overrides, speed_steps, speed_rounds, progress)
    summary = {
        "seeds": list(range(seeds)),
        "overrides": list(overrides),
        "runs": runs,
        "speed": speed,
        "speed_steps": speed_steps,
        "speed_rounds": speed_rounds,
    }
    command = bench_command(
        "balance",
        overrides,
        f"--seeds {seeds}",
        f"--out {out_dir}",
        *unless_default("--variants", variants, ALL_VARIANTS),
    )
    bench.write(
        summary,
        lambda s: format_report(s, command),
        {"balance.png": _plot, "balance_curves.png": _plot_curves},
    )
    return summary


CONTROL = "none (again)"


def measure_step_times(
    overrides: Sequence[str], steps: int, rounds: int, progress: bool = True
) -> dict[str, dict[str, float]]:
    """Step time of each concat method relative to the baseline, measured as paired ratios.

    One trainer per method (plus a second, independent baseline as an A/A control) sees the same batches.
    For every batch every trainer takes one step, in an order rotated from batch to batch, and each
    method's time is divided by the baseline's time on that same batch; the result is the median of these
    paired ratios over ``steps`` batches x ``rounds`` rounds (a first round is a warm-up). Pairing at the
    step level cancels the slow drifts of a shared machine, which made block-wise timing disagree with
    itself by more than 10 %; the control's ratio shows the noise floor that remains.
    """
    names = [*METHODS, CONTROL]
    with tempfile.TemporaryDirectory() as tmp:
        trainers = [
            Trainer(
                load_config(
                    None,
                    [*overrides, balance_override(n.split()[0]), f"out_dir={tmp}", f"name=speed_{i}"],
                ),
                progress=False,
            )
            for i, n in enumerate(names)
        ]
        batches = [b for _, b in zip(range(steps), trainers[0].train_loader, strict=False)]
        timed = paired_step_times(trainers, batches, rounds, progress)
    return dict(zip(names, timed, strict=True))


def run_speed_benchmark(
    out_dir: str | Path = "bench-results",
    overrides: Sequence[str] = (),
    steps: int = 20,
    rounds: int = 5,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Only the step-time comparison, written to ``balance/speed.{md,json}``."""
    speed = measure_step_times(overrides, steps, rounds, progress)
    command = bench_command("balance-speed", overrides, f"--speed-steps {steps}", f"--speed-rounds {rounds}")
    lines = [f"Measured with `{command}`:", "", *_speed_table(speed, steps, rounds)]
    BenchReport("balance", out_dir).write(speed, lambda _: "\n".join(lines) + "\n", stem="speed")
    return speed


def _speed_table(speed: dict[str, dict[str, float]], steps: int, rounds: int) -> list[str]:
    lines = [
        f"Step time of each method over the baseline (concat, batch 64, one process; the same {steps} "
        f"batches for every method, {rounds} rounds after a warm-up round; on every batch each method takes "
        "one step, in rotated order, and the ratio is the median of the per-batch ratios to the baseline's "
        f"step; `{CONTROL}` is a second baseline model, an A/A control showing the noise floor):",
        "",
        "| method | median ms / step | × baseline (median paired ratio) |",
        "|---|---|---|",
    ]
    lines += [f"| {m} | {s['seconds'] * 1000:.1f} | {s['ratio']:.3f} |" for m, s in speed.items()]
    return lines


def format_report(summary: dict[str, Any], command: str) -> str:
    n = len(summary["seeds"])
    lines = [
        "# Modality balancing on AV-Digits",
        "",
        f"Measured with `{command}` (mean ± std over {n} seeds).",
        "",
        "| fusion | method | test accuracy | macro-F1 | audio probe | image probe |",
        "|---|---|---|---|---|---|",
    ]
    for variant, runs in summary["runs"].items():
        fusion, method = variant.split("/")
        acc = [r["test"]["accuracy"] for r in runs]
        f1 = [r["test"]["macro_f1"] for r in runs]
        audio = [r["probe"]["audio"] for r in runs]
        image = [r["probe"]["image"] for r in runs]
        lines.append(f"| {fusion} | {method} | {fmt(acc)} | {fmt(f1)} | {fmt(audio)} | {fmt(image)} |")
    lines += ["", *_speed_table(summary["speed"], summary["speed_steps"], summary["speed_rounds"])]
    return "\n".join(lines) + "\n"


def _plot(summary: dict[str, Any], path: Path) -> None:
    variants = list(summary["runs"])
    with figure(path, figsize=(max(6, 0.9 * len(variants)), 3.8)) as (_, ax):
        width = 0.27
        for k, (label, get) in enumerate(
            (
                ("test accuracy", lambda r: r["test"]["accuracy"]),
                ("audio probe", lambda r: r["probe"]["audio"]),
                ("image probe", lambda r: r["probe"]["image"]),
            )
        ):
            stats = [mean_std([get(r) for r in summary["runs"][v]]) for v in variants]
            ax.bar(
                [i + (k - 1) * width for i in range(len(variants))],
                [m * 100 for m, _ in stats],
                width,
                yerr=[s * 100 for _, s in stats],
                capsize=2,
                label=label,
            )
        ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
        ax.set_ylim(50, 100)
        ax.set_ylabel("%")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, 1.15), ncol=3, frameon=False)


def _plot_curves(summary: dict[str, Any], path: Path) -> None:
    runs = summary["runs"]
    plot_balance_curves({v: rs[0]["run_dir"] for v, rs in runs.items() if not v.endswith("/none")}, path)
