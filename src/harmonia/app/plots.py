"""Plots of runs: the balancing statistics ρ, k and q over training, and panels of curves.

Every figure follows :mod:`harmonia.app.plotstyle`: within one axes no two series share colour, line style
and marker, a key (a run, a modality) keeps its look across panels, and legends sit beside the panels.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harmonia.app.logs import read_metrics
from harmonia.app.plotstyle import StyleMap

QUANTITIES = (("rho", "discrepancy ratio ρ"), ("k", "OGM coefficient k"), ("q", "OPM drop probability q"))

#: per-epoch means of one run's step statistics: ``balance/<quantity>/<modality>`` → {epoch: mean}
Curves = dict[str, dict[int, float]]


def balance_curves(run_dir: str | Path) -> Curves:
    """Per-epoch means of every ``balance/<quantity>/<modality>`` step record of a run."""
    return step_curves(run_dir, ("balance/",))


def step_curves(run_dir: str | Path, prefixes: Sequence[str]) -> Curves:
    """Per-epoch means of the numeric step-record values of a run whose keys start with one of
    ``prefixes``."""
    per_epoch: dict[str, dict[int, list[float]]] = {}
    for record in read_metrics(Path(run_dir) / "metrics.jsonl"):
        if record["kind"] != "step":
            continue
        for key, value in record.items():
            if key.startswith(tuple(prefixes)) and _is_number(value):
                per_epoch.setdefault(key, {}).setdefault(record["epoch"], []).append(value)
    return {k: {e: statistics.fmean(v) for e, v in epochs.items()} for k, epochs in per_epoch.items()}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class Series:
    """One line: ``colour`` and ``style`` are the keys its look is chosen by (see :class:`StyleMap`)."""

    label: str
    x: list[float]
    y: list[float]
    colour: str
    style: str = ""


@dataclass
class Panel:
    title: str
    series: list[Series] = field(default_factory=list)
    xlabel: str = "epoch"
    ylabel: str = ""


def plot_panels(
    panels: Sequence[Panel],
    path: str | Path,
    columns: int = 3,
    panel_size: tuple[float, float] = (4.0, 2.9),
    dpi: int = 110,
    row_legend: bool = False,
) -> None:
    """Draw ``panels`` in rows of up to ``columns`` and save the figure. Line styles go to style keys in
    order of first appearance (so list the main one first).

    Legends: each panel with several lines has its own, inside when short and to its right when long
    (constrained layout keeps it clear of the next panel). With ``row_legend``, one legend beside the last
    panel of each row names the row's colour keys and line-style keys apart (n + m entries instead of
    n × m), for rows whose panels share their series.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    styles = StyleMap(
        [s.colour for p in panels for s in p.series], [s.style for p in panels for s in p.series]
    )
    columns = max(1, min(columns, len(panels)))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(
        rows,
        columns,
        figsize=(panel_size[0] * columns + 1.2, panel_size[1] * rows),
        squeeze=False,
        layout="constrained",
    )
    try:
        for ax, panel in zip(axes.flat, panels, strict=False):
            for s in panel.series:
                ax.plot(s.x, s.y, label=s.label, markersize=4, lw=1.3, **styles(s.colour, s.style).kwargs())
            ax.set_title(panel.title, fontsize=9)
            ax.set_xlabel(panel.xlabel, fontsize=8)
            if panel.xlabel == "epoch":
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if panel.ylabel:
                ax.set_ylabel(panel.ylabel, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if len(ax.lines) > 1 and not row_legend:
                _legend_beside(ax, len(ax.lines))
        if row_legend:
            for row in range(rows):
                shown = [p for p in panels[row * columns : (row + 1) * columns]]
                _row_legend(axes[row][len(shown) - 1], [s for p in shown for s in p.series], styles)
        for ax in axes.flat[len(panels) :]:
            ax.set_visible(False)
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)


def _legend_beside(ax: Any, entries: int) -> None:
    """A compact legend: inside the panel when short, beside it (right) when long."""
    if entries <= 3:
        ax.legend(fontsize=6.5, loc="best", framealpha=0.8)
    else:
        ax.legend(
            fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False
        )


def _row_legend(ax: Any, series: Sequence[Series], styles: StyleMap) -> None:
    """Beside ``ax``: one entry per colour key (solid line in its colour), then one per line-style key
    (grey line in its style), when both vary; else one entry per series."""
    from matplotlib.lines import Line2D

    colours = list(dict.fromkeys(s.colour for s in series))
    kinds = list(dict.fromkeys(s.style for s in series))
    if len(colours) < 2 or len(kinds) < 2:
        handles = [Line2D([], [], **styles(s.colour, s.style).kwargs()) for s in series]
        labels = [s.label for s in series]
    else:
        handles = [Line2D([], [], **{**styles(c, kinds[0]).kwargs(), "linestyle": "-"}) for c in colours]
        grey: list[dict[str, Any]] = [
            {"color": "0.35", "linestyle": styles(colours[0], k).linestyle} for k in kinds
        ]
        handles += [Line2D([], [], **kwargs) for kwargs in grey]
        labels = [*colours, *kinds]
    ax.legend(
        handles,
        labels,
        fontsize=6.5,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        borderaxespad=0.0,
        frameon=False,
        ncol=2 if len(labels) > 16 else 1,
    )


def plot_balance_curves(
    runs: Mapping[str, str | Path | Mapping[str, Mapping[Any, float]]], path: str | Path
) -> bool:
    """Draw ρ, k and q per modality over epochs for each labelled run; False when nothing was logged.

    ``runs`` maps a label to a run folder or to its :func:`balance_curves` (epoch keys may be strings, as
    read back from JSON). Labels ``group/name`` (e.g. ``concat/ogm_ge``) put each group (e.g. each fusion
    head) in a row of its own; each row has one panel per quantity any run logged. A colour per run, a line
    style per modality.
    """
    curves = {
        label: balance_curves(run) if isinstance(run, str | Path) else _int_epochs(run)
        for label, run in runs.items()
    }
    logged = [
        (quantity, title)
        for quantity, title in QUANTITIES
        if any(k.startswith(f"balance/{quantity}/") for c in curves.values() for k in c)
    ]
    if not logged:
        return False
    groups: dict[str, list[str]] = {}
    for label in curves:
        group = label.split("/", 1)[0] if "/" in label else ""
        groups.setdefault(group, []).append(label)
    panels = []
    for group, labels in groups.items():
        for quantity, title in logged:
            panel = Panel(f"{group}: {title}" if group else title)
            for label in labels:
                name = label.split("/", 1)[1] if "/" in label else label
                for key, values in sorted(curves[label].items()):
                    if key.startswith(f"balance/{quantity}/"):
                        modality = key.rsplit("/", 1)[1]
                        epochs = sorted(values)
                        panel.series.append(
                            Series(
                                f"{name} {modality}".strip(),
                                [e + 1 for e in epochs],
                                [values[e] for e in epochs],
                                colour=name,
                                style=modality,
                            )
                        )
            panels.append(panel)
    plot_panels(panels, path, columns=len(logged), panel_size=(4.2, 3.0), row_legend=True)
    return True


def _int_epochs(curves: Mapping[str, Mapping[Any, float]]) -> Curves:
    return {key: {int(e): float(v) for e, v in values.items()} for key, values in curves.items()}


__all__ = [
    "Panel",
    "Series",
    "balance_curves",
    "plot_balance_curves",
    "plot_panels",
    "step_curves",
]
