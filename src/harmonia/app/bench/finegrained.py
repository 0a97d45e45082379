"""``harmonia bench finegrained``: coarse vs fine-grained contrastive loss on partially irrelevant clips.

The pre-training recipe (:data:`~harmonia.app.bench.pretrain.PRETRAIN_RECIPE`) on tri-modal AV-Digits where
half of the training clips have half of their frames taken from another digit's clip (a contiguous block;
captions and audio describe the clip's own digit). Every run uses the same encoder — time-local video
tokens by default (``pretrain.video_tokens``), so that coarse and fine-grained runs differ only in the
loss — and every batch size gets the same number of optimizer steps (``train.max_steps``). For each batch
size the variants come with two controls: the coarse loss on clean clips (the ceiling) and the coarse loss
on the partial clips (the floor); a variant's share of the gap is (variant − floor) / (ceiling − floor).

Each run is scored on the clean test split — digit linear probe of the frozen video backbone and zero-shot
video↔text R@1/5/10 (each model ranks by the score it was trained with) — and logs per-evaluation curves
on validation (R@1) and on the partial training clips (attention of each caption word over the tubelets:
relevant vs unrelated frames). Variants are compared on validation; test is reported. For each batch size:
the paired median step time of each variant (same batches, interleaved) and the peak memory of one
training step (the growth of the resident set of a fresh process during the step).
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harmonia.app.attention import frame_attention, plot_frame_attention
from harmonia.app.bench.common import (
    equal_step_overrides,
    fmt,
    mean_std,
    paired_step_times,
    plot_curves,
    step_memories_mib,
)
from harmonia.app.bench.pipeline import BenchReport, bench_command, figure, sweep, unless_default
from harmonia.app.bench.pretrain import PRETRAIN_RECIPE
from harmonia.app.config import ExperimentConfig, load_config
from harmonia.app.plotstyle import StyleMap
from harmonia.app.train import Callback, build_trainer
from harmonia.data.trimodal import load_trimodal_avdigits

PARTIAL = ["data.trimodal.partial_rate=0.5", "data.trimodal.partial_fraction=0.5"]
CLEAN = ["data.trimodal.partial_rate=0.0"]
FINE = ["pretrain.vt_loss=finegrained", "pretrain.pool_direction=over_a"]
VARIANTS: dict[str, list[str]] = {
    "coarse-clean": CLEAN,  # control: the ceiling
    "coarse": PARTIAL,  # control: the floor
    "finegrained": [*PARTIAL, *FINE],
    "finegrained-both": [*PARTIAL, "pretrain.vt_loss=finegrained", "pretrain.pool_direction=both"],
    "finegrained-av": [*PARTIAL, *FINE, "pretrain.va_loss=finegrained"],
    # another encoder: only for the attention comparison, not for the gap
    "finegrained-global": [*PARTIAL, *FINE, "pretrain.video_tokens=global"],
}
CEILING, FLOOR = "coarse-clean", "coarse"
DEFAULT_VARIANTS = (CEILING, FLOOR, "finegrained")
BATCH_SIZES = (16, 32)  # batch 128 at equal steps does not fit the 45-minute budget on 2 CPU cores
STEPS = 600  # optimizer steps of every run, whatever its batch size
EVALUATIONS = 3  # evaluations per run (validation R@1 and attention curves)
VIDEO_TOKENS = "time_local"
ATTENTION_CLIPS = 512  # partial training clips the attention curves are measured on


def _overrides(variant: str, batch_size: int, overrides: Sequence[str], video_tokens: str) -> list[str]:
    return [
        *PRETRAIN_RECIPE,
        f"pretrain.video_tokens={video_tokens}",
        "pretrain.gate=false",  # the learnability gate is not part of this comparison (and slow here)
        *VARIANTS[variant],
        *overrides,
        f"train.batch_size={batch_size}",
    ]


class AttentionCurve(Callback):
    """At every evaluation, the mean attention of caption words on the relevant and the unrelated
    tubelets of the first ``max_clips`` partial training clips (``attention/relevant``, ``/irrelevant``,
    ``/ratio``, × uniform); after the last epoch, optionally a picture of it."""

    def __init__(self, tau_att: float, tubelet_frames: int, max_clips: int, picture: Path | None) -> None:
        self.tau_att, self.tubelet_frames, self.max_clips, self.picture = (
            tau_att,
            tubelet_frames,
            max_clips,
            picture,
        )

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, float]) -> None:
        split = trainer.dataset.split("train")
        if not any(k.startswith("val/") for k in metrics) or bool(split.relevant_frames.all()):
            return
        attention = frame_attention(
            trainer.model,
            split,
            self.tau_att,
            self.tubelet_frames,
            device=trainer.device,
            max_clips=self.max_clips,
        )
        stats = attention.mean_weight()
        metrics.update({f"attention/{k}": v for k, v in stats.items()})
        if self.picture is not None and epoch + 1 == trainer.num_epochs:
            self.picture.parent.mkdir(parents=True, exist_ok=True)
            plot_frame_attention(
                attention,
                split,
                str(self.picture),
                title=f"{self.picture.stem}: attention of caption words over frames "
                f"(relevant {stats['relevant']:.2f}x uniform, unrelated {stats['irrelevant']:.2f}x)",
            )


def _attention_callbacks(cfg: Any, out: Path, variant: str) -> Any:
    """A factory of each run's :class:`AttentionCurve` (the first run, seed 0, also draws its picture)."""
    runs = iter(range(1 << 30))

    def make() -> list[Callback]:
        first = next(runs) == 0
        picture = out / f"attention_{variant}_b{cfg.train.batch_size}.png" if first else None
        return [AttentionCurve(cfg.pretrain.tau_att, cfg.pretrain.tubelet[0], ATTENTION_CLIPS, picture)]

    return make


