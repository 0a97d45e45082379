"""From each dataset's raw layout to training: `harmonia prep` on generated fixtures (a corrupt file
reported and skipped, a rerun idempotent), then `harmonia train` with a paper-recipe config on the
prepared folder."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from avfixtures import RAW_LAYOUTS
from harmonia.app.cli import main
from harmonia.app.config import OptimizerKind, load_config
from harmonia.app.datasets import PREPARED_DATASETS
from harmonia.app.registry import BALANCING
from harmonia.data.raw_layouts import SCANNERS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: the config each dataset's fixture trains with (between them, every balancing method)
TRAINED_WITH = {
    "cremad": "cremad_opm_ogm",
    "kinetics_sounds": "kinetics_sounds_ogm_ge",
    "vggsound": "vggsound_opm",
    "ave": "ave_baseline",
}
SMALL = [
    "train.device=cpu",
    "train.epochs=1",
    "train.batch_size=2",
    "train.eval_batch_size=2",
    "data.image_size=32",
    "data.num_workers=0",
]


def _prepare(dataset: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> Path:
    src, dst = tmp_path / "raw", tmp_path / "prepared"
    RAW_LAYOUTS[dataset](src)
    args = ["prep", dataset, "--src", str(src), "--dst", str(dst), "--workers", "2", "--quiet"]
    assert main(args) == 0
    report = json.loads((dst / "prep_report.json").read_text())
    assert [f["reason"] for f in report["failed"]] and "cannot open" in report["failed"][0]["reason"]
    capsys.readouterr()
    assert main(args) == 0
    assert "prepared 0 clips" in capsys.readouterr().out  # idempotent
    return dst


@pytest.mark.integration
@pytest.mark.parametrize("dataset", sorted(TRAINED_WITH))
def test_each_dataset_goes_from_its_raw_layout_to_training(
    dataset: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    dst = _prepare(dataset, tmp_path, capsys)
    name = TRAINED_WITH[dataset]
    overrides = [f"data.root={dst}", f"out_dir={tmp_path / 'runs'}", *SMALL]
    assert main(["train", str(CONFIGS / f"{name}.yaml"), "--quiet", *overrides]) == 0
    run = tmp_path / "runs" / name
    results = json.loads((run / "results.json").read_text())
    # two test clips (one per class) after one epoch on four: no accuracy level is guaranteed, but it is a
    # count over exactly those two clips (a dropped or repeated clip, or a mean of batch means that weighs
    # them unequally, gives another value)
    assert results["test"]["accuracy"] in (0.0, 0.5, 1.0)
    assert set(results["probe"]) == {"audio", "visual"}
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert state["global_step"] == 2  # 4 training clips in batches of 2
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epoch = next(s for s in steps if s["kind"] == "epoch")
    assert torch.isfinite(torch.tensor(epoch["train/loss"]))
    assert ("val/accuracy" in epoch) == (dataset in ("kinetics_sounds", "ave"))  # splits the dataset has


@pytest.mark.integration
def test_prepared_training_resumes_exactly_with_worker_processes(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Two epochs in one go equal one epoch, a stop, and a resumed second epoch (frame choice and
    augmentation drawn in DataLoader workers depend on (seed, epoch, clip) only)."""
    dst = _prepare("cremad", tmp_path, capsys)
    config = str(CONFIGS / "cremad_opm_ogm.yaml")
    common = [f"data.root={dst}", f"out_dir={tmp_path / 'runs'}", *SMALL, "train.probe=false"]
    common.append("data.num_workers=2")
    assert main(["train", config, "--quiet", *common, "train.epochs=2", "name=whole"]) == 0
    assert main(["train", config, "--quiet", *common, "train.epochs=1", "name=split"]) == 0
    assert main(["train", config, "--quiet", *common, "train.epochs=2", "name=split", "--resume"]) == 0
    whole, split = (
        torch.load(tmp_path / "runs" / n / "checkpoints" / "last.pt", weights_only=False)["model"]
        for n in ("whole", "split")
    )
    for key, value in whole.items():
        torch.testing.assert_close(split[key], value, msg=key)


