"""``harmonia bench distributed``: training throughput with 1 and N data-parallel processes (torchrun).

Each process count trains the same config for a few epochs under ``torchrun --nproc_per_node N`` (gloo on
CPU), with the machine's CPU threads split evenly between the processes (``train.num_threads``), so that
every run uses the same cores. Throughput is training samples per second of the median epoch after the
first (training steps only, from ``train/epoch_seconds``); the speed-up is relative to one process.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from harmonia.app.bench.pipeline import BenchReport, bench_command
from harmonia.app.config import load_config
from harmonia.app.logs import read_metrics
from harmonia.app.train.distributed import free_port
from harmonia.errors import HarmoniaError

DEFAULT_CONFIG = "configs/avdigits_concat.yaml"


def run_distributed_benchmark(
    config: str | Path = DEFAULT_CONFIG,
    nprocs: Sequence[int] = (1, 2),
    epochs: int = 4,
    out_dir: str | Path = "bench-results",
    overrides: Sequence[str] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``config`` with each process count; write ``distributed.{md,json}``."""
    bench = BenchReport("distributed", out_dir)
    threads = os.cpu_count() or 1
    cfg = load_config(config, list(overrides))
    results: dict[str, dict[str, float]] = {}
    for n in tqdm(nprocs, desc="processes", disable=not progress, unit="run"):
        name = f"{cfg.name}_x{n}"
        command = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
            f"--master_port={free_port()}", "-m", "harmonia", "train", str(config), *overrides,
            f"name={name}", f"out_dir={bench.runs_dir}", f"train.epochs={epochs}", "train.probe=false",
            f"train.num_threads={max(1, threads // n)}", "--overwrite", "--quiet",
        ]  # fmt: skip
        done = subprocess.run(
            command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
        if done.returncode != 0:
            raise HarmoniaError(f"{n}-process run failed:\n{done.stderr[-3000:]}")
        records = [r for r in read_metrics(bench.runs_dir / name / "metrics.jsonl") if r["kind"] == "epoch"]
        seconds = statistics.median(r["train/epoch_seconds"] for r in records[1:] or records)
        results[str(n)] = {"epoch_seconds": seconds, "threads_per_process": max(1, threads // n)}
    samples = _train_samples(cfg)
    for r in results.values():
        r["samples_per_second"] = samples / r["epoch_seconds"]
    base = results[str(nprocs[0])]["samples_per_second"]
    for r in results.values():
        r["speedup"] = r["samples_per_second"] / base
    summary = {"config": str(config), "overrides": list(overrides), "epochs": epochs, "cpus": threads,
               "train_samples": samples, "results": results}  # fmt: skip
    command_line = bench_command(
        "distributed", overrides, f"--config {config}", "--nprocs", *map(str, nprocs), f"--epochs {epochs}",
        f"--out {out_dir}",
    )  # fmt: skip
    bench.write(summary, lambda s: format_report(s, command_line))
    return summary


def _train_samples(cfg: Any) -> int:
    """Training samples per epoch seen by all ranks together (full global batches only)."""
    from harmonia.data.avdigits import load_avdigits
    from harmonia.data.trimodal import load_trimodal_avdigits

    if cfg.data.name == "trimodal_avdigits":
        n = len(
            load_trimodal_avdigits(
                cfg.data.trimodal_recipe(), cfg.data.avdigits_recipe(), progress=False
            ).split("train")
        )
    else:
        n = len(
            load_avdigits(cfg.data.avdigits_recipe(), progress=False)
            .split("train", list(cfg.data.modalities))
            .labels
        )
    return n // cfg.train.batch_size * cfg.train.batch_size


def format_report(summary: dict[str, Any], command: str) -> str:
    lines = [
        "# Data-parallel throughput on CPU",
        "",
        f"Measured with `{command}` on {summary['cpus']} CPU cores (gloo; the cores split evenly between "
        f"the processes; {summary['train_samples']} training samples per epoch; median epoch after the "
        "first).",
        "",
        "| processes | threads each | epoch (s) | samples/s | speed-up |",
        "|---|---|---|---|---|",
    ]
    for n, r in summary["results"].items():
        rate, speedup = r["samples_per_second"], r["speedup"]
        threads, seconds = r["threads_per_process"], r["epoch_seconds"]
        lines.append(f"| {n} | {threads} | {seconds:.2f} | {rate:.0f} | {speedup:.2f}× |")
    return "\n".join(lines) + "\n"
