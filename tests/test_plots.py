"""Readable figures: distinct looks for the series of an axes, no overlapping labels, in the run and
benchmark plots."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from harmonia.app.plotstyle import StyleMap, figure_problems


@pytest.fixture
def saved_figures(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, list[str], Figure]]:
    """Every figure saved during the test, with what :func:`figure_problems` found in it at saving time
    (which draws it: the file itself is not written)."""
    saved: list[tuple[Path, list[str], Figure]] = []

    def savefig(self: Figure, path: Any, *args: Any, **kwargs: Any) -> None:
        saved.append((Path(path), figure_problems(self), self))

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


def test_style_map_gives_every_key_pair_its_own_look() -> None:
    styles = StyleMap([f"run{i}" for i in range(45)], [f"m{j}" for j in range(6)])
    looks = {(i, j): styles(f"run{i}", f"m{j}") for i in range(45) for j in range(6)}
    assert len(set(looks.values())) == 45 * 6
    assert looks[(0, 0)] == styles("run0", "m0")  # the same key keeps its look
    # the first ten colour keys get tab10, in order; the first style key a solid line with small dots
    assert looks[(0, 0)].color == "#1f77b4" and looks[(9, 0)].color == "#17becf"
    assert looks[(0, 0)].linestyle == "-" and looks[(0, 0)].marker == "."
    assert looks[(0, 1)].linestyle == "--"


def test_figure_problems_finds_lookalike_lines_and_overlapping_labels() -> None:
    fig, (ax, other) = plt.subplots(1, 2, figsize=(4, 2))
    try:
        ax.plot([0, 1], [0, 1], color="C0", label="concat/ogm audio")
        ax.plot([0, 1], [1, 0], color="C0", label="film/ogm audio")
        ax.plot([0, 1], [1, 1], color="C0", ls="--", label="differs in style")
        ax.plot([0, 1], [0.5, 0.5], color="gray", label="_reference line (unlabelled)")
        other.bar(range(6), range(6))
        other.set_xticks(range(6), [f"a long variant name {i}" for i in range(6)])
        problems = figure_problems(fig)
    finally:
        plt.close(fig)
    assert any("'concat/ogm audio' and 'film/ogm audio' share colour" in p for p in problems)
    assert not any("differs in style" in p for p in problems)
    assert any(
        "x tick labels 'a long variant name 0' and 'a long variant name 1' overlap" in p for p in problems
    )

    fig, ax = plt.subplots(figsize=(4, 3))
    try:
        ax.plot([0, 1], [0, 1], label="a")
        ax.plot([0, 1], [1, 0], label="b")
        ax.legend()
        assert figure_problems(fig) == []
    finally:
        plt.close(fig)


def _balance_curves(offset: float) -> dict[str, dict[int, float]]:
    return {
        f"balance/{q}/{m}": {e: offset + e * 0.1 + k for e in range(5)}
        for k, (q, m) in enumerate(itertools.product(("rho", "k", "q"), ("audio", "image")))
    }


@pytest.mark.integration
def test_balance_curves_figure_gives_each_run_and_modality_its_own_look(
    tmp_path: Path, saved_figures: list
) -> None:
    from harmonia.app.plots import plot_balance_curves

    methods = [f"method{i}" for i in range(12)]  # more than tab10 has colours
    runs = {
        f"{fusion}/{m}": _balance_curves(i) for fusion in ("concat", "film") for i, m in enumerate(methods)
    }
    assert plot_balance_curves(runs, tmp_path / "curves.png")
    [(_, problems, fig)] = saved_figures
    assert problems == []
    axes = [ax for ax in fig.axes if ax.lines]
    assert [ax.get_title() for ax in axes[:3]] == [
        "concat: discrepancy ratio ρ",
        "concat: OGM coefficient k",
        "concat: OPM drop probability q",
    ]
    assert len(axes) == 6 and all(len(ax.lines) == 24 for ax in axes)  # a row per fusion, 12 runs x 2
    # the same run and modality look the same in both rows
    first = {line.get_label(): (line.get_color(), line.get_linestyle()) for line in axes[0].lines}
    second = {line.get_label(): (line.get_color(), line.get_linestyle()) for line in axes[3].lines}
    assert first == second


def _balance_summary(variants: list[str]) -> dict[str, Any]:
    def run(i: int) -> dict[str, Any]:
        value = 0.8 + 0.01 * (i % 15)
        return {
            "test": {"accuracy": value, "macro_f1": value},
            "probe": {"audio": value - 0.05, "image": value},
            "seconds": 10.0 + i,
            "run_dir": "/nonexistent",
            "balance_curves": _balance_curves(i) if "og" in variants[i] or "opm" in variants[i] else {},
        }

    return {
        "seeds": [0],
        "controls": {m: [{"probe": {m: 0.9}, "test": {"accuracy": 0.9}}] for m in ("audio", "image")},
        "runs": {v: [run(i)] for i, v in enumerate(variants)},
        "speed": {},
    }


def _harmonize_summary(backbones: tuple[str, ...]) -> dict[str, Any]:
    variants = ("clean", "baseline", "realign", "curriculum", "realign+curriculum")

    def run(i: int) -> dict[str, Any]:
        curves = [
            {
                "step": 50 * s,
                "epoch": s,
                "train/conflict_auroc": 0.5 + 0.01 * s,
                "train/loss_vt_auroc": 0.6 + 0.02 * s,
                "train/drop_precision": 0.3 + 0.01 * i,
                "gate/val_conflict_auroc": 0.55,
                "gate/passed": float(s > 2),
                "val/video_to_text/R@1": 0.01 * s + 0.001 * i,
            }
            for s in range(1, 8)
        ]
        return {
            "test": {"video_to_text/R@1": 0.05 + 0.01 * i},
            "probe": {"video": 0.6 + 0.01 * i},
            "curves": curves,
        }

    keys = [f"{b}/{v}" for b in backbones for v in variants]
    return {"runs": {k: [run(i)] for i, k in enumerate(keys)}}


@pytest.mark.integration
def test_benchmark_figures_are_readable(tmp_path: Path, saved_figures: list) -> None:
    """The leaderboard's 26 variants, both harmonization backbones: no lookalike lines, no overlapping
    labels, no panel running into another."""
    from harmonia.app.bench import balance, harmonize

    fusions = {"concat": [*balance.all_methods()], "sum": ["none", "mla", "ogm_ge", "opm", "agm", "pmr"]}
    variants = [f"{f}/{m}" for f, methods in fusions.items() for m in dict.fromkeys(["none", *methods])]
    summary = _balance_summary(variants)
    for name, plot in balance.PLOTS.items():
        plot(summary, tmp_path / name)
    both = _harmonize_summary(("shared", "specific"))
    for name, plot in harmonize.PLOTS.items():
        plot(both, tmp_path / name)
    assert [p.name for p, _, _ in saved_figures] == [
        "balance.png",
        "balance_curves.png",
        "harmonize.png",
        "harmonize_curves.png",
    ]
    for path, problems, _ in saved_figures:
        assert problems == [], path.name
    curves = saved_figures[1][2]
    assert {ax.get_title().split(":")[0] for ax in curves.axes if ax.lines} == {"concat", "sum"}
