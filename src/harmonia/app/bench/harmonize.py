"""``harmonia bench harmonize``: gradient realignment and curriculum on 30 % misaligned tri-modal AV-Digits.

Quality: the pre-training recipe of ``harmonia bench pretrain`` with 30 % of the training captions taken
from another digit's clip, for each backbone (shared, specific) and each variant — realignment (feature
mode, PCGrad), curriculum (feature mode, conflicts reported but not realigned, threshold annealed from 0
to −1 over ``harmonize.curriculum_epochs`` once the learnability gate has passed), both — beside two
controls: ``clean`` (no misaligned captions: the ceiling) and ``baseline`` (30 % misaligned, plain
gradients: the floor; it runs the feature mode with rule ``none``, whose gradients equal a plain backward,
so that it logs the conflict score of every triplet). Every run takes the same number of optimizer steps.

Reported per seed and as mean ± std: digit probes and zero-shot R@1/5/10 on the clean test split, the
variant chosen on validation, and the per-epoch curves of the conflict detector (AUROC of −cos(g_va, g_vt)
for the misaligned triplets, beside the per-sample L_vt), of the curriculum's drop precision, of the gate's
validation diagnostic and of validation R@1; plus the conflict AUROC of ``harmonia audit`` on the
baseline's final checkpoint.

Speed: median paired step-time ratios over a plain step (as ``bench balance-speed``) of the feature,
parameter and batch modes; and ``torch.func`` per-sample parameter gradients against a Python loop over the
samples on one batch of the video branch.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from harmonia.app.audit import audit_conflicts
from harmonia.app.bench.common import (
    curve,
    equal_step_overrides,
    fmt,
    mean_std,
    paired_step_times,
    plot_curves,
)
from harmonia.app.bench.pipeline import BenchReport, bench_command, figure, sweep, unless_default
from harmonia.app.bench.pretrain import PRETRAIN_RECIPE
from harmonia.app.config import ExperimentConfig, load_config
from harmonia.app.plotstyle import StyleMap
from harmonia.app.train import build_trainer
from harmonia.app.train.checkpoint import last_checkpoint_path
from harmonia.data.trimodal import load_trimodal_avdigits
from harmonia.errors import ConfigError
from harmonia.gradients.harmonizer import per_sample_parameter_grads
from harmonia.models.pretrain import TriModalPretrainModel, VideoAnchor

CLEAN, FLOOR = "clean", "baseline"
VARIANTS = {
    CLEAN: ["data.trimodal.misalign_rate=0.0", "harmonize.mode=none"],  # control: the ceiling
    FLOOR: ["harmonize.mode=feature", "harmonize.rule=none"],  # control: the floor (plain gradients)
    "realign": ["harmonize.mode=feature", "harmonize.rule=pcgrad"],
    "curriculum": ["harmonize.mode=feature", "harmonize.rule=none", "harmonize.curriculum=true"],
    "realign+curriculum": ["harmonize.mode=feature", "harmonize.rule=pcgrad", "harmonize.curriculum=true"],
}
CONTROLS = (CLEAN, FLOOR)
BACKBONES = ("shared",)  # the setting the harmonization paper studies; add specific with --backbones
STEPS = 600  # optimizer steps of every run (12 epochs of batch 64)
SPEED_VARIANTS = {
    "plain": ["harmonize.mode=none"],
    "plain (again)": ["harmonize.mode=none"],
    "feature": ["harmonize.mode=feature"],
    "feature+curriculum": ["harmonize.mode=feature", "harmonize.curriculum=true"],
    "parameter": ["harmonize.mode=parameter"],
    "batch": ["harmonize.mode=batch"],
}
NOISE = [
    "data.trimodal.misalign_rate=0.3",
    "data.trimodal.misalign_modality=text",
    "harmonize.curriculum_epochs=4",
    "harmonize.curriculum_start_when=gate",
]
#: test metrics compared between a variant and the baseline: (result section, key, label)
METRICS = (
    ("probe", "video", "video probe"),
    ("probe", "audio", "audio probe"),
    ("test", "video_to_text/R@1", "video→text R@1"),
    ("test", "text_to_video/R@1", "text→video R@1"),
    ("test", "video_to_text/R@10", "video→text R@10"),
    ("test", "video_to_audio/R@10", "video→audio R@10"),
)


def run_harmonize_benchmark(
    seeds: int = 3,
    out_dir: str | Path = "bench-results",
    variants: Sequence[str] = tuple(VARIANTS),
    backbones: Sequence[str] = BACKBONES,
    overrides: Sequence[str] = (),
    steps: int = STEPS,
    evaluations: int = 0,
    speed_steps: int = 10,
    speed_rounds: int = 5,
    progress: bool = True,
) -> dict[str, Any]:
    """Train every backbone × variant for ``seeds`` seeds and ``steps`` optimizer steps (evaluated
    ``evaluations`` times; 0: every epoch); write ``harmonize.{md,json,png}`` and
    ``harmonize_curves.png``."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    bench = BenchReport("harmonize", out_dir)
    base = load_config(None, [*PRETRAIN_RECIPE, *NOISE, *overrides])
    train_size = len(
        load_trimodal_avdigits(
            base.data.trimodal_recipe(), base.data.avdigits_recipe(), progress=False
        ).split("train")
    )
    budget = equal_step_overrides(steps, train_size, base.train.batch_size, evaluations or 10**6)

    def configure(job: tuple[str, str]) -> ExperimentConfig:
        backbone, variant = job
        return load_config(
            None,
            [
                *PRETRAIN_RECIPE,
                *NOISE,
                *overrides,
                *VARIANTS[variant],
                *budget,
                f"pretrain.backbone={backbone}",
                f"name={backbone}_{variant.replace('+', '_')}",
                f"out_dir={bench.runs_dir}",
            ],
        )

    audits: dict[str, list[dict[str, float]]] = {}

    def audit_floor(job: tuple[str, str], results: list[dict[str, Any]]) -> None:
        backbone, variant = job
        if variant != FLOOR:
            return
        audits[backbone] = []
        for r in results:
            run_cfg = load_config(Path(r["run_dir"]) / "config.yaml")
            audit = audit_conflicts(
                run_cfg,
                last_checkpoint_path(r["run_dir"]),
                Path(r["run_dir"]) / "audit.csv",
                progress=False,
            )
            audits[backbone].append(audit.auroc)

    grid = [(b, v) for b in backbones for v in variants]
    swept = sweep("harmonize benchmark", grid, configure, seeds, progress, after=audit_floor)
    runs = {f"{backbone}/{variant}": results for (backbone, variant), results in swept.items()}
    speed = measure_speed(overrides, speed_steps, speed_rounds, progress) if speed_steps > 0 else {}
    summary = {
        "seeds": list(range(seeds)),
        "overrides": list(overrides),
        "steps": steps,
        "train_size": train_size,
        "runs": runs,
        "audit": audits,
        "speed": speed,
    }
    command = bench_command(
        "harmonize",
        overrides,
        f"--seeds {seeds} --steps {steps}",
        *([f"--evaluations {evaluations}"] if evaluations else []),
        f"--speed-steps {speed_steps} --speed-rounds {speed_rounds}",
        f"--out {out_dir}",
        *unless_default("--variants", variants, tuple(VARIANTS)),
        *unless_default("--backbones", backbones, BACKBONES),
    )
    bench.write(summary, lambda s: format_report(s, command), PLOTS)
    return summary


