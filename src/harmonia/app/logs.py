"""Run logs: one JSON object per line (``metrics.jsonl``) and TensorBoard scalars."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


class RunLogger:
    """Append-only metrics log. ``truncate_from_epoch`` drops records of epochs a resumed run will redo."""

    def __init__(
        self,
        run_dir: Path,
        tensorboard: bool = True,
        truncate_from_epoch: int | None = None,
        purge_step: int | None = None,
    ) -> None:
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

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl``; a torn last line (a killed run) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
