"""AMCo (Zhou et al., ICASSP 2023; BalanceMM's implementation) against independent computations, and in
training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harmonia.balance import AMCo, BalanceStep, amco_mask_ratio, dependence_shares
from harmonia.balance.amco import amco_mask
from harmonia.errors import ConfigError
from harmonia.models import MultimodalClassifier
from harmonia.models.fusion import build_fusion
from helpers import tiny_experiment, train_interrupted_and_resumed


def test_mask_ratio_follows_the_sine_ramp_of_balancemm() -> None:
    # l = 0.1 · epoch · b; p = sin(π/2 · min(0.3, l) / 0.3), worked by hand
    assert amco_mask_ratio(0, 50) == 0.0  # epoch 0: l stays 0
    assert amco_mask_ratio(1, 0) == 0.0
    assert amco_mask_ratio(1, 1) == pytest.approx(0.5)  # sin(π/6)
    assert amco_mask_ratio(1, 2) == pytest.approx(math.sqrt(3) / 2)  # sin(π/3)
    assert amco_mask_ratio(1, 3) == pytest.approx(1.0)
    assert amco_mask_ratio(1, 40) == 1.0  # bounded by min(ε, l)
    assert amco_mask_ratio(2, 1) == pytest.approx(math.sqrt(3) / 2)
    assert amco_mask_ratio(3, 1, eps=0.6, growth=0.1) == pytest.approx(math.sin(math.pi / 4))
    with pytest.raises(ConfigError, match="eps"):
        amco_mask_ratio(1, 1, eps=0.0)


def test_mask_zeros_floor_of_ratio_positions_uniformly_without_rescaling() -> None:
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([amco_mask(50, 0.37, generator) for _ in range(4000)])
    assert set(draws.unique().tolist()) == {0.0, 1.0}  # kept entries are not rescaled
    assert bool(((draws == 0).sum(dim=1) == 18).all())  # ⌊0.37 · 50⌋
    frequency = (draws == 0).float().mean(dim=0)  # each position masked with probability 18/50
    assert torch.allclose(frequency, torch.full((50,), 0.36), atol=0.04)
    assert int((amco_mask(10, 1.0, generator) == 0).sum()) == 10
    assert int((amco_mask(10, 0.0, generator) == 0).sum()) == 0


def test_dependence_shares_are_the_softmax_mass_over_the_concatenated_logits() -> None:
    a = [[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    v = [[0.0, 0.5], [3.0, 0.0], [-1.0, 0.0]]
    expected = {"audio": 0.0, "image": 0.0}
    for row_a, row_v in zip(a, v, strict=True):
        e = [math.exp(x) for x in row_a + row_v]
        expected["audio"] += sum(e[:2]) / sum(e) / len(a)
        expected["image"] += sum(e[2:]) / sum(e) / len(a)
    shares = dependence_shares({"audio": torch.tensor(a), "image": torch.tensor(v)})
    for m in expected:
        assert float(shares[m]) == pytest.approx(expected[m], rel=1e-6)
    assert float(sum(shares.values())) == pytest.approx(1.0)


def _model(modalities: tuple[str, ...] = ("audio", "image"), dim: int = 64, classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    encoders = {m: nn.Sequential(nn.Flatten(), nn.Linear(8, dim)) for m in modalities}
    return MultimodalClassifier(
        encoders, build_fusion("concat", modalities, dict.fromkeys(modalities, dim), classes)
    )


def _run_step(amco: AMCo, model: nn.Module, epoch: int, inputs: dict, labels: torch.Tensor):
    step = BalanceStep(labels, epoch, inputs=inputs)
    amco.before_forward(step)
    output = model(inputs, transform=lambda f: amco.transform_features(step, f))
    base = F.cross_entropy(output.logits, labels)
    return step, output, amco.adjust_loss(step, output, base)


def test_logit_mask_loss_is_masked_fused_ce_plus_unimodal_ces_and_flags_follow_sigma() -> None:
    modalities = ("audio", "image", "text")  # M = 3
    model = _model(modalities)
    amco = AMCo(modalities, sigma=0.3, seed=5)
    inputs = {m: torch.randn(16, 8) for m in modalities}
    labels = torch.randint(0, 10, (16,))
    step, output, loss = _run_step(amco, model, 0, inputs, labels)  # epoch 0: p = 0, nothing masked
    uni = output.unimodal_logits
    expected = F.cross_entropy(output.logits, labels) + sum(
        F.cross_entropy(uni[m], labels) for m in modalities
    )
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    shares = dependence_shares(uni)
    assert amco.dependent.tolist() == [float(shares[m]) > 0.3 for m in modalities]

    amco.dependent = torch.tensor([True, False, True])
    amco.epoch_step = torch.tensor(2)
    amco.epoch = torch.tensor(1)  # the same epoch: flags kept; b = 2 -> p = sin(π/3), N = ⌊0.866 · 10⌋ = 8
    step, output, loss = _run_step(amco, model, 1, inputs, labels)
    assert step.metrics["balance/amco/ratio"] == pytest.approx(math.sqrt(3) / 2)
    mask = amco._logit_mask
    assert mask is not None and int((mask == 0).sum()) == 8
    uni = output.unimodal_logits
    masked = {m: uni[m] * mask if m in ("audio", "text") else uni[m] for m in modalities}
    fused = sum(masked.values())  # BalanceMM's fused output: the sum of (masked) unimodal logits
    expected = F.cross_entropy(fused, labels) + sum(F.cross_entropy(masked[m], labels) for m in modalities)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    shares = dependence_shares(masked)
    assert amco.dependent.tolist() == [float(shares[m]) > 0.3 for m in modalities]
    assert step.metrics["balance/amco/dependent/audio"] == 1.0
    assert step.metrics["balance/amco/dependent/image"] == 0.0
    loss.backward()  # masked classes of a dependent modality get no gradient from its masked logits
    assert all(p.grad is not None for p in model.parameters())


def test_feature_mask_zeros_channels_of_the_dependent_modality_only() -> None:
    model = _model()
    amco = AMCo(("audio", "image"), target="features", seed=1)
    amco.dependent = torch.tensor([False, True])
    amco.epoch, amco.epoch_step = torch.tensor(1), torch.tensor(1)  # p = 0.5, N = 32 of 64 channels
    inputs = {m: torch.randn(16, 8) for m in ("audio", "image")}
    labels = torch.randint(0, 10, (16,))
    clean = model.encode(inputs)
    _, output, loss = _run_step(amco, model, 1, inputs, labels)
    assert torch.equal(output.features["audio"], clean["audio"])
    kept = output.features["image"] != 0
    assert bool((kept == kept[0]).all())  # one mask for the whole batch
    assert int((~kept[0]).sum()) == 32
    assert torch.equal(output.features["image"][:, kept[0]], clean["image"][:, kept[0]])  # not rescaled
    uni = output.unimodal_logits
    expected = F.cross_entropy(output.logits, labels) + sum(F.cross_entropy(uni[m], labels) for m in uni)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)


def test_new_epoch_resets_flags_and_ramp_and_window_switches_it_off() -> None:
    amco = AMCo(("audio", "image"), start_epoch=1, end_epoch=3)
    amco.dependent = torch.tensor([True, False])
    amco.epoch, amco.epoch_step = torch.tensor(1), torch.tensor(7)
    step = BalanceStep(torch.zeros(4, dtype=torch.long), epoch=2)
    amco.before_forward(step)
    assert amco.dependent.tolist() == [False, False] and int(amco.epoch_step) == 1
    assert step.metrics["balance/amco/ratio"] == 0.0
    step = BalanceStep(torch.zeros(4, dtype=torch.long), epoch=3)
    amco.before_forward(step)
    loss = torch.tensor(1.0)
    assert amco.adjust_loss(step, None, loss) is loss and step.metrics == {}
    with pytest.raises(ConfigError, match="balances modalities"):
        AMCo(("audio",))


def test_config_names_the_bad_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"balance\[0\]\.sigam"):
        tiny_experiment(tmp_path, "balance=[{name: amco, sigam: 0.5}]")
    with pytest.raises(ConfigError, match=r"balance\[0\]\.sigma: must be <= 1"):
        tiny_experiment(tmp_path, "balance=[{name: amco, sigma: 1.5}]")
    with pytest.raises(ConfigError, match=r"balance\[0\]\.eps: must be > 0"):
        tiny_experiment(tmp_path, "balance=[{name: amco, eps: 0}]")
    with pytest.raises(ConfigError, match=r"balance\[1\]\.target"):
        tiny_experiment(tmp_path, "balance=[opm, {name: amco, target: inputs}]")
    cfg = tiny_experiment(tmp_path, "balance=[{name: amco, sigma: 0.6, target: features}]")
    assert cfg.balance[0].settings.sigma == 0.6 and cfg.balance[0].settings.target.value == "features"


@pytest.mark.integration
@pytest.mark.parametrize("balance", ["amco", "{name: amco, target: features}"])
def test_training_logs_amco_and_resumes_exactly(tmp_path: Path, balance: str) -> None:
    run = train_interrupted_and_resumed(tmp_path, f"balance=[{balance}]", "train.probe=false", into_epoch=2)
    steps = run.steps
    keys = {"balance/amco/ratio", "balance/amco/share/audio", "balance/amco/dependent/image"}
    assert keys <= set(steps[-1])
    assert any(r["balance/amco/ratio"] > 0 for r in steps)
    assert any(r["balance/amco/dependent/audio"] + r["balance/amco/dependent/image"] > 0 for r in steps)