def after_gate(result: dict[str, Any], key: str) -> list[float]:
    """Values of ``key`` at the epochs after the one at which the gate first passed (none if it never
    did)."""
    passed = [c["epoch"] for c in result["curves"] if c.get("gate/passed") == 1.0]
    if not passed:
        return []
    return [c[key] for c in result["curves"] if c["epoch"] > passed[0] and key in c]


def _cell(values: list[float]) -> str:
    return fmt(values, 1.0, 3) if values else "–"


def _mean_after(results: list[dict[str, Any]], key: str) -> list[float]:
    """Per seed, the mean of ``key`` over the epochs after the gate (seeds without any left out)."""
    return [statistics.fmean(v) for v in (after_gate(r, key) for r in results) if v]


def _drop_precision_after(results: list[dict[str, Any]]) -> list[float]:
    """Per seed, the precision of everything the curriculum dropped after the gate: the epochs' drop
    precisions weighted by their dropped fractions (an epoch that dropped 3 triplets counts for little)."""
    out = []
    for r in results:
        rows = [c for c in _after_gate_curves(r) if "train/drop_precision" in c]
        total = sum(c["train/dropped_fraction"] for c in rows)
        if total > 0:
            out.append(sum(c["train/drop_precision"] * c["train/dropped_fraction"] for c in rows) / total)
    return out