def run_finegrained_benchmark(
    seeds: int = 3,
    out_dir: str | Path = "bench-results",
    variants: Sequence[str] = DEFAULT_VARIANTS,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    overrides: Sequence[str] = (),
    steps: int = STEPS,
    evaluations: int = EVALUATIONS,
    video_tokens: str = VIDEO_TOKENS,
    speed_steps: int = 20,
    speed_rounds: int = 5,
    progress: bool = True,
) -> dict[str, Any]:
    """Train every variant at every batch size for ``seeds`` seeds and ``steps`` optimizer steps, time and
    measure the steps; write ``finegrained.{md,json,png}``, ``finegrained_curves.png`` and
    ``attention_<variant>_b<batch>.png``."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    bench = BenchReport("finegrained", out_dir)
    base = load_config(None, _overrides(variants[0], batch_sizes[0], overrides, video_tokens))
    train_size = len(
        load_trimodal_avdigits(
            base.data.trimodal_recipe(), base.data.avdigits_recipe(), progress=False
        ).split("train")
    )

    def configure(job: tuple[int, str]) -> ExperimentConfig:
        batch_size, variant = job
        return load_config(
            None,
            [
                *_overrides(variant, batch_size, overrides, video_tokens),
                *equal_step_overrides(steps, train_size, batch_size, evaluations),
                f"name={variant}_b{batch_size}",
                f"out_dir={bench.runs_dir}",
            ],
        )

    def add_attention(job: tuple[int, str], results: list[dict[str, Any]]) -> None:
        for r in results:
            last = [c for c in r["curves"] if "attention/ratio" in c]
            r["attention"] = (
                {k: last[-1][f"attention/{k}"] for k in ("relevant", "irrelevant", "ratio")} if last else {}
            )

    jobs = [(b, v) for b in batch_sizes for v in variants]
    swept = sweep(
        "finegrained benchmark",
        jobs,
        configure,
        seeds,
        progress,
        callbacks=lambda job, cfg: _attention_callbacks(cfg, bench.folder, job[1]),
        after=add_attention,
    )
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for (batch_size, variant), results in swept.items():
        runs.setdefault(str(batch_size), {})[variant] = results
    speed: dict[str, dict[str, Any]] = {}
    if speed_steps > 0:
        for batch_size in batch_sizes:
            speed[str(batch_size)] = measure_speed(
                variants, batch_size, overrides, speed_steps, speed_rounds, progress, video_tokens
            )
    summary = {
        "seeds": list(range(seeds)),
        "variants": list(variants),
        "overrides": list(overrides),
        "steps": steps,
        "video_tokens": video_tokens,
        "train_size": train_size,
        "runs": runs,
        "speed": speed,
    }
    command = bench_command(
        "finegrained",
        overrides,
        f"--seeds {seeds} --steps {steps} --evaluations {evaluations} --video-tokens {video_tokens}",
        f"--speed-steps {speed_steps} --speed-rounds {speed_rounds}",
        f"--out {out_dir}",
        *unless_default("--variants", variants, DEFAULT_VARIANTS),
        *unless_default("--batch-sizes", batch_sizes, BATCH_SIZES),
    )
    bench.write(summary, lambda s: format_report(s, command), PLOTS)
    return summary


def speed_trainers(
    variants: Sequence[str], batch_size: int, overrides: Sequence[str], video_tokens: str, out_dir: str
) -> list[Any]:
    """One trainer per entry of ``variants`` (a variant may repeat, e.g. for an A/A control) at
    ``batch_size``, its run folder under ``out_dir``."""
    return [
        build_trainer(
            load_config(
                None,
                [*_overrides(v, batch_size, overrides, video_tokens), f"out_dir={out_dir}", f"name=s{i}"],
            ),
            progress=False,
        )
        for i, v in enumerate(variants)
    ]


def measure_speed(
    variants: Sequence[str],
    batch_size: int,
    overrides: Sequence[str],
    steps: int,
    rounds: int,
    progress: bool = True,
    video_tokens: str = VIDEO_TOKENS,
) -> dict[str, Any]:
    """Paired step times of the variants at ``batch_size`` and each one's peak step memory (MiB)."""
    with tempfile.TemporaryDirectory() as tmp:
        trainers = speed_trainers(variants, batch_size, overrides, video_tokens, tmp)
        batches = [b for _, b in zip(range(steps), trainers[0].train_loader, strict=False)]
        times = paired_step_times(trainers, batches, rounds, progress)
    memory = step_memories_mib([_overrides(v, batch_size, overrides, video_tokens) for v in variants])
    return {v: {**t, "peak_mib": m} for v, t, m in zip(variants, times, memory, strict=True)}


