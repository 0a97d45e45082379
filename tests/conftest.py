from __future__ import annotations

import os
from pathlib import Path

import pytest

from harmonia.app.config import AVDigitsRecipe, ExperimentConfig, load_config


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test builds datasets into a private cache, never the user's."""
    cache = tmp_path_factory.mktemp("harmonia-cache")
    old = os.environ.get("HARMONIA_CACHE")
    os.environ["HARMONIA_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("HARMONIA_CACHE", None)
    else:
        os.environ["HARMONIA_CACHE"] = old


TINY_RECIPE = {
    "limit": 150,
    "voice_accents": ["en-us", "en"],
    "voice_variants": ["f1", "m1", "m3", "f4"],
    "audio_snr_db": 10.0,
}


@pytest.fixture
def tiny_recipe() -> AVDigitsRecipe:
    return AVDigitsRecipe(**TINY_RECIPE)


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
