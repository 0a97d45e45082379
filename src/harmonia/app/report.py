"""The report of a run, and the comparison of several: ``report.md`` plus a self-contained ``index.html``.

Built from the run folder's files alone (``config.yaml``, ``metrics.jsonl``, ``results.json`` and the
figures the run wrote), so it works on any run folder, old or unfinished, and is what ``harmonia report``
runs. A run's report holds: what was trained, the final metrics, the commands that reproduce and resume it,
the per-epoch curves (``report_curves.png``), the method diagnostics the run drew (``balance_curves.png``,
``conflict_histograms.png``, attention maps, ...) plus the per-epoch means of every other statistic its
methods logged (``report_diagnostics.png``), the files, and the config. ``harmonia train`` writes it at the
end of every run (:func:`write_run_report_safely`: a failing report warns and never costs the run).

A comparison puts runs side by side: what differs in their configs, their final metrics in one table, and
their curves overlaid (one colour per run).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harmonia.app.document import Block, Code, Figure, Heading, Table, Text, write_atomic, write_document
from harmonia.app.logs import read_metrics
from harmonia.app.plots import Panel, Series, plot_balance_curves, plot_panels
from harmonia.errors import InputError

CURVES = "report_curves.png"
DIAGNOSTICS = "report_diagnostics.png"
SPLITS = ("train", "val", "test")
MAX_PANELS = 12
#: epochs the report's third command adds
EXTEND = 10
#: figures runs write, with what they show (any other PNG in a run folder is shown under its file name)
KNOWN_FIGURES = {
    "balance_curves.png": "ρ, k and q per modality over training (per-epoch means of the per-step logs)",
    "conflict_histograms.png": "per-triplet conflict score cos(g_va, g_vt), clean and misaligned triplets",
}
#: per-epoch values not worth a curve
SKIPPED = ("train/epoch_seconds", "train/lr", "gate/first_passed_epoch")
#: the order of evaluation panels (others follow alphabetically)
FIRST_FAMILIES = ("loss", "accuracy", "unimodal_accuracy", "macro_f1", "mAP", "R@1", "R@10", "R@5")


@dataclass
class Run:
    """What a run folder holds, read without validating (old runs may predate today's config keys)."""

    path: Path
    label: str
    config_text: str
    config: dict[str, Any]
    results: dict[str, Any] | None
    records: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.path.name)

    @property
    def modalities(self) -> list[str]:
        return [str(m) for m in (self.config.get("data") or {}).get("modalities") or []]

    def epoch_records(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == "epoch"]

    def final_metrics(self) -> dict[str, float]:
        """``test/<metric>`` and ``probe/<modality>`` of the finished run, or the last evaluation of an
        unfinished one."""
        if self.results is not None:
            test = {f"test/{k}": v for k, v in (self.results.get("test") or {}).items()}
            return {**test, **{f"probe/{k}": v for k, v in (self.results.get("probe") or {}).items()}}
        evaluated = [r for r in self.epoch_records() if any(k.startswith("test/") for k in r)]
        last = evaluated[-1] if evaluated else {}
        return {k: v for k, v in last.items() if k.startswith("test/") and _is_number(v)}


def load_run(path: str | Path, label: str | None = None) -> Run:
    """Read a run folder; :class:`InputError` when it is not one."""
    import yaml

    folder = Path(path)
    if not (folder / "config.yaml").is_file():
        raise InputError(
            f"{folder} is not a run folder (no config.yaml); give the folder harmonia train wrote, "
            f"e.g. runs/<name>"
        )
    text = (folder / "config.yaml").read_text(encoding="utf-8")
    config = yaml.safe_load(text) or {}
    results_file = folder / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else None
    metrics = folder / "metrics.jsonl"
    records = read_metrics(metrics) if metrics.is_file() else []
    return Run(folder, label or folder.name, text, config, results, records)


