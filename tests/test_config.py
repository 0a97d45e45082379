from __future__ import annotations

import dataclasses
import enum
from pathlib import Path

import pytest
import torch

from harmonia.app.build import build_balancing, build_model
from harmonia.app.config import (
    ExperimentConfig,
    OptimConfig,
    OptimizerKind,
    TrainConfig,
    apply_overrides,
    dump_config,
    from_dict,
    load_config,
    schema_of,
    settings_from,
    to_dict,
)
from harmonia.app.datasets import PREPARED_DATASETS
from harmonia.data.avdigits import AVDigitsRecipe
from harmonia.data.trimodal import TriModalRecipe
from harmonia.errors import ConfigError
from harmonia.models.fusion import FusionKind
from harmonia.settings import setting

REPO = Path(__file__).resolve().parents[1]


#: the number of classes of each prepared dataset (its inputs: audio 1 channel, visual 3)
PREPARED_SHAPES = {
    "cremad": 6,
    "kinetics_sounds": 31,
    "vggsound": 309,
    "ave": 28,
}


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path: Path, tmp_path: Path) -> None:
    """Every config loads; a config of a prepared dataset also builds its model and its balancing methods
    (a method refuses a fusion head it cannot work with, e.g. MLA without ``sum``, only at build)."""
    cfg = load_config(path)
    assert cfg.data.modalities
    if cfg.data.name not in PREPARED_DATASETS:
        return
    assert set(PREPARED_SHAPES) == set(PREPARED_DATASETS)
    modalities = list(cfg.data.modalities)
    model = build_model(cfg.model, modalities, {"audio": 1, "visual": 3}, PREPARED_SHAPES[cfg.data.name])
    entries = []
    for entry in cfg.balance:
        settings = entry.settings
        if entry.name == "umt":  # its teachers are trained runs: stand in a checkpoint of this very model
            torch.save({"model": model.state_dict()}, tmp_path / "teacher.pt")
            teachers = {m: str(tmp_path / "teacher.pt") for m in settings.teachers}
            settings = dataclasses.replace(settings, teachers=teachers)
        entries.append((entry.name, settings))
    callback = build_balancing(entries, model, seed=cfg.train.seed)
    assert (callback is None) == (not cfg.balance)


def test_defaults_and_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None, [])
    assert cfg.model.fusion is FusionKind.CONCAT
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "c.yaml") == cfg


def test_overrides_are_typed_and_nested() -> None:
    cfg = load_config(
        None,
        [
            "optim.lr=0.5",
            "optim.name=adam",
            "data.modalities=[image]",
            "model.fusion=film",
            "data.avdigits.audio_snr_db=null",
        ],
    )
    assert cfg.optim.lr == 0.5 and cfg.optim.name is OptimizerKind.ADAM
    assert cfg.data.modalities == ["image"]
    assert cfg.model.fusion is FusionKind.FILM
    assert cfg.data.avdigits.audio_snr_db is None


