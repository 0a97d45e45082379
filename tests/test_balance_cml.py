"""CML (Ma et al., ICML 2023) against an independent re-implementation of its regulariser, and in training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harmonia.balance import CML, BalanceStep, cml_regularizer
from harmonia.errors import ConfigError
from harmonia.models import MultimodalClassifier, MultimodalOutput
from harmonia.models.fusion import build_fusion
from helpers import tiny_experiment, train_interrupted_and_resumed


def reference_cml(chain: list[list[list[float]]], labels: list[int], exempt: bool) -> float:
    """Σ_i Σ_k s_ik · max(0, Conf(z_i^{T_k}) - Conf(z_i^{T_{k-1}})) with plain floats; Conf = max softmax."""

    def softmax(row: list[float]) -> list[float]:
        e = [math.exp(v) for v in row]
        return [v / sum(e) for v in e]

    total = 0.0
    for k in range(1, len(chain)):
        for i, y in enumerate(labels):
            fuller, reduced = softmax(chain[k - 1][i]), softmax(chain[k][i])
            pred_fuller, pred_reduced = fuller.index(max(fuller)), reduced.index(max(reduced))
            if exempt and pred_reduced == y and pred_fuller != y:
                continue
            total += max(0.0, max(reduced) - max(fuller))
    return total


def test_zero_when_no_confidence_rises() -> None:
    full = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(9.0)]])  # Conf 0.75, 0.9
    reduced = torch.tensor([[0.0, 0.0], [0.0, math.log(4.0)]])  # Conf 0.5, 0.8
    term, violated = cml_regularizer([full, reduced], torch.tensor([0, 1]))
    assert float(term) == 0.0
    assert float(violated) == 0.0


def test_hand_derived_positive_term_and_the_exemption() -> None:
    labels = torch.tensor([0, 0, 1])
    full = torch.tensor(
        [[0.0, 0.0], [0.0, math.log(3.0)], [math.log(4.0), 0.0]]
    )  # Conf .5 .75 .8; pred ? 1 0
    reduced = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0], [0.0, math.log(9.0)]])  # Conf .75 .5 .9; 0 ? 1
    # sample 0: .75 - .5 = .25, but argmax of [0, 0] is class 0 (= label) so it is not exempt
    # sample 1: confidence falls; sample 2: reduced right (1), full wrong (0): .9 - .8 = .1, exempt
    term, violated = cml_regularizer([full, reduced], labels, exempt_corrected=True)
    assert float(term) == pytest.approx(0.25, abs=1e-6)
    assert float(violated) == pytest.approx(1 / 3)
    term, violated = cml_regularizer([full, reduced], labels, exempt_corrected=False)
    assert float(term) == pytest.approx(0.35, abs=1e-6)
    assert float(violated) == pytest.approx(2 / 3)
    term, _ = cml_regularizer([full, reduced], labels, exempt_corrected=False, reduction="mean")
    assert float(term) == pytest.approx(0.35 / 3, abs=1e-6)


@pytest.mark.parametrize("exempt", [True, False])
def test_matches_the_reference_on_a_three_link_chain(exempt: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    chain = [torch.randn(6, 3, generator=generator) * 2 for _ in range(4)]
    labels = torch.randint(0, 3, (6,), generator=generator)
    term, _ = cml_regularizer(chain, labels, exempt_corrected=exempt)
    expected = reference_cml([z.tolist() for z in chain], labels.tolist(), exempt)
    assert expected > 0
    assert float(term) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("exempt", [True, False])
def test_gradient_matches_finite_differences(exempt: bool) -> None:
    generator = torch.Generator().manual_seed(1)
    chain = [
        (torch.randn(5, 3, generator=generator, dtype=torch.float64) * 2).requires_grad_() for _ in range(3)
    ]
    labels = torch.randint(0, 3, (5,), generator=generator)
    assert float(cml_regularizer(chain, labels, exempt)[0].detach()) > 0
    assert torch.autograd.gradcheck(lambda *zs: cml_regularizer(list(zs), labels, exempt)[0], tuple(chain))


def _concat_model(modalities: tuple[str, ...], dim: int = 4, classes: int = 3) -> MultimodalClassifier:
    torch.manual_seed(0)
    encoders = {m: nn.Linear(2, dim) for m in modalities}
    return MultimodalClassifier(
        encoders, build_fusion("concat", modalities, dict.fromkeys(modalities, dim), classes)
    )


def test_two_modalities_reduced_prediction_and_loss_match_balancemm_formula() -> None:
    """For a concat head the reduced prediction is ``out - o^removed + b/M`` (BalanceMM's form); the loss is
    ``(CE(full) + CE(reduced)) / 2 + λ · L_CML``."""
    model = _concat_model(("audio", "image"))
    cml = CML.build(model, CML.Settings(lam=0.5), seed=3)
    inputs = {m: torch.randn(8, 2) for m in ("audio", "image")}
    labels = torch.randint(0, 3, (8,))
    output = model(inputs)
    orders = cml.removal_orders(8)  # drawn before the step, as adjust_loss will
    step = BalanceStep(labels, epoch=0)
    ce = F.cross_entropy(output.logits, labels)
    loss = cml.adjust_loss(step, output, ce)

    bias = model.fusion.fc.bias / 2
    removed = [("audio", "image")[int(j)] for j in orders[:, 0]]
    reduced = torch.stack(
        [output.logits[i] - output.unimodal_logits[m][i] + bias for i, m in enumerate(removed)]
    )
    term = reference_cml([output.logits.tolist(), reduced.tolist()], labels.tolist(), exempt=True)
    expected = (ce + F.cross_entropy(reduced, labels)) / 2 + 0.5 * term
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), abs=1e-5)
    assert step.metrics["balance/cml/loss"] == pytest.approx(0.5 * term, abs=1e-5)
    assert 0 <= step.metrics["balance/cml/violated"] <= 1
    loss.backward()  # differentiable through the fusion head and the encoders
    assert all(p.grad is not None for p in model.parameters())


def test_three_modalities_chain_removes_one_modality_per_link() -> None:
    modalities = ("audio", "image", "text")
    model = _concat_model(modalities)
    cml = CML.build(model, seed=0)
    features = {m: torch.randn(5, 4) for m in modalities}
    logits = model.fusion(features)
    orders = cml.removal_orders(5)
    assert sorted(orders[0].tolist()) == [0, 1, 2]
    chain = cml.chain(features, logits, orders)
    assert len(chain) == 3
    for i in range(5):
        kept_last = [m for j, m in enumerate(modalities) if j == int(orders[i, 2])]
        only = {m: features[m][i : i + 1] if m in kept_last else torch.zeros(1, 4) for m in modalities}
        torch.testing.assert_close(chain[2][i : i + 1], model.fusion(only))
    assert torch.equal(cml.removal_orders(5), orders)  # same step, same draw: resumable


def test_a_model_without_fusion_head_uses_summed_unimodal_logits() -> None:
    class Additive(nn.Module):
        modalities = ("audio", "image")

        def __init__(self) -> None:
            super().__init__()
            self.heads = nn.ModuleDict({m: nn.Linear(3, 2) for m in self.modalities})

        def unimodal_logits(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {m: self.heads[m](features[m]) for m in self.modalities}

    model = Additive()
    cml = CML.build(model)
    features = {m: torch.randn(4, 3) for m in model.modalities}
    uni = model.unimodal_logits(features)
    logits = uni["audio"] + uni["image"]
    orders = cml.removal_orders(4)
    reduced = cml.chain(features, logits, orders)[1]
    for i in range(4):
        kept = model.modalities[1 - int(orders[i, 0])]
        torch.testing.assert_close(reduced[i], uni[kept][i])
    output = MultimodalOutput(logits, features, uni)
    assert (
        float(
            cml.adjust_loss(BalanceStep(torch.zeros(4, dtype=torch.long), 0), output, logits.sum()).detach()
        )
        != 0
    )


def test_inactive_epochs_leave_the_loss_alone_and_one_modality_is_refused() -> None:
    model = _concat_model(("audio", "image"))
    cml = CML.build(model, CML.Settings(start_epoch=2))
    output = model({m: torch.randn(4, 2) for m in ("audio", "image")})
    loss = torch.tensor(1.5)
    step = BalanceStep(torch.zeros(4, dtype=torch.long), epoch=1)
    assert cml.adjust_loss(step, output, loss) is loss
    assert step.metrics == {}
    with pytest.raises(ConfigError, match="balances modalities"):
        CML(("audio",))


def test_config_names_the_bad_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"balance\[0\]\.lamda"):
        tiny_experiment(tmp_path, "balance=[{name: cml, lamda: 0.1}]")
    with pytest.raises(ConfigError, match=r"balance\[0\]\.lam: must be >= 0"):
        tiny_experiment(tmp_path, "balance=[{name: cml, lam: -1.0}]")
    with pytest.raises(ConfigError, match=r"balance\[1\]\.start_epoch: must be >= 0"):
        tiny_experiment(tmp_path, "balance=[opm, {name: cml, start_epoch: -1}]")
    cfg = tiny_experiment(tmp_path, "balance=[{name: cml, lam: 0.3, reduction: mean}]")
    assert cfg.balance[0].settings.lam == 0.3


@pytest.mark.integration
@pytest.mark.parametrize("methods", ["cml", "cml,opm"])
def test_training_logs_cml_and_resumes_exactly(tmp_path: Path, methods: str) -> None:
    steps = train_interrupted_and_resumed(tmp_path, f"balance=[{methods}]", "train.probe=false").steps
    assert {"balance/cml/loss", "balance/cml/violated"} <= set(steps[-1])
    assert any(r["balance/cml/loss"] > 0 for r in steps)
    if "opm" in methods:
        assert {"balance/q/audio", "balance/q/image"} <= set(steps[-1])
