"""Run logs: one JSON object per line (``metrics.jsonl``), TensorBoard scalars and, optionally, MLflow
(``train.loggers``; see :mod:`harmonia.app.mlflow_log`)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol


class MetricSink(Protocol):
    """A further destination of a run's records (MLflow)."""

    def log(self, kind: str, step: int, epoch: int, values: dict[str, Any]) -> None: ...

    def close(self, status: str | None = None) -> None: ...

    def finish(self) -> None: ...


class RunLogger:
    """Append-only metrics log. ``truncate_from_epoch`` drops records of epochs a resumed run will redo;
    ``sinks`` get every record too."""

    def __init__(
        self,
        run_dir: Path,
        tensorboard: bool = True,
        truncate_from_epoch: int | None = None,
        purge_step: int | None = None,
        sinks: Sequence[MetricSink] = (),
    ) -> None:
        self.sinks = list(sinks)
        self.path = run_dir / "metrics.jsonl"
        if truncate_from_epoch is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("epoch", 0) < truncate_from_epoch]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        self._file = open(self.path, "a")  # noqa: SIM115 - closed in close()
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_step)

    def log(self, kind: str, step: int, epoch: int, values: dict[str, Any]) -> None:
        record = {"kind": kind, "step": step, "epoch": epoch, **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, int | float) and math.isfinite(value):
                    self._tb.add_scalar(f"{key}" if "/" in key else f"{kind}/{key}", value, step)
        for sink in self.sinks:
            sink.log(kind, step, epoch, values)

    def close(self, status: str | None = None) -> None:
        """Close the files; ``status`` (``FAILED``, ``KILLED``) tells the sinks that the run stopped early."""
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        for sink in self.sinks:
            sink.close(status)

    def finish(self) -> None:
        """After the run's last file is written: the sinks upload what they keep (MLflow's artifacts)."""
        for sink in self.sinks:
            sink.finish()


def open_run_logger(cfg: Any, run_dir: Path, resume: bool, epoch: int = 0, global_step: int = 0) -> RunLogger:
    """The logger of ``cfg.train.loggers`` for a run (resumed at ``epoch``/``global_step``)."""
    kinds = {getattr(k, "value", k) for k in cfg.train.loggers}
    sinks: list[MetricSink] = []
    if "mlflow" in kinds:
        from harmonia.app.config import to_dict
        from harmonia.app.mlflow_log import MlflowSink, tracking_uri

        uri = tracking_uri(cfg.train.mlflow_uri, cfg.out_dir)
        sinks.append(MlflowSink(run_dir, cfg.name, to_dict(cfg), uri, cfg.train.mlflow_experiment, resume))
    return RunLogger(
        run_dir,
        tensorboard="tensorboard" in kinds,
        truncate_from_epoch=epoch if resume else None,
        purge_step=global_step if resume else None,
        sinks=sinks,
    )


def check_loggers(cfg: Any) -> None:
    """Refuse, before anything is written, a logger whose package is missing (with the pip command)."""
    if "mlflow" in {getattr(k, "value", k) for k in cfg.train.loggers}:
        from harmonia.app.mlflow_log import check_mlflow_installed, tracking_uri

        check_mlflow_installed(tracking_uri(cfg.train.mlflow_uri, cfg.out_dir))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl``; a torn last line (a killed run) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
