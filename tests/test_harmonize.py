"""GradientHarmonizer against independent computations on a small model with known structure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from harmonia.app.logs import read_metrics
from harmonia.app.train import build_trainer
from harmonia.errors import ConfigError
from harmonia.gradients.curriculum import ConflictCurriculum
from harmonia.gradients.harmonizer import GradientHarmonizer
from harmonia.metrics.classification import auroc
from helpers import tiny_experiment, tiny_pretrain, tiny_pretrain_overrides

B, D_IN, D = 6, 4, 3


class Toy(torch.nn.Module):
    """z = W x is the anchor; loss a reads z only, loss b reads z and a separate head V."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W = torch.nn.Parameter(torch.randn(D, D_IN, generator=g, dtype=torch.float64))
        self.V = torch.nn.Parameter(torch.randn(D, D_IN, generator=g, dtype=torch.float64))
        self.u = torch.randn(D, generator=g, dtype=torch.float64)

    def losses(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z = x @ self.W.T
        loss_a = (z @ self.u - 1) ** 2 + 0.1 * (z * z.roll(1, 0)).sum(1)  # couples neighbouring samples
        loss_b = ((z * (x @ self.V.T)).sum(1) + 0.5) ** 2
        return z, {"va": loss_a, "vt": loss_b}


def _x() -> torch.Tensor:
    return torch.randn(B, D_IN, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _pcgrad_rows(g_a: torch.Tensor, g_b: torch.Tensor) -> torch.Tensor:
    """Independent per-row PCGrad written as a loop."""
    out = []
    for a, b in zip(g_a, g_b, strict=True):
        if float(a @ b) < 0:
            a, b = a - (a @ b) / (b @ b) * b, b - (a @ b) / (a @ a) * a
        out.append(a + b)
    return torch.stack(out)


def _row_grads(model: Toy, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z, losses = model.losses(x)
    g_a = torch.autograd.grad(losses["va"].mean(), z, retain_graph=True)[0]
    g_b = torch.autograd.grad(losses["vt"].mean(), z)[0]
    return g_a, g_b


def test_rule_none_without_curriculum_equals_plain_backward() -> None:
    model, x = Toy(), _x()
    _, losses = model.losses(x)
    (losses["va"].mean() + losses["vt"].mean()).backward()
    plain = [p.grad.clone() for p in (model.W, model.V)]
    model.zero_grad()
    z, losses = model.losses(x)
    stats = GradientHarmonizer(rule="none").backward(losses, z)
    torch.testing.assert_close(model.W.grad, plain[0])
    torch.testing.assert_close(model.V.grad, plain[1])
    assert stats.kept_fraction == 1.0 and stats.cosine.shape == (B,)


def test_feature_pcgrad_sends_realigned_rows_upstream_and_plain_gradients_elsewhere() -> None:
    model, x = Toy(), _x()
    g_a, g_b = _row_grads(model, x)
    expected_w = _pcgrad_rows(g_a, g_b).T @ x  # dz_i/dW = x_i: W.grad = Σ_i g'_i x_iᵀ
    _, losses = model.losses(x)
    expected_v = torch.autograd.grad(losses["vt"].mean(), model.V)[0]
    cos = torch.nn.functional.cosine_similarity(g_a, g_b, dim=1)
    assert bool((cos < 0).any()) and bool((cos > 0).any()), "the toy should have both kinds of rows"
    z, losses = model.losses(x)
    stats = GradientHarmonizer(rule="pcgrad").backward(losses, z)
    torch.testing.assert_close(model.W.grad, expected_w)
    torch.testing.assert_close(model.V.grad, expected_v)
    torch.testing.assert_close(stats.cosine, cos)
    assert stats.conflict_fraction == pytest.approx(float((cos < 0).double().mean()))


def test_curriculum_drops_conflicting_samples_from_every_branch() -> None:
    model, x = Toy(), _x()
    g_a, g_b = _row_grads(model, x)
    cos = torch.nn.functional.cosine_similarity(g_a, g_b, dim=1)
    keep = cos >= 0.0
    n = int(keep.sum())
    assert 0 < n < B
    rows = _pcgrad_rows(g_a, g_b) * keep[:, None] * (B / n)
    expected_w = rows.T @ x
    _, losses = model.losses(x)
    expected_v = torch.autograd.grad((losses["vt"] * keep).sum() / n, model.V)[0]
    z, losses = model.losses(x)
    harmonizer = GradientHarmonizer(
        rule="pcgrad", curriculum=ConflictCurriculum(start=0.0, end=-1.0, steps=10)
    )
    stats = harmonizer.backward(losses, z)
    torch.testing.assert_close(model.W.grad, expected_w)
    torch.testing.assert_close(model.V.grad, expected_v)
    assert stats.kept.tolist() == keep.tolist() and stats.threshold == 0.0 and harmonizer.num_steps == 1


def test_batch_mode_is_pcgrad_on_whole_batch_gradients() -> None:
    model, x = Toy(), _x()
    _, losses = model.losses(x)
    g_a = torch.autograd.grad(losses["va"].mean(), model.W, retain_graph=True)[0].flatten()
    g_b = torch.autograd.grad(losses["vt"].mean(), model.W, retain_graph=True)[0].flatten()
    expected_v = torch.autograd.grad(losses["vt"].mean(), model.V)[0]
    expected_w = _pcgrad_rows(g_a[None], g_b[None])[0].view(D, D_IN)
    _, losses = model.losses(x)
    GradientHarmonizer(mode="batch", rule="pcgrad", params=[model.W]).backward(losses)
    torch.testing.assert_close(model.W.grad, expected_w)
    torch.testing.assert_close(model.V.grad, expected_v)


def test_harmonizer_errors() -> None:
    model, x = Toy(), _x()
    z, losses = model.losses(x)
    with pytest.raises(ValueError, match="two objectives"):
        GradientHarmonizer().backward({"va": losses["va"]}, z)
    with pytest.raises(ValueError, match="per-sample losses"):
        GradientHarmonizer().backward({"va": losses["va"].mean(), "vt": losses["vt"].mean()}, z)
    with pytest.raises(ValueError, match="needs the anchor"):
        GradientHarmonizer().backward(losses)
    with pytest.raises(ValueError, match="needs params"):
        GradientHarmonizer(mode="batch")
    with pytest.raises(ValueError, match="use mode='feature'"):
        GradientHarmonizer(mode="batch", params=[model.W], curriculum=ConflictCurriculum())


def test_auroc_by_hand() -> None:
    # positives score 0.9, 0.4; negatives 0.5, 0.1, 0.4: pairs won 1+1+1 (0.9) + 0+1+0.5 (0.4) = 4.5 of 6
    assert auroc(
        torch.tensor([0.9, 0.4, 0.5, 0.1, 0.4]), torch.tensor([1, 1, 0, 0, 0]).bool()
    ) == pytest.approx(0.75)
    assert auroc(torch.tensor([0.1, 0.2]), torch.tensor([False, False])) != auroc(
        torch.zeros(2), torch.zeros(2)
    )


@pytest.mark.integration
def test_trainer_harmonizes_logs_conflicts_and_resumes_exactly(tmp_path: Path) -> None:

    args = (
        "data.trimodal.misalign_rate=0.3",
        "harmonize.mode=feature",
        "harmonize.curriculum=true",
        "harmonize.curriculum_epochs=2",
    )
    full = build_trainer(tiny_pretrain(tmp_path, "train.epochs=3", *args), progress=False).fit()
    steps = [r for r in read_metrics(full.run_dir / "metrics.jsonl") if r["kind"] == "step"]
    assert all("harmonize/kept_fraction" in r and "harmonize/threshold" in r for r in steps)
    assert steps[0]["harmonize/threshold"] == 0.0 and steps[-1]["harmonize/threshold"] == -1.0
    epochs = [r for r in read_metrics(full.run_dir / "metrics.jsonl") if r["kind"] == "epoch"]
    assert len(epochs) == 3
    for r in epochs:  # the logged AUROC is the one of the saved per-triplet cosines and ground truth
        data = np.load(full.run_dir / "conflicts" / f"epoch_{r['epoch']:03d}.npz")
        assert data["noisy"].any() and not data["noisy"].all()
        assert r["train/conflict_auroc"] == pytest.approx(auroc(-data["cosine"], data["noisy"]))
    assert len(list((full.run_dir / "conflicts").glob("epoch_*.npz"))) == 3
    assert (full.run_dir / "conflict_histograms.png").stat().st_size > 1000

    build_trainer(tiny_pretrain(tmp_path, "name=resumed", "train.epochs=2", *args), progress=False).fit()
    resumed = build_trainer(
        tiny_pretrain(tmp_path, "name=resumed", "train.epochs=3", *args), resume=True, progress=False
    ).fit()
    assert resumed.test == full.test and resumed.probe == full.probe


@pytest.mark.integration
def test_batch_mode_trains_and_config_errors(tmp_path: Path) -> None:

    result = build_trainer(
        tiny_pretrain(tmp_path, "train.epochs=1", "harmonize.mode=batch"), progress=False
    ).fit()
    assert "video_to_text/R@1" in result.test
    with pytest.raises(ConfigError, match=r"set harmonize\.mode=feature"):
        tiny_pretrain(tmp_path, "harmonize.mode=batch", "harmonize.curriculum=true")
    with pytest.raises(ConfigError, match=r"applies to task=pretrain"):
        tiny_experiment(tmp_path, "harmonize.mode=feature")
    with pytest.raises(ConfigError, match="anneals downwards"):
        tiny_pretrain(tmp_path, "harmonize.curriculum_start=-0.5", "harmonize.curriculum_end=0.5")


class ToyAnchor(torch.nn.Module):
    def __init__(self, toy: Toy) -> None:
        super().__init__()
        self.toy = toy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.toy.W.T


def test_per_sample_parameter_grads_equal_a_loop_on_the_real_video_branch() -> None:
    from harmonia.data import captions
    from harmonia.gradients.harmonizer import per_sample_parameter_grads
    from harmonia.models.pretrain import TriModalPretrainModel, VideoAnchor

    torch.manual_seed(0)
    model = TriModalPretrainModel((4, 16), (32, 51), len(captions.VOCABULARY), 6, width=16, heads=2, depth=1)
    anchor = VideoAnchor(model)
    params = anchor.anchor_named_parameters()
    video, rows = torch.rand(5, 1, 4, 16, 16), torch.randn(5, 16)
    batched = per_sample_parameter_grads(anchor, params, video, rows)
    for i in range(5):
        z = anchor(video[i : i + 1])[0]
        loop = torch.autograd.grad((z * rows[i]).sum(), list(params.values()))
        for (name, value), expected in zip(batched.items(), loop, strict=True):
            torch.testing.assert_close(value[i], expected, rtol=1e-4, atol=1e-6, msg=name)


def test_parameter_mode_realigns_per_sample_parameter_gradients() -> None:
    model, x = Toy(), _x()
    g_a, g_b = _row_grads(model, x)
    per_a = g_a[:, :, None] * x[:, None, :]  # sample i's dL_a/dW = g_a,i x_iᵀ
    per_b = g_b[:, :, None] * x[:, None, :]
    expected_w = _pcgrad_rows(per_a.flatten(1), per_b.flatten(1)).sum(0).view(D, D_IN)
    _, losses = model.losses(x)
    expected_v = torch.autograd.grad(losses["vt"].mean(), model.V)[0]
    anchor = ToyAnchor(model)
    harmonizer = GradientHarmonizer(mode="parameter", anchor_module=anchor, anchor_params={"toy.W": model.W})
    z, losses = model.losses(x)
    stats = harmonizer.backward(losses, z, anchor_input=x)
    torch.testing.assert_close(model.W.grad, expected_w)
    torch.testing.assert_close(model.V.grad, expected_v)
    torch.testing.assert_close(
        stats.cosine, torch.nn.functional.cosine_similarity(per_a.flatten(1), per_b.flatten(1))
    )
    with pytest.raises(ValueError, match="needs anchor_module"):
        GradientHarmonizer(mode="parameter")
    with pytest.raises(ValueError, match="needs anchor_input"):
        harmonizer.backward(losses, z)


@pytest.mark.integration
def test_audit_ranks_triplets_and_scores_detectors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import csv

    from harmonia.app.cli import main

    cfg = tiny_pretrain(tmp_path, "data.trimodal.misalign_rate=0.3")
    trainer = build_trainer(cfg, progress=False)
    split_size = len(trainer.dataset.split("train"))
    trainer.fit()

    config = tmp_path / "tiny_pretrain" / "config.yaml"
    assert main(["audit", str(config), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "AUROC" in printed and "conflict (-cos)" in printed and "loss_vt" in printed
    with open(tmp_path / "tiny_pretrain" / "audit_feature.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == split_size and [int(r["rank"]) for r in rows] == list(range(1, split_size + 1))
    cos = [float(r["conflict_cosine"]) for r in rows]
    assert cos == sorted(cos)  # most conflicting first
    assert sum(int(r["misaligned_text"]) for r in rows) == round(0.3 * split_size)
    assert (
        main(["audit", str(config), "--quiet", "--mode", "parameter", "--out", str(tmp_path / "p.csv")]) == 0
    )
    assert main(["audit", str(config), "--checkpoint", str(tmp_path / "missing.pt"), "--quiet"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.integration
def test_bench_harmonize_writes_report(tmp_path: Path) -> None:
    from harmonia.app.bench.harmonize import run_harmonize_benchmark

    summary = run_harmonize_benchmark(
        seeds=1,
        out_dir=tmp_path,
        variants=["clean", "baseline", "realign+curriculum"],
        backbones=["specific"],
        overrides=tiny_pretrain_overrides(),
        steps=6,
        speed_steps=2,
        speed_rounds=1,
        progress=False,
    )
    report = (tmp_path / "harmonize" / "harmonize.md").read_text()
    assert "| specific | realign+curriculum |" in report and "torch.func" in report and "AUROC" in report
    assert set(summary["speed"]["steps"]) >= {"plain", "feature", "parameter", "batch"}
    assert summary["speed"]["steps"]["plain"]["ratio"] == 1.0
    assert (tmp_path / "harmonize" / "harmonize.png").stat().st_size > 1000
    assert (tmp_path / "harmonize" / "harmonize_curves.png").stat().st_size > 1000
    assert "Variant chosen on validation" in report and "conflict AUROC after gate" in report
    runs = summary["runs"]
    assert all(r["steps"] == 6 for rs in runs.values() for r in rs)  # equal optimizer steps
    baseline = runs["specific/baseline"][0]
    assert any("train/conflict_auroc" in c for c in baseline["curves"])  # rule none still reports conflicts
    assert not any("train/conflict_auroc" in c for c in runs["specific/clean"][0]["curves"])
