"""MMPareto (Wei & Hu, ICML 2024): the integration rule by hand, one real step against separately computed
gradients, training with logs and exact resume, and config validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harmonia.balance import BalanceStep, MMPareto, MMParetoSettings
from harmonia.balance.mmpareto import integrate, pareto_weights
from harmonia.errors import ConfigError
from helpers import tiny_experiment, train_interrupted_and_resumed


def min_norm_weight(g1: torch.Tensor, g2: torch.Tensor) -> float:
    """Closed-form argmin_{a in [0,1]} ||a g1 + (1-a) g2||^2 (independent of the library)."""
    return float(torch.clamp(((g2 - g1) @ g2) / ((g1 - g2) @ (g1 - g2)), 0.0, 1.0))


def test_pareto_weights_of_a_conflicting_and_a_non_conflicting_pair() -> None:
    g_mm = torch.tensor([1.0, 0.0, 2.0])
    g_uni = torch.tensor([-2.0, 1.0, -1.0])  # cos < 0: conflict
    cos, w_mm, w_uni = pareto_weights(g_mm, g_uni)
    assert cos == pytest.approx(float(F.cosine_similarity(g_mm, g_uni, dim=0)), abs=1e-6)
    assert cos < 0
    a = min_norm_weight(g_mm, g_uni)  # (g2-g1).g2 / |g1-g2|^2 = (6+1+3)/(9+1+9) = 10/19
    assert a == pytest.approx(10 / 19)
    assert (w_mm, w_uni) == pytest.approx((a, 1 - a))
    # the min-norm point is orthogonal to the segment between the two gradients
    point = w_mm * g_mm + w_uni * g_uni
    assert float(point @ (g_mm - g_uni)) == pytest.approx(0.0, abs=1e-6)

    g_ok = torch.tensor([1.0, 1.0, 0.0])  # cos > 0: equal weights
    cos, w_mm, w_uni = pareto_weights(g_mm, g_ok)
    assert cos > 0
    assert (w_mm, w_uni) == (0.5, 0.5)


def test_integration_keeps_at_least_the_sums_magnitude_and_scales_by_gamma() -> None:
    g_mm = [torch.tensor([1.0, 0.0]), torch.tensor([[2.0]])]
    g_uni = [torch.tensor([-2.0, 1.0]), torch.tensor([[-1.0]])]
    a = 10 / 19
    out = integrate(g_mm, g_uni, a, 1 - a, gamma=1.5)
    for got, x, y in zip(out, g_mm, g_uni, strict=True):
        h = 2 * a * x + 2 * (1 - a) * y
        scale = max(1.0, float((x + y).norm() / h.norm()))
        torch.testing.assert_close(got, 1.5 * scale * h)
    # no conflict: gamma times the plain sum
    same = integrate(g_mm, g_mm, 0.5, 0.5, gamma=1.5)
    for got, x in zip(same, g_mm, strict=True):
        torch.testing.assert_close(got, 1.5 * 2 * x)
    # a zero direction gives a zero gradient, not NaN
    zero = integrate([torch.tensor([1.0])], [torch.tensor([-1.0])], 0.5, 0.5, gamma=1.5)
    assert zero[0].tolist() == [0.0]


def _tiny_model():  # type: ignore[no-untyped-def]
    from harmonia.models import build_classifier

    return build_classifier(
        ["audio", "image"], {"audio": 1, "image": 1}, 3, encoder_widths=[4], feature_dim=8
    )


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_real_step_writes_the_rule_applied_to_separately_computed_gradients(sign: float) -> None:
    # sign=-1 trains on -CE: the multimodal gradient then opposes the unimodal ones (observed cos < 0 for
    # both encoders), so both branches of the rule meet a real model
    torch.manual_seed(0)
    model = _tiny_model().train()
    inputs = {"audio": torch.randn(6, 1, 8, 8), "image": torch.randn(6, 1, 8, 8)}
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    method = MMPareto.build(model, MMParetoSettings(gamma=1.5))

    out = model(inputs)
    loss = sign * F.cross_entropy(out.logits, labels)
    params = dict(model.named_parameters())
    g_mm = dict(zip(params, torch.autograd.grad(loss, list(params.values()), retain_graph=True), strict=True))
    g_uni = {
        m: torch.autograd.grad(
            F.cross_entropy(out.unimodal_logits[m], labels),
            list(model.encoders[m].parameters()),
            retain_graph=True,
        )
        for m in ("audio", "image")
    }

    step = BalanceStep(labels, epoch=0)
    returned = method.adjust_loss(step, out, loss)
    assert returned is loss
    model.zero_grad()
    returned.backward()
    method.after_backward(step, out)

    for m in ("audio", "image"):
        names = [f"encoders.{m}.{n}" for n, _ in model.encoders[m].named_parameters()]
        a = torch.cat([g_mm[n].flatten() for n in names])
        b = torch.cat([g.flatten() for g in g_uni[m]])
        cos = float(F.cosine_similarity(a, b, dim=0))
        w = 0.5 if cos > 0 else min_norm_weight(a, b)
        if sign < 0:
            assert cos < 0
        assert step.metrics[f"balance/mmpareto/cos/{m}"] == pytest.approx(cos, abs=1e-5)
        assert step.metrics[f"balance/mmpareto/w_mm/{m}"] == pytest.approx(w, abs=1e-5)
        assert step.metrics[f"balance/mmpareto/w_uni/{m}"] == pytest.approx(1 - w, abs=1e-5)
        for n, gu in zip(names, g_uni[m], strict=True):
            h = 2 * w * g_mm[n] + 2 * (1 - w) * gu
            scale = max(1.0, float((g_mm[n] + gu).norm() / h.norm()))
            torch.testing.assert_close(params[n].grad, 1.5 * scale * h, rtol=1e-4, atol=1e-7)
    for n, p in model.fusion.named_parameters():  # the fusion head: the plain multimodal gradient
        torch.testing.assert_close(p.grad, g_mm[f"fusion.{n}"])


def test_mmpareto_needs_two_encoders() -> None:
    with pytest.raises(ConfigError, match="balances modalities"):
        MMPareto({"audio": torch.nn.Linear(2, 2)})


@pytest.mark.integration
def test_mmpareto_trains_logs_and_resumes_exactly(tmp_path: Path) -> None:
    keys = set(train_interrupted_and_resumed(tmp_path, "balance=[mmpareto]", "train.probe=false").steps[-1])
    for m in ("audio", "image"):
        assert {
            f"balance/mmpareto/cos/{m}",
            f"balance/mmpareto/w_mm/{m}",
            f"balance/mmpareto/w_uni/{m}",
            f"balance/mmpareto/uni_loss/{m}",
        } <= keys


def test_mmpareto_config_names_the_bad_key(tmp_path: Path) -> None:
    cfg = tiny_experiment(tmp_path, "balance=[{name: mmpareto, gamma: 2.0}]")
    assert cfg.balance[0].name == "mmpareto"
    with pytest.raises(ConfigError, match=r"balance\[0\]\.gama"):
        tiny_experiment(tmp_path, "balance=[{name: mmpareto, gama: 2.0}]")
    with pytest.raises(ConfigError, match=r"balance\[0\]\.gamma"):
        tiny_experiment(tmp_path, "balance=[{name: mmpareto, gamma: -1.0}]")
