"""Figures a person can read at a glance: distinct styles for the series of one axes, and a check of it.

A :class:`StyleMap` gives every series a (colour, line style, marker) from two keys — say the run for the
colour and the modality for the line style — so that the same key looks the same in every panel of a figure,
and no two series of one axes look alike: colours come from matplotlib's ``tab10`` (then the light half of
``tab20``), line styles from four dash patterns, and markers break the ties left when both run out.
:func:`figure_problems` lists what would make a drawn figure hard to read: two labelled lines of one axes that
look alike, tick labels that overlap, and text of one panel that runs into another.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

#: ``tab10``, then the light shades of ``tab20``: 20 colours, the first ten the familiar ones
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#aec7e8",
    "#ffbb78",
    "#98df8a",
    "#ff9896",
    "#c5b0d5",
    "#c49c94",
    "#f7b6d2",
    "#c7c7c7",
    "#dbdb8d",
    "#9edae5",
)
LINESTYLES = ("-", "--", ":", "-.")
#: the first is the default small dot; the others separate series whose colour and line style repeat
MARKERS = (".", "o", "s", "^", "v", "D", "x", "+", "*", "P", "h", "<", ">")


@dataclass(frozen=True)
class Style:
    """How one series is drawn; ``kwargs()`` goes to ``ax.plot``."""

    color: str
    linestyle: str
    marker: str

    def kwargs(self) -> dict[str, Any]:
        return {"color": self.color, "linestyle": self.linestyle, "marker": self.marker}


class StyleMap:
    """Colour by one key and line style by another, the same for a key in every axes of a figure.

    Colour key ``i`` (in order of first appearance) and style key ``j`` get ``PALETTE[i % 20]``,
    ``LINESTYLES[j % 4]`` and a marker numbered by ``i // 20`` and ``j // 4``, so that distinct key pairs
    never share all three (up to ``len(MARKERS)`` marker levels).
    """

    def __init__(self, colour_keys: Iterable[str], style_keys: Iterable[str] = ("",)) -> None:
        self.colours = {k: i for i, k in enumerate(dict.fromkeys(colour_keys))}
        self.styles = {k: j for j, k in enumerate(dict.fromkeys(style_keys))}
        self._style_levels = max(1, math.ceil(len(self.styles) / len(LINESTYLES)))

    def __call__(self, colour_key: str, style_key: str = "") -> Style:
        i = self.colours.setdefault(colour_key, len(self.colours))
        j = self.styles.setdefault(style_key, len(self.styles))
        level = (i // len(PALETTE)) * self._style_levels + j // len(LINESTYLES)
        return Style(
            PALETTE[i % len(PALETTE)], LINESTYLES[j % len(LINESTYLES)], MARKERS[level % len(MARKERS)]
        )


def figure_problems(fig: Any) -> list[str]:
    """What makes the drawn ``fig`` hard to read, one sentence each (empty: nothing found).

    * two labelled lines of one axes with the same colour, line style and marker;
    * overlapping tick labels of one axis (only those inside the view limits, which are drawn);
    * a title, axis label, tick label or legend of one axes that runs into another axes or its text.
    """
    from matplotlib.colors import to_hex

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    problems: list[str] = []
    decorations: list[tuple[int, str, Any]] = []  # (axes number, -1 for the figure; what; window extent)
    for n, ax in enumerate(fig.axes):
        if not ax.get_visible():
            continue
        name = f"axes {n} ({ax.get_title() or ax.get_ylabel() or 'untitled'})"
        seen: dict[tuple[str, str, str], str] = {}
        for line in ax.get_lines():
            label = str(line.get_label())
            if label.startswith("_"):
                continue
            key = (to_hex(line.get_color()), str(line.get_linestyle()), str(line.get_marker()))
            if key in seen:
                problems.append(
                    f"{name}: lines '{seen[key]}' and '{label}' share colour, line style and marker"
                )
            seen.setdefault(key, label)
        for axis, labels, (low, high) in (
            ("x", ax.get_xticklabels(), sorted(ax.get_xlim())),
            ("y", ax.get_yticklabels(), sorted(ax.get_ylim())),
        ):
            shown = [
                (t.get_text(), t.get_window_extent(renderer))
                for t in labels
                if t.get_visible() and t.get_text() and _inside(t, axis, low, high)
            ]
            for (text_a, a), (text_b, b) in itertools.combinations(shown, 2):
                if _overlap(a, b):
                    problems.append(f"{name}: {axis} tick labels '{text_a}' and '{text_b}' overlap")
            decorations += [(n, f"axes {n}'s {axis} tick label '{t}'", box) for t, box in shown]
        for what, text in (("title", ax.title), ("x label", ax.xaxis.label), ("y label", ax.yaxis.label)):
            if text.get_visible() and text.get_text():
                decorations.append(
                    (n, f"axes {n}'s {what} '{text.get_text()}'", text.get_window_extent(renderer))
                )
        legend = ax.get_legend()
        if legend is not None and legend.get_visible():
            decorations.append((n, f"axes {n}'s legend", legend.get_window_extent(renderer)))
    suptitle = getattr(fig, "_suptitle", None)
    if suptitle is not None and suptitle.get_visible() and suptitle.get_text():
        decorations.append(
            (-1, f"the figure title '{suptitle.get_text()}'", suptitle.get_window_extent(renderer))
        )
    areas = [(n, ax.get_window_extent(renderer)) for n, ax in enumerate(fig.axes) if ax.get_visible()]
    for legend in fig.legends:
        box = legend.get_window_extent(renderer)
        problems += [f"the figure legend runs into axes {n}" for n, area in areas if _overlap(box, area)]
    for (n, what, box), (m, other, other_box) in itertools.combinations(decorations, 2):
        if n != m and _overlap(box, other_box):
            problems.append(f"{what} and {other} overlap")
    for n, what, box in decorations:
        problems += [f"{what} runs into axes {m}" for m, area in areas if m != n and _overlap(box, area)]
    return problems


def _inside(text: Any, axis: str, low: float, high: float) -> bool:
    x, y = text.get_position()
    value = x if axis == "x" else y
    span = (high - low) * 1e-9
    return bool(low - span <= value <= high + span)


def _overlap(a: Any, b: Any, tolerance: float = 0.5) -> bool:
    """Whether two window extents share more than a ``tolerance``-pixel sliver."""
    return bool(
        min(a.x1, b.x1) - max(a.x0, b.x0) > tolerance and min(a.y1, b.y1) - max(a.y0, b.y0) > tolerance
    )


__all__ = ["LINESTYLES", "MARKERS", "PALETTE", "Style", "StyleMap", "figure_problems"]