# --------------------------------------------------------------------------------------------------
# curves


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _family(key: str, modalities: Sequence[str]) -> tuple[str, str, str] | None:
    """(family, series, split) of an epoch key ``<split>/<rest>``: the panel a value goes to and its line
    in it. ``train/unimodal_accuracy/audio`` → (unimodal_accuracy, audio, train);
    ``val/video_to_text/R@1`` → (R@1, video→text, val); ``train/loss_va`` → (loss, loss_va, train)."""
    split, _, rest = key.partition("/")
    if split not in SPLITS or not rest:
        return None
    parts = rest.split("/")
    if rest.startswith("loss") and "auroc" not in rest:
        return "loss", "" if rest == "loss" else rest, split
    if len(parts) >= 2 and parts[-1] in modalities:
        return "/".join(parts[:-1]), parts[-1], split
    if len(parts) == 2 and "_to_" in parts[0]:
        return parts[1], parts[0].replace("_to_", "→"), split
    return rest, "", split


def _changes(values: Sequence[float]) -> bool:
    return len(values) < 2 or max(values) != min(values)


def _order(family: str) -> tuple[int, str]:
    return (FIRST_FAMILIES.index(family) if family in FIRST_FAMILIES else len(FIRST_FAMILIES), family)


def epoch_panels(runs: Sequence[Run]) -> tuple[list[Panel], list[Panel]]:
    """Panels of the per-epoch values of ``runs``: (evaluation panels: families logged on val or test, and
    the training loss and accuracy; diagnostic panels: everything else, including the per-epoch means of
    the methods' step statistics). With one run a line's colour is its modality (or retrieval direction)
    and its style its split; with several, each modality (direction) gets a panel of its own, the colour is
    the run and the style the split."""
    several = len(runs) > 1
    evaluation: dict[tuple[str, str], Panel] = {}  # (title, family) -> panel
    diagnostic: dict[tuple[str, str], Panel] = {}
    for run in runs:
        records = run.epoch_records()
        keys = dict.fromkeys(k for r in records for k in r if _is_number(r[k]) and k not in SKIPPED)
        keys.pop("step", None), keys.pop("epoch", None)
        families: dict[str, dict[str, tuple[str, str]]] = {}  # family -> key -> (series, split)
        for key in keys:
            found = _family(key, run.modalities)
            if found is None:
                namespace, _, rest = key.partition("/")
                base = rest.removesuffix("_threshold")
                found = (f"{namespace}/{base}", "threshold" if base != rest else "", namespace)
            families.setdefault(found[0], {})[key] = found[1:]
        for family, members in families.items():
            splits = {split for _, split in members.values()}
            is_evaluation = bool(splits & {"val", "test"}) or family in ("loss", "accuracy")
            target = evaluation if is_evaluation else diagnostic
            for key, (series, split) in members.items():
                points = [(r["epoch"] + 1, float(r[key])) for r in records if _is_number(r.get(key))]
                if not points or (not is_evaluation and not _changes([v for _, v in points])):
                    continue
                shown_split = split if split in SPLITS else ""
                if several:  # a panel per modality (direction, ...), a colour per run, a style per split
                    title = f"{family}: {series}" if series else family
                    label, colour, style = f"{run.label} {shown_split}".strip(), run.label, split
                else:  # a colour per modality (direction, ...), a style per split
                    title = family
                    label = " ".join(p for p in (shown_split, series) if p) or key
                    colour, style = series or split, split
                panel = target.setdefault((title, family), Panel(title.replace("_", " ")))
                panel.series.append(
                    Series(label, [x for x, _ in points], [y for _, y in points], colour, style)
                )
        for key, values in _step_statistics(run).items():
            family = key.rsplit("/", 1)[0] if key.rsplit("/", 1)[-1] in run.modalities else key
            panel = diagnostic.setdefault((family, family), Panel(f"{family} (step mean)"))
            series = key.rsplit("/", 1)[1] if family != key else ""
            epochs = sorted(values)
            panel.series.append(
                Series(
                    f"{run.label} {series}".strip() if several else series or key.rsplit("/", 1)[-1],
                    [e + 1 for e in epochs],
                    [values[e] for e in epochs],
                    colour=run.label if several else series or family,
                    style=series if several else "",
                )
            )
    ordered = sorted(evaluation.items(), key=lambda kv: (_order(kv[0][1]), kv[0][0]))
    return [p for _, p in ordered if p.series], [p for _, p in sorted(diagnostic.items()) if p.series]


