"""Faults and bad input: each case gets a message that names the problem and the fix, or correct behaviour;
nothing runs code from a checkpoint, no worker outlives its parent and no temporary file is left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from avfixtures import write_corrupt, write_video
from harmonia.app.cli import main
from harmonia.app.config import AVDigitsRecipe, dump_config, load_config
from harmonia.app.train import Callback, Trainer
from harmonia.app.train.checkpoint import CHECKPOINT_FORMAT_VERSION, load_checkpoint
from harmonia.balance import OGM, OPM
from harmonia.data import avdigits
from harmonia.data.prep import PrepSettings
from harmonia.errors import CheckpointError, ConfigError, DataError, InputError, NonFiniteLossError
from harmonia.losses import FineGrainedNCE, mil_nce, nce
from harmonia.losses.finegrained import finegrained_nce
from helpers import tiny_experiment, tiny_pretrain

# --------------------------------------------------------------------------------------------------
# checkpoints


class RunsCode:
    """A pickle payload: unpickling it would create ``marker`` (as ``os.system`` would run a command)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def _plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format_version": CHECKPOINT_FORMAT_VERSION, "model": {"w": RunsCode(marker)}}, path)


@pytest.mark.integration
def test_a_malicious_checkpoint_does_not_run_on_resume(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "pwned"
    cfg = tiny_experiment(tmp_path)
    config = tmp_path / "tiny.yaml"
    config.write_text(dump_config(cfg))
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.yaml").write_text(dump_config(cfg))
    _plant(tmp_path / "tiny" / "checkpoints" / "last.pt", marker)
    assert main(["train", str(config), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "is not a harmonia checkpoint" in err and "arbitrary code" in err
    assert not marker.exists()


@pytest.mark.integration
def test_a_malicious_checkpoint_does_not_run_in_audit(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "pwned"
    config = tmp_path / "pre.yaml"
    config.write_text(dump_config(tiny_pretrain(tmp_path)))
    _plant(tmp_path / "evil.pt", marker)
    assert main(["audit", str(config), "--checkpoint", str(tmp_path / "evil.pt"), "--quiet"]) == 2
    assert "is not a harmonia checkpoint" in capsys.readouterr().err
    assert not marker.exists()


def test_a_checkpoint_without_a_needed_key_names_it(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    torch.save({"format_version": CHECKPOINT_FORMAT_VERSION, "epoch": 1}, path)
    with pytest.raises(CheckpointError, match=r"has no 'model' entry \(it has epoch, format_version\)"):
        load_checkpoint(path, required=("model",))


@pytest.mark.integration
def test_a_real_checkpoint_loads_without_unpickling_objects(tmp_path: Path) -> None:
    """Everything the trainer saves (RNG states, optimizer, OGM/OPM state) is tensors and plain data."""
    trainer = Trainer(tiny_experiment(tmp_path, "train.epochs=1", "balance=[ogm,opm]"), progress=False)
    trainer.fit()
    state = torch.load(trainer.checkpoint_path, weights_only=True)
    assert state["callbacks"]["BalancingCallback"]["0:ogm"]["num_steps"] > 0


@pytest.mark.integration
def test_resume_and_fresh_start_remove_stale_temporary_checkpoints(tmp_path: Path) -> None:
    trainer = Trainer(tiny_experiment(tmp_path, "train.epochs=1", "train.probe=false"), progress=False)
    trainer.fit()
    folder = trainer.checkpoint_path.parent
    stale = [folder / ".last.pt.abc123.tmp", folder / ".last.pt.xyz789.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint: the process was killed while writing it")
    Trainer(
        tiny_experiment(tmp_path, "train.epochs=2", "train.probe=false"), resume=True, progress=False
    ).fit()
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt"]

    # a run folder without a checkpoint yet (killed in its first write) and a fresh start over it
    for path in stale:
        path.write_bytes(b"x")
    (folder / "last.pt").unlink()
    cfg = tiny_experiment(tmp_path, "train.epochs=1", "train.probe=false")
    Trainer(cfg, overwrite=True, progress=False)
    assert not any(p.exists() for p in stale)


class PoisonWeightsAtEpochEnd(Callback):
    """Turns the weights NaN through the optimizer step of the first epoch's last batch."""

    def before_optimizer_step(self, trainer: Trainer) -> None:
        if trainer.global_step == len(trainer.train_loader) - 1:
            for p in trainer.model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))


@pytest.mark.integration
def test_weights_turning_nan_on_an_epochs_last_step_name_the_epoch(tmp_path: Path) -> None:
    trainer = Trainer(tiny_experiment(tmp_path), [PoisonWeightsAtEpochEnd()], progress=False)
    with pytest.raises(NonFiniteLossError, match=r"became NaN/inf during epoch 1.*optim.lr"):
        trainer.fit()
    assert not trainer.checkpoint_path.exists()


@pytest.mark.integration
def test_disk_full_while_training_says_free_space_and_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from harmonia.app.train import checkpoint

    trainer = Trainer(tiny_experiment(tmp_path, "train.probe=false"), progress=False)

    def full(obj: object, f: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(CheckpointError, match=r"no space left on device.*Free disk space.*--resume"):
        trainer.fit()
    assert list(trainer.checkpoint_path.parent.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# configs


def test_config_file_problems_name_the_file(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml is not UTF-8 text \(byte 0xe9 .*save it as UTF-8"):
        load_config(latin1)
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: a\ntrain: [1, 2\n")
    with pytest.raises(ConfigError, match=r'not valid YAML(.|\n)*in "[^"]*broken.yaml", line \d'):
        load_config(broken)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here yet\n")
    with pytest.raises(ConfigError, match=r"empty.yaml is empty.*'\{\}' to run with every default"):
        load_config(empty)
    defaults = tmp_path / "defaults.yaml"
    defaults.write_text("{}\n")
    assert load_config(defaults).name == load_config(None).name


def test_unknown_key_message_separates_its_sentences() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'foo'\. Valid keys here: name, "):
        load_config(None, ["foo=1"])
    with pytest.raises(ConfigError, match=r"did you mean 'optim.lr'\? Valid keys here"):
        load_config(None, ["optim.lrr=1"])


@pytest.mark.integration
def test_a_batch_larger_than_the_training_set_is_refused_in_both_tasks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train.batch_size=100000000 exceeds the \d+ training samples"):
        Trainer(tiny_experiment(tmp_path, "train.batch_size=100000000"), progress=False)
    from harmonia.app.train.pretrain import PretrainTrainer

    with pytest.raises(ConfigError, match=r"train.batch_size=100000000 exceeds the \d+ training"):
        PretrainTrainer(tiny_pretrain(tmp_path, "train.batch_size=100000000"), progress=False)


@pytest.mark.integration
def test_a_model_too_large_for_memory_names_the_sizes(tmp_path: Path) -> None:
    if Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1":
        pytest.skip("the kernel promises any allocation (overcommit_memory=1): the OOM killer would answer")
    with pytest.raises(ConfigError, match=r"does not fit in memory.*model.feature_dim"):
        Trainer(tiny_experiment(tmp_path, "model.feature_dim=100000000000"), progress=False)


# --------------------------------------------------------------------------------------------------
# AV-Digits cache


@pytest.mark.integration
def test_a_cache_meta_that_is_not_an_object_is_rebuilt(tiny_recipe: AVDigitsRecipe) -> None:
    first = avdigits.load_avdigits(tiny_recipe, progress=False)
    meta = avdigits.cache_root() / "avdigits" / avdigits.recipe_key(tiny_recipe) / "meta.json"
    meta.write_text("[1, 2, 3]")
    again = avdigits.load_avdigits(tiny_recipe, progress=False)
    assert torch.equal(first.split("test").labels, again.split("test").labels)
    assert isinstance(json.loads(meta.read_text()), dict)


@pytest.mark.integration
def test_a_read_only_cache_that_needs_a_build_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_recipe: AVDigitsRecipe
) -> None:
    monkeypatch.setenv("HARMONIA_CACHE", str(tmp_path / "ro"))
    real_mkdir = Path.mkdir

    def read_only(self: Path, *args: object, **kwargs: object) -> None:
        if str(self).startswith(str(tmp_path / "ro")):
            raise PermissionError(13, "Permission denied", str(self))
        real_mkdir(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(DataError, match=r"not writable \(Permission denied\); set HARMONIA_CACHE"):
        avdigits.load_avdigits(tiny_recipe, progress=False)


# --------------------------------------------------------------------------------------------------
# losses and balancing methods


@pytest.mark.parametrize("temperature", [0.0, -0.07, float("nan"), float("inf")])
def test_contrastive_losses_refuse_a_temperature_that_is_not_positive(temperature: float) -> None:
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        nce(a, b, temperature, gather=False)
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        mil_nce(a, b[:, None], temperature=temperature, gather=False)
    tokens = torch.randn(4, 3, 8)
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        finegrained_nce(tokens, tokens, temperature=temperature, gather=False)
    with pytest.raises(ValueError, match="tau_att must be a positive finite number"):
        finegrained_nce(tokens, tokens, tau_att=temperature, gather=False)


def test_contrastive_losses_refuse_an_empty_batch() -> None:
    with pytest.raises(ValueError, match="batch is empty"):
        nce(torch.randn(0, 8), torch.randn(0, 8), gather=False)
    with pytest.raises(ValueError, match="batch is empty"):
        mil_nce(torch.randn(0, 8), torch.randn(0, 2, 8), gather=False)
    with pytest.raises(ValueError, match="batch is empty"):
        FineGrainedNCE(gather=False)(torch.randn(0, 3, 8), torch.randn(0, 2, 8))


def _encoders() -> dict[str, torch.nn.Module]:
    return {"audio": torch.nn.Linear(4, 3), "image": torch.nn.Linear(4, 3)}


def test_opm_update_with_other_modality_names_says_which() -> None:
    opm = OPM(["audio", "image"])
    with pytest.raises(InputError, match=r"no unimodal logits for \['image'\].*got \['audio', 'visual'\]"):
        opm.update({"audio": torch.randn(4, 3), "visual": torch.randn(4, 3)}, torch.tensor([0, 1, 2, 0]))


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (torch.tensor([0.0, 1.0, 2.9, 1.0]), "integer class indices"),
        (torch.tensor([True, False, True, False]), "integer class indices"),
        (torch.tensor([0, 1, 3, 1]), r"in \[0, 2\] for 3-class logits, got values from 0 to 3"),
        (torch.tensor([0, -1, 2, 1]), "got values from -1 to 2"),
    ],
)
def test_balancing_refuses_labels_that_are_not_class_indices(labels: torch.Tensor, message: str) -> None:
    logits = {"audio": torch.randn(4, 3), "image": torch.randn(4, 3)}
    with pytest.raises(InputError, match=message):
        OPM(["audio", "image"]).update(logits, labels)
    with pytest.raises(InputError, match=message):
        OGM(_encoders()).step(logits, labels, epoch=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_balancing_refuses_non_finite_logits_instead_of_switching_off(bad: float) -> None:
    labels = torch.tensor([0, 1, 2, 0])
    logits = {"audio": torch.randn(4, 3), "image": torch.randn(4, 3)}
    logits["image"][2, 1] = bad
    with pytest.raises(NonFiniteLossError, match=r"logits of \['image'\] hold NaN or inf"):
        OPM(["audio", "image"]).update(logits, labels)
    with pytest.raises(NonFiniteLossError, match="balancing would silently switch off"):
        OGM(_encoders()).step(logits, labels, epoch=0)


# --------------------------------------------------------------------------------------------------
# prep


def _cremad(src: Path, good: bool = True) -> None:
    from avfixtures import write_wav

    if good:
        write_video(src / "VideoFlash" / "1001_DFA_ANG_XX.flv", container="flv", codec="flv")
        write_wav(src / "AudioWAV" / "1001_DFA_ANG_XX.wav")
    write_corrupt(src / "VideoFlash" / "1004_DFA_NEU_XX.flv")
    write_wav(src / "AudioWAV" / "1004_DFA_NEU_XX.wav")


def test_prep_refuses_a_frame_rate_that_is_not_positive(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _cremad(tmp_path / "raw")
    for fps in ("0", "-1"):
        args = ["prep", "cremad", "--src", str(tmp_path / "raw"), "--dst", str(tmp_path / "out"), "--quiet"]
        assert main([*args, "--fps", fps]) == 2
        assert "--fps must be above 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="max_frames"):
        PrepSettings(max_frames=0)


@pytest.mark.integration
def test_prep_fails_when_every_clip_fails_and_a_rerun_may_change_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _cremad(tmp_path / "raw", good=False)
    args = ["prep", "cremad", "--src", str(tmp_path / "raw"), "--dst", str(tmp_path / "out"), "--quiet"]
    assert main(args) == 1
    assert "every one of the 1 clips failed" in capsys.readouterr().err
    _cremad(tmp_path / "raw")  # the user adds a good clip and changes the frame rate
    assert main([*args, "--fps", "2"]) == 0  # nothing was finished, so nothing to mix settings with


def test_prep_output_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "videos").mkdir()
    target = tmp_path / "shards.tar"
    target.write_bytes(b"")
    assert main(["prep", "shards", "--src", str(tmp_path / "videos"), "--dst", str(target), "--quiet"]) == 2
    assert "--dst" in (err := capsys.readouterr().err) and "is a file, not a folder" in err
    assert main(["prep", "cremad", "--src", str(tmp_path), "--dst", str(target), "--quiet"]) == 2


@pytest.mark.integration
def test_prep_shards_rewrites_a_truncated_shard(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, dst = tmp_path / "videos", tmp_path / "shards"
    for i in range(4):
        write_video(src / f"clip{i}.mp4", seconds=1.0, fps=8, tone_hz=300.0)
        (src / f"clip{i}.txt").write_text(f"caption {i}\n")
    args = ["prep", "shards", "--src", str(src), "--dst", str(dst), "--quiet", "--frames", "2"]
    args += ["--frame-size", "8", "--seconds", "1", "--n-mels", "8", "--shard-size", "2", "--workers", "1"]
    assert main(args) == 0
    shard = dst / json.loads((dst / "shards.json").read_text())["splits"]["train"]["shards"][0]
    intact = shard.read_bytes()
    shard.write_bytes(intact[: len(intact) // 2])
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"rewrote {shard.name}" in out and "truncated" in out
    assert shard.read_bytes() == intact


PREP_UNDER_KILL = """
import sys, time
from pathlib import Path
import harmonia.data.prep as prep
from harmonia.data.prep import PrepSettings, RawClip

def slow_clip(clip, dst, settings):
    time.sleep(120)
    return 1

prep.prepare_clip = slow_clip  # forked workers inherit it
clips = [RawClip(f"c{i}", Path("v"), Path("a"), "x", "train") for i in range(4)]
prep.prepare("cremad", clips, sys.argv[1], PrepSettings(), workers=2, progress=False)
"""


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_prep_workers_die_when_the_main_process_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "prep_under_kill.py"
    script.write_text(textwrap.dedent(PREP_UNDER_KILL))
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "out")])
    deadline, workers = time.time() + 60, []
    while time.time() < deadline and len(workers) < 2:
        time.sleep(0.2)
        workers = _children(proc.pid)
    assert len(workers) == 2, f"the pool did not start its 2 workers: {workers}"
    time.sleep(1.0)  # the workers are inside their (slow) clips
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    survivors = [w for w in workers if _alive(w)]
    for w in survivors:  # do not leak them from the test either
        os.kill(w, signal.SIGKILL)
    assert not survivors, f"prep workers {survivors} outlived the killed main process"
