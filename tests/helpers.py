"""Plain helpers shared by the tests: the tiny AV-Digits recipe and tiny experiment configs.

Tests import these with ``from helpers import ...``; ``conftest.py`` keeps only fixtures and hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from harmonia.app.config import ExperimentConfig, load_config
from harmonia.app.logs import read_metrics
from harmonia.app.train import Callback, Trainer, TrainResult

TINY_RECIPE = {
    "limit": 150,
    "voice_accents": ["en-us", "en"],
    "voice_variants": ["f1", "m1", "m3", "f4"],
    "audio_snr_db": 10.0,
}


def tiny_experiment(out_dir: Path, *overrides: str) -> ExperimentConfig:
    """A config that trains in about a second per epoch on the tiny recipe."""
    recipe = [f"data.avdigits.{k}={v!r}".replace("'", "") for k, v in TINY_RECIPE.items()]
    return load_config(
        None,
        [
            *recipe,
            f"out_dir={out_dir}",
            "name=tiny",
            "model.feature_dim=16",
            "model.encoder_widths=[8, 16]",
            "model.hidden_dim=16",
            "train.epochs=3",
            "train.batch_size=32",
            "train.log_every=1",
            *overrides,
        ],
    )


def tiny_pretrain_overrides() -> list[str]:
    """The tiny recipe and a small pre-training model, as dotted overrides (for benchmark calls)."""
    recipe = [f"data.avdigits.{k}={v!r}".replace("'", "") for k, v in TINY_RECIPE.items()]
    return [
        *recipe,
        "pretrain.width=16",
        "pretrain.depth=1",
        "pretrain.heads=2",
        "pretrain.embed_dim=16",
        "train.epochs=1",
        "train.batch_size=16",
    ]


def tiny_pretrain(out_dir: Path, *overrides: str) -> ExperimentConfig:
    """Tri-modal pre-training on the tiny recipe, about a second per epoch."""
    recipe = [f"data.avdigits.{k}={v!r}".replace("'", "") for k, v in TINY_RECIPE.items()]
    return load_config(
        None,
        [
            *recipe,
            f"out_dir={out_dir}",
            "name=tiny_pretrain",
            "task=pretrain",
            "data.name=trimodal_avdigits",
            "data.modalities=[video,audio,text]",
            "pretrain.width=16",
            "pretrain.depth=1",
            "pretrain.heads=2",
            "pretrain.embed_dim=16",
            "optim.name=adamw",
            "optim.lr=0.003",
            "train.epochs=2",
            "train.batch_size=16",
            "train.log_every=1",
            *overrides,
        ],
    )


class Interrupt(Callback):
    """Simulates a kill: raises KeyboardInterrupt before the forward pass of global step ``at_step``."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def before_forward(self, trainer: Trainer, batch: dict) -> None:
        if trainer.global_step == self.at_step:
            raise KeyboardInterrupt


@dataclass
class ResumeRun:
    """What :func:`train_interrupted_and_resumed` leaves for the test's own checks."""

    full: Trainer  # the uninterrupted run, after fit
    full_result: TrainResult
    steps: list[dict]  # the step records of the uninterrupted run's metrics.jsonl
    resumed: TrainResult  # the interrupted and resumed run


def train_interrupted_and_resumed(
    tmp_path: Path, *overrides: str, at_epoch: int = 1, into_epoch: int = 1
) -> ResumeRun:
    """Trains the tiny experiment fully in ``tmp_path/a``, then in ``tmp_path/b`` with a kill at global step
    ``at_epoch * steps_per_epoch + into_epoch`` and a resume; asserts that every step of the full run is
    logged and that the resumed run ends with the same test metrics."""
    full = Trainer(tiny_experiment(tmp_path / "a", *overrides), progress=False)
    full_result = full.fit()
    steps = [r for r in read_metrics(tmp_path / "a" / "tiny" / "metrics.jsonl") if r["kind"] == "step"]
    assert len(steps) == full.global_step

    cfg = tiny_experiment(tmp_path / "b", *overrides)
    at_step = at_epoch * len(full.train_loader) + into_epoch
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, [Interrupt(at_step=at_step)], progress=False).fit()
    resumed = Trainer(cfg, resume=True, progress=False).fit()
    assert resumed.test == full_result.test
    return ResumeRun(full, full_result, steps, resumed)
