"""Mixed precision (``train.precision``): bf16 autocast on the CPU for every balancing method and every
harmonizer option, compared with float32; the float16 gradient scaler's order (unscale before the methods
read gradients), skipped steps and checkpoints, exercised on the CPU (torch runs float16 autocast and
``GradScaler("cpu")`` there; the trainer itself refuses ``16-mixed`` without CUDA).

Tolerance of a bf16 run against the float32 run from the same initial weights, over its first 3 steps
(stated in docs/training.md, measured on the tiny recipes):

* every per-step statistic a method logs (ρ, k, q, its losses and weights): |bf16 − fp32| <= 2 % of the value
  + 0.01; statistics that count samples (argmax flips, cosine signs) within 2 samples of the batch;
* the method's effect on the model: the parameter update after 3 steps has cosine >= 0.99 with the float32
  update and a norm within 2 % of it (pre-training: cosine >= 0.98, >= 0.95 with a curriculum, which may
  drop another sample or two; norm within 5 %); the harmonizer's batch-mean gradient cosine within 0.1.

Measured: worst statistic 1 % (Greedy's speed gap), update cosines 0.998-0.9997 (classification) and
0.993-0.996 (pre-training), mean gradient cosines within 0.06.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harmonia.app.callbacks.base import Callback
from harmonia.app.config import PrecisionKind
from harmonia.app.logs import read_metrics
from harmonia.app.registry import BALANCING
from harmonia.app.train import Trainer, build_trainer
from harmonia.app.train.precision import MixedPrecision
from harmonia.errors import ConfigError
from harmonia.gradients.harmonizer import GradientHarmonizer
from harmonia.losses import nce
from harmonia.models import ConcatFusion, MultimodalClassifier
from helpers import tiny_experiment, tiny_pretrain

STEPS = 3
RTOL, ATOL = 0.02, 0.01
#: statistics that count samples (an argmax or a cosine sign): bf16 may flip a sample near the boundary
COUNTED = (
    "balance/valuation/",
    "balance/cml/violated",  # the fraction of the batch whose unimodal loss breaks the chain
    "harmonize/conflict_fraction",
    "harmonize/kept_fraction",
)
#: statistics compared absolutely: the batch-mean cosine of the two losses' gradients lies near 0
#: (batch mode reached 0.105 once in a full-suite run, depending on the tests before it: 0.15 for that mode)
ABSOLUTE = {"harmonize/mean_cosine": 0.1}
ABSOLUTE_BATCH_MODE = {"harmonize/mean_cosine": 0.15}
#: harmonia's own methods (docs/extending.md registers a ModDrop while the suite runs)
OWN_METHODS = [m for m in BALANCING.names() if BALANCING.get(m).__module__.startswith("harmonia.balance.")]


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """The end-of-run figures (matplotlib, a second each) are not under test here."""
    monkeypatch.setattr("harmonia.app.callbacks.balance.plot_balance_curves", lambda *a, **k: None)
    monkeypatch.setattr("harmonia.app.callbacks.harmonize.plot_conflict_histograms", lambda *a, **k: None)


def float32_steps(trainer: Any) -> tuple[list[dict[str, float]], torch.Tensor]:
    """The statistics of the first STEPS steps of epoch 0 (as ``fit`` takes them) and the update."""
    start = flat_parameters(trainer.model)
    trainer.model.train()
    trainer.train_loader.set_epoch(0)
    rows = []
    for _, batch in zip(range(STEPS), trainer.train_loader, strict=False):
        _, loss = trainer.train_step(batch)
        rows.append({"train/loss": loss, **trainer.step_metrics})
    return rows, flat_parameters(trainer.model) - start


def assert_close_to_float32(
    expected: list[dict[str, float]],
    logged: list[dict[str, Any]],
    batch_size: int,
    absolute: dict[str, float] = ABSOLUTE,
) -> None:
    assert len(logged) == len(expected) == STEPS
    for step, (ours, theirs) in enumerate(zip(logged, expected, strict=True)):
        for key, want in theirs.items():
            got = ours[key]
            assert math.isfinite(got), (step, key, got)
            tolerance = RTOL * abs(want) + ATOL
            if key.startswith(COUNTED):
                tolerance = 2 / batch_size
            tolerance = absolute.get(key, tolerance)
            assert abs(got - want) <= tolerance, f"step {step}: {key} bf16 {got} vs fp32 {want}"


def assert_same_effect(update: torch.Tensor, reference: torch.Tensor, min_cosine: float, norm: float) -> None:
    cosine = float(F.cosine_similarity(update, reference, dim=0))
    ratio = float(update.norm() / reference.norm())
    assert cosine >= min_cosine and abs(ratio - 1) <= norm, (cosine, ratio)


def record_dtypes(modules: list[torch.nn.Module]) -> set[torch.dtype]:
    """The dtypes of every output of ``modules`` from now on (training and evaluation)."""
    seen: set[torch.dtype] = set()
    for module in modules:
        module.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
    return seen


# --------------------------------------------------------------------------------------------------
# configuration


def test_precision_and_loggers_are_validated() -> None:
    assert tiny_experiment(Path("unused"), "train.precision=32").train.precision is PrecisionKind.FULL
    with pytest.raises(ConfigError, match=r"16-mixed needs a CUDA device.*use train.precision=bf16"):
        tiny_experiment(Path("unused"), "train.precision=16-mixed")
    with pytest.raises(ConfigError, match="did you mean 'bf16'"):
        tiny_experiment(Path("unused"), "train.precision=bf15")
    with pytest.raises(ConfigError, match="lacks jsonl"):
        tiny_experiment(Path("unused"), "train.loggers=[tensorboard]")
    with pytest.raises(ConfigError, match=r"16-mixed needs a CUDA device.*use train.precision=bf16"):
        MixedPrecision("16-mixed", torch.device("cpu"))


# --------------------------------------------------------------------------------------------------
# the library: float32 losses under autocast, the harmonizer under a loss scale


def test_contrastive_loss_computes_in_float32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    a = F.normalize(torch.randn(8, 16), dim=1).bfloat16().requires_grad_()
    b = F.normalize(torch.randn(8, 16), dim=1).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nce(a, b, temperature=0.07, gather=False)
    # symmetric InfoNCE written out in float64 on the same (bf16-valued) embeddings
    s = a.detach().double() @ b.double().T / 0.07
    target = torch.arange(8)
    expected = 0.5 * (F.cross_entropy(s, target) + F.cross_entropy(s.T, target))
    assert loss.dtype == torch.float32
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    loss.backward()
    assert a.grad is not None and a.grad.dtype == torch.bfloat16
    # the same loss with bfloat16 arithmetic is measurably off: the upcast matters
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s16 = (a.detach() @ b.T) / 0.07
        rough = 0.5 * (F.cross_entropy(s16, target) + F.cross_entropy(s16.T, target))
    error = abs(float(loss.detach()) - float(expected))
    assert abs(float(rough) - float(expected)) > 100 * error


@pytest.mark.parametrize("mode", ["feature", "batch"])
def test_harmonizer_with_scaled_weights_leaves_scaled_gradients(mode: str) -> None:
    """With both weights times S the harmonizer leaves S times the gradients of an unscaled call (what
    the trainer relies on under a float16 gradient scaler): PCGrad is scale-equivariant."""
    grads = {}
    for scale in (1.0, 1024.0):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4))
        head_a = torch.nn.Linear(4, 1)
        x = torch.randn(10, 6)
        anchor = net(x)
        h, y = head_a(anchor).squeeze(1), torch.randn(10).sign()
        losses = {"va": (h - y) ** 2, "vt": (h + y) ** 2}  # opposite pulls where |h| < 1: conflicts
        harmonizer = GradientHarmonizer(mode, "pcgrad", params=list(net.parameters()))
        stats = harmonizer.backward(losses, anchor, {"va": scale, "vt": 2 * scale})
        grads[scale] = torch.cat([p.grad.flatten() for p in [*net.parameters(), *head_a.parameters()]])
        assert stats.conflict_fraction > 0  # realignment acts
    torch.testing.assert_close(grads[1024.0] / 1024.0, grads[1.0], rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# (a) every balancing method under bf16 autocast


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An (untrained) joint model's checkpoint: UMT's teacher for both modalities."""
    folder = tmp_path_factory.mktemp("teacher")
    trainer = build_trainer(tiny_experiment(folder, "train.probe=false"), progress=False)
    path = folder / "teacher.pt"
    torch.save({"model": trainer.model.state_dict()}, path)
    return path


