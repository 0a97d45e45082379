"""AGM (Li et al., ICCV 2023) checked against direct re-computations of the official code's formulas."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harmonia.balance import AGM, AGMSettings, BalanceStep, agm_coefficients, mono_modal_responses
from harmonia.errors import ConfigError
from helpers import tiny_experiment, train_interrupted_and_resumed

# --------------------------------------------------------------------------------------------------
# independent reference: the official code's formulas written out with Python floats, per sample


def reference_score(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """``mean_k -log softmax(o)[k][y_k]``, a probability below 1e-8 counted as 1e-8 (official code)."""
    total = 0.0
    for row, y in zip(logits.tolist(), labels.tolist(), strict=True):
        top = max(row)
        p = math.exp(row[y] - top) / sum(math.exp(v - top) for v in row)
        total += -math.log(max(p, 1e-8))
    return total / len(labels)


def reference_coefficients(
    scores: list[float], running: list[float], alpha: float, clip: float | None
) -> list[float]:
    """``k^m = exp(α·min(r̄^m - r^m, c))``, ``r^m = exp(M/(M-1)(mean s - s^m))`` (official URFunny/CREMA-D)."""
    m = len(scores)
    mean_s, mean_run = sum(scores) / m, sum(running) / m
    out = []
    for s, run in zip(scores, running, strict=True):
        ratio = math.exp((mean_s - s) * m / (m - 1))
        optimal = math.exp((mean_run - run) * m / (m - 1))
        gap = optimal - ratio if clip is None else min(optimal - ratio, clip)
        out.append(math.exp(alpha * gap))
    return out


def _encoders(names: list[str]) -> dict[str, nn.Module]:
    return {m: nn.Linear(1, 1) for m in names}


# --------------------------------------------------------------------------------------------------
# maths


def test_two_modality_responses_are_the_official_halves() -> None:
    torch.manual_seed(0)
    w = {"a": torch.randn(3, 4), "b": torch.randn(3, 4)}

    def fuse(f: dict[str, torch.Tensor]) -> torch.Tensor:  # nonlinear: an interaction term
        return torch.tanh(f["a"] @ w["a"].T) * (f["b"] @ w["b"].T) + f["a"] @ w["b"].T + 0.3

    feats = {"a": torch.randn(5, 4), "b": torch.randn(5, 4)}
    zero = {m: torch.zeros_like(x) for m, x in feats.items()}
    full = fuse(feats)
    only_a = fuse({"a": feats["a"], "b": zero["b"]})  # the official "pad_visual_out"
    only_b = fuse({"a": zero["a"], "b": feats["b"]})
    out = mono_modal_responses(fuse, feats)
    torch.testing.assert_close(out["a"], 0.5 * (full - only_b + only_a))
    torch.testing.assert_close(out["b"], 0.5 * (full - only_a + only_b))
    torch.testing.assert_close(out["a"] + out["b"], full)


def test_three_modality_responses_are_the_official_thirds_and_sixths() -> None:
    torch.manual_seed(1)
    w = {m: torch.randn(4, 3) for m in "avt"}

    def fuse(f: dict[str, torch.Tensor]) -> torch.Tensor:
        h = {m: f[m] @ w[m].T for m in "avt"}
        return h["a"] * h["v"] - torch.sigmoid(h["t"] + h["a"]) + h["v"] * h["t"] * h["a"] + 0.1

    feats = {m: torch.randn(6, 3) for m in "avt"}

    def v(*present: str) -> torch.Tensor:
        return fuse({m: feats[m] if m in present else torch.zeros_like(feats[m]) for m in "avt"})

    # run/URFunny_main.py's Modality_Audio, with pad_x_out = v(everything but x)
    total, pad_a, pad_v, pad_t = v("a", "v", "t"), v("v", "t"), v("a", "t"), v("a", "v")
    pad_va, pad_vt, pad_at = v("t"), v("a"), v("v")
    expected = {
        "a": (total - pad_a + pad_vt) / 3 + (pad_v - pad_at + pad_t - pad_va) / 6,
        "v": (total - pad_v + pad_at) / 3 + (pad_a - pad_vt + pad_t - pad_va) / 6,
        "t": (total - pad_t + pad_va) / 3 + (pad_v - pad_at + pad_a - pad_vt) / 6,
    }
    out = mono_modal_responses(fuse, feats)
    for m in "avt":
        torch.testing.assert_close(out[m], expected[m])
    torch.testing.assert_close(out["a"] + out["v"] + out["t"], total)


@pytest.mark.parametrize(
    ("names", "alpha", "clip"), [(["audio", "image"], 1.0, 10.0), (list("avt"), 0.7, 0.05)]
)
def test_scores_coefficients_and_running_average_over_three_steps(
    names: list[str], alpha: float, clip: float | None
) -> None:
    gen = torch.Generator().manual_seed(3)
    agm = AGM(_encoders(names), alpha=alpha, clip=clip)
    running = [0.0] * len(names)
    for t in range(1, 4):
        labels = torch.randint(0, 4, (5,), generator=gen)
        responses = {m: 3 * torch.randn(5, 4, generator=gen) for m in names}
        if t == 2:  # one sample whose true class has probability < 1e-8: the score counts it as 1e-8
            responses[names[0]][0] = -40.0
            responses[names[0]][0, (int(labels[0]) + 1) % 4] = 0.0
        scores, k = agm.update(responses, labels)
        expected_scores = [reference_score(responses[m], labels) for m in names]
        expected_k = reference_coefficients(expected_scores, running, alpha, clip)
        running = [r * (t - 1) / t + s / t for r, s in zip(running, expected_scores, strict=True)]
        assert [scores[m] for m in names] == pytest.approx(expected_scores, rel=1e-9)
        assert k.tolist() == pytest.approx(expected_k, rel=1e-9)
        assert agm.running_scores.tolist() == pytest.approx(running, rel=1e-9)
        assert int(agm.num_steps) == t
    if clip == 10.0:
        assert scores[names[0]] > 0 and all(v != 1.0 for v in k.tolist())


def test_the_first_step_compares_with_a_running_average_of_zero_and_the_cap_bounds_the_boost() -> None:
    # S_0 = 0 for all: r̄ = 1; the weaker modality (higher score) has r < 1, so k = exp(α·(1 - r)) > 1
    k, ratio, optimal = agm_coefficients(torch.tensor([0.2, 1.4], dtype=torch.float64), torch.zeros(2), 1.0)
    assert optimal.tolist() == [1.0, 1.0]
    assert ratio.tolist() == pytest.approx([math.exp(1.2), math.exp(-1.2)])
    assert k.tolist() == pytest.approx([math.exp(1 - math.exp(1.2)), math.exp(1 - math.exp(-1.2))])
    # S = (0, 1): r̄ = (e, 1/e), r = (1, 1): modality 0 gets exp(2·(e - 1)) without cap, exp(2·1) with c = 1
    same, slow = torch.tensor([0.0, 0.0]), torch.tensor([0.0, 1.0])
    capped, _, _ = agm_coefficients(same, slow, 2.0, clip=1.0)
    assert capped.tolist() == pytest.approx([math.exp(2.0), math.exp(2.0 * (math.exp(-1) - 1))])
    uncapped, _, _ = agm_coefficients(same, slow, 2.0, clip=None)
    assert float(uncapped[0]) == pytest.approx(math.exp(2.0 * (math.e - 1)), rel=1e-6)


def _tiny_model() -> nn.Module:
    from harmonia.models import build_classifier

    torch.manual_seed(0)
    return build_classifier(
        ["audio", "image"], {"audio": 1, "image": 1}, 3, encoder_widths=[4], feature_dim=8
    )


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_training_step_scales_each_encoder_gradient_by_its_coefficient_and_not_the_head() -> None:
    model = _tiny_model()
    plain = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(5)
    inputs = {m: torch.randn(6, 1, 8, 8, generator=gen) for m in ("audio", "image")}
    labels = torch.tensor([0, 1, 2, 0, 1, 2])

    F.cross_entropy(plain(inputs).logits, labels).backward()
    expected_grads = _grads(plain)

    # the coefficients, computed directly: responses of the concat head on zeroed features (eval mode)
    with torch.no_grad():
        feats = plain.encode(inputs)
        head = plain.fusion.eval()
        zero = {m: torch.zeros_like(f) for m, f in feats.items()}
        full = head(feats)
        only_a = head({"audio": feats["audio"], "image": zero["image"]})
        only_i = head({"audio": zero["audio"], "image": feats["image"]})
        scores = [
            reference_score(0.5 * (full - only_i + only_a), labels),
            reference_score(0.5 * (full - only_a + only_i), labels),
        ]
    coefs = dict(zip(["audio", "image"], reference_coefficients(scores, [0.0, 0.0], 3.0, 10.0), strict=True))
    assert abs(coefs["audio"] - 1) > 1e-3 and abs(coefs["image"] - 1) > 1e-3

    agm = AGM.build(model, AGMSettings(alpha=3.0))
    step = BalanceStep(labels, epoch=0)
    output = model(inputs, transform=lambda f: agm.transform_features(step, f))
    assert model.fusion.training  # restored after the muted passes
    F.cross_entropy(output.logits, labels).backward()
    agm.after_backward(step, output)

    assert step.metrics["balance/agm/score/audio"] == pytest.approx(scores[0], rel=1e-6)
    assert step.metrics["balance/agm/score/image"] == pytest.approx(scores[1], rel=1e-6)
    assert step.metrics["balance/agm/coef/audio"] == pytest.approx(coefs["audio"], rel=1e-6)
    assert step.metrics["balance/agm/coef/image"] == pytest.approx(coefs["image"], rel=1e-6)
    got = _grads(model)
    assert set(got) == set(expected_grads)
    for name, g in got.items():
        modality = name.split(".")[1] if name.startswith("encoders.") else None
        factor = coefs[modality] if modality else 1.0  # the fusion head is untouched
        torch.testing.assert_close(g, expected_grads[name] * factor, rtol=1e-5, atol=1e-7, msg=name)
    assert agm.state_dict().keys() == {"running_scores", "num_steps"}  # the head is not AGM's submodule


def test_outside_its_epochs_agm_keeps_the_gradients_but_updates_the_running_average() -> None:
    model = _tiny_model()
    agm = AGM.build(model, AGMSettings(alpha=3.0, start_epoch=1, end_epoch=2))
    assert [agm.is_active(e) for e in range(3)] == [False, True, False]
    plain = copy.deepcopy(model)
    inputs = {m: torch.randn(4, 1, 8, 8) for m in ("audio", "image")}
    labels = torch.tensor([0, 1, 2, 0])
    F.cross_entropy(plain(inputs).logits, labels).backward()
    step = BalanceStep(labels, epoch=0)
    output = model(inputs, transform=lambda f: agm.transform_features(step, f))
    F.cross_entropy(output.logits, labels).backward()
    agm.after_backward(step, output)
    assert step.metrics["balance/agm/coef/audio"] == 1.0 == step.metrics["balance/agm/coef/image"]
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, _grads(plain)[name], msg=name)
    assert int(agm.num_steps) == 1 and bool((agm.running_scores > 0).all())


def test_state_dict_resumes_the_running_average() -> None:
    names = ["audio", "image", "text"]
    gen = torch.Generator().manual_seed(7)
    batches = [
        ({m: torch.randn(4, 5, generator=gen) for m in names}, torch.randint(0, 5, (4,), generator=gen))
        for _ in range(3)
    ]
    a = AGM(_encoders(names), alpha=0.5)
    for responses, labels in batches[:2]:
        a.update(responses, labels)
    b = AGM(_encoders(names), alpha=0.5)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    saved = copy.deepcopy(a.state_dict())
    ka = a.update(*batches[2])[1]
    assert torch.equal(saved["running_scores"], b.running_scores)  # a's update did not mutate the saved state
    assert torch.equal(ka, b.update(*batches[2])[1])


def test_agm_needs_two_modalities_and_valid_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="balances modalities"):
        AGM(_encoders(["audio"]))
    with pytest.raises(ConfigError, match="alpha"):
        AGM(_encoders(["audio", "image"]), alpha=-1)
    with pytest.raises(ConfigError, match="fusion head"):
        AGM.build(_no_head_model())
    with pytest.raises(ConfigError, match=r"balance\[0\]\.beta"):
        tiny_experiment(tmp_path, "balance=[{name: agm, beta: 1.0}]")
    with pytest.raises(ConfigError, match=r"balance\[0\]\.alpha"):
        tiny_experiment(tmp_path, "balance=[{name: agm, alpha: -0.5}]")
    with pytest.raises(ConfigError, match=r"balance\[0\]\.clip"):
        tiny_experiment(tmp_path, "balance=[{name: agm, clip: -1}]")
    with pytest.raises(ConfigError, match="balances modalities"):
        tiny_experiment(tmp_path, "balance=[agm]", "data.modalities=[image]")
    cfg = tiny_experiment(tmp_path, "balance=[{name: agm, alpha: 0.1, clip: null, end_epoch: 20}]")
    assert cfg is not None


def _no_head_model() -> nn.Module:
    class NoHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoders = nn.ModuleDict({"audio": nn.Linear(1, 1), "image": nn.Linear(1, 1)})

    return NoHead()


# --------------------------------------------------------------------------------------------------
# end to end


@pytest.mark.integration
def test_agm_training_logs_scores_and_coefficients_and_resumes_exactly(tmp_path: Path) -> None:
    steps = train_interrupted_and_resumed(tmp_path, "balance=[agm]", "train.probe=false").steps
    for m in ("audio", "image"):
        assert {f"balance/agm/score/{m}", f"balance/agm/coef/{m}"} <= set(steps[-1])
        assert all(math.isfinite(r[f"balance/agm/coef/{m}"]) for r in steps)
    assert any(r["balance/agm/coef/audio"] != 1.0 for r in steps)