def _after_gate_curves(result: dict[str, Any]) -> list[dict[str, float]]:
    """The epoch records after the first at which the gate passed that log a dropped fraction."""
    passed = [c["epoch"] for c in result["curves"] if c.get("gate/passed") == 1.0]
    if not passed:
        return []
    return [c for c in result["curves"] if c["epoch"] > passed[0] and "train/dropped_fraction" in c]


def _last(results: list[dict[str, Any]], key: str) -> list[float]:
    """Per seed, the last logged value of ``key``."""
    return [
        [c[key] for c in r["curves"] if key in c][-1] for r in results if any(key in c for c in r["curves"])
    ]


def gate_epoch(result: dict[str, Any]) -> float | None:
    """The epoch (counted from 1) at which the gate first passed, None if it never did."""
    passed = [c["epoch"] for c in result["curves"] if c.get("gate/passed") == 1.0]
    return passed[0] + 1 if passed else None


def measure_speed(overrides: Sequence[str], steps: int, rounds: int, progress: bool = True) -> dict[str, Any]:
    """Paired per-batch step-time ratios of each mode over a plain step, and torch.func vs a loop."""
    names = list(SPEED_VARIANTS)
    with tempfile.TemporaryDirectory() as tmp:
        trainers = [
            build_trainer(
                load_config(
                    None,
                    [
                        *PRETRAIN_RECIPE,
                        *NOISE,
                        *overrides,
                        *SPEED_VARIANTS[n],
                        f"out_dir={tmp}",
                        f"name=s{i}",
                    ],
                ),
                progress=False,
            )
            for i, n in enumerate(names)
        ]
        batches = [b for _, b in zip(range(steps), trainers[0].train_loader, strict=False)]
        steps_table = dict(zip(names, paired_step_times(trainers, batches, rounds, progress), strict=True))
        model = trainers[0].model
        assert isinstance(model, TriModalPretrainModel)
        per_sample = time_per_sample_gradients(VideoAnchor(model), batches[0]["inputs"]["video"], rounds)
    return {"steps": steps_table, "per_sample": per_sample, "batch_size": int(batches[0]["labels"].shape[0])}