def gap_closed(summary: dict[str, Any], batch_size: str, variant: str, metric: str) -> float | None:
    """(variant − floor) / (ceiling − floor) of the seed means of ``metric`` (``probe``: video probe,
    else a test retrieval key), or None without both controls."""
    by = summary["runs"][batch_size]
    if CEILING not in by or FLOOR not in by:
        return None

    def value(v: str) -> float:
        return mean_std([_metric(r, metric) for r in by[v]])[0]

    gap = value(CEILING) - value(FLOOR)
    return (value(variant) - value(FLOOR)) / gap if gap else None


def _metric(result: dict[str, Any], metric: str, split: str = "test") -> float:
    return float(result["probe"]["video"] if metric == "probe" else result[split][metric])


def _probe(results: list[dict[str, Any]]) -> str:
    return fmt([r["probe"]["video"] for r in results]) if all(r["probe"] for r in results) else "–"


def format_report(summary: dict[str, Any], command: str) -> str:
    n = len(summary["seeds"])
    variants = summary["variants"]
    lines = [
        "# Coarse vs fine-grained contrastive loss on partially irrelevant clips",
        "",
        f"Measured with `{command}` (mean ± std over {n} seeds). Training data: 50 % of the clips have a "
        "contiguous half of their frames taken from another digit's clip (`coarse-clean`: none, the ceiling; "
        f"`coarse` on the partial clips is the floor); test and validation splits clean. Video tokens: "
        f"`{summary.get('video_tokens', 'global')}` for every run"
        + (" but `finegrained-global`" if "finegrained-global" in variants else "")
        + f"; every run takes {summary.get('steps', '?')} optimizer steps, whatever its batch size.",
        "",
        "| batch | variant | steps | val video→text R@1 | test video→text R@1 | R@5 | R@10 | text→video R@1 "
        "| video probe (%) | attention relevant / unrelated (× uniform) | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for batch_size, by_variant in summary["runs"].items():
        for v in variants:
            results = by_variant[v]
            att = [r["attention"] for r in results if r.get("attention")]
            attention = (
                f"{fmt([a['relevant'] for a in att], 1, 2)} / {fmt([a['irrelevant'] for a in att], 1, 2)}"
                if att
                else "–"
            )
            ratio = fmt([a["ratio"] for a in att], 1, 2) if att else "–"
            steps = "/".join(sorted({str(r.get("steps", "?")) for r in results}))
            lines.append(
                f"| {batch_size} | {v} | {steps} | {fmt([r['val']['video_to_text/R@1'] for r in results])} | "
                + " | ".join(fmt([r["test"][f"video_to_text/R@{k}"] for r in results]) for k in (1, 5, 10))
                + f" | {fmt([r['test']['text_to_video/R@1'] for r in results])}"
                + f" | {_probe(results)} | {attention} | {ratio} |"
            )
    others = [v for v in variants if v not in (CEILING, FLOOR, "finegrained-global")]
    if CEILING in variants and FLOOR in variants and others:
        lines += [
            "",
            "Share of the coarse clean-vs-partial gap a variant closes, (variant − floor) / "
            "(ceiling − floor) of the seed means (test; 100 % = as good as training on clean clips):",
            "",
            "| batch | variant | ceiling − floor, video probe | closed | ceiling − floor, video→text R@1 "
            "| closed |",
            "|---|---|---|---|---|---|",
        ]
        for batch_size, by in summary["runs"].items():
            for v in others:
                cells = []
                for metric in ("probe", "video_to_text/R@1"):
                    if metric == "probe" and not all(r["probe"] for rs in by.values() for r in rs):
                        cells += ["–", "–"]
                        continue
                    ceiling = mean_std([_metric(r, metric) for r in by[CEILING]])[0]
                    floor = mean_std([_metric(r, metric) for r in by[FLOOR]])[0]
                    closed = gap_closed(summary, batch_size, v, metric)
                    cells += [
                        f"{(ceiling - floor) * 100:+.1f} points",
                        "–" if closed is None else f"{closed * 100:.0f} %",
                    ]
                lines.append(f"| {batch_size} | {v} | {' | '.join(cells)} |")
        lines += ["", "Chosen on validation (video→text R@1, mean over seeds), per batch size:", ""]
        for batch_size, by in summary["runs"].items():
            best = max(others, key=lambda v: mean_std([r["val"]["video_to_text/R@1"] for r in by[v]])[0])
            lines.append(
                f"- batch {batch_size}: `{best}` — test video→text R@1 "
                f"{fmt([r['test']['video_to_text/R@1'] for r in by[best]])}, video probe "
                f"{_probe(by[best])}"
            )
    if summary["speed"]:
        lines += [
            "",
            "Step time (median over the timed steps, paired with the first variant on the same batches) and "
            "peak memory of one training step (growth of a fresh process's resident set during the step):",
            "",
            "| batch | variant | step (ms) | × " + variants[0] + " | peak step memory (MiB) |",
            "|---|---|---|---|---|",
        ]
        for batch_size, by_variant in summary["speed"].items():
            for v in variants:
                s = by_variant[v]
                lines.append(
                    f"| {batch_size} | {v} | {s['seconds'] * 1000:.0f} | {s['ratio']:.2f} | "
                    f"{s['peak_mib']:.0f} |"
                )
    seconds = [r["seconds"] for by in summary["runs"].values() for rs in by.values() for r in rs]
    lines += [
        "",
        f"A training run took {statistics.median(seconds):.0f} s (median over all runs). Curves: "
        "`finegrained_curves.png`.",
    ]
    return "\n".join(lines) + "\n"


def _plot(summary: dict[str, Any], path: Path) -> None:
    variants = summary["variants"]
    batches = list(summary["runs"])
    panels = 4 if summary["speed"] else 2
    with figure(path, 1, panels, figsize=(4 * panels, 3.6)) as (_, axes):
        width = 0.8 / len(variants)
        bars = (
            ("video→text R@1 (%)", lambda r: r["test"]["video_to_text/R@1"] * 100),
            ("video probe (%)", lambda r: r["probe"]["video"] * 100),
        )
        for ax, (label, value) in zip(axes[:2], bars, strict=True):
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
            ax.set(xlabel="batch size (equal steps)", ylabel=label)
            ax.legend(fontsize=8)
        if summary["speed"]:
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


def plot_finegrained_curves(summary: dict[str, Any], path: Path) -> None:
    """Per batch size (rows): validation video→text R@1 and the attention ratio (relevant / unrelated,
    training partial clips) against optimizer steps, mean ± std over seeds."""
    batches = list(summary["runs"])
    styles = StyleMap(summary["variants"])
    with figure(path, len(batches), 2, figsize=(10, 3.2 * len(batches)), squeeze=False, dpi=110) as (_, axes):
        for row, b in enumerate(batches):
            for v in summary["variants"]:
                runs = summary["runs"][b][v]
                plot_curves(axes[row][0], runs, "val/video_to_text/R@1", v, 100, styles(v))
                plot_curves(axes[row][1], runs, "attention/ratio", v, style=styles(v))
            axes[row][0].set(xlabel="optimizer step", ylabel="val video→text R@1 (%)", title=f"batch {b}")
            axes[row][1].set(
                xlabel="optimizer step", ylabel="attention relevant / unrelated", title=f"batch {b}"
            )
            axes[row][1].axhline(1.0, color="gray", lw=0.8, ls="--")
            for ax in axes[row]:
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)


#: the figures of ``harmonia bench finegrained`` drawn from ``finegrained.json`` (``--replot`` redraws
#: them; the attention pictures come from the runs' callbacks)
PLOTS = {"finegrained.png": _plot, "finegrained_curves.png": plot_finegrained_curves}
