"""``train.loggers: [..., mlflow]``: a run logged to a local MLflow store (SQLite: MLflow 3 refuses its file
store ``./mlruns`` by default) and read back with ``MlflowClient``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from harmonia.app.logs import read_metrics
from harmonia.app.mlflow_log import RUN_ID_FILE, flatten_config, metric_name, tracking_uri
from harmonia.app.train import Trainer
from harmonia.errors import ConfigError
from helpers import Interrupt, tiny_experiment


def test_tracking_uri_and_metric_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(None, tmp_path) == "http://127.0.0.1:5000"
    assert tracking_uri("sqlite:///x.db", tmp_path) == "sqlite:///x.db"  # the config wins
    assert metric_name("epoch", "test/video_to_text/R@1") == "test/video_to_text/R_at_1"
    assert metric_name("step", "loss") == "step/loss"
    flat = flatten_config({"optim": {"lr": 0.1}, "balance": [{"name": "ogm"}], "name": "x", "empty": {}})
    assert flat == {"optim.lr": "0.1", "balance": '[{"name": "ogm"}]', "name": "x", "empty": "{}"}


def test_mlflow_missing_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)
    cfg = tiny_experiment(tmp_path, "train.loggers=[jsonl, mlflow]")
    with pytest.raises(
        ConfigError, match=r"pip install 'harmonia\[mlflow\]'.*remove mlflow from train.loggers"
    ):
        Trainer(cfg, progress=False)
    assert not (tmp_path / "tiny").exists()  # refused before the run folder is touched


@pytest.mark.integration
def test_a_run_logs_params_metrics_and_artifacts_to_mlflow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setattr("harmonia.app.callbacks.balance.plot_balance_curves", lambda *a, **k: None)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    overrides = [
        "train.loggers=[jsonl, mlflow]",
        f"train.mlflow_uri={uri}",
        "train.mlflow_experiment=tiny-runs",
        "train.epochs=2",
        "train.probe=false",
        "balance=[ogm]",
    ]
    cfg = tiny_experiment(tmp_path, *overrides)
    with pytest.raises(KeyboardInterrupt):  # killed in epoch 2, then resumed: one MLflow run throughout
        Trainer(cfg, [Interrupt(at_step=4)], progress=False).fit()
    client = MlflowClient(uri)
    run_id = (tmp_path / "tiny" / RUN_ID_FILE).read_text().strip()
    assert client.get_run(run_id).info.status == "KILLED"
    result = Trainer(cfg, resume=True, progress=False).fit()

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert client.get_experiment(run.info.experiment_id).name == "tiny-runs"
    assert run.data.params["optim.lr"] == str(cfg.optim.lr)
    assert run.data.params["balance"].startswith('[{"name": "ogm"')
    # every step's loss at its global step, as metrics.jsonl has it (a step of the epoch the resume redid is
    # logged twice: by the killed run and again)
    records = read_metrics(tmp_path / "tiny" / "metrics.jsonl")
    steps = {r["step"]: r["train/loss"] for r in records if r["kind"] == "step"}
    history: dict[int, list[float]] = {}
    for metric in client.get_metric_history(run_id, "train/loss"):
        history.setdefault(metric.step, []).append(metric.value)
    assert set(history) == set(steps) and len(steps) == 6
    for step, loss in steps.items():
        assert any(v == pytest.approx(loss, rel=1e-6) for v in history[step]), (step, history[step], loss)
    k = client.get_metric_history(run_id, "balance/k/image")
    assert len({m.step for m in k}) == len(steps)
    assert run.data.metrics["test/accuracy"] == pytest.approx(result.test["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "metrics.jsonl", "results.json"} <= artifacts and RUN_ID_FILE not in artifacts
    local = Path(client.download_artifacts(run_id, "results.json", str(tmp_path / "download")))
    assert json.loads(local.read_text())["test"] == result.test
    # the artifacts of an experiment harmonia created in a local SQLite store lie beside the database
    assert (tmp_path / "store" / "mlartifacts").is_dir()
