"""Helpers shared by the benchmarks: runs over seeds and mean ± std formatting."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from harmonia.config import ExperimentConfig
from harmonia.train import build_trainer


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: Sequence[float], scale: float = 100.0) -> str:
    mean, std = mean_std(values)
    return f"{mean * scale:.1f} ± {std * scale:.1f}"


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
