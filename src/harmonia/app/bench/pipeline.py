"""The pipeline every benchmark shares: a sweep of configs × seeds, then ``<name>.json``, ``<name>.md``
and the plots written into ``<out_dir>/<name>/``, and the report printed.

A benchmark module keeps what is its own (which configs, the summary, the Markdown table, the plots);
:func:`sweep` runs the configs and :class:`BenchReport` writes the files.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from harmonia.app.bench.common import run_variant
from harmonia.app.config import ExperimentConfig
from harmonia.app.train import Callback
from harmonia.errors import HarmoniaError

Job = TypeVar("Job", bound=Hashable)
Results = list[dict[str, Any]]
Plot = Callable[[dict[str, Any], Path], None]


def sweep(
    title: str,
    jobs: Sequence[Job],
    configure: Callable[[Job], ExperimentConfig],
    seeds: int,
    progress: bool,
    *,
    unit: str = "variant",
    callbacks: Callable[[Job, ExperimentConfig], Callable[[], Sequence[Callback]]] | None = None,
    after: Callable[[Job, Results], None] | None = None,
    for_seed: Callable[[Job, ExperimentConfig, int], ExperimentConfig] | None = None,
) -> dict[Job, Results]:
    """Train the config of every job for seeds ``0 .. seeds-1`` (:func:`run_variant`), one job after the
    other under a progress bar named ``title``. ``configure`` makes a job's config, ``callbacks`` (given
    the job and its config) the factory of each run's callbacks, and ``after`` sees a job's results as soon
    as they are in (to add to them, or to measure its checkpoints), and ``for_seed(job, cfg, seed)`` the
    config of one seed's run when it differs from seed to seed. Returns the results of each job."""
    runs: dict[Job, Results] = {}
    bar = tqdm(jobs, desc=title, disable=not progress, unit=unit)
    for job in bar:
        bar.set_postfix(variant=job if isinstance(job, str | int | float) else "/".join(map(str, job)))
        cfg = configure(job)
        runs[job] = run_variant(
            cfg,
            list(range(seeds)),
            progress,
            callbacks(job, cfg) if callbacks else None,
            functools.partial(for_seed, job) if for_seed is not None else None,
        )
        if after is not None:
            after(job, runs[job])
    return runs


def bench_command(benchmark: str, overrides: Sequence[str], *flags: str) -> str:
    """The command line a report quotes: ``harmonia bench <benchmark> <overrides> <flags>``."""
    return " ".join([f"harmonia bench {benchmark}", *overrides, *flags])


def unless_default(flag: str, values: Sequence[Any], default: Sequence[Any]) -> list[str]:
    """``[f"{flag} v1 v2 ..."]`` when ``values`` differ from ``default``, else nothing."""
    return [" ".join([flag, *map(str, values)])] if tuple(values) != tuple(default) else []


@dataclass(frozen=True)
class BenchReport:
    """Where a benchmark writes: ``<out_dir>/<name>/`` (its runs in ``runs/``)."""

    name: str
    out_dir: str | Path

    @property
    def folder(self) -> Path:
        return Path(self.out_dir) / self.name

    @property
    def runs_dir(self) -> Path:
        return self.folder / "runs"

    def write(
        self,
        summary: dict[str, Any],
        report: Callable[[dict[str, Any]], str],
        plots: Mapping[str, Plot] | None = None,
        stem: str | None = None,
    ) -> str:
        """Write ``<stem>.json`` (the summary), ``<stem>.md`` (``report(summary)``) and each of ``plots``
        (file name → plot function) into :attr:`folder`, print the report and return it. ``stem``: the
        benchmark's name unless given."""
        stem = stem or self.name
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"{stem}.json").write_text(json.dumps(summary, indent=1))
        text = report(summary)
        (self.folder / f"{stem}.md").write_text(text)
        for filename, plot in (plots or {}).items():
            plot(summary, self.folder / filename)
        print(text)
        return text

    def replot(self, plots: Mapping[str, Plot], stem: str | None = None) -> list[Path]:
        """Draw ``plots`` again from the saved ``<stem>.json``, without training; returns the files drawn."""
        stem = stem or self.name
        saved = self.folder / f"{stem}.json"
        if not saved.is_file():
            raise HarmoniaError(
                f"{saved} not found: --replot redraws the figures of a finished benchmark; run it first "
                f"(harmonia bench {self.name} --out {self.out_dir}) or point --out at its folder"
            )
        summary = json.loads(saved.read_text())
        written = []
        for filename, plot in plots.items():
            path = self.folder / filename
            before = path.stat().st_mtime_ns if path.exists() else None
            try:
                plot(summary, path)
            except KeyError as exc:
                raise HarmoniaError(
                    f"{saved} lacks {exc} that {filename} is drawn from: it was written by another version "
                    f"of harmonia bench {self.name}; run the benchmark again to draw it"
                ) from None
            if path.exists() and path.stat().st_mtime_ns != before:
                written.append(path)
        return written


@contextmanager
def figure(path: Path, nrows: int = 1, ncols: int = 1, dpi: int = 120, **kwargs: Any) -> Iterator[Any]:
    """``fig, axes`` of ``plt.subplots(nrows, ncols, **kwargs)`` (Agg backend); on leaving the block the
    figure is laid out tightly (unless ``layout=...`` chose another layout engine), saved to ``path`` at
    ``dpi`` and closed (only closed after an error)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, **kwargs)
    try:
        yield fig, axes
        if "layout" not in kwargs:
            fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