def time_per_sample_gradients(anchor: VideoAnchor, video: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of per-sample parameter gradients of the video branch: vmap(grad) vs a loop."""
    params = anchor.anchor_named_parameters()
    rows = torch.randn(video.shape[0], anchor(video[:1]).shape[1])

    def loop() -> None:
        for i in range(video.shape[0]):
            z = anchor(video[i : i + 1])[0]
            torch.autograd.grad((z * rows[i]).sum(), list(params.values()))

    def batched() -> None:
        per_sample_parameter_grads(anchor, params, video, rows)

    times: dict[str, list[float]] = {"loop": [], "torch.func": []}
    for _ in range(repeats + 1):
        for name, fn in (("loop", loop), ("torch.func", batched)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    medians = {k: statistics.median(v[1:]) for k, v in times.items()}
    return {**medians, "speedup": medians["loop"] / medians["torch.func"]}


def format_report(summary: dict[str, Any], command: str) -> str:
    n = len(summary["seeds"])
    runs = summary["runs"]
    steps = sorted({str(r.get("steps", "?")) for rs in runs.values() for r in rs})
    lines = [
        "# Gradient harmonization on 30 % misaligned tri-modal AV-Digits",
        "",
        f"Measured with `{command}` (mean ± std over {n} seeds, %; test split, clean; "
        f"{'/'.join(steps)} optimizer steps per run). Controls: `clean` (no misaligned captions, the "
        "ceiling) and `baseline` (30 % misaligned, plain gradients, the floor).",
        "",
        "| backbone | variant | val video→text R@1 | " + " | ".join(m[2] for m in METRICS) + " |",
        "|---|---|---|" + "---|" * len(METRICS),
    ]
    for key, results in runs.items():
        backbone, variant = key.split("/")
        cells = [fmt([r["val"]["video_to_text/R@1"] for r in results])]
        cells += [fmt([r[section][k] for r in results]) for section, k, _ in METRICS]
        lines.append(f"| {backbone} | {variant} | {' | '.join(cells)} |")
    backbones = list(dict.fromkeys(k.split("/")[0] for k in runs))
    chosen_lines = []
    for backbone in backbones:
        candidates = [
            k.split("/")[1] for k in runs if k.startswith(f"{backbone}/") and k.split("/")[1] not in CONTROLS
        ]
        floor = runs.get(f"{backbone}/{FLOOR}")
        if not candidates or floor is None:
            continue
        best = max(
            candidates,
            key=lambda v: mean_std([r["val"]["video_to_text/R@1"] for r in runs[f"{backbone}/{v}"]])[0],
        )
        chosen = runs[f"{backbone}/{best}"]
        deltas, worse = [], []
        for section, k, label in METRICS:
            (m_v, s_v), (m_b, s_b) = (
                mean_std([r[section][k] for r in chosen]),
                mean_std([r[section][k] for r in floor]),
            )
            deltas.append(f"{label} {(m_v - m_b) * 100:+.1f}")
            if m_v < m_b - max(s_v, s_b):
                worse.append(label)
        chosen_lines.append(
            f"- {backbone}: `{best}` (best validation video→text R@1 of the non-control variants); on test "
            f"vs baseline, points: {', '.join(deltas)}; worse than baseline by more than one std: "
            f"{', '.join(worse) or 'none'}"
        )
    if chosen_lines:
        lines += ["", "Variant chosen on validation, per backbone:", "", *chosen_lines]
    lines += [
        "",
        "Learnability gate and noise detection during training (mean ± std over seeds; AUROC of the "
        "misaligned training triplets; 'after gate' = mean over the epochs after the gate first passed, "
        "'last' = final epoch; drop precision = share of all triplets dropped after the gate that are "
        "misaligned, base rate 0.30):",
        "",
        "| backbone | variant | gate passed at epoch | conflict AUROC after gate | conflict AUROC last "
        "| loss_vt AUROC last | drop precision after gate | dropped fraction after gate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, results in runs.items():
        backbone, variant = key.split("/")
        if variant == CLEAN:
            continue
        epochs = [e for e in (gate_epoch(r) for r in results) if e is not None]
        gate = f"{mean_std(epochs)[0]:.1f} ({len(epochs)}/{len(results)} seeds)" if epochs else "never"

        lines.append(
            f"| {backbone} | {variant} | {gate} | {_cell(_mean_after(results, 'train/conflict_auroc'))} | "
            f"{_cell(_last(results, 'train/conflict_auroc'))} | "
            f"{_cell(_last(results, 'train/loss_vt_auroc'))} | "
            f"{_cell(_drop_precision_after(results))} | "
            f"{_cell(_mean_after(results, 'train/dropped_fraction'))} |"
        )
    if summary["audit"]:
        lines += [
            "",
            "Finding the misaligned training triplets with the final baseline checkpoint "
            "(`harmonia audit`, AUROC):",
            "",
            "| backbone | conflict score (−cos) | per-sample loss_vt | loss_va + loss_vt |",
            "|---|---|---|---|",
        ]
        for backbone, rows in summary["audit"].items():
            cells = [
                fmt([r[k] for r in rows], scale=1.0, digits=3)
                for k in ("conflict (-cos)", "loss_vt", "loss_va + loss_vt")
            ]
            lines.append(f"| {backbone} | {' | '.join(cells)} |")
    speed = summary["speed"]
    if speed:
        lines += [
            "",
            f"Step time over a plain step (shared backbone, batch {speed['batch_size']}, one process; median "
            "of per-batch ratios, methods interleaved step by step; `plain (again)` is an A/A control):",
            "",
            "| mode | median ms / step | × plain |",
            "|---|---|---|",
        ]
        lines += [
            f"| {m} | {s['seconds'] * 1000:.0f} | {s['ratio']:.3f} |" for m, s in speed["steps"].items()
        ]
        ps = speed["per_sample"]
        lines += [
            "",
            f"Per-sample parameter gradients of the video branch for a batch of {speed['batch_size']}: "
            f"torch.func (vmap of grad) {ps['torch.func'] * 1000:.0f} ms, a loop over samples "
            f"{ps['loop'] * 1000:.0f} ms: "
            f"{ps['speedup']:.1f}× faster.",
        ]
    lines += ["", "Curves: `harmonize_curves.png`."]
    return "\n".join(lines) + "\n"


def _plot(summary: dict[str, Any], path: Path) -> None:
    """Test video→text R@1 and video probe of every backbone/variant: horizontal bars (one row per run
    kind, so that labels never collide however many there are), one colour per backbone."""
    from matplotlib.patches import Patch

    keys = list(summary["runs"])
    backbones = list(dict.fromkeys(k.split("/")[0] for k in keys))
    colours = StyleMap(backbones)
    height = max(2.6, 0.34 * len(keys) + 1.3)
    with figure(path, 1, 2, figsize=(10, height), sharey=True, layout="constrained") as (fig, axes):
        ys = list(range(len(keys)))[::-1]
        for ax, (metric, label) in zip(
            axes,
            ((("test", "video_to_text/R@1"), "video→text R@1 (%)"), (("probe", "video"), "video probe (%)")),
            strict=True,
        ):
            stats = [mean_std([r[metric[0]][metric[1]] for r in summary["runs"][k]]) for k in keys]
            ax.barh(
                ys,
                [m * 100 for m, _ in stats],
                xerr=[sd * 100 for _, sd in stats],
                capsize=3,
                color=[colours(k.split("/")[0]).color for k in keys],
            )
            ax.set_xlabel(label)
            ax.grid(axis="x", alpha=0.3)
        axes[0].set_yticks(ys, keys, fontsize=8)
        fig.legend(
            handles=[Patch(color=colours(b).color, label=f"{b} backbone") for b in backbones],
            loc="outside lower center",
            ncol=len(backbones),
            frameon=False,
            fontsize=8,
        )
        fig.suptitle("30 % misaligned captions: test split, mean ± std over seeds", fontsize=10)


def plot_harmonize_curves(summary: dict[str, Any], path: Path) -> None:
    """Per backbone (rows), against optimizer steps, mean ± std over seeds: the conflict AUROC of the
    misaligned training triplets (dashed: the per-sample L_vt detector of the baseline), the curriculum's
    drop precision, the gate's validation conflict AUROC on synthetic swaps and validation video→text R@1;
    dotted vertical line: the mean step at which the gate first passed (baseline)."""
    runs = summary["runs"]
    backbones = list(dict.fromkeys(k.split("/")[0] for k in runs))
    styles = StyleMap(k.split("/")[1] for k in runs)
    panels = (
        ("train/conflict_auroc", "conflict AUROC (train, misaligned)", 1.0),
        ("train/drop_precision", "drop precision (base 0.30)", 1.0),
        ("gate/val_conflict_auroc", "gate: val conflict AUROC (swaps)", 1.0),
        ("val/video_to_text/R@1", "val video→text R@1 (%)", 100.0),
    )
    with figure(
        path, len(backbones), len(panels), figsize=(18, 3.4 * len(backbones)), squeeze=False, dpi=110
    ) as (_, axes):
        for row, backbone in enumerate(backbones):
            keys = [k for k in runs if k.startswith(f"{backbone}/")]
            for col, (metric, label, scale) in enumerate(panels):
                ax = axes[row][col]
                for k in keys:
                    variant = k.split("/")[1]
                    plot_curves(ax, runs[k], metric, variant, scale, styles(variant))
                if metric == "train/conflict_auroc" and f"{backbone}/{FLOOR}" in runs:
                    steps, means, _ = curve(runs[f"{backbone}/{FLOOR}"], "train/loss_vt_auroc")
                    if steps:
                        ax.plot(steps, means, ls="--", color="gray", label="baseline: loss_vt detector")
                floor = runs.get(f"{backbone}/{FLOOR}", [])
                gate_steps = [
                    next(c["step"] for c in r["curves"] if c.get("gate/passed") == 1.0)
                    for r in floor
                    if any(c.get("gate/passed") == 1.0 for c in r["curves"])
                ]
                if gate_steps:
                    ax.axvline(statistics.fmean(gate_steps), color="black", ls=":", lw=1)
                ax.set(xlabel="optimizer step", ylabel=label, title=f"{backbone} backbone")
                ax.grid(alpha=0.3)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=7)


#: the figures of ``harmonia bench harmonize`` (redrawn from ``harmonize.json`` by ``--replot``)
PLOTS = {"harmonize.png": _plot, "harmonize_curves.png": plot_harmonize_curves}
