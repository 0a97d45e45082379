from __future__ import annotations

from pathlib import Path

import pytest

from harmonia.app.config import (
    ExperimentConfig,
    OptimizerKind,
    apply_overrides,
    dump_config,
    from_dict,
    load_config,
    to_dict,
)
from harmonia.errors import ConfigError
from harmonia.models.fusion import FusionKind

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.data.modalities


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
    from harmonia.app.config import EncoderKind, ModelConfig, OptimConfig, ScheduleKind

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
