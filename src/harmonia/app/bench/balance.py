"""``harmonia bench balance``: the balancing methods side by side on the default (imbalanced) AV-Digits.

Quality: every variant (fusion head / balancing method) is trained for each seed with the defaults of
``configs/avdigits_concat.yaml`` (20 epochs, SGD) and each method's own defaults. ``--methods all`` runs every
registered method with concat fusion (methods that need another head, e.g. MLA's shared head on a sum
fusion, run with that head) and a subset again with sum fusion; each fusion has its unbalanced baseline.
Two controls give each modality's ceiling: its encoder trained alone. The report gives, mean ± std over
seeds: test accuracy, macro-F1, each encoder's linear-probe accuracy, and the imbalance degree

    ID = max_m (A_m − P_m) − min_m (A_m − P_m),

where ``P_m`` is modality m's probe inside the joint model and ``A_m`` its probe trained alone (same
seed): how many points more one modality is under-trained than another (0: evenly trained; the
unbalanced concat model is near ``A_audio − P_audio``, since the image encoder loses little). UMT's
teachers are the controls' checkpoints of the same seed.

Cost: in one process the same fixed batches go through ``Trainer.train_step`` of every method, interleaved
step by step (rotated order), at a mid-training epoch; the report gives the median of the per-batch
ratios to the baseline of the same fusion, with a second baseline as an A/A control, plus the peak memory
of one step (fresh process per method) over the baseline's, and the whole run's wall time over the
baseline's (it includes evaluations and per-epoch passes, e.g. Relearn's diagnosis): the fastest seed's run
over the baseline's fastest, since load on a shared machine only ever adds time (not interleaved, so
noisier than the step ratio).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from harmonia.app.bench.common import fmt, mean_std, paired_step_times, step_memories_mib
from harmonia.app.bench.pipeline import BenchReport, bench_command, figure, sweep, unless_default
from harmonia.app.config import ExperimentConfig, load_config
from harmonia.app.plots import QUANTITIES, balance_curves, plot_balance_curves
from harmonia.app.registry import BALANCING
from harmonia.app.train import build_trainer
from harmonia.app.train.checkpoint import last_checkpoint_path
from harmonia.errors import ConfigError

BASELINE = "none"
MODALITIES = ("audio", "image")
DEFAULT_METHODS = ("ogm_ge", "opm", "opm+ogm_ge")
#: methods whose head is not concat (MLA shares one linear head, built by tying a sum fusion's heads)
OWN_FUSION = {"mla": "sum"}
SECOND_FUSION = "sum"
#: the methods run again with the second fusion (when asked for): the modulation family and its cousins
SECOND_FUSION_METHODS = ("ogm_ge", "opm", "opm+ogm_ge", "agm", "pmr", "mmpareto", "mla")
CONTROL = "none (again)"
#: the epoch at which step times are taken: past every default warm-up, inside every default window
TIMING_EPOCH = 10


def all_methods() -> list[str]:
    """Every registered balancing method, in registry order."""
    return list(BALANCING.names())


def parse_methods(methods: Sequence[str]) -> list[str]:
    """``all`` → every registered method; otherwise each entry is a method name or ``a+b`` (both in one
    ``balance`` list), checked against the registry."""
    if list(methods) == ["all"]:
        return all_methods()
    known = set(all_methods())
    parsed = []
    for spec in methods:
        if spec == BASELINE:
            continue
        unknown = [p for p in spec.split("+") if p not in known]
        if unknown:
            raise ConfigError(
                f"unknown balancing method {unknown[0]!r} in --methods {spec!r}; "
                f"choose from: all, {', '.join(sorted(known))} (combine with '+', e.g. opm+agm)"
            )
        parsed.append(spec)
    return parsed


def fusion_of(method: str) -> str:
    """The fusion head a method runs with in the leaderboard (concat unless it needs another)."""
    needs = {OWN_FUSION[p] for p in method.split("+") if p in OWN_FUSION}
    if len(needs) > 1:
        raise ConfigError(f"--methods {method!r}: its methods need different fusion heads {sorted(needs)}")
    return needs.pop() if needs else "concat"


def leaderboard_variants(methods: Sequence[str]) -> list[str]:
    """``fusion/method`` variants of the methods: each with its fusion, the second-fusion subset again with
    sum, and the baseline of every fusion used."""
    variants = [f"{fusion_of(m)}/{m}" for m in methods] + [
        f"{SECOND_FUSION}/{m}" for m in methods if m in SECOND_FUSION_METHODS and fusion_of(m) == "concat"
    ]
    fusions = dict.fromkeys(["concat", *(v.split("/")[0] for v in variants)])
    return [
        variant
        for fusion in fusions
        for variant in [f"{fusion}/{BASELINE}", *(v for v in variants if v.startswith(f"{fusion}/"))]
    ]


def balance_override(method: str, teachers: dict[str, str] | None = None) -> str:
    """``balance=[...]`` of a variant's method (``none``, a name, or ``a+b``); UMT gets ``teachers``."""
    if method == BASELINE:
        return "balance=[]"
    entries = []
    for name in method.split("+"):
        if name == "umt":
            mapping = ", ".join(f"{m}: '{p}'" for m, p in (teachers or {}).items())
            entries.append(f"{{name: umt, teachers: {{{mapping}}}}}")
        else:
            entries.append(name)
    return f"balance=[{', '.join(entries)}]"


