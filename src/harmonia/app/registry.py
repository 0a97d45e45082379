"""The plug-in points of the application: one registry per kind, each entry one line.

* ``DATASETS``: name -> :class:`DatasetSpec` (the task it serves and a builder ``build(trainer, dataset)``;
  a ``classify`` builder returns a :class:`~harmonia.data.sources.ClassificationData`, a ``pretrain``
  builder sets the trainer's dataset, model and loader);
* ``MODELS``: name -> ``build(model_cfg, modalities, input_channels, num_classes) -> nn.Module`` for
  ``task: classify`` (the model must follow the output contract of
  :class:`~harmonia.models.MultimodalClassifier`);
* ``BALANCING``: name -> a :class:`~harmonia.balance.BalancingMethod` class (its ``Settings`` dataclass is
  the schema of its config entry);
* ``BACKWARD``: name -> a backward strategy factory ``(trainer) -> strategy`` (``plain``: ``loss.backward()``;
  ``harmonize``: the gradient harmonizer).

Adding a method, a dataset or a model is one new module plus one ``register`` line below (see
docs/extending.md). Nothing here imports the config, so the config can validate names against these.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from harmonia.app import backward, datasets, pretrain_data
from harmonia.balance import (
    AGM,
    CML,
    LFM,
    MBSD,
    MLA,
    OGM,
    OGMGE,
    OPM,
    PMR,
    UME,
    UMT,
    AMCo,
    BalancingMethod,
    GBlending,
    Greedy,
    MMCosine,
    MMPareto,
    ReconBoost,
    Relearn,
    SampleValuation,
)
from harmonia.errors import ConfigError
from harmonia.models.build import build_classifier
from harmonia.models.encoders import EncoderKind

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> objects of one kind, with an error that lists the choices (and the closest one)."""

    def __init__(self, kind: str, key: str) -> None:
        self.kind, self.key = kind, key
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        if name not in self._entries:
            close = difflib.get_close_matches(name, list(self._entries), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{self.key}: unknown {self.kind} {name!r}{hint}; available: {', '.join(self._entries)}"
            )
        return self._entries[name]

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset the trainer can load by name: the task it serves and how to build it."""

    task: str  # "classify" or "pretrain"
    build: Callable[[Any, Any], Any]
    needs_root: bool = False  # read from the folder data.root (written by harmonia prep)


DATASETS: Registry[DatasetSpec] = Registry("dataset", "data.name")
DATASETS.register("avdigits", DatasetSpec("classify", datasets.avdigits))
for _name in datasets.PREPARED_DATASETS:
    DATASETS.register(_name, DatasetSpec("classify", datasets.prepared, needs_root=True))
DATASETS.register("trimodal_avdigits", DatasetSpec("pretrain", pretrain_data.trimodal_avdigits))
DATASETS.register("shards", DatasetSpec("pretrain", pretrain_data.shards))


def classifier(cfg: Any, modalities: list[str], input_channels: Any, num_classes: int) -> Any:
    """The ``model`` section's encoders and fusion head (:func:`~harmonia.models.build_classifier`)."""
    return build_classifier(
        modalities,
        input_channels,
        num_classes,
        encoder=EncoderKind(cfg.encoder),
        feature_dim=cfg.feature_dim,
        encoder_widths=cfg.encoder_widths,
        fusion=cfg.fusion,
        hidden_dim=cfg.hidden_dim,
    )


MODELS: Registry[Callable[..., Any]] = Registry("model", "model.name")
MODELS.register("classifier", classifier)

BALANCING: Registry[type[BalancingMethod]] = Registry("balancing method", "balance[].name")
BALANCING.register("ogm", OGM)
BALANCING.register("ogm_ge", OGMGE)
BALANCING.register("opm", OPM)
BALANCING.register("cml", CML)
BALANCING.register("mmpareto", MMPareto)
BALANCING.register("agm", AGM)
BALANCING.register("lfm", LFM)
BALANCING.register("amco", AMCo)
BALANCING.register("pmr", PMR)
BALANCING.register("relearn", Relearn)
BALANCING.register("ume", UME)
BALANCING.register("umt", UMT)
BALANCING.register("gblending", GBlending)
BALANCING.register("mla", MLA)
BALANCING.register("mmcosine", MMCosine)
BALANCING.register("reconboost", ReconBoost)
BALANCING.register("valuation", SampleValuation)
BALANCING.register("mbsd", MBSD)
BALANCING.register("greedy", Greedy)

BACKWARD: Registry[Callable[[Any], Any]] = Registry("backward strategy", "backward")
BACKWARD.register("plain", backward.plain)
BACKWARD.register("harmonize", backward.harmonize)


def datasets_of(task: str) -> list[str]:
    return [name for name in DATASETS if DATASETS.get(name).task == task]