def test_int_is_accepted_for_float_but_not_the_reverse() -> None:
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match=r"train\.epochs: expected an integer, got 2\.5"):
        load_config(None, ["train.epochs=2.5"])


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("optim.lrr=0.1", r"unknown config key 'optim\.lrr'; did you mean 'optim\.lr'\?"),
        ("trian.epochs=3", r"unknown config key 'trian'; did you mean 'train'\?"),
        ("data.avdigits.audio_snr=3", r"did you mean 'data\.avdigits\.audio_snr_db'"),
        (
            "model.fusion=concatt",
            r"model\.fusion: 'concatt' is not a valid choice \(did you mean 'concat'\?\)",
        ),
        ("optim.lr=fast", r"optim\.lr: expected a number, got 'fast'"),
        ("optim.lr=-1", r"optim\.lr: must be > 0"),
        ("train.probe=yes please", r"train\.probe: expected true or false"),
        ("data.modalities=audio", r"data\.modalities: expected a list of str"),
        ("data.modalities=[]", r"at least one modality"),
        ("data.modalities=[audio, audio]", r"lists a modality twice"),
        ("task=regress", r"task: 'regress' is not a valid choice; choose one of 'classify', 'pretrain'"),
        ("task=pretrain", r"task=pretrain trains on data.name=trimodal_avdigits or shards, not avdigits"),
        ("data.name=mnist", r"data.name: unknown dataset 'mnist'"),
        ("optim=3", r"optim: expected a mapping"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_malformed_override_and_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("optim: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_to_dict_is_plain_data() -> None:
    data = to_dict(load_config(None, []))
    assert data["model"]["fusion"] == "concat"
    assert from_dict(ExperimentConfig, data) == load_config(None, [])


def test_configs_built_in_python_get_enums_and_checks() -> None:
    from harmonia.app.config import EncoderKind, ModelConfig, ScheduleKind

    assert OptimConfig(name="sgd", schedule="cosine").name is OptimizerKind.SGD
    assert OptimConfig(schedule="cosine").schedule is ScheduleKind.COSINE
    assert ModelConfig(encoder="conv").encoder is EncoderKind.CONV
    with pytest.raises(ConfigError, match=r"optim\.name: 'sgdd' is not a valid choice"):
        OptimConfig(name="sgdd")


def test_exponent_floats_from_yaml(tmp_path: Path) -> None:
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == pytest.approx(1e-3)
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 5e-4\n")
    assert load_config(tmp_path / "c.yaml").optim.lr == pytest.approx(5e-4)


@pytest.mark.parametrize("name", ["", "..", "../escape", "a/b", "-x"])
def test_run_names_must_be_plain_folder_names(name: str) -> None:
    with pytest.raises(ConfigError, match="not a plain folder name"):
        load_config(None, [f"name='{name}'"])


def test_benchmark_defaults_are_the_concat_config() -> None:
    assert load_config(REPO / "configs" / "avdigits_concat.yaml") == load_config(
        None, ["name=avdigits_concat"]
    )


# --------------------------------------------------------------------------------------------------
# library settings dataclasses as schemas


class _Shape(str, enum.Enum):
    ROUND = "round"
    SQUARE = "square"


@dataclasses.dataclass
class _Inner:
    depth: int = setting(2, help="layers", ge=1)


@dataclasses.dataclass
class _Recipe:
    """A small settings dataclass, as the library declares them."""

    rate: float = setting(0.5, help="how often", ge=0, le=1)
    count: int | None = setting(None, help="how many", ge=1)
    sizes: list[int] = setting(default_factory=lambda: [1, 2], help="sizes")
    shape: _Shape = setting(_Shape.ROUND, help="shape")
    inner: _Inner = setting(default_factory=_Inner, help="nested settings")


def test_settings_from_builds_the_dataclass() -> None:
    recipe = settings_from(
        _Recipe, {"rate": "1e-1", "shape": "square", "sizes": [3], "inner": {"depth": 4}}, "algo"
    )
    assert recipe == _Recipe(rate=0.1, sizes=[3], shape=_Shape.SQUARE, inner=_Inner(depth=4))
    assert settings_from(_Recipe, {}, "algo") == _Recipe()
    assert schema_of(_Recipe) is schema_of(_Recipe)
    assert schema_of(_Recipe).model_fields["rate"].description == "how often"


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        (
            {"rat": 0.1},
            r"unknown config key 'algo\.rat'; did you mean 'algo\.rate'\? Valid keys here: algo\.rate",
        ),
        ({"rate": 2}, r"algo\.rate: must be <= 1, got 2\.0 \(how often\)"),
        ({"inner": {"depth": 0}}, r"algo\.inner\.depth: must be >= 1, got 0 \(layers\)"),
        ({"inner": {"dpth": 3}}, r"did you mean 'algo\.inner\.depth'"),
        ({"count": True}, r"algo\.count: expected an integer, got True"),
        ({"sizes": [1, 2.5]}, r"algo\.sizes\[1\]: expected an integer, got 2\.5"),
        ({"shape": "rond"}, r"algo\.shape: 'rond' is not a valid choice \(did you mean 'round'\?\)"),
        ({"inner": 3}, r"algo\.inner: expected a mapping of settings, got 3"),
    ],
)
def test_settings_from_names_the_prefixed_key(data: dict[str, object], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        settings_from(_Recipe, data, "algo")


def test_recipe_sections_give_the_library_dataclasses() -> None:
    cfg = load_config(None, ["data.avdigits.limit=40", "data.trimodal.frames=4"])
    assert cfg.data.avdigits_recipe() == AVDigitsRecipe(limit=40)
    assert cfg.data.trimodal_recipe() == TriModalRecipe(frames=4)
    with pytest.raises(ConfigError, match=r"data\.avdigits\.limit: must be >= 30, got 3 \(use only"):
        load_config(None, ["data.avdigits.limit=3"])


def test_bool_is_not_an_int() -> None:
    with pytest.raises(ConfigError, match=r"train\.epochs: expected an integer, got True"):
        load_config(None, ["train.epochs=true"])
    with pytest.raises(ConfigError, match=r"train\.epochs: expected an integer, got 'abc'"):
        load_config(None, ["train.epochs=abc"])
    with pytest.raises(ConfigError, match=r"train\.seed: expected an integer, got False"):
        TrainConfig(seed=False)


def test_configs_built_in_python_keep_working() -> None:
    cfg = ExperimentConfig(train=TrainConfig(epochs=2))
    assert cfg.train.epochs == 2 and TrainConfig(seed=1).seed == 1
    cfg.train.epochs = 3
    assert to_dict(cfg)["train"]["epochs"] == 3
    with pytest.raises(ConfigError, match=r"optim\.lr: must be > 0, got -1\.0 \(learning rate\)"):
        OptimConfig(lr=-1)
    with pytest.raises(ConfigError, match=r"data: expected a mapping of settings, got 3"):
        ExperimentConfig(data=3)


def test_list_index_overrides() -> None:
    data = {"balance": [{"method": "ogm", "alpha": 0.1}]}
    apply_overrides(data, ["balance.0.alpha=0.5", "balance.1.method=opm", "balance.1.q_base=0.3"])
    assert data == {"balance": [{"method": "ogm", "alpha": 0.5}, {"method": "opm", "q_base": 0.3}]}
    data = {"model": {"encoder_widths": [8, 16]}}
    apply_overrides(data, ["model.encoder_widths.1=32"])
    assert data == {"model": {"encoder_widths": [8, 32]}}
    with pytest.raises(ConfigError, match="not a list index"):
        apply_overrides(data, ["model.encoder_widths.x=1"])
    with pytest.raises(ConfigError, match="out of range"):
        apply_overrides(data, ["model.encoder_widths.5=1"])
    cfg = load_config(None, ["model.encoder_widths=[8, 16]", "model.encoder_widths.0=4"])
    assert cfg.model.encoder_widths == [4, 16]
