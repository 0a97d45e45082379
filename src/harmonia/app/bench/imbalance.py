"""``harmonia bench imbalance``: how much joint training under-trains each modality.

For each seed it trains (a) the joint model of the base config and (b) one unimodal model per modality
(the same encoder trained alone), then compares each encoder's linear-probe test accuracy. A modality whose
probe inside the joint model is well below its probe when trained alone is under-trained: the imbalance
the balancing methods (OGM, OPM) exist to remove.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from harmonia.app.bench.common import fmt, mean_std, run_variant
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
    out = Path(out_dir) / "imbalance"
    # without a config: the defaults, which are configs/avdigits_concat.yaml (a test checks they agree)
    forced = [f"out_dir={out / 'runs'}", "train.probe=true"]
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
                "balance.method=none",
                f"name={base.name}_{m}_only",
            ],
        )
    seed_list = list(range(seeds))
    runs: dict[str, list[dict[str, Any]]] = {}
    bar = tqdm(variants.items(), desc="imbalance benchmark", disable=not progress, unit="variant")
    for key, cfg in bar:
        bar.set_postfix(variant=key)
        runs[key] = run_variant(cfg, seed_list, progress)

    rows = []
    for m in modalities:
        alone = [r["probe"][m] for r in runs[m]]
        joint = [r["probe"][m] for r in runs["joint"]]
        gaps = [a - j for a, j in zip(alone, joint, strict=True)]
        rows.append({"modality": m, "alone": alone, "joint": joint, "gap": gaps})
    summary = {
        "config": str(config) if config else "the defaults (= configs/avdigits_concat.yaml)",
        "overrides": list(overrides),
        "seeds": seed_list,
        "rows": rows,
        "joint_test_accuracy": [r["test"]["accuracy"] for r in runs["joint"]],
        "unimodal_test_accuracy": {m: [r["test"]["accuracy"] for r in runs[m]] for m in modalities},
        "runs": runs,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "imbalance.json").write_text(json.dumps(summary, indent=1))
    report = format_report(summary, command=_command(config, seeds, out_dir, overrides))
    (out / "imbalance.md").write_text(report)
    _plot(summary, out / "imbalance.png")
    print(report)
    return summary


def _command(config: str | Path | None, seeds: int, out_dir: str | Path, overrides: Sequence[str]) -> str:
    parts = ["harmonia bench imbalance", *overrides]
    if config:
        parts.append(f"--config {config}")
    parts += [f"--seeds {seeds}", f"--out {out_dir}"]
    return " ".join(parts)


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    width = 0.38
    for k, (key, label) in enumerate((("alone", "trained alone"), ("joint", "inside joint model"))):
        means = [mean_std(r[key])[0] * 100 for r in rows]
        stds = [mean_std(r[key])[1] * 100 for r in rows]
        ax.bar(
            [i + (k - 0.5) * width for i in range(len(rows))], means, width, yerr=stds, capsize=3, label=label
        )
    ax.set_xticks(range(len(rows)), [r["modality"] for r in rows])
    ax.set_ylabel("linear-probe test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    ax.set_title("Per-modality encoder quality on AV-Digits")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
