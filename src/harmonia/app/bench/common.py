"""Helpers shared by the benchmarks: runs over seeds (with their per-epoch curves), equal-step budgets,
mean ± std formatting and curve plots."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from harmonia.app.config import ExperimentConfig
from harmonia.app.logs import read_metrics
from harmonia.app.train import Callback, build_trainer


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    mean, std = mean_std(values)
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def run_variant(
    cfg: ExperimentConfig,
    seeds: Sequence[int],
    progress: bool,
    callbacks: Callable[[], Sequence[Callback]] | None = None,
) -> list[dict[str, Any]]:
    """Train ``cfg`` once per seed. Each result is :meth:`TrainResult.to_dict` plus ``steps`` (optimizer
    steps taken), ``val`` (the validation metrics of the last evaluation) and ``curves``: the numeric
    metrics of every epoch (``step``, ``epoch`` and the logged ``train/``, ``val/``, ``test/``, ``gate/``
    ... values). ``callbacks`` makes fresh callbacks for each run."""
    results = []
    for seed in seeds:
        run_cfg = cfg.model_copy(
            update={"name": f"{cfg.name}_seed{seed}", "train": cfg.train.model_copy(update={"seed": seed})}
        )
        trainer = build_trainer(
            run_cfg, list(callbacks()) if callbacks else (), overwrite=True, progress=False
        )
        result = trainer.fit()
        row = result.to_dict()
        row["steps"] = trainer.global_step
        row["curves"] = epoch_curves(result.run_dir)
        evaluated = [c for c in row["curves"] if any(k.startswith("val/") for k in c)]
        row["val"] = (
            {k.removeprefix("val/"): v for k, v in evaluated[-1].items() if k.startswith("val/")}
            if evaluated
            else {}
        )
        results.append(row)
        if progress:
            shown = {k: round(v, 4) for k, v in result.test.items() if k in ("accuracy", "video_to_text/R@1")}
            tqdm.write(f"  {run_cfg.name}: test {shown}, probe {result.probe}, {trainer.global_step} steps")
    return results


def epoch_curves(run_dir: str | Path) -> list[dict[str, float]]:
    """The numeric values of each epoch record of a run's ``metrics.jsonl``, with ``step`` and ``epoch``."""
    return [
        {k: float(v) for k, v in r.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        for r in read_metrics(Path(run_dir) / "metrics.jsonl")
        if r.get("kind") == "epoch"
    ]


def steps_per_epoch(train_size: int, batch_size: int) -> int:
    """Optimizer steps of one epoch of the pre-training loader (the last partial batch is dropped)."""
    return train_size // batch_size


def equal_step_overrides(steps: int, train_size: int, batch_size: int, evaluations: int) -> list[str]:
    """Overrides that give a run at ``batch_size`` exactly ``steps`` optimizer steps (``train.max_steps``;
    ceil(steps / steps per epoch) epochs, the last cut short), evaluated about ``evaluations`` times, at
    the same steps for every batch size as far as whole epochs allow."""
    per_epoch = steps_per_epoch(train_size, batch_size)
    if per_epoch < 1:
        raise ValueError(f"batch size {batch_size} exceeds the {train_size} training triplets")
    epochs = math.ceil(steps / per_epoch)
    every = max(1, round(epochs / max(1, evaluations)))
    return [f"train.max_steps={steps}", f"train.epochs={epochs}", f"train.eval_every={every}"]


def curve(results: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float], list[float]]:
    """Steps, mean and std over seeds of ``key`` at the epochs where every seed logged it."""
    per_seed = [{c["step"]: c[key] for c in r["curves"] if key in c} for r in results]
    steps = sorted(set.intersection(*(set(p) for p in per_seed))) if per_seed else []
    stats = [mean_std([p[s] for p in per_seed]) for s in steps]
    return steps, [m for m, _ in stats], [sd for _, sd in stats]


def plot_curves(ax: Any, results: Sequence[dict[str, Any]], key: str, label: str, scale: float = 1.0) -> None:
    """Mean ± std band over seeds of ``key`` against optimizer steps (nothing when never logged)."""
    steps, means, stds = curve(results, key)
    if not steps:
        return
    m = [v * scale for v in means]
    line = ax.plot(steps, m, marker=".", label=label)[0]
    ax.fill_between(
        steps,
        [a - b * scale for a, b in zip(m, stds, strict=True)],
        [a + b * scale for a, b in zip(m, stds, strict=True)],
        alpha=0.15,
        color=line.get_color(),
    )


def paired_step_times(
    trainers: Sequence[Any], batches: Sequence[dict[str, Any]], rounds: int, progress: bool = True
) -> list[dict[str, float]]:
    """Median step time of each trainer and median of its per-batch ratios to ``trainers[0]``.

    For every batch each trainer takes one step, in an order rotated from batch to batch; each step time is
    divided by the first trainer's time on the same batch. The first of ``rounds + 1`` rounds is a warm-up.
    Pairing at the step level cancels the slow drifts of a shared machine.
    """
    n = len(trainers)
    seconds: list[list[float]] = [[] for _ in range(n)]
    ratios: list[list[float]] = [[] for _ in range(n)]
    for r in tqdm(range(rounds + 1), desc="step timing", disable=not progress, unit="round"):
        for j, batch in enumerate(batches):
            shift = (r * len(batches) + j) % n
            elapsed = [0.0] * n
            for i in [*range(shift, n), *range(shift)]:
                start = time.perf_counter()
                trainers[i].train_step(batch)
                elapsed[i] = time.perf_counter() - start
            if r == 0:
                continue
            for i in range(n):
                seconds[i].append(elapsed[i])
                ratios[i].append(elapsed[i] / elapsed[0])
    return [
        {"seconds": statistics.median(seconds[i]), "ratio": statistics.median(ratios[i])} for i in range(n)
    ]
