"""``harmonia bench compile``: what ``train.compile`` gains or costs per training step on this machine.

For each task, classification on ``configs/avdigits_concat.yaml`` (the config defaults) and pre-training on
``configs/trimodal_pretrain.yaml`` (:data:`~harmonia.app.bench.pretrain.PRETRAIN_RECIPE`), three trainers
are built from the same config and seed: ``eager``, ``eager (again)`` (an A/A control, whose ratio shows
the noise floor) and ``compiled`` (``train.compile=true``). Each takes a first step on the same batch; the
compiled one's first step compiles (inductor's on-disk caches switched off: the cost of a first run), and
both first-step times are reported. Then all three take one step on each of the same ``steps`` full
batches, in an order rotated from batch to batch, for ``rounds`` rounds after a warm-up round; each time is
divided by the eager trainer's time on the same batch, and the report gives the medians
(:func:`~harmonia.app.bench.common.paired_step_times`). Graphs compiled during the timed rounds (a
recompilation) are counted and reported.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch

from harmonia.app.bench.common import paired_step_times
from harmonia.app.bench.pipeline import BenchReport, bench_command, unless_default
from harmonia.app.bench.pretrain import PRETRAIN_RECIPE
from harmonia.app.config import load_config
from harmonia.app.train import BaseTrainer, build_trainer
from harmonia.errors import ConfigError

TASKS = ("classify", "pretrain")
#: the config each task is measured on (the recipe overrides; classification: the defaults)
RECIPES: dict[str, tuple[str, list[str]]] = {
    "classify": ("configs/avdigits_concat.yaml", []),
    "pretrain": ("configs/trimodal_pretrain.yaml", PRETRAIN_RECIPE),
}
TRAINERS = ("eager", "eager (again)", "compiled")


def run_compile_benchmark(
    out_dir: str = "bench-results",
    overrides: Sequence[str] = (),
    tasks: Sequence[str] = TASKS,
    steps: int = 20,
    rounds: int = 5,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure eager and compiled steps of each task; write ``compile/compile.{md,json}``."""
    unknown = [t for t in tasks if t not in RECIPES]
    if unknown:
        raise ConfigError(f"bench compile: unknown tasks {unknown}; choose from {', '.join(TASKS)}")
    summary: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "steps": steps,
        "rounds": rounds,
        "overrides": list(overrides),
        "tasks": {},
    }
    for task in tasks:
        summary["tasks"][task] = measure_task(task, overrides, steps, rounds, progress)
        summary["threads"] = torch.get_num_threads()  # as the trainers set it (train.num_threads)
    command = bench_command(
        "compile",
        overrides,
        f"--speed-steps {steps}",
        f"--speed-rounds {rounds}",
        *unless_default("--tasks", tasks, TASKS),
    )
    BenchReport("compile", out_dir).write(summary, lambda s: format_report(s, command))
    return summary


def measure_task(
    task: str, overrides: Sequence[str], steps: int, rounds: int, progress: bool
) -> dict[str, Any]:
    """Step times of eager, eager again and compiled trainers of ``task``, and the compiled first step."""
    import torch._inductor.config
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # a fresh compilation, whatever ran before in this process
    _, recipe = RECIPES[task]
    with tempfile.TemporaryDirectory() as tmp:

        def build(i: int, compiled: bool) -> BaseTrainer:
            eager = ["train.compile=false", "train.compile_mode=default"]
            flags = ["train.compile=true"] if compiled else eager
            cfg = load_config(
                None, [*recipe, f"task={task}", *overrides, *flags, f"out_dir={tmp}", f"name={task}_{i}"]
            )
            trainer = build_trainer(cfg, progress=False)
            trainer.model.train()
            return trainer

        trainers = [build(i, name == "compiled") for i, name in enumerate(TRAINERS)]
        batches = full_batches(trainers[0], steps)
        first: dict[str, float] = {}
        graphs = counters["stats"]["unique_graphs"]
        with torch._inductor.config.patch(force_disable_caches=True):  # the compile time of a first run
            for name, trainer in zip(TRAINERS, trainers, strict=True):
                start = time.perf_counter()
                trainer.train_step(batches[0])
                first[name] = time.perf_counter() - start
        compiled_graphs = counters["stats"]["unique_graphs"] - graphs
        timed = paired_step_times(trainers, batches, rounds, progress)
        cfg = trainers[0].cfg
    return {
        "config": RECIPES[task][0],
        "batch_size": cfg.train.batch_size,
        "mode": trainers[-1].cfg.train.compile_mode.value,
        "first_step_seconds": first,
        "graphs": compiled_graphs,
        "recompiled": counters["stats"]["unique_graphs"] - graphs - compiled_graphs,
        "timing": dict(zip(TRAINERS, timed, strict=True)),
    }


def full_batches(trainer: BaseTrainer, steps: int) -> list[dict[str, Any]]:
    """``steps`` training batches of the config's batch size (the epoch-0 order, repeated if short)."""
    trainer.train_loader.set_epoch(0)
    size = trainer.cfg.train.batch_size
    batches = [b for b in trainer.train_loader if len(b["indices"]) == size]
    if not batches:
        raise ConfigError(f"bench compile: no full training batch of train.batch_size={size}; lower it")
    return [batches[i % len(batches)] for i in range(steps)]


def format_report(summary: dict[str, Any], command: str) -> str:
    lines = [
        "# Compiled training step (`train.compile`)",
        "",
        f"Measured with `{command}` (torch {summary['torch']}, {summary['threads']} CPU threads, one "
        f"process). Median over {summary['steps']} batches × {summary['rounds']} rounds after a warm-up "
        "round; on every batch each trainer takes one step, in rotated order, and its ratio is the median "
        "of its per-batch ratios to the eager trainer's step. `eager (again)` is a second eager trainer, an "
        "A/A control showing the noise floor. First step: the compiled trainer's compiles its graphs "
        "(inductor's caches off, as in a first run).",
        "",
        "| task | config | batch | eager ms / step | compiled ms / step | compiled × eager "
        "| A/A control × eager | first step, eager (s) | first step, compiled (s) | graphs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task, t in summary["tasks"].items():
        timing, first = t["timing"], t["first_step_seconds"]
        graphs = f"{t['graphs']}" + (f" (+{t['recompiled']} recompiled)" if t["recompiled"] else "")
        lines.append(
            f"| {task} | {t['config']} | {t['batch_size']} | {timing['eager']['seconds'] * 1000:.1f} "
            f"| {timing['compiled']['seconds'] * 1000:.1f} | {timing['compiled']['ratio']:.3f} "
            f"| {timing['eager (again)']['ratio']:.3f} | {first['eager']:.2f} | {first['compiled']:.1f} "
            f"| {graphs} |"
        )
    return "\n".join(lines) + "\n"
