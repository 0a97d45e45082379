from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harmonia.app.config import dump_config
from harmonia.app.logs import read_metrics
from harmonia.app.train import Callback, Trainer, TrainResult
from harmonia.app.train.checkpoint import load_checkpoint
from harmonia.errors import CheckpointError, ConfigError, InputError, NonFiniteLossError, RunFolderExistsError
from helpers import Interrupt, tiny_experiment, train_interrupted_and_resumed

pytestmark = pytest.mark.integration  # every test here trains or spawns processes


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def _fit_and_list_untrained(trainer: Trainer) -> tuple[TrainResult, list[str]]:
    """Fits ``trainer``; returns its result and the names of the parameters that training left unchanged."""
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    result = trainer.fit()
    return result, [k for k, v in trainer.model.named_parameters() if torch.equal(v.detach(), before[k])]


def test_fit_writes_a_complete_run_folder(tmp_path: Path) -> None:
    cfg = tiny_experiment(tmp_path, "train.epochs=2")
    result = Trainer(cfg, progress=False).fit()
    run = tmp_path / "tiny"
    assert {"config.yaml", "metrics.jsonl", "results.json", "checkpoints", "tensorboard"} <= {
        p.name for p in run.iterdir()
    }
    assert set(result.test) >= {"accuracy", "macro_f1", "mAP", "unimodal_accuracy/audio"}
    assert set(result.probe) == {"audio", "image"}
    records = read_metrics(run / "metrics.jsonl")
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [0, 1]
    assert any(r["kind"] == "final" for r in records)
    assert json.loads((run / "results.json").read_text())["test"] == result.test
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    full_cfg = tiny_experiment(tmp_path / "a")
    full = Trainer(full_cfg, progress=False)
    full_result = full.fit()

    cfg = tiny_experiment(tmp_path / "b")
    steps_per_epoch = len(full.train_loader)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, [Interrupt(at_step=steps_per_epoch + 1)], progress=False).fit()  # mid epoch 2
    assert load_checkpoint(tmp_path / "b" / "tiny" / "checkpoints" / "last.pt")["epoch"] == 1
    resumed = Trainer(cfg, resume=True, progress=False)
    resumed_result = resumed.fit()

    assert resumed_result.test == full_result.test
    assert resumed_result.probe == full_result.probe
    for key, value in _params(full).items():
        torch.testing.assert_close(_params(resumed)[key], value, rtol=0, atol=0)
    epochs = [
        r["epoch"] for r in read_metrics(tmp_path / "b" / "tiny" / "metrics.jsonl") if r["kind"] == "epoch"
    ]
    assert epochs == [0, 1, 2]  # the interrupted epoch's partial records were dropped


