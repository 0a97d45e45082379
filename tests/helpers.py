"""Plain helpers shared by the tests: the tiny AV-Digits recipe and tiny experiment configs.

Tests import these with ``from helpers import ...``; ``conftest.py`` keeps only fixtures and hooks.
"""

from __future__ import annotations

from pathlib import Path

from harmonia.app.config import ExperimentConfig, load_config

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
