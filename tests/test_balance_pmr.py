"""PMR (Fan et al., CVPR 2023) checked against direct re-computations of the paper's equations."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from harmonia.balance import PMR, BalanceStep, PMRSettings, pmr_coefficients, prototype_logits
from harmonia.balance.pmr import prototype_terms
from harmonia.errors import ConfigError
from helpers import tiny_experiment, train_interrupted_and_resumed

# --------------------------------------------------------------------------------------------------
# independent reference: the paper's equations with Python floats, per sample


def ref_probs(z: list[float], protos: list[list[float]]) -> list[float]:
    """Eq. 7: softmax over the negative Euclidean distances to the prototypes."""
    neg = [-math.sqrt(sum((a - b) ** 2 for a, b in zip(z, c, strict=True))) for c in protos]
    top = max(neg)
    e = [math.exp(v - top) for v in neg]
    return [v / sum(e) for v in e]


def ref_terms(feats: list[list[float]], labels: list[int], protos: list[list[float]]) -> tuple[float, ...]:
    """(Σ_i p_i(y_i), mean_i -log p_i(y_i), mean_i H(p_i))."""
    score = ce = ent = 0.0
    for z, y in zip(feats, labels, strict=True):
        p = ref_probs(z, protos)
        score += p[y]
        ce += -math.log(p[y])
        ent += -sum(v * math.log(v) for v in p)
    return score, ce / len(labels), ent / len(labels)


def ref_eq11(rho: float) -> tuple[float, float]:
    """Eq. 11: (β, γ) from ρ_t = s^0 / s^1."""
    if rho < 1:
        return min(max(1 / rho - 1, 0.0), 1.0), 0.0
    return 0.0, min(max(rho - 1, 0.0), 1.0)


def class_means(feats: list[list[float]], labels: list[int], num_classes: int) -> list[list[float] | None]:
    out: list[list[float] | None] = []
    for k in range(num_classes):
        rows = [z for z, y in zip(feats, labels, strict=True) if y == k]
        out.append([sum(col) / len(rows) for col in zip(*rows, strict=True)] if rows else None)
    return out


def _output(features: dict[str, torch.Tensor], num_classes: int) -> SimpleNamespace:
    batch = next(iter(features.values())).shape[0]
    return SimpleNamespace(features=features, logits=torch.zeros(batch, num_classes))


# --------------------------------------------------------------------------------------------------
# maths


def test_prototype_ce_and_entropy_match_a_direct_computation() -> None:
    feats = [[0.0, 1.0], [2.0, -1.0], [0.5, 0.5], [-1.0, 3.0]]
    protos = [[0.0, 0.0], [1.0, 1.0], [-2.0, 2.0]]
    labels = [1, 0, 1, 2]
    logits = prototype_logits(torch.tensor(feats), torch.tensor(protos))
    assert logits[1, 0].item() == pytest.approx(-math.sqrt(5))  # -‖(2,-1) - (0,0)‖
    score, ce, ent = prototype_terms(logits, torch.tensor(labels))
    expected = ref_terms(feats, labels, protos)
    assert [score.item(), ce.item() / 4, ent.item() / 4] == pytest.approx(list(expected), rel=1e-6)
    # a mask leaves rows out of the sums
    score_m, ce_m, _ = prototype_terms(logits, torch.tensor(labels), torch.tensor([True, False, True, True]))
    keep = [0, 2, 3]
    ref = ref_terms([feats[i] for i in keep], [labels[i] for i in keep], protos)
    assert [score_m.item(), ce_m.item() / 3] == pytest.approx([ref[0], ref[1]], rel=1e-6)


@pytest.mark.parametrize("scores", [(3.0, 4.5), (4.5, 3.0), (1.0, 5.0), (6.0, 2.0), (2.0, 2.0)])
def test_two_modality_coefficients_are_eq_11(scores: tuple[float, float]) -> None:
    rho, beta, eta = pmr_coefficients(torch.tensor(scores))
    r = scores[0] / scores[1]
    b, g = ref_eq11(r)
    assert rho.tolist() == pytest.approx([r, 1 / r])
    assert beta.tolist() == pytest.approx([b, g])  # PCE weights: β on modality 0, γ on modality 1
    assert eta.tolist() == pytest.approx([g, b])  # entropy weights: Eq. 13 swaps them


def test_three_modality_coefficients_compare_with_the_best_and_the_worst() -> None:
    rho, beta, eta = pmr_coefficients(torch.tensor([2.0, 3.0, 4.0]))
    assert rho.tolist() == pytest.approx([2 / 4, 3 / 4, 4 / 3])
    assert beta.tolist() == pytest.approx([1.0, 4 / 3 - 1, 0.0])  # clip(0, s_max/s - 1, 1)
    assert eta.tolist() == pytest.approx([0.0, 0.5, 1.0])  # clip(0, s/s_min - 1, 1)


def test_first_epoch_step_adds_the_paper_terms_with_the_batch_class_means() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = [0, 1, 2, 0, 1, 1]
    a = torch.randn(6, 3, generator=gen)
    v = 0.2 * torch.randn(6, 4, generator=gen)
    feats = {"audio": a.clone().requires_grad_(), "image": v.clone().requires_grad_()}
    pmr = PMR(["audio", "image"], alpha=2.0, mu=0.01, entropy_epochs=1)
    step = BalanceStep(torch.tensor(labels), epoch=0)
    base = torch.tensor(0.7)
    total = pmr.adjust_loss(step, _output(feats, 3), base)

    refs = []
    for x in (a.tolist(), v.tolist()):
        protos = class_means(x, labels, 3)
        assert all(p is not None for p in protos)
        refs.append(ref_terms(x, labels, protos))  # type: ignore[arg-type]
    rho = refs[0][0] / refs[1][0]
    b, g = ref_eq11(rho)
    expected = 0.7 + 2.0 * (b * refs[0][1] + g * refs[1][1]) - 0.01 * (g * refs[0][2] + b * refs[1][2])
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert step.metrics["balance/pmr/rho/audio"] == pytest.approx(rho, rel=1e-6)
    assert step.metrics["balance/pmr/beta/audio"] == pytest.approx(b, abs=1e-6)
    assert step.metrics["balance/pmr/beta/image"] == pytest.approx(g, abs=1e-6)
    assert step.metrics["balance/pmr/loss"] == pytest.approx(expected - 0.7, rel=1e-4, abs=1e-6)
    total.backward()  # the prototypes are detached: gradient only through the features
    assert feats["audio"].grad is not None and torch.isfinite(feats["audio"].grad).all()

    # after E_r the entropy term is gone
    later = PMR(["audio", "image"], alpha=2.0, mu=0.01, entropy_epochs=0)
    step = BalanceStep(torch.tensor(labels), epoch=0)
    out = later.adjust_loss(step, _output({"audio": a, "image": v}, 3), base)
    assert out.item() == pytest.approx(0.7 + 2.0 * (b * refs[0][1] + g * refs[1][1]), rel=1e-5)
    assert step.metrics["balance/pmr/eta/audio"] == 0.0 == step.metrics["balance/pmr/eta/image"]


def test_prototypes_accumulate_over_an_epoch_and_swap_in_with_momentum() -> None:
    gen = torch.Generator().manual_seed(1)
    pmr = PMR(["a", "b"], momentum=0.5, entropy_epochs=0)

    def feed(labels: list[int], epoch: int) -> tuple[dict[str, torch.Tensor], BalanceStep]:
        feats = {
            "a": torch.randn(len(labels), 2, generator=gen),
            "b": torch.randn(len(labels), 3, generator=gen),
        }
        step = BalanceStep(torch.tensor(labels), epoch=epoch)
        pmr.adjust_loss(step, _output(feats, 4), torch.tensor(0.0))
        return feats, step

    # epoch 0: two batches; class 3 never appears
    e0 = [feed([0, 1, 1], 0), feed([2, 0, 2, 1], 0)]
    assert not pmr.has_prototype.any()  # no epoch has ended: nothing swapped in yet
    labels0 = [0, 1, 1, 2, 0, 2, 1]
    mean0 = {m: class_means(torch.cat([f[m] for f, _ in e0]).tolist(), labels0, 4) for m in ("a", "b")}

    # epoch 1: its first step swaps epoch 0's means in (ε plays no part: no previous prototype)
    f1, _ = feed([0, 0, 1], 1)
    assert pmr.has_prototype.tolist() == [True, True, True, False]
    for i, m in enumerate(("a", "b")):
        got = pmr.prototypes(i)[:3].tolist()
        for k in range(3):
            assert got[k] == pytest.approx(mean0[m][k], rel=1e-6)
    assert pmr.counts.tolist() == [2, 1, 0, 0]  # epoch 1's accumulation started afresh

    # epoch 2: classes 0 and 1 blend 0.5 / 0.5; class 2 (absent in epoch 1) keeps its prototype
    f2, step2 = feed([3, 0, 1], 2)
    mean1 = {m: class_means(f1[m].tolist(), [0, 0, 1], 4) for m in ("a", "b")}
    for i, m in enumerate(("a", "b")):
        got = pmr.prototypes(i).tolist()
        for k in (0, 1):
            want = [0.5 * x + 0.5 * y for x, y in zip(mean0[m][k], mean1[m][k], strict=True)]  # type: ignore[arg-type]
            assert got[k] == pytest.approx(want, rel=1e-6)
        assert got[2] == pytest.approx(mean0[m][2], rel=1e-6)
    # class 3 has no prototype: left out of the softmax, its sample adds nothing (sums / batch size)
    protos = [pmr.prototypes(0)[k].tolist() for k in range(3)]
    _, ce, _ = ref_terms(f2["a"][1:].tolist(), [0, 1], protos)
    assert step2.metrics["balance/pmr/pce/a"] == pytest.approx(ce * 2 / 3, rel=1e-5)


def test_state_dict_resumes_prototypes_and_accumulators_exactly() -> None:
    gen = torch.Generator().manual_seed(2)
    batches = [
        (
            {m: torch.randn(5, 3, generator=gen) for m in ("a", "b")},
            torch.randint(0, 3, (5,), generator=gen),
            e,
        )
        for e in (0, 0, 1, 1, 2)
    ]

    def run(pmr: PMR, part: list) -> list[float]:
        out = []
        for feats, labels, epoch in part:
            step = BalanceStep(labels, epoch=epoch)
            out.append(pmr.adjust_loss(step, _output(feats, 3), torch.tensor(0.0)).item())
        return out

    a = PMR(["a", "b"], momentum=0.3)
    run(a, batches[:3])
    saved, live = copy.deepcopy(a.state_dict()), a.state_dict()
    b = PMR(["a", "b"], momentum=0.3)
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # b's buffers are still empty: re-sized on load
    assert run(a, batches[3:]) == run(b, batches[3:])
    assert not torch.equal(saved["sums_0"], b.state_dict()["sums_0"])  # b moved on
    for key, value in saved.items():  # a's later steps did not mutate the state it had returned
        assert torch.equal(value, live[key]), key
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert set(saved) == {
        "prototypes_0", "prototypes_1", "sums_0", "sums_1", "counts", "has_prototype", "accumulating_epoch",
    }  # fmt: skip


def test_outside_its_epochs_pmr_adds_nothing_but_keeps_accumulating() -> None:
    pmr = PMR(["a", "b"], start_epoch=1, end_epoch=2)
    assert [pmr.is_active(e) for e in range(3)] == [False, True, False]
    feats = {m: torch.randn(4, 2) for m in ("a", "b")}
    step = BalanceStep(torch.tensor([0, 1, 0, 1]), epoch=0)
    loss = torch.tensor(1.5)
    assert pmr.adjust_loss(step, _output(feats, 2), loss) is loss
    assert pmr.counts.tolist() == [2, 2] and "balance/pmr/loss" not in step.metrics


def test_pmr_needs_two_modalities_and_valid_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="balances modalities"):
        PMR(["audio"])
    with pytest.raises(ConfigError, match="momentum"):
        PMR(["audio", "image"], momentum=1.0)
    with pytest.raises(ConfigError, match=r"balance\[0\]\.alpha"):
        tiny_experiment(tmp_path, "balance=[{name: pmr, alpha: -1}]")
    with pytest.raises(ConfigError, match=r"balance\[0\]\.momentum"):
        tiny_experiment(tmp_path, "balance=[{name: pmr, momentum: 1.0}]")
    with pytest.raises(ConfigError, match=r"balance\[0\]\.entropy_epochs"):
        tiny_experiment(tmp_path, "balance=[{name: pmr, entropy_epochs: -2}]")
    with pytest.raises(ConfigError, match=r"balance\[0\]\.gamma"):
        tiny_experiment(tmp_path, "balance=[{name: pmr, gamma: 1.0}]")
    with pytest.raises(ConfigError, match="balances modalities"):
        tiny_experiment(tmp_path, "balance=[pmr]", "data.modalities=[image]")
    cfg = tiny_experiment(
        tmp_path, "balance=[{name: pmr, alpha: 2, mu: 0.001, momentum: 0.2, end_epoch: 70}]"
    )
    assert cfg.balance[0].settings == PMRSettings(alpha=2, mu=0.001, momentum=0.2, end_epoch=70)


# --------------------------------------------------------------------------------------------------
# end to end


@pytest.mark.integration
def test_pmr_training_logs_rho_beta_and_loss_and_resumes_exactly(tmp_path: Path) -> None:
    run = train_interrupted_and_resumed(tmp_path, "balance=[pmr]", "train.probe=false")
    full, steps = run.full, run.steps
    for m in ("audio", "image"):
        keys = {f"balance/pmr/{k}/{m}" for k in ("rho", "beta", "eta", "pce", "entropy")}
        assert keys | {"balance/pmr/loss"} <= set(steps[-1])
        assert all(math.isfinite(r[f"balance/pmr/rho/{m}"]) for r in steps)
    assert any(r["balance/pmr/loss"] != 0.0 for r in steps)
    pmr = full.callbacks[0].methods[0]  # type: ignore[attr-defined]
    assert int(pmr.accumulating_epoch) == 2 and bool(pmr.has_prototype.all())
