"""Helpers shared by the benchmarks: runs over seeds and mean ± std formatting."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from harmonia.config import ExperimentConfig
from harmonia.train import build_trainer


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    mean, std = mean_std(values)
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def run_variant(cfg: ExperimentConfig, seeds: Sequence[int], progress: bool) -> list[dict[str, Any]]:
    results = []
    for seed in seeds:
        run_cfg = dataclasses.replace(
            cfg, name=f"{cfg.name}_seed{seed}", train=dataclasses.replace(cfg.train, seed=seed)
        )
        result = build_trainer(run_cfg, overwrite=True, progress=False).fit()
        results.append(result.to_dict())
        if progress:
            shown = {k: round(v, 4) for k, v in result.test.items() if k in ("accuracy", "video_to_text/R@1")}
            tqdm.write(f"  {run_cfg.name}: test {shown}, probe {result.probe}")
    return results


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
