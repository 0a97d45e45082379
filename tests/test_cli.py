from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from harmonia.app.cli import main
from harmonia.app.config import dump_config
from harmonia.errors import ConfigError
from helpers import TINY_RECIPE, tiny_experiment

RECIPE_ARGS = [f"{k}={v!r}".replace("'", "") for k, v in TINY_RECIPE.items()]


def _tiny_yaml(tmp_path: Path, *overrides: str) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(dump_config(tiny_experiment(tmp_path / "runs", *overrides)))
    return path


@pytest.mark.integration
def test_data_command_prints_statistics(capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "avdigits", *RECIPE_ARGS, "--quiet", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert sum(s["size"] for s in summary["splits"].values()) == TINY_RECIPE["limit"]
    assert set(summary["raw_input_linear_accuracy"]) == {"audio", "image"}
    assert main(["data", "avdigits", *RECIPE_ARGS, "--quiet"]) == 0
    assert "unimodal difficulty" in capsys.readouterr().out


@pytest.mark.integration
def test_train_command_prints_accuracy_and_probes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = _tiny_yaml(tmp_path)
    assert main(["train", str(config), "--quiet", "train.epochs=1"]) == 0  # overrides after flags work
    out = capsys.readouterr().out
    assert "test accuracy" in out and "linear-probe accuracy" in out and "image" in out
    assert main(["train", str(config), "--quiet", "train.epochs=1"]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["optim.lrr=0.1"], "did you mean 'optim.lr'"),
        (["model.fusion=late"], "choose one of 'concat', 'sum', 'film', 'gated'"),
        (["train.epochs=two"], "train.epochs: expected an integer"),
    ],
)
def test_train_command_reports_config_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    assert main(["train", str(_tiny_yaml(tmp_path)), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("harmonia: error:") and message in err


@pytest.mark.integration
def test_bench_imbalance_writes_a_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = _tiny_yaml(tmp_path, "train.epochs=1")
    assert (
        main(
            [
                "bench",
                "imbalance",
                "--config",
                str(config),
                "--seeds",
                "2",
                "--out",
                str(tmp_path / "b"),
                "--quiet",
            ]
        )
        == 0
    )
    report = (tmp_path / "b" / "imbalance" / "imbalance.md").read_text()
    assert "| audio |" in report and "| image |" in report and "harmonia bench imbalance" in report
    data = json.loads((tmp_path / "b" / "imbalance" / "imbalance.json").read_text())
    for row in data["rows"]:
        assert len(row["alone"]) == len(row["joint"]) == 2
        assert row["gap"] == pytest.approx([a - j for a, j in zip(row["alone"], row["joint"], strict=True)])
    assert (tmp_path / "b" / "imbalance" / "imbalance.png").stat().st_size > 1000


def test_bench_imbalance_needs_two_modalities(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = _tiny_yaml(tmp_path, "data.modalities=[image]")
    assert main(["bench", "imbalance", "--config", str(config), "--out", str(tmp_path / "b"), "--quiet"]) == 2
    assert "only ['image']" in capsys.readouterr().err


@pytest.mark.integration
def test_bench_balance_writes_report_plots_and_speed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from harmonia.app.bench.balance import run_balance_benchmark

    tiny = [o for o in _tiny_overrides() if not o.startswith(("name=", "out_dir="))]
    summary = run_balance_benchmark(
        seeds=2,
        out_dir=tmp_path,
        methods=["ogm_ge", "umt", "mla"],
        overrides=[*tiny, "train.epochs=1"],
        speed_steps=2,
        speed_rounds=1,
        progress=False,
    )
    out = tmp_path / "balance"
    report = (out / "balance.md").read_text()
    assert "| concat | ogm_ge |" in report and "| sum | mla |" in report and "imbalance degree" in report
    assert "--methods ogm_ge umt mla" in report
    assert (out / "balance.png").stat().st_size > 1000 and (out / "balance_curves.png").stat().st_size > 1000
    assert list(summary["runs"]) == [
        "concat/none",
        "concat/ogm_ge",
        "concat/umt",
        "sum/none",
        "sum/mla",
        "sum/ogm_ge",
    ]
    # UMT's teachers are the controls of the same seed
    for seed, run in enumerate(summary["runs"]["concat/umt"]):
        config = yaml.safe_load((Path(run["run_dir"]) / "config.yaml").read_text())
        teachers = config["balance"][0]["teachers"]
        assert teachers["audio"].endswith(f"alone_audio_seed{seed}/checkpoints/last.pt")
    speed = summary["speed"]
    assert set(speed) == {*summary["runs"], "none (again)"}
    assert speed["concat/none"]["ratio"] == 1.0 and speed["sum/none"]["ratio"] == 1.0
    assert speed["concat/none"]["memory_ratio"] == 1.0 and speed["sum/mla"]["peak_mib"] > 0
    # without trained teachers, UMT is timed with the untrained baseline's encoders as its teachers
    from harmonia.app.bench.balance import measure_step_times, variant_rows

    alone = measure_step_times(["concat/umt"], tiny, steps=1, rounds=1, progress=False)
    assert set(alone) == {"concat/none", "concat/umt", "none (again)"} and alone["concat/umt"]["seconds"] > 0
    # the imbalance degree of a row, recomputed from the saved probes

    row = next(r for r in variant_rows(summary) if r["variant"] == "concat/none")
    run, alone = (
        summary["runs"]["concat/none"][1],
        {m: summary["controls"][m][1]["probe"][m] for m in ("audio", "image")},
    )
    deficits = [alone[m] - run["probe"][m] for m in ("audio", "image")]
    assert row["imbalance_degree"][1] == pytest.approx(abs(deficits[0] - deficits[1]))

    # --replot redraws every figure from balance.json alone (the run folders gone), ρ/k/q curves included
    import shutil

    shutil.rmtree(out / "runs")
    (out / "balance_curves.png").unlink()
    capsys.readouterr()
    assert main(["bench", "balance", "--out", str(tmp_path), "--replot"]) == 0
    assert capsys.readouterr().out.split() == [
        "redrew",
        str(out / "balance.png"),
        "redrew",
        str(out / "balance_curves.png"),
    ]
    assert (out / "balance_curves.png").stat().st_size > 1000
    assert main(["bench", "balance-speed", "--out", str(tmp_path), "--replot"]) == 2
    assert "nothing to replot" in capsys.readouterr().err


def test_bench_balance_names_unknown_methods_and_variants() -> None:
    from harmonia.app.bench.balance import leaderboard_variants, parse_methods, run_balance_benchmark

    with pytest.raises(ConfigError, match=r"unknown balancing method 'magic'.*opm"):
        run_balance_benchmark(methods=["opm+magic"], progress=False)
    with pytest.raises(ConfigError, match="not fusion/method"):
        run_balance_benchmark(variants=["opm"], progress=False)
    every = leaderboard_variants(parse_methods(["all"]))
    assert every[0] == "concat/none" and "sum/none" in every and "sum/mla" in every
    assert "concat/mla" not in every  # MLA's shared head needs a sum fusion
    combined = leaderboard_variants(parse_methods(["opm+ogm_ge", "none"]))
    assert combined == ["concat/none", "concat/opm+ogm_ge", "sum/none", "sum/opm+ogm_ge"]
    from harmonia.app.registry import BALANCING

    assert {v.split("/")[1] for v in every} == {"none", *BALANCING.names()}


def _tiny_overrides() -> list[str]:
    from harmonia.app.config import to_dict

    def flat(d: dict, prefix: str = "") -> list[str]:
        items = []
        for k, v in d.items():
            if isinstance(v, dict):
                items += flat(v, f"{prefix}{k}.")
            else:
                items.append(f"{prefix}{k}={json.dumps(v)}")
        return items

    return flat(to_dict(tiny_experiment(Path("unused"))))


@pytest.mark.parametrize("kind", ["methods", "datasets", "models"])
def test_list_prints_every_registered_name(kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    from harmonia.app.cli import main
    from harmonia.app.registry import BALANCING, DATASETS, MODELS

    assert main(["list", kind]) == 0
    registry = {"methods": BALANCING, "datasets": DATASETS, "models": MODELS}[kind]
    assert capsys.readouterr().out.split() == registry.names()