def _step_statistics(run: Run) -> dict[str, dict[int, float]]:
    """Per-epoch means of the methods' step statistics, but for ρ, k and q (``balance_curves.png``)."""
    per_epoch: dict[str, dict[int, list[float]]] = {}
    for record in run.records:
        if record.get("kind") != "step":
            continue
        for key, value in record.items():
            if "/" not in key or key.startswith("train/") or not _is_number(value):
                continue
            if re.match(r"balance/(rho|k|q)/", key):
                continue
            per_epoch.setdefault(key, {}).setdefault(int(record["epoch"]), []).append(float(value))
    means = {k: {e: statistics.fmean(v) for e, v in epochs.items()} for k, epochs in per_epoch.items()}
    return {k: v for k, v in means.items() if _changes(list(v.values()))}


def _draw(panels: list[Panel], path: Path) -> tuple[bool, list[str]]:
    """Draw up to :data:`MAX_PANELS` panels atomically; (drawn?, titles of the panels left out)."""
    if not panels:
        path.unlink(missing_ok=True)
        return False, []
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    try:
        plot_panels(panels[:MAX_PANELS], tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return True, [p.title for p in panels[MAX_PANELS:]]


# --------------------------------------------------------------------------------------------------
# one run


def _fmt(value: Any) -> str:
    if not _is_number(value):
        return str(value)
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}"


