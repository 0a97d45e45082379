"""LFM (Yang et al., NeurIPS 2024): the matching loss and the weight schedules against independent
computations, the adjusted loss, training with logs and exact resume, and config validation."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harmonia.balance import LFM, BalanceStep, LFMSettings, js_divergence, lfm_cls_weight, matching_loss
from harmonia.errors import ConfigError
from helpers import tiny_experiment, train_interrupted_and_resumed

# the official Crema_epoch.py's polynomial (classification weight), highest power last
OFFICIAL = [2.04623704e-01, 3.35472727e-03, 1.22989557e-04, -2.92947416e-06, 2.23835486e-08, -5.39717505e-11]


def official_alignment(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The official code's ``Alignment`` (F.kl_div(p.log(), m) is KL(m || p)), written out."""
    p, q = F.softmax(a, dim=-1), F.softmax(b, dim=-1)
    m = 0.5 * p + 0.5 * q
    return 0.5 * (F.kl_div(p.log(), m, reduction="batchmean") + F.kl_div(q.log(), m, reduction="batchmean"))


def test_js_divergence_by_hand_and_against_the_official_formula() -> None:
    # two classes: p = (1/2, 1/2), q = (0.9, 0.1): r = (0.7, 0.3)
    a = torch.tensor([[0.0, 0.0]])
    b = torch.tensor([[math.log(9.0), 0.0]])
    kl_r_p = 0.7 * math.log(0.7 / 0.5) + 0.3 * math.log(0.3 / 0.5)
    kl_r_q = 0.7 * math.log(0.7 / 0.9) + 0.3 * math.log(0.3 / 0.1)
    assert float(js_divergence(a, b)) == pytest.approx(0.5 * (kl_r_p + kl_r_q), rel=1e-6)

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 4, generator=g), 3 * torch.randn(5, 4, generator=g)
    assert float(js_divergence(a, b)) == pytest.approx(float(official_alignment(a, b)), rel=1e-5)
    assert float(js_divergence(a, a)) == pytest.approx(0.0, abs=1e-7)
    # stable where softmax underflows (the official p.log() would give inf - inf)
    far = torch.tensor([[200.0, -200.0]])
    assert torch.isfinite(js_divergence(far, -far))
    # mixture-first, so unbounded (the textbook JS is <= log 2): r = (1/2, 1/2), KL(r || p) = 400/2 - log 2
    assert float(js_divergence(far, -far)) == pytest.approx(200.0 - math.log(2.0), rel=1e-5)


def test_matching_loss_is_the_mean_over_pairs() -> None:
    g = torch.Generator().manual_seed(1)
    z = {m: torch.randn(6, 3, generator=g) for m in ("audio", "image", "text")}
    pairs = [("audio", "image"), ("audio", "text"), ("image", "text")]
    expected = sum(float(official_alignment(z[m], z[n])) for m, n in pairs) / 3
    assert float(matching_loss(z, ("audio", "image", "text"))) == pytest.approx(expected, rel=1e-5)
    assert float(matching_loss(z, ("audio", "image"))) == pytest.approx(
        float(official_alignment(z["audio"], z["image"])), rel=1e-5
    )


