"""Builders of the classification datasets the config names (``data.name``), registered in
:mod:`harmonia.app.registry`. Each takes the trainer (for its config, rank and progress setting) and an
optional already-loaded dataset, and returns a :class:`~harmonia.data.sources.ClassificationData`."""

from __future__ import annotations

from typing import Any

from harmonia.data.avdigits import AVDigits, check_modalities, load_avdigits
from harmonia.data.sources import ClassificationData, InMemoryData, PreparedData

#: datasets read from a folder that ``harmonia prep`` wrote (data.root); classification, audio + visual
PREPARED_DATASETS = ("cremad", "kinetics_sounds", "vggsound", "ave")


def avdigits(trainer: Any, dataset: AVDigits | None) -> ClassificationData:
    """The embedded AV-Digits (built and cached on first use), or ``dataset`` when one is given."""
    cfg = trainer.cfg.data
    loaded = dataset or load_avdigits(cfg.avdigits_recipe(), progress=trainer.progress)
    check_modalities(cfg.modalities, loaded.modalities)
    return InMemoryData(loaded, list(cfg.modalities))


def prepared(trainer: Any, dataset: Any) -> ClassificationData:
    """A folder written by ``harmonia prep`` (CREMA-D, Kinetics-Sounds, VGGSound, AVE)."""
    cfg = trainer.cfg.data
    return PreparedData(
        cfg.root,
        cfg.name,
        list(cfg.modalities),
        frames=cfg.frames,
        image_size=cfg.image_size,
        num_workers=cfg.num_workers,
        seed=trainer.cfg.train.seed,
    )