@pytest.mark.integration
def test_a_prepared_folder_of_another_dataset_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    dst = _prepare("vggsound", tmp_path, capsys)
    config = str(CONFIGS / "cremad_baseline.yaml")
    assert main(["train", config, "--quiet", f"data.root={dst}", f"out_dir={tmp_path}", *SMALL]) == 2
    assert "holds a prepared 'vggsound' dataset" in capsys.readouterr().err
    assert main(["train", config, "--quiet", f"out_dir={tmp_path}", "data.root=null", *SMALL]) == 2
    assert "harmonia prep cremad" in capsys.readouterr().err


#: (optim.name, lr, schedule, step_size, epochs, batch) of the paper configs: the OGM-GE repository's main.py
#: defaults, but for the configs that follow the method's own official run on that dataset (each cited in its
#: header)
SHARED_RECIPE = ("sgd", 1e-3, "step", 70, 100, 64)
OFFICIAL_RECIPES = {
    "cremad_mmpareto": ("sgd", 2e-3, "none", None, 50, 64),  # mmpareto.sh + MMPareto.py
    "cremad_relearn": ("sgd", 2e-3, "none", None, 90, 64),  # ours.sh + ours.py
    "cremad_lfm": ("sgd", 1e-2, "step", 70, 200, 64),  # Crema_epoch.py + data/crema.json
    "cremad_mmcosine": ("sgd", 1e-3, "step", 100, 200, 32),  # main_CD.py
    "cremad_reconboost": ("sgd", 1e-2, "step", 240, 800, 64),  # README command + train.py
    "kinetics_sounds_valuation": ("adam", 5e-5, "step", 30, 60, 64),  # sample_level.py
}
#: heads other than concat: MLA's shared head is a tied sum head; UME's branches are separate only with sum
FUSION = {"mla": "sum", "ume": "sum"}
#: the two-method and OGM-GE configs are named after the combination, the others after their one method
COMBINED = {("ogm",): "ogm_ge", ("ogm", "opm"): "opm_ogm"}
#: the config file of a method named otherwise: OGM's paper configs run OGM-GE (`ogm` with ge: true)
CONFIG_OF = {"ogm": "ogm_ge"}


def _paper_configs() -> list[tuple[Path, str]]:
    """Every config of a prepared dataset, with its dataset."""
    found = []
    for path in sorted(CONFIGS.glob("*.yaml")):
        dataset = next((d for d in PREPARED_DATASETS if path.stem.startswith(d + "_")), None)
        if dataset is not None:
            found.append((path, dataset))
    return found


def test_paper_configs_follow_the_published_recipe() -> None:
    """Every dataset has a paper config per method; each one keeps the recipe its header cites."""
    assert set(SCANNERS) == set(PREPARED_DATASETS)
    for path, dataset in _paper_configs():
        cfg = load_config(path)
        assert cfg.data.name == dataset and cfg.name == path.stem
        assert cfg.data.modalities == ["audio", "visual"] and cfg.model.encoder.value == "resnet18"
        o, stem = cfg.optim, path.stem
        recipe = (o.name.value, o.lr, o.schedule.value, o.step_size if o.schedule.value == "step" else None)
        assert (*recipe, cfg.train.epochs, cfg.train.batch_size) == OFFICIAL_RECIPES.get(stem, SHARED_RECIPE)
        assert o.name is not OptimizerKind.SGD or o.momentum == 0.9
        methods = {entry.name: entry.settings for entry in cfg.balance}
        suffix = stem[len(dataset) + 1 :]
        if len(methods) == 1 and tuple(methods) not in COMBINED:
            assert suffix == next(iter(methods)), path.name
        elif methods:
            assert suffix == COMBINED[tuple(sorted(methods))], path.name
        else:
            assert suffix == "baseline"
        assert cfg.model.fusion.value == FUSION.get(suffix, "concat"), path.name
        if "ogm" in methods:
            assert methods["ogm"].alpha == (0.1 if dataset == "vggsound" else 0.8) and methods["ogm"].ge
        if "opm" in methods:
            s = methods["opm"]
            assert (s.q_base, s.lam, s.p_exe) == (0.5, 0.5, 0.7)
        header = path.read_text().split("\nname:")[0]
        assert "Target:" in header and f"harmonia prep {dataset}" in header, path.name
        assert f"harmonia train configs/{path.name}" in header, path.name
        assert f"{cfg.train.epochs} epochs" in header and f"batch {cfg.train.batch_size}" in header, path.name
        # every setting a config moves off its method's default is a value its header states (and sources)
        for name, settings in methods.items():
            for field in dataclasses.fields(settings):
                value = getattr(settings, field.name)
                if isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                if field.default is dataclasses.MISSING or value != field.default:
                    assert f"{value:g}" in header, f"{path.name}: {name}.{field.name} = {value}"


