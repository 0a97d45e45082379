"""Fine-grained losses in pre-training: trainer, retrieval scoring, harmonizer on token anchors, attention
analysis and the benchmark, on tiny data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harmonia.app.attention import frame_attention
from harmonia.app.logs import read_metrics
from harmonia.app.train import build_trainer
from harmonia.app.train.pretrain import PretrainTrainer
from harmonia.gradients.harmonizer import GradientHarmonizer
from harmonia.losses import ContrastiveGrain, FineGrainedNCE, VATTLoss
from harmonia.losses.finegrained import token_scores
from harmonia.metrics.retrieval import retrieval_metrics, retrieval_metrics_from_scores
from helpers import tiny_pretrain, tiny_pretrain_overrides


@pytest.mark.integration
def test_finegrained_pretraining_runs_scores_retrieval_finely_and_resumes(tmp_path: Path) -> None:
    overrides = ("pretrain.vt_loss=finegrained", "pretrain.va_loss=finegrained", "pretrain.chunk_size=4")
    full = build_trainer(tiny_pretrain(tmp_path, *overrides, "train.epochs=2"), progress=False)
    assert isinstance(full, PretrainTrainer) and full.loss.needs_tokens
    result = full.fit()
    assert set(result.probe) == {"video", "audio", "text"}
    # Two tiny epochs leave retrieval at chance (observed R@10 0.33-0.43 on 30 test clips, chance 10/30),
    # so assert what can fail instead: recall grows with K in every direction, and the training loss fell
    # (observed 6.74 -> 6.36, the video-text term 3.96 -> 3.59).
    for pair in ("video_to_text", "text_to_video", "video_to_audio", "audio_to_video"):
        assert result.test[f"{pair}/R@1"] <= result.test[f"{pair}/R@5"] <= result.test[f"{pair}/R@10"]
    epochs = [r for r in read_metrics(full.run_dir / "metrics.jsonl") if r["kind"] == "epoch"]
    assert len(epochs) == 2 and epochs[1]["train/loss"] < epochs[0]["train/loss"]

    # retrieval ranks by the fine-grained score: recompute it independently for video -> text
    split = full.dataset.split("test")
    e = full.embed(split)
    words = e["token_masks/text"]
    per_candidate = torch.stack(
        [
            token_scores(e["tokens/video_vt"], e["tokens/text"][:, c], None, words[:, c], 0.1)
            for c in range(words.shape[1])
        ],
        -1,
    )
    real = words.any(-1).double()
    bag_scores = (per_candidate.double() * real).sum(-1) / real.sum(-1)
    expected = retrieval_metrics_from_scores({("video", "text"): bag_scores})
    got = full.evaluate("test")
    for key, value in expected.items():
        assert got[f"test/{key}"] == pytest.approx(value)

    resumed_cfg = tiny_pretrain(tmp_path, *overrides, "name=resumed", "train.epochs=1")
    build_trainer(resumed_cfg, progress=False).fit()
    resumed = build_trainer(
        tiny_pretrain(tmp_path, *overrides, "name=resumed", "train.epochs=2"), resume=True, progress=False
    ).fit()
    assert resumed.test == result.test


@pytest.mark.integration
def test_finegrained_losses_train_modality_specific_backbones(tmp_path: Path) -> None:
    cfg = tiny_pretrain(
        tmp_path,
        "pretrain.backbone=specific",
        "pretrain.va_loss=finegrained",
        "pretrain.pool_direction=over_b",
    )
    trainer = build_trainer(cfg, progress=False)
    batch = next(iter(trainer.train_loader))
    before = [p.detach().clone() for p in trainer.model.backbones["audio"].parameters()]
    _, loss = trainer.train_step(batch)
    assert loss == loss  # finite, not NaN
    after = list(trainer.model.backbones["audio"].parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.integration
def test_eval_every_skips_epochs_but_always_evaluates_the_last(tmp_path: Path) -> None:
    result = build_trainer(
        tiny_pretrain(tmp_path, "train.epochs=3", "train.eval_every=2", "train.probe=false"), progress=False
    ).fit()
    epochs = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if r["kind"] == "epoch"]
    evaluated = [r["epoch"] for r in epochs if "val/video_to_text/R@1" in r]
    assert evaluated == [1, 2] and "video_to_text/R@1" in result.test


def test_retrieval_from_scores_equals_retrieval_from_embeddings() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = (
        F.normalize(torch.randn(9, 4, generator=g), dim=-1),
        F.normalize(torch.randn(9, 4, generator=g), dim=-1),
    )
    assert retrieval_metrics({("a", "b"): (x, y)}) == retrieval_metrics_from_scores(
        {("a", "b"): x.double() @ y.double().T}
    )


@pytest.mark.integration
def test_harmonizer_on_token_anchors_with_a_finegrained_loss(tmp_path: Path) -> None:
    """rule none equals a plain backward, and pcgrad realigns the flattened token rows."""
    trainer = build_trainer(tiny_pretrain(tmp_path, "pretrain.vt_loss=finegrained"), progress=False)
    assert isinstance(trainer, PretrainTrainer)
    batch = next(iter(trainer.train_loader))
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    def grads(rule: str | None) -> list[torch.Tensor]:
        trainer.model.zero_grad(set_to_none=True)
        out = trainer.forward(batch["inputs"])
        losses = trainer.compute_loss(out)
        if rule is None:
            losses.loss.backward()
        else:
            GradientHarmonizer(rule=rule).backward(losses.per_sample, out.features["video_tokens"])
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]

    for got, want in zip(grads("none"), grads(None), strict=True):
        torch.testing.assert_close(got, want)
    out = trainer.forward(batch["inputs"])
    per_sample = trainer.compute_loss(out).per_sample
    anchor = out.features["video_tokens"]
    rows = [
        torch.autograd.grad(per_sample[k].mean(), anchor, retain_graph=True)[0].flatten(1)
        for k in ("va", "vt")
    ]
    stats = GradientHarmonizer(rule="pcgrad").backward(per_sample, anchor)
    torch.testing.assert_close(stats.cosine, F.cosine_similarity(*rows, dim=1))


@pytest.mark.integration
def test_trainer_harmonizes_finegrained_losses_through_token_anchors(tmp_path: Path) -> None:
    for mode in ("feature", "parameter"):
        cfg = tiny_pretrain(
            tmp_path,
            f"name={mode}",
            "pretrain.vt_loss=finegrained",
            f"harmonize.mode={mode}",
            "data.trimodal.misalign_rate=0.3",
            "train.probe=false",
        )
        trainer = build_trainer(cfg, progress=False)
        assert isinstance(trainer, PretrainTrainer)
        assert trainer.harmonize is not None and trainer.harmonize.anchor_key == "video_tokens"
        trainer.fit()
        assert (trainer.run_dir / "conflicts" / "epoch_000.npz").exists()


@pytest.mark.integration
def test_vatt_loss_needs_tokens_for_finegrained_terms(tmp_path: Path) -> None:
    loss = VATTLoss(vt=ContrastiveGrain.FINEGRAINED, finegrained=FineGrainedNCE(tau_att=0.2))
    assert loss.needs_tokens and loss.finegrained.tau == loss.temperature
    trainer = build_trainer(tiny_pretrain(tmp_path), progress=False)
    assert isinstance(trainer, PretrainTrainer)
    out = trainer.model(next(iter(trainer.train_loader))["inputs"])
    with pytest.raises(ValueError, match="return_tokens=True"):
        loss.from_output(out)


@pytest.mark.integration
def test_frame_attention_sums_to_one_and_labels_time_slots(tmp_path: Path) -> None:
    cfg = tiny_pretrain(tmp_path, "data.trimodal.partial_rate=0.5", "data.trimodal.partial_fraction=0.5")
    trainer = build_trainer(cfg, progress=False)
    assert isinstance(trainer, PretrainTrainer)
    split = trainer.dataset.split("train")
    att = frame_attention(trainer.model, split, 0.1, cfg.pretrain.tubelet[0])
    assert len(att.indices) == round(0.5 * len(split))
    torch.testing.assert_close(att.weights.sum((1, 2)), torch.ones(len(att.indices)))
    frames = split.relevant_frames[att.indices].view(len(att.indices), -1, cfg.pretrain.tubelet[0])
    for n in range(len(att.indices)):
        for t in range(frames.shape[1]):
            expected = 1 if frames[n, t].all() else 0 if not frames[n, t].any() else -1
            assert int(att.slot_relevant[n, t]) == expected
    stats = att.mean_weight()
    assert stats["relevant"] > 0 and stats["irrelevant"] > 0


@pytest.mark.integration
def test_bench_finegrained_writes_report_plots_and_memory(tmp_path: Path) -> None:
    from harmonia.app.bench.finegrained import run_finegrained_benchmark

    summary = run_finegrained_benchmark(
        seeds=1,
        out_dir=tmp_path,
        variants=["coarse-clean", "coarse", "finegrained"],
        batch_sizes=[16],
        overrides=[*tiny_pretrain_overrides(), "data.trimodal.captions=2"],
        steps=4,
        evaluations=1,
        speed_steps=2,
        speed_rounds=1,
        progress=False,
    )
    out = tmp_path / "finegrained"
    report = (out / "finegrained.md").read_text()
    assert "| 16 | finegrained |" in report and "peak step memory" in report
    assert "Share of the coarse clean-vs-partial gap" in report and "Chosen on validation" in report
    assert summary["speed"]["16"]["coarse-clean"]["ratio"] == 1.0
    assert all(s["peak_mib"] > 0 for s in summary["speed"]["16"].values())
    assert (out / "finegrained.png").stat().st_size > 1000
    assert (out / "finegrained_curves.png").stat().st_size > 1000
    assert (out / "attention_finegrained_b16.png").stat().st_size > 1000
    fine = summary["runs"]["16"]["finegrained"][0]
    assert fine["attention"]["ratio"] > 0 and "video_to_text/R@1" in fine["val"]
    assert any("attention/ratio" in c for c in fine["curves"])
    assert summary["runs"]["16"]["coarse-clean"][0]["attention"] == {}  # no partial clips: no attention


@pytest.mark.integration
def test_bench_finegrained_gives_every_batch_size_the_same_steps(tmp_path: Path) -> None:
    """Batch 8 and 64 both take exactly ``steps`` optimizer steps (ceil(steps / steps per epoch) epochs,
    the last one cut short), so the comparison is at equal optimizer steps."""
    from harmonia.app.bench.common import equal_step_overrides
    from harmonia.app.bench.finegrained import run_finegrained_benchmark

    expected = ["train.max_steps=10", "train.epochs=4", "train.eval_every=2"]
    assert equal_step_overrides(10, 100, 32, 2) == expected
    expected = ["train.max_steps=10", "train.epochs=1", "train.eval_every=1"]
    assert equal_step_overrides(10, 100, 8, 2) == expected
    summary = run_finegrained_benchmark(
        seeds=1,
        out_dir=tmp_path,
        variants=["coarse"],
        batch_sizes=[8, 64],
        overrides=[*tiny_pretrain_overrides(), "data.trimodal.captions=2"],
        steps=7,
        evaluations=2,
        speed_steps=0,
        progress=False,
    )
    per_epoch = {b: summary["train_size"] // b for b in (8, 64)}
    assert per_epoch[64] < 7 < per_epoch[8]  # batch 64 needs several epochs, batch 8 a part of one
    for batch_size in ("8", "64"):
        run = summary["runs"][batch_size]["coarse"][0]
        assert run["steps"] == 7
        assert run["curves"][-1]["step"] == 7
        assert run["epochs"] == -(-7 // per_epoch[int(batch_size)])
    assert "| 8 | coarse | 7 |" in (tmp_path / "finegrained" / "finegrained.md").read_text()
