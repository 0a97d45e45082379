"""From each dataset's raw layout to training: `harmonia prep` on generated fixtures (a corrupt file
reported and skipped, a rerun idempotent), then `harmonia train` with a paper-recipe config on the
prepared folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from avfixtures import RAW_LAYOUTS
from harmonia.app.cli import main
from harmonia.app.config import OptimizerKind, load_config
from harmonia.app.datasets import PREPARED_DATASETS
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


def test_paper_configs_follow_the_published_recipe() -> None:
    """Every dataset has a paper config per method; each one keeps the recipe its header cites."""
    assert set(SCANNERS) == set(PREPARED_DATASETS)
    for path in sorted(CONFIGS.glob("*.yaml")):
        dataset = next((d for d in PREPARED_DATASETS if path.stem.startswith(d + "_")), None)
        if dataset is None:
            continue
        cfg = load_config(path)
        assert cfg.data.name == dataset and cfg.name == path.stem
        assert cfg.data.modalities == ["audio", "visual"] and cfg.model.encoder.value == "resnet18"
        assert cfg.optim.name is OptimizerKind.SGD and cfg.optim.lr == 1e-3 and cfg.optim.momentum == 0.9
        assert (cfg.optim.step_size, cfg.train.epochs, cfg.train.batch_size) == (70, 100, 64)
        methods = {entry.name: entry.settings for entry in cfg.balance}
        suffix = {(): "baseline", ("ogm",): "ogm_ge", ("opm",): "opm", ("ogm", "opm"): "opm_ogm"}
        assert path.stem.endswith(suffix[tuple(sorted(methods))])
        if "ogm" in methods:
            assert methods["ogm"].alpha == (0.1 if dataset == "vggsound" else 0.8) and methods["ogm"].ge
        if "opm" in methods:
            s = methods["opm"]
            assert (s.q_base, s.lam, s.p_exe) == (0.5, 0.5, 0.7)
        header = path.read_text().split("\nname:")[0]
        assert "Target:" in header and f"harmonia prep {dataset}" in header