def test_every_balancing_method_has_a_cremad_and_a_kinetics_sounds_config() -> None:
    # harmonia's own methods (docs/extending.md's example registers a ModDrop while the suite runs)
    own = [m for m in BALANCING.names() if BALANCING.get(m).__module__.startswith("harmonia.balance.")]
    assert len(own) >= 19
    for method in own:
        for dataset in ("cremad", "kinetics_sounds"):
            path = CONFIGS / f"{dataset}_{CONFIG_OF.get(method, method)}.yaml"
            assert path.is_file(), f"{method}: no {path.name} (add it: docs/datasets.md)"
            names = [entry.name for entry in load_config(path).balance]
            assert names == ["ogm"] if method == "ogm_ge" else method in names, path.name


@pytest.mark.integration
def test_a_cremad_validation_list_feeds_the_methods_that_read_one(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """cremad_gblending (as cremad_relearn) reads a validation split, which CREMA-D gets from a ``val.csv``
    next to the split lists: a prep rerun moves those clips, and G-Blending's epoch-end estimate reads them.
    """
    dst = _prepare("cremad", tmp_path, capsys)
    rows = (tmp_path / "raw" / "train.csv").read_text().splitlines()
    (tmp_path / "raw" / "val.csv").write_text("\n".join(rows[:2]) + "\n")  # one ANG, one HAP clip
    assert main(["prep", "cremad", "--src", str(tmp_path / "raw"), "--dst", str(dst), "--quiet"]) == 0
    overrides = [f"data.root={dst}", f"out_dir={tmp_path / 'runs'}", *SMALL, "train.probe=false"]
    assert main(["train", str(CONFIGS / "cremad_gblending.yaml"), "--quiet", *overrides]) == 0
    steps = [json.loads(line) for line in (tmp_path / "runs" / "cremad_gblending" / "metrics.jsonl").open()]
    epoch = next(s for s in steps if s["kind"] == "epoch")
    assert "val/accuracy" in epoch and "balance/gblending/loss_val/fused" in epoch


@pytest.mark.integration
def test_umt_config_runs_after_the_teacher_runs_its_header_lists(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The two unimodal baseline runs of the header write the checkpoints the config's relative `teachers`
    paths name (from the folder harmonia runs in); the UMT run then distils both."""
    dst = _prepare("kinetics_sounds", tmp_path, capsys)
    monkeypatch.chdir(tmp_path)
    # batches of all four training clips: with two, the teachers' batch-norm statistics after one step are
    # too degenerate for eval mode (their features blow up; a fixture artifact, not UMT's)
    small = [f"data.root={dst}", *SMALL, "train.batch_size=4", "train.probe=false", "train.log_every=1"]
    baseline = str(CONFIGS / "kinetics_sounds_baseline.yaml")
    for modality in ("audio", "visual"):
        teacher = [f"data.modalities=[{modality}]", f"name=kinetics_sounds_teacher_{modality}"]
        assert main(["train", baseline, "--quiet", *small, *teacher]) == 0
    assert main(["train", str(CONFIGS / "kinetics_sounds_umt.yaml"), "--quiet", *small]) == 0
    run = tmp_path / "runs" / "kinetics_sounds_umt"
    steps = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    step = next(s for s in steps if s["kind"] == "step")
    assert step["balance/umt/distill/audio"] > 0 and step["balance/umt/distill/visual"] > 0
