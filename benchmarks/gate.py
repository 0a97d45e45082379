"""When does pre-training pass the learnability gate? ``python benchmarks/gate.py CONFIG [--seeds 0 1 2]
[--max-epochs N] [--out DIR] [overrides ...]``.

Trains CONFIG once per seed and stops a run as soon as the gate has passed on validation, or
``--extra-epochs`` later (to watch a curriculum that starts at the gate), or after
``--max-epochs``, default half of ``train.epochs``; the learning-rate schedule is still laid out for all
of ``train.epochs``, so the epochs run are exactly those of a full run). Writes ``DIR/gate.json`` (every
epoch's gate metrics per seed) and ``DIR/gate.md``, a table per seed with the epoch at which the gate first
passed (counted from 1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from harmonia.app.callbacks.base import Callback
from harmonia.app.config import load_config
from harmonia.app.train import build_trainer

COLUMNS = (
    ("gate/loss_va", "val L_va"),
    ("gate/loss_vt", "val L_vt"),
    ("gate/video_to_audio/R@10", "val v→a R@10"),
    ("gate/video_to_text/R@10", "val v→t R@10"),
    ("gate/axis_va", "axis L_va"),
    ("gate/axis_vt", "axis L_vt"),
    ("gate/val_conflict_auroc", "val conflict AUROC"),
    ("train/conflict_auroc", "train conflict AUROC"),
    ("train/loss_vt_auroc", "train L_vt AUROC"),
    ("train/drop_precision", "drop precision"),
    ("test/video_to_audio/R@10", "test v→a R@10"),
)


class _Stop(Exception):
    pass


class _Recorder(Callback):
    """Keeps every epoch's metrics; stops the run when the gate has passed or at ``max_epochs``."""

    def __init__(self, max_epochs: int, extra: int = 0) -> None:
        self.max_epochs, self.extra, self.epochs = max_epochs, extra, []  # type: ignore[var-annotated]

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, float]) -> None:
        self.epochs.append({"epoch": epoch, **metrics})
        first = metrics.get("gate/first_passed_epoch", -1.0)
        if (first >= 0 and epoch >= first + self.extra) or epoch + 1 >= self.max_epochs:
            raise _Stop


def run(
    config: str, seeds: list[int], max_epochs: int | None, out: Path, overrides: list[str], extra: int = 0
) -> dict:
    summary: dict[str, Any] = {"config": config, "overrides": overrides, "runs": {}}
    for seed in seeds:
        cfg = load_config(
            config, [*overrides, f"train.seed={seed}", f"out_dir={out / 'runs'}", f"name=seed{seed}"]
        )
        limit = max_epochs or cfg.train.epochs // 2
        trainer = build_trainer(cfg, overwrite=True, progress=False)
        recorder = _Recorder(limit, extra)
        trainer.callbacks.append(recorder)  # after the gate, which measures first
        with contextlib.suppress(_Stop):
            trainer.fit()
        passed = [e["epoch"] for e in recorder.epochs if e.get("gate/passed") == 1.0]
        summary["runs"][str(seed)] = {
            "epochs_total": cfg.train.epochs,
            "epochs_run": len(recorder.epochs),
            "steps_per_epoch": len(trainer.train_loader),
            "gate_epoch": passed[0] + 1 if passed else None,
            "epochs": recorder.epochs,
        }
        print(
            f"seed {seed}: gate {'passed after epoch ' + str(passed[0] + 1) if passed else 'not passed'}"
            f" (of {cfg.train.epochs}; ran {len(recorder.epochs)})",
            flush=True,
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "gate.json").write_text(json.dumps(summary, indent=1))
    (out / "gate.md").write_text(report(summary))
    return summary


def report(summary: dict) -> str:
    lines = [
        f"# Learnability gate: `python benchmarks/gate.py {summary['config']} "
        f"{' '.join(summary['overrides'])}`".rstrip()
        + "",
        "",
    ]
    for seed, r in summary["runs"].items():
        gate = f"passed after epoch {r['gate_epoch']}" if r["gate_epoch"] else "not passed"
        lines += [
            f"## seed {seed}: {gate} of {r['epochs_total']} ({r['steps_per_epoch']} steps per epoch)",
            "",
            "| epoch | " + " | ".join(name for _, name in COLUMNS) + " | passed |",
            "|---" * (len(COLUMNS) + 2) + "|",
        ]
        for e in r["epochs"]:
            cells = [f"{e[k]:.3f}" if k in e else "" for k, _ in COLUMNS]
            lines.append(
                f"| {e['epoch'] + 1} | " + " | ".join(cells) + f" | {int(e.get('gate/passed', 0))} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench-results/gate"))
    parser.add_argument(
        "--extra-epochs", type=int, default=0, help="epochs to go on after the gate passed (curriculum)"
    )
    args, overrides = parser.parse_known_args(argv)
    run(args.config, args.seeds, args.max_epochs, args.out, overrides, args.extra_epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