def _shown_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies inside it, else absolute."""
    absolute = path.resolve()
    try:
        return str(absolute.relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(absolute)


def commands(run: Run) -> tuple[str, str, str]:
    """(reproduce, resume, extend) command lines for ``run``, valid from the working directory: the saved
    config with ``out_dir``/``name`` overrides when the folder no longer sits where the config says."""
    folder = _shown_path(run.path)
    config = f"{folder}/config.yaml"
    where: list[str] = []
    saved = Path(str(run.config.get("out_dir", "runs"))) / run.name
    if saved.resolve() != run.path.resolve():
        where = [f"out_dir={_shown_path(run.path.parent)}", f"name={run.path.name}"]
    train = run.config.get("train") or {}
    threads = (run.results or {}).get("num_threads")
    pin = [f"train.num_threads={threads}"] if threads and train.get("num_threads") is None else []
    out_dir = where[0:1] if where else []
    reproduce = " ".join(["harmonia train", config, *out_dir, f"name={run.path.name}_again", *pin])
    resume = " ".join(["harmonia train", config, *where, "--resume"])
    more = int(train.get("epochs") or 0) + EXTEND
    extend = " ".join(["harmonia train", config, *where, f"train.epochs={more}", "--resume"])
    return reproduce, resume, extend


def _summary(run: Run) -> list[str]:
    cfg = run.config
    data, model, train = cfg.get("data") or {}, cfg.get("model") or {}, cfg.get("train") or {}
    task = cfg.get("task", "classify")
    items = [f"task: `{task}`, data: `{data.get('name', '?')}` ({', '.join(run.modalities) or '?'})"]
    if task == "pretrain":
        pre = cfg.get("pretrain") or {}
        harmonize = (cfg.get("harmonize") or {}).get("mode", "none")
        items.append(f"model: `{pre.get('backbone', '?')}` backbone; harmonization: `{harmonize}`")
    else:
        methods = [b if isinstance(b, str) else b.get("name", "?") for b in cfg.get("balance") or []]
        items.append(
            f"model: `{model.get('encoder', '?')}` encoders, `{model.get('fusion', '?')}` fusion; "
            f"balancing: {', '.join(f'`{m}`' for m in methods) or 'none'}"
        )
    epochs = max((r["epoch"] + 1 for r in run.epoch_records()), default=0)
    planned = train.get("epochs", "?")
    if run.results is not None:
        threads = run.results.get("num_threads")
        items.append(
            f"finished: {run.results.get('epochs', epochs)} epochs in {run.results.get('seconds', 0):.0f} s"
            + (f" on {threads} CPU thread{'s' * (threads != 1)}" if threads else "")
        )
    else:
        items.append(f"**not finished** (no `results.json`): {epochs} of {planned} epochs logged")
    return items


def _diagnostic_figures(run: Run) -> list[Figure]:
    figures = []
    pngs = sorted(p for p in run.path.rglob("*.png") if not p.name.startswith(("report_", ".")))
    for png in sorted(pngs, key=lambda p: (p.name not in KNOWN_FIGURES, str(p))):
        relative = png.relative_to(run.path).as_posix()
        figures.append(Figure(relative, KNOWN_FIGURES.get(png.name, f"`{relative}`")))
    return figures


def _files(run: Run) -> list[str]:
    items = []
    for entry in sorted(run.path.iterdir()):
        if entry.name.startswith(".") or entry.name in ("report.md", "index.html"):
            continue
        if entry.is_dir():
            count = sum(1 for p in entry.rglob("*") if p.is_file())
            items.append(f"`{entry.name}/` ({count} file{'s' * (count != 1)})")
        else:
            items.append(f"`{entry.name}` ({_size(entry.stat().st_size)})")
    return items


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def run_report_blocks(run: Run) -> list[Block]:
    """The report of one run; draws its curve figures into the run folder."""
    evaluation, diagnostic = epoch_panels([run])
    curves, left_curves = _draw(evaluation, run.path / CURVES)
    diagnostics, left_diag = _draw(diagnostic, run.path / DIAGNOSTICS)
    reproduce, resume, extend = commands(run)
    blocks: list[Block] = [Heading(f"Run `{run.name}`", 1), Text(items=tuple(_summary(run)))]
    metrics = run.final_metrics()
    blocks.append(Heading("Final metrics" if run.results is not None else "Last evaluation"))
    if metrics:
        blocks.append(Table(("metric", "value"), tuple((f"`{k}`", _fmt(v)) for k, v in metrics.items())))
    else:
        blocks.append(Text("Nothing evaluated yet."))
    blocks += [
        Heading("Reproduce and resume"),
        Text(
            "Run from the working directory the paths are relative to. The first line trains the same "
            "config again into a new folder (on the same machine, torch build and thread count it repeats "
            "every number); the second continues this run from `checkpoints/last.pt` after a kill; the "
            f"third trains it on to {EXTEND} more epochs (not with the cosine schedule, which was laid out "
            "for the planned length)."
        ),
        Code(f"{reproduce}\n{resume}\n{extend}", "bash"),
        Heading("Curves"),
    ]
    if curves:
        blocks.append(Figure(CURVES, "per-epoch curves (epoch = finished epochs)"))
        if left_curves:
            blocks.append(Text(f"Not drawn (more than {MAX_PANELS} panels): {', '.join(left_curves)}."))
    else:
        blocks.append(Text("No epoch has been logged yet."))
    figures = _diagnostic_figures(run)
    if figures or diagnostics:
        blocks.append(Heading("Method diagnostics"))
        blocks += figures
        if diagnostics:
            blocks.append(
                Figure(
                    DIAGNOSTICS,
                    "other per-epoch statistics of the run and its methods (step means: "
                    "per-epoch means of per-step logs)",
                )
            )
            if left_diag:
                blocks.append(Text(f"Not drawn (more than {MAX_PANELS} panels): {', '.join(left_diag)}."))
    blocks += [
        Heading("Files"),
        Text(items=tuple(_files(run))),
        Heading("Config"),
        Code(run.config_text, "yaml"),
    ]
    return blocks


def write_run_report(run_dir: str | Path) -> Path:
    """(Re)write ``report.md`` and ``index.html`` of the run in ``run_dir``; returns the HTML page."""
    run = load_run(run_dir)
    _, page = write_document(run_report_blocks(run), run.path, f"harmonia run {run.name}")
    return page


def write_run_report_safely(run_dir: str | Path) -> Path | None:
    """:func:`write_run_report`, but a failure only warns (the trained run and its results are kept)."""
    try:
        return write_run_report(run_dir)
    except Exception as exc:
        warnings.warn(
            f"the report of run {run_dir} could not be written ({type(exc).__name__}: {exc}); the run "
            f"itself is complete (results.json, checkpoints). Retry with: harmonia report {run_dir}",
            stacklevel=2,
        )
        return None


# --------------------------------------------------------------------------------------------------
# several runs


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat |= _flatten(value, f"{prefix}{key}.")
        return flat
    return {prefix.rstrip("."): tree}


def _plain(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def config_differences(runs: Sequence[Run]) -> list[tuple[str, list[str]]]:
    """Config keys (dotted) whose values differ between runs, with each run's value (``–``: not set)."""
    flat = [_flatten(r.config) for r in runs]
    keys = dict.fromkeys(k for f in flat for k in f)
    diffs = []
    for key in keys:
        values = [_plain(f[key]) if key in f else "–" for f in flat]
        if len(set(values)) > 1 and key != "name":
            diffs.append((key, values))
    return diffs


