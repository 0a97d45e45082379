"""Plots of a run: the balancing statistics ρ, k and q over training."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from pathlib import Path

from harmonia.app.logs import read_metrics

QUANTITIES = (("rho", "discrepancy ratio ρ"), ("k", "OGM coefficient k"), ("q", "OPM drop probability q"))


def balance_curves(run_dir: str | Path) -> dict[str, dict[int, float]]:
    """Per-epoch means of every ``balance/<quantity>/<modality>`` step record of a run."""
    per_epoch: dict[str, dict[int, list[float]]] = {}
    for record in read_metrics(Path(run_dir) / "metrics.jsonl"):
        if record["kind"] != "step":
            continue
        for key, value in record.items():
            if key.startswith("balance/"):
                per_epoch.setdefault(key, {}).setdefault(record["epoch"], []).append(value)
    return {k: {e: statistics.fmean(v) for e, v in epochs.items()} for k, epochs in per_epoch.items()}


def plot_balance_curves(runs: Mapping[str, str | Path], path: str | Path) -> bool:
    """Draw ρ, k and q per modality over epochs for each labelled run; False when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {label: balance_curves(run_dir) for label, run_dir in runs.items()}
    if not any(curves.values()):
        return False
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, (quantity, title) in zip(axes, QUANTITIES, strict=True):
        for label, run_curves in curves.items():
            for key, values in sorted(run_curves.items()):
                if key.startswith(f"balance/{quantity}/"):
                    modality = key.rsplit("/", 1)[1]
                    name = f"{label} {modality}".strip()
                    ax.plot(list(values), list(values.values()), marker=".", label=name)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
