"""ReconBoost (Hua et al., ICML 2024) checked against direct re-computations of the official code's loss."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from harmonia.balance import BalanceStep, ReconBoost, ReconBoostSettings, reconboost_loss
from harmonia.errors import ConfigError
from helpers import tiny_experiment, train_interrupted_and_resumed

# --------------------------------------------------------------------------------------------------
# independent references with Python floats


def ref_softmax(z: list[float]) -> list[float]:
    top = max(z)
    e = [math.exp(v - top) for v in z]
    return [v / sum(e) for v in e]


def ref_boost(
    own: list[list[float]], ens: list[list[float]] | None, y: list[int], w1: float, w2: float
) -> float:
    """The official ``-w1 mean_c(t log p) + w2 mean_c(t softmax(F) log p)``, averaged over the batch."""
    total = 0.0
    for i, row in enumerate(own):
        logp = [math.log(v) for v in ref_softmax(row)]
        q = [1.0] * len(row) if ens is None else ref_softmax(ens[i])
        t = [1.0 if c == y[i] else 0.0 for c in range(len(row))]
        a = sum(t[c] * logp[c] for c in range(len(row))) / len(row)
        b = sum(t[c] * q[c] * logp[c] for c in range(len(row))) / len(row)
        total += -w1 * a + w2 * b
    return total / len(own)


OWN = [[2.0, -1.0, 0.5], [0.1, 0.2, -0.3], [-1.0, 3.0, 0.0]]
OTHER = [[1.5, 0.0, -0.5], [0.0, 2.0, 1.0], [0.3, -0.2, 0.4]]
THIRD = [[0.2, 0.1, 0.0], [-1.0, 0.5, 0.5], [2.0, 0.0, -2.0]]
Y = [0, 2, 1]


def _logits() -> dict[str, torch.Tensor]:
    return {
        "audio": torch.tensor(OWN, dtype=torch.float64, requires_grad=True),
        "image": torch.tensor(OTHER, dtype=torch.float64, requires_grad=True),
        "text": torch.tensor(THIRD, dtype=torch.float64, requires_grad=True),
    }


# --------------------------------------------------------------------------------------------------
# maths


def test_boosting_loss_matches_the_official_formula_on_hand_made_logits() -> None:
    own, other = torch.tensor(OWN), torch.tensor(OTHER)
    y = torch.tensor(Y)
    loss, q = reconboost_loss(own, other, y, 5.0, 1.0)
    assert float(loss.detach()) == pytest.approx(ref_boost(OWN, OTHER, Y, 5.0, 1.0), rel=1e-6)
    assert q.tolist() == pytest.approx([ref_softmax(OTHER[i])[Y[i]] for i in range(3)], rel=1e-6)
    empty, q1 = reconboost_loss(own, None, y, 4.0, 1.0)  # empty ensemble: q = 1 (official constant c0)
    assert float(empty) == pytest.approx(ref_boost(OWN, None, Y, 4.0, 1.0), rel=1e-6)
    assert q1.tolist() == [1.0, 1.0, 1.0]


def test_reconcilement_term_weighs_down_what_the_ensemble_already_gets_right() -> None:
    own = torch.tensor(OWN, requires_grad=True)
    y = torch.tensor(Y)
    confident = torch.nn.functional.one_hot(y, 3).float() * 20  # q ≈ 1: weight w1 - w2
    plain, _ = reconboost_loss(own, None, y, 5.0, 0.0)
    agreeing, _ = reconboost_loss(own, confident, y, 5.0, 1.0)
    assert float(agreeing.detach()) == pytest.approx(float(plain.detach()) * 4 / 5, rel=1e-5)


def test_step_uses_the_ensemble_of_the_others_and_only_the_boosted_modality_gets_gradient() -> None:
    method = ReconBoost(["audio", "image", "text"], weight1=5.0, weight2=1.0, alpha=0.5, boost_rate=0.7)
    logits = _logits()
    step = BalanceStep(torch.tensor(Y), epoch=0)
    loss = method.adjust_loss(step, SimpleNamespace(unimodal_logits=logits), torch.tensor(0.0))
    ens = [[0.7 * (OTHER[i][c] + THIRD[i][c]) for c in range(3)] for i in range(3)]
    assert float(loss.detach()) == pytest.approx(
        ref_boost(OWN, ens, Y, 5.0, 1.0), rel=1e-9
    )  # stage 0: no MSE term
    loss.backward()
    assert logits["audio"].grad is not None and logits["image"].grad is None and logits["text"].grad is None
    assert step.metrics["balance/reconboost/boost/audio"] == pytest.approx(float(loss.detach()))
    assert "balance/reconboost/consolidation/audio" not in step.metrics


def test_consolidation_term_is_added_without_gradient_from_stage_one() -> None:
    method = ReconBoost(["audio", "image"], alpha=0.5, stage_epochs=1, rectify_epochs=1)
    logits = _logits()
    step = BalanceStep(torch.tensor(Y), epoch=2)  # stage 1 boosts image; its partner is audio
    loss = method.adjust_loss(step, SimpleNamespace(unimodal_logits=logits), torch.tensor(0.0))
    mse = (
        sum(
            (a - b) ** 2
            for i in range(3)
            for a, b in zip(ref_softmax(OTHER[i]), ref_softmax(OWN[i]), strict=True)
        )
        / 9
    )
    expected = ref_boost(OTHER, OWN, Y, 5.0, 1.0) + 0.5 * mse
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-9)
    assert step.metrics["balance/reconboost/consolidation/image"] == pytest.approx(mse, rel=1e-9)
    loss.backward()
    plain, _ = reconboost_loss(
        logits["image"].detach().requires_grad_(), logits["audio"], torch.tensor(Y), 5, 1
    )
    plain.backward()
    assert logits["audio"].grad is None  # the MSE is detached, as in the official code


def test_schedule_alternates_stages_and_rectification() -> None:
    method = ReconBoost(["audio", "image"], stage_epochs=2, rectify_epochs=1)
    phases = [(p.stage, p.modality) for p in map(method.phase, range(8))]
    assert phases == [
        (0, "audio"), (0, "audio"), (0, None),
        (1, "image"), (1, "image"), (1, None),
        (2, "audio"), (2, "audio"),
    ]  # fmt: skip
    assert [method.phase(e).modality for e in range(4)] == ["audio", "audio", None, "image"]
    no_rect = ReconBoost(["a", "b", "c"], stage_epochs=1, rectify_epochs=0)
    assert [no_rect.phase(e).modality for e in range(5)] == ["a", "b", "c", "a", "b"]
    assert no_rect.previous("a") == "c" and no_rect.previous("b") == "a"


def test_rectification_keeps_the_fused_loss_and_late_ensemble_membership() -> None:
    method = ReconBoost(["audio", "image"], stage_epochs=1, rectify_epochs=1)
    step = BalanceStep(torch.tensor(Y), epoch=1)
    fused = torch.tensor(1.25)
    assert method.adjust_loss(step, SimpleNamespace(unimodal_logits=_logits()), fused) is fused
    assert step.metrics == {"balance/reconboost/rectify": 1.25}
    late = ReconBoost(["a", "b", "c"], ensemble_from_start=False)
    assert late.ensemble_members(0, "a") == ()
    assert late.ensemble_members(1, "b") == ("a",)
    assert late.ensemble_members(2, "c") == ("a", "b")
    assert late.ensemble_members(3, "a") == ("b", "c")
    assert ReconBoost(["a", "b", "c"]).ensemble_members(0, "a") == ("b", "c")
    # an empty ensemble: q = 1, weight w1 - w2, as with the official constant c0
    step = BalanceStep(torch.tensor(Y), epoch=0)
    logits = {"a": torch.tensor(OWN), "b": torch.tensor(OTHER), "c": torch.tensor(THIRD)}
    loss = late.adjust_loss(step, SimpleNamespace(unimodal_logits=logits), fused)
    assert float(loss.detach()) == pytest.approx(ref_boost(OWN, None, Y, 5.0, 1.0), rel=1e-6)
    assert step.metrics["balance/reconboost/agreement/a"] == 1.0


def test_reconboost_needs_two_modalities_and_valid_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least 2"):
        ReconBoost(["audio"])
    with pytest.raises(ConfigError, match="stage_epochs"):
        ReconBoost(["audio", "image"], stage_epochs=0)
    for key, value in (
        ("weight1", 0),
        ("weight2", -1),
        ("alpha", -0.5),
        ("boost_rate", 0),
        ("stage_epochs", 0),
    ):
        with pytest.raises(ConfigError, match=rf"balance\[0\]\.{key}"):
            tiny_experiment(tmp_path, f"balance=[{{name: reconboost, {key}: {value}}}]")
    with pytest.raises(ConfigError, match=r"balance\[0\]\.rectify_epochs"):
        tiny_experiment(tmp_path, "balance=[{name: reconboost, rectify_epochs: -1}]")
    cfg = tiny_experiment(
        tmp_path, "balance=[{name: reconboost, weight1: 4, stage_epochs: 1, rectify_epochs: 2}]"
    )
    assert cfg.balance[0].settings == ReconBoostSettings(weight1=4.0, stage_epochs=1, rectify_epochs=2)


# --------------------------------------------------------------------------------------------------
# end to end


@pytest.mark.integration
def test_reconboost_training_logs_alternates_and_resumes_exactly(tmp_path: Path) -> None:
    run = train_interrupted_and_resumed(
        tmp_path,
        "balance=[{name: reconboost, stage_epochs: 1, rectify_epochs: 1}]",
        "model.fusion=sum",
        "train.probe=false",
        at_epoch=1,
    )
    full, steps = run.full, run.steps
    per_epoch = len(full.train_loader)
    epoch0, epoch1, epoch2 = steps[:per_epoch], steps[per_epoch : 2 * per_epoch], steps[2 * per_epoch :]
    assert all(
        "balance/reconboost/boost/audio" in r and "balance/reconboost/boost/image" not in r for r in epoch0
    )
    assert all("balance/reconboost/rectify" in r for r in epoch1)
    assert all("balance/reconboost/consolidation/image" in r for r in epoch2)
    assert all(math.isfinite(r["balance/reconboost/boost/image"]) for r in epoch2)
    assert {"accuracy", "unimodal_accuracy/audio", "unimodal_accuracy/image"} <= set(run.full_result.test)