def default_compare_dir(runs: Sequence[str | Path]) -> Path:
    """``<parent of the first run>/compare-<name>-<name>...`` (names hashed when that grows long)."""
    paths = [Path(r) for r in runs]
    names = "-".join(p.name for p in paths)
    if len(names) > 80:
        digest = hashlib.sha1("\n".join(str(p.resolve()) for p in paths).encode()).hexdigest()[:8]
        names = f"{len(paths)}-runs-{digest}"
    return paths[0].resolve().parent / f"compare-{names}"


def _labels(paths: Sequence[Path]) -> list[str]:
    """Folder names, with the parent added where two runs share a name."""
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def compare_report_blocks(runs: Sequence[Run], out: Path) -> list[Block]:
    """The comparison of ``runs``; draws its figures into ``out``."""
    evaluation, _ = epoch_panels(runs)
    curves, left = _draw(evaluation, out / CURVES)
    balance = out / "balance_curves.png"
    tmp = balance.with_name(f".{balance.stem}.{os.getpid()}.tmp.png")
    try:
        has_balance = plot_balance_curves({r.label: r.path for r in runs}, tmp)
        if has_balance:
            os.replace(tmp, balance)
        else:
            balance.unlink(missing_ok=True)
    finally:
        tmp.unlink(missing_ok=True)
    header = ("run", *(f"`{r.label}`" for r in runs))
    links = [os.path.relpath(r.path / "report.md", out) for r in runs]
    blocks: list[Block] = [
        Heading(f"Comparison of {len(runs)} runs", 1),
        Text(
            items=tuple(
                f"[{r.label}]({link}): `{_shown_path(r.path)}`" for r, link in zip(runs, links, strict=True)
            )
        ),
        Heading("Final metrics"),
    ]
    metrics = [r.final_metrics() for r in runs]
    keys = list(dict.fromkeys(k for m in metrics for k in m))
    rows = [(f"`{k}`", *(_fmt(m[k]) if k in m else "–" for m in metrics)) for k in keys]
    rows.append(("epochs", *(str((r.results or {}).get("epochs", "unfinished")) for r in runs)))
    seconds = [(r.results or {}).get("seconds") for r in runs]
    rows.append(("seconds", *(f"{t:.1f}" if _is_number(t) else "–" for t in seconds)))
    blocks.append(Table(header, tuple(rows)))
    diffs = config_differences(runs)
    blocks.append(Heading("Config differences"))
    if diffs:
        blocks.append(
            Table(("key", *header[1:]), tuple((f"`{k}`", *(f"`{v}`" for v in vs)) for k, vs in diffs))
        )
    else:
        blocks.append(Text("The configs are the same but for the name."))
    blocks.append(Heading("Curves"))
    if curves:
        blocks.append(Figure(CURVES, "per-epoch curves, one colour per run"))
        if left:
            blocks.append(Text(f"Not drawn (more than {MAX_PANELS} panels): {', '.join(left)}."))
    if has_balance:
        blocks.append(Figure(balance.name, "ρ, k and q per modality, one colour per run"))
    command = " ".join(["harmonia report", *(_shown_path(r.path) for r in runs), "--out", _shown_path(out)])
    blocks += [
        Text(
            "Each run's own report (diagnostics, commands, config) is linked above. Rewrite this page with:"
        ),
        Code(command, "bash"),
    ]
    return blocks


def write_comparison(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """``report.md`` and ``index.html`` comparing the runs in ``run_dirs``, in ``out`` (default
    :func:`default_compare_dir`); returns the HTML page."""
    paths = [Path(r) for r in run_dirs]
    runs = [load_run(p, label) for p, label in zip(paths, _labels(paths), strict=True)]
    folder = Path(out) if out is not None else default_compare_dir(paths)
    folder.mkdir(parents=True, exist_ok=True)
    _, page = write_document(compare_report_blocks(runs, folder), folder, f"harmonia: {len(runs)} runs")
    return page


__all__ = [
    "Run",
    "commands",
    "config_differences",
    "default_compare_dir",
    "epoch_panels",
    "load_run",
    "write_atomic",
    "write_comparison",
    "write_run_report",
    "write_run_report_safely",
]