def _variant_overrides(variant: str, teachers: dict[str, str] | None = None) -> list[str]:
    fusion, method = variant.split("/")
    return [
        f"model.fusion={fusion}",
        balance_override(method, teachers),
        f"name={fusion}_{method.replace('+', '_')}",
    ]


def run_balance_benchmark(
    seeds: int = 3,
    out_dir: str | Path = "bench-results",
    methods: Sequence[str] = DEFAULT_METHODS,
    variants: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    speed_steps: int = 20,
    speed_rounds: int = 5,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the controls and every variant for ``seeds`` seeds, time each; write ``balance.{md,json,png}``.

    ``variants`` (``fusion/method`` pairs) replaces the list :func:`leaderboard_variants` makes of
    ``methods``."""
    chosen = list(variants) if variants is not None else leaderboard_variants(parse_methods(methods))
    for v in chosen:
        _, _, method = v.partition("/")
        if not method:
            raise ConfigError(f"variant {v!r} is not fusion/method, e.g. concat/opm or sum/none")
        parse_methods([method])
    bench = BenchReport("balance", out_dir)
    forced = [f"out_dir={bench.runs_dir}", "train.probe=true"]

    def alone(modality: str) -> ExperimentConfig:
        return load_config(
            None,
            [*overrides, f"data.modalities=[{modality}]", "balance=[]", f"name=alone_{modality}", *forced],
        )

    controls = sweep("balance controls", list(MODALITIES), alone, seeds, progress, unit="modality")

    def teachers(seed: int) -> dict[str, str]:
        return {m: str(last_checkpoint_path(controls[m][seed]["run_dir"])) for m in MODALITIES}

    def configure(variant: str, seed: int = 0) -> ExperimentConfig:
        return load_config(None, [*overrides, *_variant_overrides(variant, teachers(seed)), *forced])

    runs = sweep(
        "balance benchmark",
        chosen,
        configure,
        seeds,
        progress,
        after=_keep_balance_curves,
        for_seed=lambda variant, _cfg, seed: configure(variant, seed),
    )
    speed = measure_step_times(chosen, overrides, speed_steps, speed_rounds, progress, teachers(0))
    summary = {
        "seeds": list(range(seeds)),
        "overrides": list(overrides),
        "controls": controls,
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
        *(
            unless_default("--methods", methods, DEFAULT_METHODS)
            if variants is None
            else [" ".join(["--variants", *chosen])]
        ),
    )
    bench.write(summary, lambda s: format_report(s, command), PLOTS)
    return summary


def _keep_balance_curves(_variant: str, results: list[dict[str, Any]]) -> None:
    """Keep each run's per-epoch ρ, k and q in the summary, so that ``--replot`` needs no run folder."""
    for r in results:
        curves = balance_curves(r["run_dir"])
        r["balance_curves"] = {
            k: v for k, v in curves.items() if k.split("/")[1] in {q for q, _ in QUANTITIES}
        }


def measure_step_times(
    variants: Sequence[str],
    overrides: Sequence[str],
    steps: int,
    rounds: int,
    progress: bool = True,
    teachers: dict[str, str] | None = None,
) -> dict[str, dict[str, float]]:
    """Step time and peak step memory of each variant relative to its fusion's baseline.

    One trainer per variant (plus a second, independent concat baseline as an A/A control) sees the same
    batches at epoch :data:`TIMING_EPOCH`. For every batch every trainer takes one step, in an order
    rotated from batch to batch, and each variant's time is divided by its fusion's baseline's time on that
    same batch; the result is the median of these paired ratios over ``steps`` batches x ``rounds`` rounds
    (a first round is a warm-up). Pairing at the step level cancels the slow drifts of a shared machine,
    which made block-wise timing disagree with itself by more than 10 %; the control's ratio shows the noise
    floor that remains. Peak memory: :func:`step_memories_mib`, one fresh process per variant. ``teachers``:
    checkpoints for UMT's teachers (modality → any run holding that encoder; without them an untrained
    joint model's checkpoint serves every modality: the cost does not depend on the weights).
    """
    baselines = [f"{fusion}/{BASELINE}" for fusion in dict.fromkeys(v.split("/")[0] for v in variants)]
    names = [*dict.fromkeys([f"concat/{BASELINE}", *baselines, *variants]), CONTROL]
    reference = [
        names.index(f"{n.split('/')[0]}/{BASELINE}" if n != CONTROL else f"concat/{BASELINE}") for n in names
    ]
    with tempfile.TemporaryDirectory() as tmp:
        teacher_files = dict(teachers or {})

        def config_overrides(i: int, name: str) -> list[str]:
            variant = f"concat/{BASELINE}" if name == CONTROL else name
            return [
                *overrides,
                *_variant_overrides(variant, teacher_files),
                f"out_dir={tmp}",
                f"name=speed_{i}",
            ]

        # names[0] is the concat baseline: no teachers needed to build it, and its (untrained) model holds
        # every encoder, enough for UMT's teachers when none are given (the cost does not depend on weights)
        trainers = [build_trainer(load_config(None, config_overrides(0, names[0])), progress=False)]
        if not teacher_files:
            path = Path(tmp) / "teacher.pt"
            torch.save({"model": trainers[0].model.state_dict()}, path)
            teacher_files = dict.fromkeys(MODALITIES, str(path))
        trainers += [
            build_trainer(load_config(None, config_overrides(i, n)), progress=False)
            for i, n in enumerate(names)
            if i > 0
        ]
        for trainer in trainers:
            trainer.epoch = min(TIMING_EPOCH, trainer.num_epochs - 1)
        batches = [b for _, b in zip(range(steps), trainers[0].train_loader, strict=False)]
        timed = paired_step_times(trainers, batches, rounds, progress, reference=reference)
        del trainers
        memory = step_memories_mib([config_overrides(i, n) for i, n in enumerate(names)])
    result = {name: {**t, "peak_mib": mib} for name, t, mib in zip(names, timed, memory, strict=True)}
    for name, ref in zip(names, reference, strict=True):
        base = memory[ref]
        result[name]["memory_ratio"] = result[name]["peak_mib"] / base if base > 0 else float("nan")
    return result


def run_speed_benchmark(
    out_dir: str | Path = "bench-results",
    overrides: Sequence[str] = (),
    methods: Sequence[str] = DEFAULT_METHODS,
    steps: int = 20,
    rounds: int = 5,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Only the cost comparison, written to ``balance/speed.{md,json}``."""
    variants = leaderboard_variants(parse_methods(methods))
    speed = measure_step_times(variants, overrides, steps, rounds, progress)
    command = bench_command(
        "balance-speed",
        overrides,
        f"--speed-steps {steps}",
        f"--speed-rounds {rounds}",
        *unless_default("--methods", methods, DEFAULT_METHODS),
    )
    lines = [f"Measured with `{command}`:", "", *_speed_table(speed, steps, rounds)]
    BenchReport("balance", out_dir).write(speed, lambda _: "\n".join(lines) + "\n", stem="speed")
    return speed


def _speed_table(speed: dict[str, dict[str, float]], steps: int, rounds: int) -> list[str]:
    lines = [
        f"Cost of each variant over its fusion's baseline (the config's batch size, one process, epoch "
        f"{TIMING_EPOCH}; the "
        f"same {steps} batches for every variant, {rounds} rounds after a warm-up round; on every batch each "
        "variant takes one step, in rotated order, and the ratio is the median of the per-batch ratios to "
        f"the baseline's step; `{CONTROL}` is a second concat baseline, an A/A control showing the noise "
        "floor; peak memory: growth of a fresh process's resident set during one step):",
        "",
        "| variant | median ms / step | step time × baseline | peak step memory (MiB) | × baseline |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {v} | {s['seconds'] * 1000:.1f} | {s['ratio']:.3f} | {s['peak_mib']:.1f} "
        f"| {s['memory_ratio']:.2f} |"
        for v, s in speed.items()
    ]
    return lines


def imbalance_degrees(probes: dict[str, float], alone: dict[str, float]) -> float:
    """max_m (A_m − P_m) − min_m (A_m − P_m) of one seed's probes ``P`` and the alone probes ``A``."""
    deficits = [alone[m] - probes[m] for m in probes]
    return max(deficits) - min(deficits)


def variant_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per variant: seed values of every reported quantity, and its costs."""
    controls = summary["controls"]
    rows = []
    for variant, runs in summary["runs"].items():
        fusion, method = variant.split("/")
        base_runs = summary["runs"].get(f"{fusion}/{BASELINE}")
        degree = [
            imbalance_degrees(r["probe"], {m: controls[m][i]["probe"][m] for m in r["probe"]})
            for i, r in enumerate(runs)
        ]
        fastest = min(r["seconds"] for r in runs)
        run_ratio = fastest / min(b["seconds"] for b in base_runs) if base_runs else float("nan")
        speed = summary["speed"].get(variant, {})
        rows.append(
            {
                "variant": variant,
                "fusion": fusion,
                "method": method,
                "accuracy": [r["test"]["accuracy"] for r in runs],
                "macro_f1": [r["test"]["macro_f1"] for r in runs],
                "probe": {m: [r["probe"][m] for r in runs] for m in runs[0]["probe"]},
                "imbalance_degree": degree,
                "step_ratio": speed.get("ratio", float("nan")),
                "memory_ratio": speed.get("memory_ratio", float("nan")),
                "run_ratio": run_ratio,
            }
        )
    return rows


def format_report(summary: dict[str, Any], command: str) -> str:
    n = len(summary["seeds"])
    modalities = list(summary["controls"])
    alone = "; ".join(
        f"{m} alone: probe {fmt([r['probe'][m] for r in runs])}, "
        f"test {fmt([r['test']['accuracy'] for r in runs])}"
        for m, runs in summary["controls"].items()
    )
    lines = [
        "# Modality balancing on AV-Digits",
        "",
        f"Measured with `{command}` (mean ± std over {n} seeds; %, imbalance degree in points). Controls "
        f"(each encoder trained alone): {alone}.",
        "",
        "| fusion | method | test accuracy | macro-F1 | "
        + " | ".join(f"{m} probe" for m in modalities)
        + " | imbalance degree | step time × | peak memory × | run time × |",
        "|---|---|---|---|" + "---|" * len(modalities) + "---|---|---|---|",
    ]
    for row in variant_rows(summary):
        probes = " | ".join(fmt(row["probe"][m]) for m in modalities)
        lines.append(
            f"| {row['fusion']} | {row['method']} | {fmt(row['accuracy'])} | {fmt(row['macro_f1'])} "
            f"| {probes} "
            f"| {fmt(row['imbalance_degree'])} | {row['step_ratio']:.2f} | {row['memory_ratio']:.2f} "
            f"| {row['run_ratio']:.2f} |"
        )
    lines += [
        "",
        "Step time and peak memory: paired with the same fusion's baseline (details below); run time: the "
        "whole training run (evaluations and per-epoch passes included), fastest seed over the baseline's "
        "fastest seed.",
        "",
        *_speed_table(summary["speed"], summary["speed_steps"], summary["speed_rounds"]),
    ]
    return "\n".join(lines) + "\n"


def _plot(summary: dict[str, Any], path: Path) -> None:
    rows = variant_rows(summary)
    modalities = list(summary["controls"])
    panels: list[tuple[str, Callable[[dict[str, Any]], list[float]], float]] = [
        ("test accuracy (%)", lambda r: r["accuracy"], 100.0),
        *((f"{m} probe (%)", lambda r, m=m: r["probe"][m], 100.0) for m in modalities),  # type: ignore[misc]
        ("imbalance degree (points)", lambda r: r["imbalance_degree"], 100.0),
    ]
    fusions = list(dict.fromkeys(r["fusion"] for r in rows))
    colours = {f: f"C{i}" for i, f in enumerate(fusions)}
    height = max(3.5, 0.28 * len(rows) + 1.2)
    with figure(path, 1, len(panels), figsize=(3.3 * len(panels), height), sharey=True) as (_, axes):
        labels = [r["variant"] for r in rows]
        ys = list(range(len(rows)))[::-1]
        for ax, (title, get, scale) in zip(axes, panels, strict=True):
            stats = [mean_std(get(r)) for r in rows]
            ax.barh(
                ys,
                [m * scale for m, _ in stats],
                xerr=[s * scale for _, s in stats],
                color=[colours[r["fusion"]] for r in rows],
                capsize=2,
            )
            for fusion in fusions:
                base = next((r for r in rows if r["variant"] == f"{fusion}/{BASELINE}"), None)
                if base is not None:
                    ax.axvline(mean_std(get(base))[0] * scale, color=colours[fusion], ls="--", lw=0.8)
            ax.set_title(title, fontsize=9)
            values = [m * scale for m, _ in stats]
            if "probe" in title or "accuracy" in title:
                ax.set_xlim(max(0.0, min(values) - 8), min(100.0, max(values) + 3))
        axes[0].set_yticks(ys, labels, fontsize=8)


def _plot_curves(summary: dict[str, Any], path: Path) -> None:
    """ρ, k and q of every variant that logged them (seed 0): a row per fusion, a colour per method."""
    shown = {}
    for variant, runs in summary["runs"].items():
        first = runs[0]
        if "balance_curves" in first:  # kept in the summary
            curves = first["balance_curves"]
        elif (Path(first["run_dir"]) / "metrics.jsonl").is_file():  # older summaries: the run folder
            curves = balance_curves(first["run_dir"])
        else:
            continue
        if curves:
            shown[variant] = curves
    if not plot_balance_curves(shown, path):
        print(f"no ρ, k or q curves to draw into {path} (none logged, or the run folders are gone)")


#: the figures of ``harmonia bench balance`` (redrawn from ``balance.json`` by ``--replot``)
PLOTS = {"balance.png": _plot, "balance_curves.png": _plot_curves}