def test_js_divergence_gradcheck() -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randn(3, 4, generator=g, dtype=torch.double, requires_grad=True)
    b = torch.randn(3, 4, generator=g, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(js_divergence, (a, b))


def test_fitted_schedule_is_the_official_polynomial_clipped() -> None:
    poly = np.polynomial.polynomial.polyval
    for e in (0, 1, 10, 50, 100, 160):
        assert lfm_cls_weight(e) == pytest.approx(poly(e, OFFICIAL), rel=1e-12)
    assert lfm_cls_weight(0) == pytest.approx(0.204623704)
    assert lfm_cls_weight(100) == pytest.approx(0.5391551960, rel=1e-9)
    assert poly(183, OFFICIAL) > 1.0  # the official polynomial overshoots ...
    assert lfm_cls_weight(183) == 0.95  # ... and is clipped at the learning-based code's bound
    assert lfm_cls_weight(250) == pytest.approx(poly(200, OFFICIAL))  # held at the fitted range's end
    # epoch_scale: a 20-epoch run follows the 200-epoch curve
    assert lfm_cls_weight(5, epoch_scale=10.0) == pytest.approx(poly(50, OFFICIAL))
    assert lfm_cls_weight(0, min_weight=0.3) == 0.3


def test_heuristic_and_constant_schedules() -> None:
    assert lfm_cls_weight(0, "heuristic") == 0.05  # 1 - exp(0) = 0, clipped
    assert lfm_cls_weight(1, "heuristic") == pytest.approx(1 - math.exp(-0.3))
    assert lfm_cls_weight(3, "heuristic", decay=0.1) == pytest.approx(1 - math.exp(-0.3))
    assert lfm_cls_weight(20, "heuristic") == 0.95
    # ModalBed's getAlpha_heritic: matching weight clip(exp(-0.3 e), 0.05, 0.95)
    for e in range(12):
        assert 1 - lfm_cls_weight(e, "heuristic") == pytest.approx(
            float(np.clip(np.exp(-0.3 * e), 0.05, 0.95))
        )
    assert lfm_cls_weight(7, "constant", cls_weight=0.4) == 0.4


def test_adjust_loss_weights_the_two_terms_and_logs() -> None:
    g = torch.Generator().manual_seed(3)
    unimodal = {m: torch.randn(4, 3, generator=g, requires_grad=True) for m in ("audio", "image")}
    output = SimpleNamespace(logits=unimodal["audio"] + unimodal["image"], unimodal_logits=unimodal)
    labels = torch.tensor([0, 1, 2, 0])
    loss = F.cross_entropy(output.logits, labels)
    lfm = LFM(("audio", "image"))
    step = BalanceStep(labels, epoch=10)
    out = lfm.adjust_loss(step, output, loss)
    alpha = float(np.polynomial.polynomial.polyval(10, OFFICIAL))
    match = float(official_alignment(unimodal["audio"].detach(), unimodal["image"].detach()))
    assert out.item() == pytest.approx(2 * (alpha * loss.item() + (1 - alpha) * match), rel=1e-5)
    assert step.metrics["balance/lfm/cls_weight"] == pytest.approx(alpha)
    assert step.metrics["balance/lfm/match_weight"] == pytest.approx(1 - alpha)
    assert step.metrics["balance/lfm/match_loss"] == pytest.approx(match, rel=1e-5)
    out.backward()
    assert all(z.grad is not None and float(z.grad.abs().sum()) > 0 for z in unimodal.values())

    const = LFM(("audio", "image"), schedule="constant", cls_weight=1.0, max_weight=1.0, scale=1.0)
    assert const.adjust_loss(BalanceStep(labels, epoch=0), output, loss).item() == pytest.approx(loss.item())


def test_lfm_needs_two_modalities_and_consistent_bounds() -> None:
    with pytest.raises(ConfigError, match="balances modalities"):
        LFM(("audio",))
    with pytest.raises(ConfigError, match="min_weight"):
        LFM(("audio", "image"), min_weight=0.9, max_weight=0.1)


def test_config_names_the_bad_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"balance\[0\]\.schedul"):
        tiny_experiment(tmp_path, "balance=[{name: lfm, schedul: fitted}]")
    with pytest.raises(ConfigError, match=r"balance\[0\]\.cls_weight: must be <= 1"):
        tiny_experiment(tmp_path, "balance=[{name: lfm, cls_weight: 2.0}]")
    with pytest.raises(ConfigError, match=r"balance\[1\]\.epoch_scale"):
        tiny_experiment(tmp_path, "balance=[opm, {name: lfm, epoch_scale: 0}]")
    with pytest.raises(ConfigError, match=r"balance\[0\]\.schedule"):
        tiny_experiment(tmp_path, "balance=[{name: lfm, schedule: learned}]")
    cfg = tiny_experiment(tmp_path, "balance=[{name: lfm, schedule: heuristic, decay: 0.5}]")
    settings = cfg.balance[0].settings
    assert isinstance(settings, LFMSettings)
    assert (settings.schedule.value, settings.decay) == ("heuristic", 0.5)


@pytest.mark.integration
def test_lfm_trains_logs_and_resumes_exactly(tmp_path: Path) -> None:
    overrides = ("balance=[{name: lfm, epoch_scale: 50}]", "train.probe=false")
    steps = train_interrupted_and_resumed(tmp_path, *overrides).steps
    assert {"balance/lfm/cls_weight", "balance/lfm/match_weight", "balance/lfm/match_loss"} <= set(steps[-1])
    weights = sorted({round(r["balance/lfm/cls_weight"], 9) for r in steps})
    poly = np.polynomial.polynomial.polyval
    assert weights == pytest.approx(sorted(poly(50.0 * e, OFFICIAL) for e in range(3)))  # one per epoch
    assert any(r["balance/lfm/match_loss"] > 0 for r in steps)