def test_a_killed_process_resumes_where_it_was(tmp_path: Path) -> None:
    """A real SIGKILL in the middle of training, then `harmonia train --resume`."""
    config = tmp_path / "tiny.yaml"
    config.write_text(dump_config(tiny_experiment(tmp_path, "train.epochs=6")))
    cmd = [sys.executable, "-m", "harmonia", "train", str(config), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "tiny" / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and load_checkpoint(ckpt)["epoch"] >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed; raise train.epochs"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(ckpt)["epoch"] < 6  # the checkpoint left behind is readable
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    resumed = json.loads((tmp_path / "tiny" / "results.json").read_text())

    reference = Trainer(tiny_experiment(tmp_path / "ref", "train.epochs=6"), progress=False).fit()
    assert resumed["test"] == reference.test
    assert resumed["probe"] == reference.probe


class PoisonFeatures(Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def transform_features(self, trainer: Trainer, features: dict) -> dict:
        if trainer.global_step == self.at_step:
            return {m: f * float("nan") for m, f in features.items()}
        return features


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    cfg = tiny_experiment(tmp_path)
    trainer = Trainer(cfg, [PoisonFeatures(at_step=5)], progress=False)
    with pytest.raises(
        NonFiniteLossError, match=r"became nan at epoch 2, step 5.*last good checkpoint.*end of epoch 1"
    ):
        trainer.fit()
    state = load_checkpoint(trainer.checkpoint_path)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_existing_run_folder_is_refused_unless_resume_or_overwrite(tmp_path: Path) -> None:
    cfg = tiny_experiment(tmp_path, "train.epochs=1", "train.probe=false")
    Trainer(cfg, progress=False).fit()
    with pytest.raises(RunFolderExistsError, match=r"--resume.*--overwrite"):
        Trainer(cfg, progress=False)
    Trainer(cfg, overwrite=True, progress=False)  # allowed
    with pytest.raises(ConfigError, match="choose one"):
        Trainer(cfg, resume=True, overwrite=True, progress=False)


def test_resume_errors(tmp_path: Path) -> None:
    cfg = tiny_experiment(tmp_path, "train.epochs=1", "train.probe=false")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Trainer(cfg, resume=True, progress=False)
    Trainer(cfg, progress=False).fit()
    other = tiny_experiment(tmp_path, "train.epochs=1", "train.probe=false", "optim.lr=0.5")
    with pytest.raises(ConfigError, match=r"optim\.lr: saved 0\.01, now 0\.5"):
        Trainer(other, resume=True, progress=False)
    ckpt = tmp_path / "tiny" / "checkpoints" / "last.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt"):
        Trainer(cfg, resume=True, progress=False).fit()


def test_resume_may_extend_training(tmp_path: Path) -> None:
    Trainer(tiny_experiment(tmp_path, "train.epochs=1", "train.probe=false"), progress=False).fit()
    result = Trainer(
        tiny_experiment(tmp_path, "train.epochs=2", "train.probe=false"), resume=True, progress=False
    ).fit()
    assert result.epochs == 2


@pytest.mark.parametrize("fusion", ["concat", "sum", "film", "gated"])
def test_every_fusion_head_and_unimodal_baselines_train(tmp_path: Path, fusion: str) -> None:
    # The tiny run stays at chance test accuracy (observed 0.1 for every head, after 1 and after 3 epochs:
    # one class predicted), so accuracy cannot be asserted; what can fail is a head whose parameters get no
    # update (a detached branch, a parameter left out of the optimizer): observed, every one of the 30-36
    # parameter tensors changed.
    result, untrained = _fit_and_list_untrained(
        Trainer(tiny_experiment(tmp_path, "train.epochs=1", f"model.fusion={fusion}"), progress=False)
    )
    assert untrained == []
    assert {"accuracy", "unimodal_accuracy/audio", "unimodal_accuracy/image"} <= set(result.test)
    assert result.probe["audio"] > 0.4  # chance 0.1; observed 0.73-0.77 on the fused model's audio features
    only, untrained = _fit_and_list_untrained(
        Trainer(
            tiny_experiment(
                tmp_path, "train.epochs=1", "data.modalities=[image]", "name=img", f"model.fusion={fusion}"
            ),
            progress=False,
        )
    )
    assert untrained == [] and set(only.probe) == {"image"}


def test_unknown_modality_in_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no modality 'video'; it has audio, image"):
        Trainer(tiny_experiment(tmp_path, "data.modalities=[audio, video]"), progress=False)


def test_training_step_rejects_a_bad_batch(tmp_path: Path) -> None:
    trainer = Trainer(tiny_experiment(tmp_path, "train.epochs=1"), progress=False)
    batch = next(iter(trainer.train_loader))
    bad = {**batch, "inputs": {"audio": batch["inputs"]["audio"]}}
    with pytest.raises(InputError, match="image"):
        trainer.train_step(bad)
    bad = {**batch, "inputs": {**batch["inputs"], "image": batch["inputs"]["image"][:, 0]}}
    with pytest.raises(InputError, match="image"):
        trainer.train_step(bad)


def test_device_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.device: 'gpu' is not a torch device"):
        Trainer(tiny_experiment(tmp_path, "train.device=gpu"), progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            Trainer(tiny_experiment(tmp_path, "train.device=cuda"), progress=False)
    assert not (tmp_path / "tiny").exists()  # nothing was written before the config was checked


def test_resume_refuses_epochs_that_break_the_schedule(tmp_path: Path) -> None:
    cosine = ("optim.schedule=cosine", "train.probe=false")
    Trainer(tiny_experiment(tmp_path, "train.epochs=1", *cosine), progress=False).fit()
    with pytest.raises(ConfigError, match="cosine schedule was laid out for 1 epochs"):
        Trainer(tiny_experiment(tmp_path, "train.epochs=2", *cosine), resume=True, progress=False)
    Trainer(tiny_experiment(tmp_path / "s", "train.epochs=2", "train.probe=false"), progress=False).fit()
    with pytest.raises(ConfigError, match="below the 2 epochs"):
        Trainer(
            tiny_experiment(tmp_path / "s", "train.epochs=1", "train.probe=false"),
            resume=True,
            progress=False,
        ).fit()


@pytest.mark.parametrize("method", ["ogm", "opm", "opm+ogm"])
def test_balanced_training_logs_rho_k_q_and_resumes_exactly(tmp_path: Path, method: str) -> None:
    overrides = (f"balance=[{method.replace('+', ',')}]", "train.probe=false")
    # asserts that every step is logged when balancing
    keys = set(train_interrupted_and_resumed(tmp_path, *overrides).steps[-1])
    if "ogm" in method:
        assert {"balance/rho/audio", "balance/k/audio", "balance/k/image"} <= keys
    if "opm" in method:
        assert {"balance/q/audio", "balance/q/image"} <= keys
    assert (tmp_path / "a" / "tiny" / "balance_curves.png").stat().st_size > 1000


def test_balance_needs_two_modalities(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="balances modalities"):
        tiny_experiment(tmp_path, "balance=[ogm]", "data.modalities=[image]")


@pytest.mark.parametrize("fusion", ["sum", "film", "gated"])
def test_balancing_works_with_every_fusion_head(tmp_path: Path, fusion: str) -> None:
    # accuracy stays at chance in a tiny run (observed 0.1); what can fail is a head that the modulated
    # gradients no longer reach: observed, every parameter tensor changed
    result, untrained = _fit_and_list_untrained(
        Trainer(
            tiny_experiment(tmp_path, "balance=[opm,ogm]", f"model.fusion={fusion}", "train.epochs=1"),
            progress=False,
        )
    )
    assert untrained == []
    assert {"accuracy", "unimodal_accuracy/audio", "unimodal_accuracy/image"} <= set(result.test)


def test_the_trainer_trains_the_users_own_model_on_the_users_own_tensors(tmp_path: Path) -> None:
    """``Trainer(cfg, model=..., dataset=TensorData(...))``: a module that is not a MultimodalClassifier but
    follows its output contract, balanced by OGM and OPM, learns a task its image modality carries."""
    from torch import nn

    from harmonia.app.config import load_config
    from harmonia.data.sources import TensorData
    from harmonia.models import MultimodalOutput

    class Mine(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.modalities = ("audio", "image")
            self.encoders = nn.ModuleDict(
                {m: nn.Sequential(nn.Flatten(), nn.Linear(16, 8)) for m in self.modalities}
            )
            self.heads = nn.ModuleDict({m: nn.Linear(8, 2) for m in self.modalities})

        def unimodal_logits(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {m: self.heads[m](features[m]) for m in self.modalities}

        def forward(self, inputs: dict[str, torch.Tensor], transform=None) -> MultimodalOutput:
            features = {m: self.encoders[m](inputs[m]) for m in self.modalities}
            if transform is not None:
                features = transform(features)
            unimodal = self.unimodal_logits(features)
            return MultimodalOutput(sum(unimodal.values()), features, unimodal)

    g = torch.Generator().manual_seed(0)

    def split(n: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        y = torch.randint(0, 2, (n,), generator=g)
        image = torch.randn(n, 1, 4, 4, generator=g) + 1.5 * (2 * y.view(-1, 1, 1, 1) - 1)
        return {"audio": torch.randn(n, 1, 4, 4, generator=g), "image": image}, y

    cfg = load_config(
        None,
        [f"out_dir={tmp_path}", "train.epochs=3", "train.batch_size=16", "balance=[ogm,opm]", "optim.lr=0.1"],
    )
    trainer = Trainer(
        cfg, model=Mine(), dataset=TensorData({"train": split(128), "test": split(64)}), progress=False
    )
    result = trainer.fit()
    assert isinstance(trainer.model, Mine)
    assert result.test["accuracy"] > 0.85  # chance 0.5; the image offset is 1.5 noise std
    assert result.probe["image"] > 0.85 and set(result.probe) == {"audio", "image"}


def test_a_users_model_without_encoders_needs_the_probe_off(tmp_path: Path) -> None:
    from torch import nn

    from harmonia.app.config import load_config

    with pytest.raises(ConfigError, match=r"train\.probe=false"):
        Trainer(load_config(None, [f"out_dir={tmp_path}"]), model=nn.Linear(2, 2), progress=False)
