"""Helpers shared by the benchmarks: runs over seeds (with their per-epoch curves), equal-step budgets,
mean ± std formatting and curve plots."""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from harmonia.app.config import ExperimentConfig, load_config
from harmonia.app.logs import read_metrics
from harmonia.app.plotstyle import Style
from harmonia.app.train import Callback, build_trainer

#: held while a memory measurement sets the allocator variable for its child process and restores it
_ENVIRONMENT = threading.Lock()


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
    for_seed: Callable[[ExperimentConfig, int], ExperimentConfig] | None = None,
) -> list[dict[str, Any]]:
    """Train ``cfg`` once per seed. Each result is :meth:`TrainResult.to_dict` plus ``steps`` (optimizer
    steps taken), ``val`` (the validation metrics of the last evaluation) and ``curves``: the numeric
    metrics of every epoch (``step``, ``epoch`` and the logged ``train/``, ``val/``, ``test/``, ``gate/``
    ... values). ``callbacks`` makes fresh callbacks for each run; ``for_seed(cfg, seed)``, when given, makes
    the config of one seed's run (e.g. to point at that seed's teacher checkpoints)."""
    results = []
    for seed in seeds:
        seed_cfg = for_seed(cfg, seed) if for_seed is not None else cfg
        run_cfg = seed_cfg.model_copy(
            update={
                "name": f"{cfg.name}_seed{seed}",
                "train": seed_cfg.train.model_copy(update={"seed": seed}),
            }
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


def plot_curves(
    ax: Any,
    results: Sequence[dict[str, Any]],
    key: str,
    label: str,
    scale: float = 1.0,
    style: Style | None = None,
) -> None:
    """Mean ± std band over seeds of ``key`` against optimizer steps (nothing when never logged), drawn in
    ``style`` (see :class:`~harmonia.app.plotstyle.StyleMap`; default: the axes' next colour, dots)."""
    steps, means, stds = curve(results, key)
    if not steps:
        return
    m = [v * scale for v in means]
    look = style.kwargs() if style is not None else {"marker": "."}
    line = ax.plot(steps, m, label=label, markersize=4, **look)[0]
    ax.fill_between(
        steps,
        [a - b * scale for a, b in zip(m, stds, strict=True)],
        [a + b * scale for a, b in zip(m, stds, strict=True)],
        alpha=0.15,
        color=line.get_color(),
    )


def paired_step_times(
    trainers: Sequence[Any],
    batches: Sequence[dict[str, Any]],
    rounds: int,
    progress: bool = True,
    reference: Sequence[int] | None = None,
) -> list[dict[str, float]]:
    """Median step time of each trainer and median of its per-batch ratios to its reference trainer
    (``trainers[reference[i]]``; ``trainers[0]`` for all when ``reference`` is not given):
    :func:`paired_times` of the trainers' ``train_step``."""
    return paired_times([t.train_step for t in trainers], batches, rounds, progress, reference)


def paired_times(
    calls: Sequence[Callable[[Any], Any]],
    inputs: Sequence[Any],
    rounds: int,
    progress: bool = True,
    reference: Sequence[int] | None = None,
    desc: str = "step timing",
) -> list[dict[str, float]]:
    """Median time of each call and median of its per-input ratios to its reference call
    (``calls[reference[i]]``; ``calls[0]`` for all when ``reference`` is not given).

    For every input each call runs once, in an order rotated from input to input; each time is divided by
    the reference call's time on the same input. The first of ``rounds + 1`` rounds is a warm-up. Pairing
    at the call level cancels the slow drifts of a shared machine.
    """
    refs = list(reference) if reference is not None else [0] * len(calls)
    n = len(calls)
    seconds: list[list[float]] = [[] for _ in range(n)]
    ratios: list[list[float]] = [[] for _ in range(n)]
    for r in tqdm(range(rounds + 1), desc=desc, disable=not progress, unit="round"):
        for j, item in enumerate(inputs):
            shift = (r * len(inputs) + j) % n
            elapsed = [0.0] * n
            for i in [*range(shift, n), *range(shift)]:
                start = time.perf_counter()
                calls[i](item)
                elapsed[i] = time.perf_counter() - start
            if r == 0:
                continue
            for i in range(n):
                seconds[i].append(elapsed[i])
                ratios[i].append(elapsed[i] / elapsed[refs[i]])
    return [
        {"seconds": statistics.median(seconds[i]), "ratio": statistics.median(ratios[i])} for i in range(n)
    ]


def peak_memory_mib(prepare: Callable[..., Mapping[Any, Callable[[], Any]]], *args: Any) -> dict[Any, float]:
    """Peak memory of each of several calls (MiB), in one fresh process: ``runs = prepare(*args)`` (name →
    call); for each call in turn, one run (one-time allocations), then how far the resident set grows above
    its size before during a second run (Linux; glibc is told to return every freed block of >= 64 KiB to
    the system, so that the resident set follows the live tensors). ``prepare`` and ``args`` must be
    picklable (a module-level function)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    with _ENVIRONMENT:  # another thread's measurement must not restore the variable before this start
        previous = os.environ.get("MALLOC_MMAP_THRESHOLD_")
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        try:
            process = context.Process(target=_memory_worker, args=(prepare, args, queue))
            process.start()
        finally:
            if previous is None:
                del os.environ["MALLOC_MMAP_THRESHOLD_"]
            else:
                os.environ["MALLOC_MMAP_THRESHOLD_"] = previous
    result = queue.get(timeout=600)
    process.join()
    if isinstance(result, str):
        raise RuntimeError(f"the memory measurement {prepare.__name__}{args} failed:\n{result}")
    return dict(result)


def step_memory_mib(overrides: Sequence[str]) -> float:
    """Peak memory of one training step of the config ``overrides`` (MiB; :func:`peak_memory_mib`)."""
    return peak_memory_mib(prepare_steps, {"step": list(overrides)})["step"]


def step_memories_mib(configs: Sequence[Sequence[str]], processes: int = 2) -> list[float]:
    """:func:`step_memory_mib` of each config, each in its own fresh process, ``processes`` of them at a
    time: each measures its own resident set, so running side by side changes no figure, only the wall
    time (most of which is starting Python and importing torch in every process)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, processes)) as pool:
        return list(pool.map(step_memory_mib, configs))


