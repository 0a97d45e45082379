"""The same config and seed give bitwise-identical logged numbers: at one thread count however loaded the
machine is (the default), and across thread counts with ``train.reproducibility=any_threads``.

Each run is a real ``harmonia train`` process, so that what the command sets before torch loads is in force.
The FiLM config with a wide hidden layer is the one whose 4096-wide backward product MKL splits by thread
count; with oneDNN's convolutions that is what made runs differ."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # every test here trains or spawns processes

ROOT = Path(__file__).resolve().parents[1]
FILM = [
    str(ROOT / "configs" / "avdigits_film.yaml"),
    "data.avdigits.limit=200",
    "model.hidden_dim=2048",
    "model.feature_dim=512",
    "train.epochs=1",
    "train.probe=false",
    "train.batch_size=32",
    "train.log_every=1",
]
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_CBWR", "OMP_DYNAMIC", "MKL_DYNAMIC")


def _start(out: Path, name: str, *overrides: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    command = [sys.executable, "-m", "harmonia", "train", *FILM, f"out_dir={out}", f"name={name}", *overrides]
    return subprocess.Popen([*command, "--quiet"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _logged(out: Path, name: str) -> list[dict]:
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if "seconds" not in k} for row in rows]


def _wait(*procs: subprocess.Popen) -> None:
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="compares 1 and 2 threads")
def test_any_threads_gives_the_same_numbers_at_1_and_2_threads(tmp_path: Path) -> None:
    strict = "train.reproducibility=any_threads"
    _wait(_start(tmp_path, "one", strict, "train.num_threads=1"))
    _wait(_start(tmp_path, "two", strict, "train.num_threads=2"))
    one, two = _logged(tmp_path, "one"), _logged(tmp_path, "two")
    assert len(one) > 5 and one == two


def test_runs_on_a_loaded_machine_give_the_same_numbers(tmp_path: Path) -> None:
    """Two runs at once, each loading the cores the other uses, agree in every number."""
    _wait(_start(tmp_path, "a"), _start(tmp_path, "b"))
    a, b = _logged(tmp_path, "a"), _logged(tmp_path, "b")
    assert len(a) > 5 and a == b
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["num_threads"] >= 1