def method_overrides(method: str, teacher: Path) -> list[str]:
    entry = (
        f"{{name: umt, teachers: {{audio: '{teacher}', image: '{teacher}'}}}}" if method == "umt" else method
    )
    fusion = ["model.fusion=sum"] if method == "mla" else []  # MLA shares one head: a sum fusion
    return [f"balance=[{entry}]", "train.probe=false", "train.loggers=[jsonl]", *fusion]


@pytest.mark.integration
@pytest.mark.parametrize("method", OWN_METHODS)
def test_every_balancing_method_trains_under_bf16_as_in_float32(
    method: str, teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_plots(monkeypatch)
    overrides = method_overrides(method, teacher)
    reference = build_trainer(tiny_experiment(tmp_path, "name=fp32", *overrides), progress=False)
    start = flat_parameters(reference.model)
    expected, reference_update = float32_steps(reference)

    cfg = tiny_experiment(
        tmp_path, "name=bf16", "train.precision=bf16", f"train.max_steps={STEPS}", *overrides
    )
    run = build_trainer(cfg, progress=False)
    assert torch.equal(flat_parameters(run.model), start)
    dtypes = record_dtypes(list(run.model.encoders.values()))
    result = run.fit()  # training, evaluation, the epoch-end hooks and the checkpoint, under bf16

    assert dtypes == {torch.bfloat16}  # autocast was on in training and evaluation
    assert all(math.isfinite(v) for v in result.test.values())
    steps = [r for r in read_metrics(run.run_dir / "metrics.jsonl") if r["kind"] == "step"]
    assert_close_to_float32(expected, steps, cfg.train.batch_size)
    assert_same_effect(flat_parameters(run.model) - start, reference_update, 0.99, 0.02)


# --------------------------------------------------------------------------------------------------
# (b) pre-training: every harmonizer and curriculum option under bf16 autocast

HARMONIZE = {
    "plain": [],
    "feature-pcgrad": ["harmonize.mode=feature"],
    "feature-gradvac": ["harmonize.mode=feature", "harmonize.rule=gradvac"],
    "parameter": ["harmonize.mode=parameter"],
    "batch": ["harmonize.mode=batch"],
    "curriculum-threshold": [
        "harmonize.mode=feature",
        "harmonize.curriculum=true",
        "harmonize.curriculum_start=0.0",
    ],
    "curriculum-top-fraction": [
        "harmonize.mode=feature",
        "harmonize.curriculum=true",
        "harmonize.curriculum_keep=top_fraction",
    ],
    "curriculum-after-gate": [
        "harmonize.mode=feature",
        "harmonize.curriculum=true",
        "harmonize.curriculum_start_when=gate",
    ],
    "finegrained": ["pretrain.va_loss=finegrained", "pretrain.vt_loss=finegrained", "harmonize.mode=feature"],
}


@pytest.mark.integration
@pytest.mark.parametrize("variant", list(HARMONIZE))
def test_pretraining_trains_under_bf16_as_in_float32(
    variant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_plots(monkeypatch)
    overrides = [*HARMONIZE[variant], "train.probe=false", "train.loggers=[jsonl]"]
    reference = build_trainer(tiny_pretrain(tmp_path, "name=fp32", *overrides), progress=False)
    start = flat_parameters(reference.model)
    expected, reference_update = float32_steps(reference)

    cfg = tiny_pretrain(tmp_path, "name=bf16", "train.precision=bf16", f"train.max_steps={STEPS}", *overrides)
    run = build_trainer(cfg, progress=False)
    dtypes = record_dtypes([m for m in run.model.modules() if isinstance(m, torch.nn.Linear)])
    result = run.fit()  # with the learnability gate's measurement at the end of the epoch

    assert torch.bfloat16 in dtypes
    assert result.test and all(math.isfinite(v) for v in result.test.values())
    steps = [r for r in read_metrics(run.run_dir / "metrics.jsonl") if r["kind"] == "step"]
    epoch = next(r for r in read_metrics(run.run_dir / "metrics.jsonl") if r["kind"] == "epoch")
    assert math.isfinite(epoch["gate/loss_va"])
    absolute = ABSOLUTE_BATCH_MODE if variant == "batch" else ABSOLUTE
    assert_close_to_float32(expected, steps, cfg.train.batch_size, absolute)
    # a curriculum may drop another sample or two (a cosine near its threshold changes sign in bf16)
    min_cosine = 0.95 if "curriculum" in variant else 0.98
    assert_same_effect(flat_parameters(run.model) - start, reference_update, min_cosine, 0.05)


# --------------------------------------------------------------------------------------------------
# (c) the float16 gradient scaler's path, on the CPU


@pytest.fixture
def cpu_float16(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Trainers built now run ``16-mixed`` on the CPU: float16 autocast and ``GradScaler("cpu")``."""

    def build(kind: Any, device: torch.device) -> MixedPrecision:
        return MixedPrecision(PrecisionKind.FP16_MIXED, device, allow_cpu_float16=True)

    monkeypatch.setattr("harmonia.app.train.base.MixedPrecision", build)
    yield


def gradient_norm(parameters: Any) -> float:
    return float(torch.cat([p.grad.flatten() for p in parameters if p.grad is not None]).norm())


def pooled_linear_model() -> MultimodalClassifier:
    """A classifier with pooling + linear encoders, for the float16 runs: torch's float16 convolutions
    on the CPU are slow (3.6 s for one step of the tiny conv model, 17 ms for this one)."""
    torch.manual_seed(0)
    encoders = {
        m: nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16, 16), nn.ReLU())
        for m in ("audio", "image")
    }
    return MultimodalClassifier(encoders, ConcatFusion(["audio", "image"], {"audio": 16, "image": 16}, 10))


class GradientProbe(Callback):
    """Records the encoders' gradient norm in ``after_backward`` (after the balancing methods'), and the
    model's after gradient clipping."""

    def __init__(self) -> None:
        self.norms: list[float] = []
        self.clipped: list[float] = []

    def after_backward(self, trainer: Any, batch: Any, output: Any) -> None:
        self.norms.append(gradient_norm(trainer.model.encoders.parameters()))

    def before_optimizer_step(self, trainer: Any) -> None:
        self.clipped.append(gradient_norm(trainer.model.parameters()))


@pytest.mark.integration
def test_float16_scaler_unscales_before_the_methods_read_gradients(tmp_path: Path, cpu_float16: None) -> None:
    """OGM modulates, and MMPareto mixes its own unimodal gradients with ``.grad``: under the scaler both
    must see true gradients. The gradients after them match the float32 run's; read before unscaling they
    would be S = 65536 times too large (MMPareto's mix then wrong, not just rescaled)."""
    overrides = ["balance=[mmpareto, ogm]", "train.probe=false", "optim.grad_clip_norm=0.2"]
    probes, stats = {}, {}
    for name in ("fp32", "fp16", "fp16-late-unscale"):
        probe = GradientProbe()
        cfg = tiny_experiment(tmp_path, f"name={name}", *overrides)
        trainer = Trainer(cfg, [probe], model=pooled_linear_model(), progress=False)
        if name == "fp32":
            trainer.precision = MixedPrecision("32", trainer.device)
        if name == "fp16-late-unscale":  # the wrong order: hooks first, unscale at the optimizer step
            trainer.precision.unscale = lambda optimizer: None  # type: ignore[method-assign]
        rows, _ = float32_steps(trainer)
        probes[name], stats[name] = probe, rows
    fp32, fp16, late = probes["fp32"], probes["fp16"], probes["fp16-late-unscale"]
    for ours, theirs in zip(fp16.norms + fp16.clipped, fp32.norms + fp32.clipped, strict=True):
        assert ours == pytest.approx(theirs, rel=0.02)
    assert max(fp16.clipped) <= 0.2 + 1e-4 < min(fp16.norms)  # clipped, after unscaling
    assert late.norms[0] > 1000 * fp32.norms[0]  # what the methods would have read
    assert_close_to_float32(stats["fp32"], stats["fp16"], 32)
    assert stats["fp16"][0]["balance/k/image"] == pytest.approx(stats["fp32"][0]["balance/k/image"], abs=1e-3)


class InfiniteGradient(Callback):
    """Makes one encoder weight's gradient inf at global step ``at`` (before the scaler unscales it)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def before_forward(self, trainer: Any, batch: Any) -> None:
        if trainer.global_step == self.at:
            weight = next(trainer.model.encoders["audio"].parameters())
            handle = weight.register_hook(lambda g: torch.full_like(g, math.inf))
            self.handle = handle

    def after_backward(self, trainer: Any, batch: Any, output: Any) -> None:
        if trainer.global_step == self.at:
            self.handle.remove()


@pytest.mark.integration
def test_a_step_the_scaler_skips_is_not_an_error_and_a_resume_continues_exactly(
    tmp_path: Path, cpu_float16: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_plots(monkeypatch)
    overrides = ["balance=[ogm_ge]", "train.probe=false", "train.loggers=[jsonl]"]
    full = Trainer(
        tiny_experiment(tmp_path, "name=full", "train.epochs=2", *overrides),
        [InfiniteGradient(at=1)],
        model=pooled_linear_model(),
        progress=False,
    )
    before: dict[int, torch.Tensor] = {}

    class Snapshot(Callback):
        def before_forward(self, t: Any, batch: Any) -> None:
            before[t.global_step] = flat_parameters(t.model)

    full.callbacks.append(Snapshot())
    full.fit()
    records = read_metrics(full.run_dir / "metrics.jsonl")
    scales = [r["train/loss_scale"] for r in records if r["kind"] == "step"]
    assert scales == [65536.0] + [32768.0] * 5  # logged after each step: step 1 halved it
    assert torch.equal(before[1], before[2])  # step 1 changed nothing
    assert not torch.equal(before[0], before[1]) and not torch.equal(before[2], before[3])
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [e["train/skipped_steps"] for e in epochs] == [1.0, 1.0]
    assert all(math.isfinite(e["val/accuracy"]) for e in epochs)

    # stopped after epoch 1 and resumed: the same weights and the same scaler state at the end
    first = Trainer(
        tiny_experiment(tmp_path, "name=resumed", "train.epochs=1", *overrides),
        [InfiniteGradient(at=1)],
        model=pooled_linear_model(),
        progress=False,
    )
    first.fit()
    resumed = Trainer(
        tiny_experiment(tmp_path, "name=resumed", "train.epochs=2", *overrides),
        resume=True,
        model=pooled_linear_model(),
        progress=False,
    )
    resumed.fit()
    assert resumed.precision.scaler.state_dict() == full.precision.scaler.state_dict()
    assert resumed.precision.skipped_steps == 1
    assert torch.equal(flat_parameters(resumed.model), flat_parameters(full.model))


def test_loggers_may_change_on_resume_precision_may_not(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from harmonia.app.train.base import BaseTrainer

    saved = tiny_experiment(tmp_path)
    view = SimpleNamespace(run_dir=tmp_path, cfg=tiny_experiment(tmp_path, "train.loggers=[jsonl, mlflow]"))
    BaseTrainer._check_resumable(view, saved)  # type: ignore[arg-type]
    view.cfg = tiny_experiment(tmp_path, "train.precision=bf16")
    with pytest.raises(ConfigError, match=r"train.precision: saved '32', now 'bf16'"):
        BaseTrainer._check_resumable(view, saved)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# the precision object on its own


def test_mixed_precision_state_round_trips_and_detects_skips() -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    precision = MixedPrecision("16-mixed", torch.device("cpu"), allow_cpu_float16=True)
    x = 0.5 * torch.randn(4, 3)
    with precision.autocast():
        out = model(x)
    assert out.dtype == torch.float16
    precision.scale(out.float().mean()).backward()
    assert float(model.weight.grad.abs().max()) > 100  # S = 65536 times the true gradient
    precision.unscale(optimizer)
    # d mean(xWᵀ + b) / dW = (1/8) Σ_i x_i for each of the 2 output rows
    true = (x.sum(0) / 8).expand(2, 3)
    torch.testing.assert_close(model.weight.grad, true, rtol=2e-3, atol=1e-4)
    assert precision.step(optimizer)
    model.weight.grad = torch.full_like(model.weight, math.inf)
    assert not precision.step(optimizer) and precision.skipped_steps == 1
    # gradients a hook made non-finite after unscaling skip the step too (the scaler has seen them finite)
    weight = model.weight.detach().clone()
    optimizer.zero_grad()
    with precision.autocast():
        precision.scale(model(x).float().mean()).backward()
    precision.unscale(optimizer)
    model.bias.grad[0] = math.nan
    assert not precision.step(optimizer) and precision.skipped_steps == 2
    assert torch.equal(model.weight, weight) and precision.loss_scale == 16384.0
    again = MixedPrecision("16-mixed", torch.device("cpu"), allow_cpu_float16=True)
    again.load_state_dict(precision.state_dict())
    assert again.loss_scale == precision.loss_scale == 16384.0 and again.skipped_steps == 2
    full = MixedPrecision("32", torch.device("cpu"))
    assert full.loss_scale == 1.0 and full.scaler is None and full.state_dict()["kind"] == "32"