def prepare_steps(configs: Mapping[str, list[str]]) -> dict[str, Callable[[], Any]]:
    """For :func:`peak_memory_mib`: one training step on a fixed batch for each config (name → overrides),
    every trainer built first."""
    tmp = tempfile.TemporaryDirectory()  # kept alive by the closures, removed when the process exits
    runs: dict[str, Callable[[], Any]] = {}
    for i, (name, overrides) in enumerate(configs.items()):
        cfg = load_config(None, [*overrides, f"out_dir={tmp.name}", f"name=memory{i}"])
        trainer = build_trainer(cfg, progress=False)
        batch = next(iter(trainer.train_loader))
        runs[name] = functools.partial(_step, tmp, trainer, batch)
    return runs


def _step(_tmp: Any, trainer: Any, batch: dict[str, Any]) -> None:
    trainer.train_step(batch)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _memory_worker(
    prepare: Callable[..., Mapping[Any, Callable[[], Any]]], args: tuple[Any, ...], queue: Any
) -> None:
    import gc
    import traceback

    try:
        peaks = {}
        for name, run in prepare(*args).items():
            run()  # optimizer state and one-time allocations
            gc.collect()
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset the peak resident set (VmHWM) to the current one
            before = _status_kib("VmRSS")
            run()
            peaks[name] = (_status_kib("VmHWM") - before) / 1024
        queue.put(peaks)
    except BaseException:
        queue.put(traceback.format_exc())
        raise
