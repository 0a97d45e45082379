"""The spoken tri-modal recipe, the clean validation split, the learnability gate, the curriculum warm-up
and the drop precision of the curriculum."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from harmonia.app.logs import read_metrics
from harmonia.app.train import build_trainer
from harmonia.data import captions as cap
from harmonia.data.avdigits import AVDigitsRecipe, load_avdigits
from harmonia.data.spoken import PHRASES, assemble, transcript
from harmonia.data.trimodal import MisalignKind, TriModalRecipe, load_trimodal_avdigits
from harmonia.errors import ConfigError
from harmonia.gradients.curriculum import ConflictCurriculum
from harmonia.metrics.classification import auroc, drop_precision
from harmonia.metrics.gate import GateRule, digit_axis_cosines, swap_pairs
from helpers import TINY_RECIPE, tiny_pretrain


@pytest.fixture(scope="module")
def base() -> object:
    return load_avdigits(AVDigitsRecipe(**TINY_RECIPE), progress=False)


def _says(text: str, digit: int, direction: int) -> bool:
    words = text.replace(",", " ").split()
    return words[0] == cap.DIGIT_WORDS[digit] and cap.DIRECTIONS[direction] in words


@pytest.mark.integration
def test_the_audio_says_what_the_captions_say(base: object) -> None:
    ds = load_trimodal_avdigits(TriModalRecipe(captions=3), base=base)  # type: ignore[arg-type]
    for name in ("train", "val", "test"):
        split = ds.split(name)
        assert split.directions is not None and len(split.transcripts) == len(split)
        assert split.inputs["audio"].shape[-1] == 101  # 2 s at a 20 ms hop
        for i in range(len(split)):
            digit, direction = int(split.labels[i]), int(split.directions[i])
            assert _says(split.transcripts[i], digit, direction), split.transcripts[i]
            # every caption that names the motion names this one; every caption names the digit
            for text in split.captions[i]:
                words = text.split()
                assert cap.DIGIT_WORDS[digit] in words or str(digit) in words
                assert not ({*cap.DIRECTIONS} - {cap.DIRECTIONS[direction]}) & set(words)
    # the digit word is spoken where the video is bright: the span lies inside the clip
    assert transcript(7, 0, 0, 1) == "seven, moving left"
    assert all("{direction}" in p for p in PHRASES)


@pytest.mark.integration
def test_audio_misalignment_changes_what_is_said_with_exact_counts(base: object) -> None:
    clean = load_trimodal_avdigits(TriModalRecipe(), base=base).split("train")  # type: ignore[arg-type]
    for kind in (MisalignKind.AUDIO, MisalignKind.BOTH, MisalignKind.TEXT):
        split = load_trimodal_avdigits(
            TriModalRecipe(misalign_rate=0.3, misalign_modality=kind),
            base=base,  # type: ignore[arg-type]
        ).split("train")
        n, flagged = len(split), split.misaligned["audio"]
        expected = round(0.3 * n) if kind is not MisalignKind.TEXT else 0
        assert int(flagged.sum()) == expected and int(split.noisy.sum()) == round(0.3 * n)
        for i in range(n):
            digit, direction = int(split.labels[i]), int(split.directions[i])  # type: ignore[index]
            if flagged[i]:
                # another digit's audio: says another digit, and says what the donor's audio said
                assert not _says(split.transcripts[i], digit, direction)
                spoken = split.transcripts[i].split(",")[0]
                assert cap.DIGIT_WORDS.index(spoken) == int(split.modality_labels["audio"][i])
            else:
                assert split.transcripts[i] == clean.transcripts[i]
                assert torch.equal(split.inputs["audio"][i], clean.inputs["audio"][i])
        # the transcript of a swapped clip is one that some clean clip said, with its audio
        for i in torch.nonzero(flagged).flatten().tolist():
            donors = [j for j in range(n) if torch.equal(clean.inputs["audio"][j], split.inputs["audio"][i])]
            assert donors and clean.transcripts[donors[0]] == split.transcripts[i]


@pytest.mark.integration
def test_digit_only_speech_keeps_the_avdigits_audio(base: object) -> None:
    ds = load_trimodal_avdigits(TriModalRecipe(speech="digit"), base=base)  # type: ignore[arg-type]
    split = ds.split("train")
    assert torch.equal(split.inputs["audio"], base.splits["train"].inputs["audio"])  # type: ignore[attr-defined]
    assert split.transcripts[0] == cap.DIGIT_WORDS[int(split.labels[0])]


def test_assemble_places_word_pause_phrase() -> None:
    rng = np.random.default_rng(0)
    word, phrase = np.ones(100, np.float32), 2 * np.ones(300, np.float32)
    clip, (onset, end), cut = assemble(word, phrase, 1000, 1000, rng)
    start = round(onset * 1000)
    assert not cut and end - onset == pytest.approx(0.1)
    assert (clip[start : start + 100] == 1).all() and (clip == 2).sum() == 300
    gap = int(np.flatnonzero(clip == 2)[0]) - (start + 100)
    assert 50 <= gap <= 200
    clip, _, cut = assemble(word, 2 * np.ones(1000, np.float32), 1000, 1000, rng)
    assert cut and len(clip) == 1000 and (clip[:100] == 1).all()


@pytest.mark.integration
def test_validation_split_is_clean_and_speaker_disjoint(base: object) -> None:
    ds = load_trimodal_avdigits(
        TriModalRecipe(misalign_rate=0.5, misalign_modality="both", partial_rate=0.5),  # type: ignore[arg-type]
        base=base,  # type: ignore[arg-type]
    )
    voices = {name: set(ds.split(name).voices) for name in ("train", "val", "test")}
    assert all(voices.values())
    assert not voices["val"] & voices["train"] and not voices["val"] & voices["test"]
    assert not voices["train"] & voices["test"]
    assert ds.split("train").noisy.any()
    for name in ("val", "test"):
        split = ds.split(name)
        assert not split.noisy.any() and split.relevant_frames.all()
        for m in ("audio", "text"):
            assert torch.equal(split.modality_labels[m], split.labels)


def test_gate_rule_by_hand() -> None:
    rule = GateRule()  # L_va <= ln B - 1, R@10 >= 5 * 10 / N
    assert rule.loss_threshold(64) == pytest.approx(math.log(64) - 1) == pytest.approx(3.158883)
    assert rule.recall_threshold(359) == pytest.approx(50 / 359) == pytest.approx(0.1392758)
    assert rule.passed(3.15, 0.14, 64, 359)
    assert not rule.passed(3.16, 0.50, 64, 359)  # loss 0.0011 nat too high
    assert not rule.passed(1.00, 0.139, 64, 359)  # recall just under 5x chance
    assert not rule.passed(1.1, 1.0, 8, 10)  # ln 8 - 1 = 1.079
    # 20 clips: chance R@10 is 0.5 and 5x chance is above 1, so no model passes
    assert rule.recall_threshold(20) == pytest.approx(2.5) and not rule.passed(0.0, 1.0, 8, 20)
    assert GateRule(recall_factor=1.5).passed(1.0, 0.75, 8, 20)
    with pytest.raises(ValueError, match="batch_size"):
        rule.passed(1.0, 1.0, 1, 10)


def test_digit_axis_cosine_by_hand() -> None:
    # class 0 anchors average to (0, 0), class 1 to (2, 0): the axis from 0 to 1 is +x
    anchors = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [2.0, 1.0], [2.0, -1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # row 0 (digit 0) got a caption of digit 1; its descent −g points to (+1, +1): cos 45° with +x
    grads = torch.tensor([[-1.0, -1.0], [3.0, 0.0]])
    cos = digit_axis_cosines(grads, anchors, labels, torch.tensor([1, 1]))
    assert cos.tolist() == pytest.approx([1 / math.sqrt(2), -1.0])
    with pytest.raises(ValueError, match="no clean anchor"):
        digit_axis_cosines(grads, anchors, labels, torch.tensor([2, 1]))


def test_swap_pairs_swaps_different_digits_in_pairs() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    perm = swap_pairs(labels, 0.5, np.random.default_rng(0))
    moved = perm != np.arange(8)
    assert moved.sum() == 4 and (perm[perm] == np.arange(8)).all()  # two pairs, each an involution
    assert (labels[perm][moved] != labels[moved]).all()
    assert (swap_pairs(np.zeros(6, int), 0.5, np.random.default_rng(0)) == np.arange(6)).all()


def test_drop_precision_by_hand() -> None:
    # 10 triplets, 3 misaligned (0, 1, 2); 4 dropped (0, 1, 5, 6): 2 of 4 dropped are misaligned
    kept = np.ones(10, bool)
    kept[[0, 1, 5, 6]] = False
    noisy = np.zeros(10, bool)
    noisy[[0, 1, 2]] = True
    out = drop_precision(kept, noisy)
    assert out == pytest.approx(
        {"dropped_fraction": 0.4, "drop_precision": 0.5, "noise_base_rate": 0.3, "drop_lift": 0.5 / 0.3}
    )
    assert math.isnan(drop_precision(np.ones(4, bool), noisy[:4])["drop_precision"])


def test_curriculum_drops_nothing_during_the_warmup() -> None:
    cos = torch.tensor([0.5, -0.5, -0.2, 0.1])
    cur = ConflictCurriculum(start=0.0, end=-1.0, steps=10, warmup_steps=3)
    for step in range(3):
        assert cur.keep_mask(cos, step).all() and not cur.active(step) and cur.progress(step) == 0
    assert cur.keep_mask(cos, 3).tolist() == [True, False, False, True]  # γ(3) = γ_0 = 0: schedule starts
    assert cur.threshold(8) == pytest.approx(-0.5)  # half-way through its 10 steps, counted from step 3
    deferred = ConflictCurriculum(start=0.0, end=-1.0, steps=10, warmup_steps=3, deferred=True)
    assert deferred.keep_mask(cos, 50).all()  # waits for the gate, however long
    deferred.begin(1)
    assert deferred.start_step == 3 and deferred.keep_mask(cos, 3).tolist() == [True, False, False, True]
    deferred.begin(40)  # a second call changes nothing
    assert deferred.start_step == 3
    restored = ConflictCurriculum(deferred=True)
    restored.load_state_dict(deferred.state_dict())
    assert restored.start_step == 3


def _epochs(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "epoch"]


def _steps(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "step"]


@pytest.mark.integration
def test_trainer_waits_for_the_warmup_and_logs_drop_precision(tmp_path: Path) -> None:
    cfg = tiny_pretrain(
        tmp_path,
        "train.epochs=2",
        "data.trimodal.misalign_rate=0.3",
        "harmonize.mode=feature",
        "harmonize.curriculum=true",
        "harmonize.curriculum_start=0.5",
        "harmonize.curriculum_warmup_epochs=1",
        "pretrain.gate=false",
    )
    result = build_trainer(cfg, progress=False).fit()
    steps = _steps(result.run_dir)
    first, second = [s for s in steps if s["epoch"] == 0], [s for s in steps if s["epoch"] == 1]
    assert first and all(s["harmonize/kept_fraction"] == 1.0 for s in first)
    assert all(s["harmonize/curriculum_active"] == 0.0 for s in first)
    assert all(s["harmonize/curriculum_active"] == 1.0 for s in second)
    assert second[0]["harmonize/threshold"] == 0.5  # the schedule starts at γ_0 after the warm-up
    assert any(s["harmonize/kept_fraction"] < 1.0 for s in second)  # γ_0 = 0.5 drops some
    epochs = _epochs(result.run_dir)
    assert epochs[0]["train/dropped_fraction"] == 0.0 and "train/drop_precision" not in epochs[0]
    assert 0 <= epochs[1]["train/drop_precision"] <= 1 and epochs[1]["train/noise_base_rate"] > 0
    for e in epochs:  # the logged AUROCs are those of the saved per-triplet scores and ground truth
        data = np.load(result.run_dir / "conflicts" / f"epoch_{e['epoch']:03d}.npz")
        assert data["noisy"].any() and not data["noisy"].all()
        assert e["train/conflict_auroc"] == pytest.approx(auroc(-data["cosine"], data["noisy"]))
        assert e["train/loss_vt_auroc"] == pytest.approx(auroc(data["loss_vt"], data["noisy"]))
    data = np.load(result.run_dir / "conflicts" / "epoch_001.npz")
    expected = drop_precision(data["kept"], data["noisy"])
    assert epochs[1]["train/drop_precision"] == pytest.approx(expected["drop_precision"])


@pytest.mark.integration
def test_gate_is_logged_every_epoch_and_starts_a_deferred_curriculum(tmp_path: Path) -> None:
    from harmonia.metrics.gate import GateRule

    cfg = tiny_pretrain(
        tmp_path,
        "train.epochs=2",
        "train.eval_every=5",
        "data.trimodal.misalign_rate=0.3",
        "harmonize.mode=feature",
        "harmonize.curriculum=true",
        "harmonize.curriculum_start_when=gate",
    )
    trainer = build_trainer(cfg, progress=False)
    assert trainer.gate is not None
    trainer.gate.rule = GateRule(margin_nats=-100.0, recall_factor=0.0)  # passes at once
    result = trainer.fit()
    epochs = _epochs(result.run_dir)
    for e in epochs:  # every epoch, although evaluation runs only after the last
        assert e["gate/ln_batch"] == pytest.approx(math.log(16))
        assert e["gate/loss_va"] > 0 and e["gate/loss_vt"] > 0
        assert -1 <= e["gate/axis_va"] <= 1 and -1 <= e["gate/axis_vt"] <= 1
        assert 0 <= e["gate/val_conflict_auroc"] <= 1  # not NaN: half of each batch is swapped
        for pair in ("video_to_audio", "video_to_text"):
            assert e[f"gate/{pair}/R@1"] <= e[f"gate/{pair}/R@10"]
        assert e["gate/passed"] == 1.0 and e["gate/first_passed_epoch"] == 0.0
    assert "val/video_to_audio/R@10" not in epochs[0]
    # after the last epoch the gate reuses the evaluation's retrieval instead of computing its own
    assert epochs[-1]["gate/video_to_audio/R@10"] == epochs[-1]["val/video_to_audio/R@10"]
    steps = _steps(result.run_dir)
    assert all(s["harmonize/curriculum_active"] == 0.0 for s in steps if s["epoch"] == 0)
    assert all(s["harmonize/curriculum_active"] == 1.0 for s in steps if s["epoch"] == 1)

    # a strict gate never passes: the deferred curriculum never drops anything
    strict = build_trainer(tiny_pretrain(tmp_path, "name=strict", *cfg_overrides_gate()), progress=False)
    assert strict.gate is not None
    strict.gate.rule = GateRule(margin_nats=100.0)  # L_va <= ln B - 100: never
    strict.fit()
    epochs = _epochs(strict.run_dir)
    assert [e["gate/passed"] for e in epochs] == [0.0, 0.0]
    assert [e["gate/first_passed_epoch"] for e in epochs] == [-1.0, -1.0]
    assert all(s["harmonize/kept_fraction"] == 1.0 for s in _steps(strict.run_dir))


def cfg_overrides_gate() -> list[str]:
    return [
        "train.epochs=2",
        "data.trimodal.misalign_rate=0.3",
        "harmonize.mode=feature",
        "harmonize.curriculum=true",
        "harmonize.curriculum_start=1.0",
        "harmonize.curriculum_start_when=gate",
    ]


def test_gate_start_needs_the_gate(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="curriculum_start_when=gate needs the learnability gate"):
        tiny_pretrain(tmp_path, *cfg_overrides_gate(), "pretrain.gate=false")


@pytest.mark.integration
def test_clips_per_image_makes_more_training_clips_only(base: object) -> None:
    one = load_trimodal_avdigits(TriModalRecipe(), base=base)  # type: ignore[arg-type]
    three = load_trimodal_avdigits(TriModalRecipe(clips_per_image=3), base=base)  # type: ignore[arg-type]
    train = three.split("train")
    assert len(train) == 3 * len(one.split("train")) and len(three.split("val")) == len(one.split("val"))
    assert torch.equal(train.labels, one.split("train").labels.repeat_interleave(3))
    assert set(train.voices) <= set(one.split("train").voices)
    for i in range(len(train)):
        assert _says(train.transcripts[i], int(train.labels[i]), int(train.directions[i]))  # type: ignore[index]
