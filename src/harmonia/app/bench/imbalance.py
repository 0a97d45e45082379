"""``harmonia bench imbalance``: how much joint training under-trains each modality.

For each seed it trains (a) the joint model of the base config and (b) one unimodal model per modality
(the same encoder trained alone), then compares each encoder's linear-probe test accuracy. A modality whose
probe inside the joint model is well below its probe when trained alone is under-trained: the imbalance
the balancing methods (OGM, OPM) exist to remove.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harmonia.app.bench.common import fmt, mean_std
from harmonia.app.bench.pipeline import BenchReport, bench_command, figure, sweep
from harmonia.app.config import load_config
from harmonia.errors import ConfigError


def run_imbalance_benchmark(
    config: str | Path | None = None,
    seeds: int = 3,
    out_dir: str | Path = "bench-results",
    overrides: Sequence[str] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Train joint and unimodal models for ``seeds`` seeds; write ``imbalance.md``, ``.json`` and ``.png``."""
    bench = BenchReport("imbalance", out_dir)
    # without a config: the defaults, which are configs/avdigits_concat.yaml (a test checks they agree)
    forced = [f"out_dir={bench.runs_dir}", "train.probe=true"]
    base = load_config(config, [*([] if config else ["name=avdigits_concat"]), *overrides, *forced])
    modalities = list(base.data.modalities)
    if len(modalities) < 2:
        raise ConfigError(
            f"the imbalance benchmark compares a joint model with its modalities trained alone; "
            f"the config has only {modalities}"
        )
    variants = {"joint": base}
    for m in modalities:
        variants[m] = load_config(
            config,
            [
                *overrides,
                *forced,
                f"data.modalities=[{m}]",
                "balance=[]",
                f"name={base.name}_{m}_only",
            ],
        )
    runs = sweep("imbalance benchmark", list(variants), variants.__getitem__, seeds, progress)

    rows = []
    for m in modalities:
        alone = [r["probe"][m] for r in runs[m]]
        joint = [r["probe"][m] for r in runs["joint"]]
        gaps = [a - j for a, j in zip(alone, joint, strict=True)]
        rows.append({"modality": m, "alone": alone, "joint": joint, "gap": gaps})
    summary = {
        "config": str(config) if config else "the defaults (= configs/avdigits_concat.yaml)",
        "overrides": list(overrides),
        "seeds": list(range(seeds)),
        "rows": rows,
        "joint_test_accuracy": [r["test"]["accuracy"] for r in runs["joint"]],
        "unimodal_test_accuracy": {m: [r["test"]["accuracy"] for r in runs[m]] for m in modalities},
        "runs": runs,
    }
    config_flag = [f"--config {config}"] if config else []
    command = bench_command("imbalance", overrides, *config_flag, f"--seeds {seeds}", f"--out {out_dir}")
    bench.write(summary, lambda s: format_report(s, command), PLOTS)
    return summary


def format_report(summary: dict[str, Any], command: str) -> str:
    n = len(summary["seeds"])
    weakest = max(summary["rows"], key=lambda r: mean_std(r["gap"])[0])
    lines = [
        "# Modality imbalance on AV-Digits",
        "",
        f"Produced by `{command}` (mean ± std over {n} seeds; config: {summary['config']}).",
        "",
        "Linear-probe test accuracy (%) of each frozen encoder, trained alone vs. inside the joint model:",
        "",
        "| modality | encoder trained alone | encoder inside joint model | gap (points) |",
        "|---|---|---|---|",
    ]
    for r in summary["rows"]:
        lines.append(f"| {r['modality']} | {fmt(r['alone'])} | {fmt(r['joint'])} | {fmt(r['gap'])} |")
    lines += [
        "",
        "Test accuracy (%) of the models themselves:",
        "",
        "| model | test accuracy |",
        "|---|---|",
        f"| joint ({' + '.join(r['modality'] for r in summary['rows'])}) "
        f"| {fmt(summary['joint_test_accuracy'])} |",
    ]
    for m, accs in summary["unimodal_test_accuracy"].items():
        lines.append(f"| {m} only | {fmt(accs)} |")
    gap = mean_std(weakest["gap"])[0] * 100
    lines += [
        "",
        f"The under-trained modality is **{weakest['modality']}**: "
        f"inside the joint model its encoder's probe is "
        f"{gap:.1f} points below the same encoder trained alone.",
        "",
    ]
    return "\n".join(lines)


def _plot(summary: dict[str, Any], path: Path) -> None:
    rows = summary["rows"]
    with figure(path, figsize=(5, 3.6)) as (_, ax):
        width = 0.38
        for k, (key, label) in enumerate((("alone", "trained alone"), ("joint", "inside joint model"))):
            means = [mean_std(r[key])[0] * 100 for r in rows]
            stds = [mean_std(r[key])[1] * 100 for r in rows]
            ax.bar(
                [i + (k - 0.5) * width for i in range(len(rows))],
                means,
                width,
                yerr=stds,
                capsize=3,
                label=label,
            )
        ax.set_xticks(range(len(rows)), [r["modality"] for r in rows])
        ax.set_ylabel("linear-probe test accuracy (%)")
        ax.set_ylim(0, 100)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
        ax.set_title("Per-modality encoder quality on AV-Digits")


#: the figures of ``harmonia bench imbalance`` (redrawn from ``imbalance.json`` by ``--replot``)
PLOTS = {"imbalance.png": _plot}
