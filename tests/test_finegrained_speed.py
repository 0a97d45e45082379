"""``harmonia bench finegrained-speed``: the loss-kernel variants compute what they claim, the paired timing
pairs, the memory method measures a known allocation, and the command runs end to end on tiny sizes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib
import pytest
import torch
import torch.nn.functional as F

matplotlib.use("Agg")
from matplotlib.figure import Figure

from harmonia.app.bench import common
from harmonia.app.bench import finegrained_speed as fs
from harmonia.app.plotstyle import figure_problems
from helpers import tiny_pretrain_overrides


def _formula_loss(a: torch.Tensor, b: torch.Tensor, tau: float, tau_att: float) -> torch.Tensor:
    """Wang & Karout's score (direction both) and symmetric InfoNCE, written out for the test."""
    sim = torch.einsum("ikd,njd->inkj", a, b)  # [B, B, K, J]
    alpha = torch.softmax(sim / tau_att, dim=2)  # over a's tokens k
    beta = torch.softmax(sim / tau_att, dim=3)  # over b's tokens j
    s = 0.5 * ((alpha * sim).sum(2).mean(-1) + (beta * sim).sum(3).mean(-1))  # [B, B]
    targets = torch.arange(a.shape[0])
    return 0.5 * (F.cross_entropy(s / tau, targets) + F.cross_entropy(s.T / tau, targets))


def test_kernel_losses_are_the_finegrained_loss_and_the_einsum_its_matmul() -> None:
    torch.manual_seed(0)
    a64 = F.normalize(torch.randn(5, 4, 3, dtype=torch.float64), dim=-1).requires_grad_()
    b64 = F.normalize(torch.randn(5, 2, 3, dtype=torch.float64), dim=-1).requires_grad_()
    expected = _formula_loss(a64, b64, fs.TEMPERATURE, fs.TAU_ATT)
    want = torch.autograd.grad(expected, (a64, b64))
    for loss in (fs.finegrained_loss, fs.previous_loss):
        value = loss(a64, b64)
        torch.testing.assert_close(value, expected)
        for got, ref in zip(torch.autograd.grad(value, (a64, b64)), want, strict=True):
            torch.testing.assert_close(got, ref)
    # the einsum: S_iknj = a_ik · b_nj, ∂a_ik = Σ_nj G_iknj b_nj, ∂b_nj = Σ_ik G_iknj a_ik
    a, b, grad = fs.kernel_inputs(3, 4, 2, 5)
    assert a.shape == (3, 4, 5) and b.shape == (3, 2, 5) and grad.shape == (3, 4, 3, 2)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(3, 4))
    da, db = fs.einsum_fwd_bwd(a, b, grad)
    with torch.no_grad():
        for i in range(3):
            for k in range(4):
                torch.testing.assert_close(
                    da[i, k], sum(grad[i, k, n, j] * b[n, j] for n in range(3) for j in range(2))
                )
        torch.testing.assert_close(
            db[1, 0], sum(grad[i, k, 1, 0] * a[i, k] for i in range(3) for k in range(4))
        )
    assert list(fs.kernel_calls()) == [fs.EINSUM, fs.CONTROL, fs.FINE, fs.PREVIOUS]
    assert list(fs.kernel_calls([16], compiled=True)) == [*fs.KERNELS, fs.chunk_variant(16), fs.COMPILED]


def test_paired_times_rotates_the_order_and_pairs_each_call_with_its_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [0.0]
    order: list[int] = []
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])

    def call(i: int, cost: float) -> Any:
        def run(item: float) -> None:
            order.append(i)
            clock[0] += cost * item  # call i takes cost_i × the input's size

        return run

    costs = [2.0, 3.0, 1.0]
    times = common.paired_times(
        [call(i, c) for i, c in enumerate(costs)], [1.0, 4.0], 2, progress=False, reference=[0, 0, 1]
    )
    assert order[:6] == [0, 1, 2, 1, 2, 0]  # rotated from input to input
    assert order[6:12] == [2, 0, 1, 0, 1, 2]
    # medians over 2 timed rounds × 2 inputs of cost × size (sizes 1, 4, 1, 4)
    assert [t["seconds"] for t in times] == [5.0, 7.5, 2.5]
    assert [t["ratio"] for t in times] == [1.0, 1.5, pytest.approx(1 / 3)]


def _summary(batches: list[int], kernel_batches: list[int]) -> dict[str, Any]:
    def step(ms: float, share: float | None, mib: float | None) -> dict[str, Any]:
        s: dict[str, Any] = {"seconds": ms / 1000, "ratio": 1.0}
        if share is not None:
            s.update(loss_seconds=ms * share / 1000, loss_share=share)
        if mib is not None:
            s["peak_mib"] = mib
        return s

    return {
        "command": "harmonia bench finegrained-speed --out x",
        "threads": 1,
        "video_tokens": "time_local",
        "overrides": [],
        "kernel": {
            "shape": {"K": 32, "J": 8, "D": 64},
            "direction": "both",
            "repeats": 3,
            "batches": {
                str(b): {
                    "block_mib": b * b * 32 * 8 * 4 / 2**20,
                    "variants": {
                        name: {"seconds": 0.01 * b * r, "ratio": r, "peak_mib": b * r}
                        for name, r in zip(fs.KERNELS, (1.0, 1.02, 2.4, 6.1), strict=True)
                    },
                    "difference": {"loss": 1e-7, "grad": 2e-9},
                }
                for b in kernel_batches
            },
        },
        "steps": {
            "variants": ["coarse", "finegrained"],
            "steps": 2,
            "rounds": 1,
            "batches": {
                str(b): {
                    "coarse": step(5.0 * b, 0.05, 0.8 * b),
                    "finegrained": {**step(6.0 * b, 0.2, 1.1 * b), "ratio": 1.2},
                    "coarse (A/A)": step(5.0 * b, None, None),
                }
                for b in batches
            },
        },
    }


