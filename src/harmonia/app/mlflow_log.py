"""MLflow logging of a training run: ``train.loggers: [jsonl, tensorboard, mlflow]``.

Needs ``pip install 'harmonia[mlflow]'`` (mlflow-skinny, plus SQLAlchemy and Alembic for a local SQLite
store). One harmonia run is one MLflow run, named after the run, in the experiment
``train.mlflow_experiment`` of the tracking store at ``train.mlflow_uri``, else ``$MLFLOW_TRACKING_URI``,
else the SQLite database ``<out_dir>/mlflow.db`` (MLflow 3 keeps its file store ``./mlruns`` in maintenance
mode and refuses it by default). An experiment harmonia creates in a local SQLite store keeps its artifacts in
``mlartifacts/`` beside the database.

* params: the resolved config, flattened to dotted keys (``optim.lr``; lists and mappings as JSON);
* metrics: every number of every ``step``, ``epoch`` and ``final`` record of ``metrics.jsonl``, at its global
  step, under the names TensorBoard gets (``train/loss``, ``balance/rho/audio``, ``test/accuracy``; a
  character MLflow refuses in a name becomes ``_``, and ``@`` becomes ``_at_``: ``R@1`` -> ``R_at_1``);
* artifacts, when the run ends: every file at the top of the run folder (``config.yaml``, ``metrics.jsonl``,
  ``results.json``, the figures and reports), not the checkpoints nor the TensorBoard events.

The run ends ``FINISHED``, or ``KILLED`` (interrupt) / ``FAILED`` (error) when training stops early. Its id is
kept in ``<run_dir>/mlflow_run_id``: ``--resume`` continues the same MLflow run, where the redone steps are
logged again.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harmonia.errors import ConfigError
from harmonia.extras import check_installed

RUN_ID_FILE = "mlflow_run_id"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
PARAMS_PER_BATCH = 100  # MLflow's limit of params in one log_batch
METRICS_PER_BATCH = 1000  # MLflow's limit of metrics in one log_batch
_REFUSED = re.compile(r"[^/\w.\- :]")


def tracking_uri(configured: str | None, out_dir: str | Path) -> str:
    """``train.mlflow_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<out_dir>/mlflow.db``."""
    if configured:
        return configured
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(Path(out_dir) / 'mlflow.db').resolve()}"


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a local ``sqlite:///PATH`` URI (None for any other store)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///"))


def check_mlflow_installed(uri: str) -> None:
    """Raise a :class:`ConfigError` naming ``pip install 'harmonia[mlflow]'`` when MLflow (or, for a
    SQLite store, SQLAlchemy and Alembic) is missing."""
    modules = ["mlflow", "sqlalchemy", "alembic"] if uri.startswith("sqlite:") else ["mlflow"]
    try:
        check_installed(modules, "train.loggers: mlflow")
    except ImportError as exc:
        raise ConfigError(f"{exc}; or remove mlflow from train.loggers") from None


def metric_name(kind: str, key: str) -> str:
    """The MLflow name of a logged value: the TensorBoard tag, with refused characters replaced."""
    tag = key if "/" in key else f"{kind}/{key}"
    return _REFUSED.sub("_", tag.replace("@", "_at_"))


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted keys -> values as text (lists and mappings as JSON, cut to MLflow's 6000 characters)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            flat[name] = text[:MAX_PARAM_LENGTH]
    return flat


class MlflowSink:
    """Logs a run to MLflow (see the module docstring). Created by the trainer on rank 0 only.

    Args:
        run_dir: the run folder (the MLflow run id is kept there).
        name: the run's name.
        config: the resolved config as plain data (logged as params).
        uri: the tracking URI (:func:`tracking_uri`).
        experiment: the experiment's name.
        resume: continue the MLflow run recorded in the run folder.
    """

    def __init__(
        self,
        run_dir: Path,
        name: str,
        config: Mapping[str, Any],
        uri: str,
        experiment: str,
        resume: bool = False,
    ) -> None:
        check_mlflow_installed(uri)
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.run_dir, self.uri = run_dir, uri
        self.client = MlflowClient(uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            database = _sqlite_path(uri)
            location = (database.parent / "mlartifacts").resolve().as_uri() if database else None
            experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        id_file = run_dir / RUN_ID_FILE
        recorded = id_file.read_text().strip() if resume and id_file.is_file() else ""
        if recorded:
            self.run_id: str = recorded
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(
                experiment_id, run_name=name, tags={"harmonia.run_dir": str(run_dir.resolve())}
            )
            self.run_id = run.info.run_id
            id_file.write_text(self.run_id + "\n")
            params = [Param(k, v) for k, v in flatten_config(config).items()]
            for start in range(0, len(params), PARAMS_PER_BATCH):
                self.client.log_batch(self.run_id, params=params[start : start + PARAMS_PER_BATCH])
        self._pending: list[Any] = []
        self._ended = False

    def log(self, kind: str, step: int, epoch: int, values: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                self._pending.append(Metric(metric_name(kind, key), float(value), now, step))
        if kind != "step" or len(self._pending) >= METRICS_PER_BATCH:
            self.flush()

    def flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:METRICS_PER_BATCH], self._pending[METRICS_PER_BATCH:]
            self.client.log_batch(self.run_id, metrics=batch)

    def close(self, status: str | None = None) -> None:
        """Send what is pending; ``status`` (``FAILED``, ``KILLED``) ends the MLflow run early."""
        self.flush()
        if status is not None and not self._ended:
            self.client.set_terminated(self.run_id, status=status)
            self._ended = True

    def finish(self) -> None:
        """Upload the files at the top of the run folder and end the MLflow run ``FINISHED``."""
        if self._ended:
            return
        self.flush()
        for path in sorted(self.run_dir.iterdir()):
            if path.is_file() and path.name != RUN_ID_FILE and not path.name.startswith("."):
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status="FINISHED")
        self._ended = True