def test_report_and_figure_are_readable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    summary = _summary([16, 32, 64, 128, 256], [128, 256])
    report = fs.format_report(summary)
    assert "| 256 | finegrained_nce | 6144.0 | 2.40 | 614 | 9.60 |" in report
    assert "| 128 | 16.0 | 1.0e-07 | 2.0e-09 |" in report  # the block: 128² · 32 · 8 float32
    assert "| 64 | finegrained | 384.0 | 1.20 | 76.8 | 20 % | 70 | 1.38 |" in report
    assert "| 64 | coarse (A/A) | 320.0 | 1.00 | – | – | – | – |" in report
    saved: list[list[str]] = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: saved.append(figure_problems(fig)))
    for name, plot in fs.PLOTS.items():
        plot(summary, tmp_path / name)
    assert saved == [[]]


@pytest.mark.integration
def test_bench_finegrained_speed_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """On tiny steps and the kernel at batch 64, where the memory method meets a known allocation: the
    einsum's fwd+bwd holds S [B, K, B, J] (4 MiB) and the gradients of a and b (0.625 MiB) at its peak."""
    from harmonia.app.cli import main

    argv = [
        "bench",
        "finegrained-speed",
        *tiny_pretrain_overrides(),
        "data.trimodal.captions=2",
        "--batch-sizes",
        "8",
        "--kernel-batch-sizes",
        "64",
        "--kernel-chunk-sizes",
        "8",
        "--repeats",
        "1",
        "--speed-steps",
        "2",
        "--speed-rounds",
        "1",
        "--out",
        str(tmp_path),
        "--quiet",
    ]
    assert main(argv) == 0
    out = tmp_path / "finegrained_speed"
    printed = capsys.readouterr().out
    assert (out / "finegrained_speed.md").read_text() in printed
    assert "--kernel-batch-sizes 64 --kernel-chunk-sizes 8" in printed and "| 8 | finegrained |" in printed
    summary = json.loads((out / "finegrained_speed.json").read_text())
    kernel = summary["kernel"]["batches"]["64"]
    assert kernel["block_mib"] == 4.0 and kernel["difference"]["grad"] < 1e-6
    chunked = fs.chunk_variant(8)
    assert list(kernel["variants"]) == [*fs.KERNELS, chunked] and kernel["variants"]["einsum"]["ratio"] == 1.0
    peaks = {name: v["peak_mib"] for name, v in kernel["variants"].items()}
    for name in (fs.EINSUM, fs.CONTROL):
        assert 4.0 <= peaks[name] <= 5.5, peaks
    assert peaks[fs.FINE] > 4.6  # one chunk of all 64 rows: S and the pooling's intermediates
    assert peaks[chunked] < peaks[fs.FINE] / 2  # chunks of 8 rows
    steps = summary["steps"]["batches"]["8"]
    assert list(steps) == ["coarse", "finegrained", "coarse (A/A)"]
    for name in ("coarse", "finegrained"):
        assert 0 < steps[name]["loss_seconds"] < steps[name]["seconds"] * 5
        assert steps[name]["peak_mib"] >= 0
    assert (out / "finegrained_speed.png").stat().st_size > 1000
    assert main(["bench", "finegrained-speed", "--out", str(tmp_path), "--replot"]) == 0


@pytest.mark.integration
def test_loss_alone_reruns_the_step_s_loss(tmp_path: Path) -> None:
    from harmonia.app.bench.finegrained import _overrides
    from harmonia.app.config import load_config
    from harmonia.app.train import build_trainer

    cfg = load_config(
        None,
        [
            *_overrides(
                "finegrained", 8, [*tiny_pretrain_overrides(), "data.trimodal.captions=2"], "time_local"
            ),
            f"out_dir={tmp_path}",
        ],
    )
    trainer = build_trainer(cfg, progress=False)
    batch = next(iter(trainer.train_loader))
    alone = fs.LossAlone(trainer, batch)
    text_tokens = alone.args[3]
    assert text_tokens.dim() == 4 and text_tokens.shape[:2] == (8, 2)  # [B, C, L, E]: the fine-grained path
    assert all(x.grad_fn is None for x in alone.leaves) and len(alone.leaves) == 4
    value = alone.loss(*alone.args, **alone.kwargs).loss
    assert float(value.detach()) == pytest.approx(alone.step_result[1], rel=1e-6)
    alone()
    assert all(x.grad is None for x in alone.leaves)  # autograd.grad: nothing accumulates between calls
