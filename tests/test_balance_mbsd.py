"""MBSD (BalanceMM's objective-level method) checked against a port of BalanceMM's formula, a Python-float
reference and hand-derived values."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from harmonia.balance import MBSD, BalanceStep, MBSDSettings, mbsd_pair_terms, mbsd_regularizer
from harmonia.errors import ConfigError, InputError
from helpers import tiny_experiment, train_interrupted_and_resumed

# --------------------------------------------------------------------------------------------------
# independent references


def port_balancemm(fused: torch.Tensor, uni: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """BalanceMM's MBSD training loss re-written sample by sample, as its trainer forms it: weights and
    confidences written one by one into fresh tensors (so autograd follows them), ``F.kl_div`` called
    with the strong confidence as its input, the two-modality branch's squared distance on the logits
    and the three-modality branch's on the probabilities, averaged over the three pairs."""
    n, classes = fused.shape
    probs = [torch.softmax(z, dim=1) for z in uni]
    preds = [p.argmax(dim=-1) for p in probs]
    pairs = [(0, 1)] if len(uni) == 2 else [(0, 1), (0, 2), (1, 2)]
    kl_sum = rs_sum = torch.zeros(())
    for j, k in pairs:
        w, ps, pw = torch.zeros(n), torch.zeros(n), torch.zeros(n)
        for i in range(n):
            a, b = probs[j][i][labels[i]], probs[k][i][labels[i]]
            if preds[j][i] == labels[i] or preds[k][i] == labels[i]:
                w[i] = max(a, b) - min(a, b)
            ps[i], pw[i] = max(a, b), min(a, b)
        x_j, x_k = (uni[j], uni[k]) if len(uni) == 2 else (probs[j], probs[k])
        rs = 1 / classes * torch.sum((x_j - x_k) ** 2, dim=1)
        kl = F.kl_div(ps, pw, reduction="none")
        kl_sum = kl_sum + torch.mm(w.reshape(1, -1), kl.reshape(-1, 1)).squeeze() / n
        rs_sum = rs_sum + torch.mm(w.reshape(1, -1), rs.reshape(-1, 1)).squeeze() / n
    ce = F.cross_entropy(fused, labels) + sum(F.cross_entropy(z, labels) for z in uni)
    return ce + kl_sum / len(pairs) + rs_sum / len(pairs)


def ref_float(uni: list[list[list[float]]], labels: list[int], space: str, divergence: str) -> float:
    """L_MBSD with Python floats for any number of modalities (mean over all pairs)."""

    def softmax(z: list[float]) -> list[float]:
        e = [math.exp(v - max(z)) for v in z]
        return [v / sum(e) for v in e]

    probs = [[softmax(z) for z in mod] for mod in uni]
    pairs = list(itertools.combinations(range(len(uni)), 2))
    total = 0.0
    for j, k in pairs:
        acc = 0.0
        for i, y in enumerate(labels):
            pj, pk = probs[j][i], probs[k][i]
            right = pj.index(max(pj)) == y or pk.index(max(pk)) == y
            s, t = max(pj[y], pk[y]), min(pj[y], pk[y])
            w = (s - t) if right else 0.0
            xj, xk = (uni[j][i], uni[k][i]) if space == "logits" else (pj, pk)
            dist = sum((a - b) ** 2 for a, b in zip(xj, xk, strict=True)) / len(xj)
            if divergence == "balancemm":
                div = t * (math.log(t) - s)
            else:
                ps, pw = (pj, pk) if pj[y] >= pk[y] else (pk, pj)
                div = sum(a * math.log(a / b) for a, b in zip(ps, pw, strict=True))
            acc += w * (dist + div)
        total += acc / len(labels)
    return total / len(pairs)


def _logits(modalities: int, batch: int = 7, classes: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(2.0 * torch.randn(batch, classes, generator=g)).requires_grad_() for _ in range(modalities)]


def _labels(batch: int = 7, classes: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(seed + 1))


def _run(method: MBSD, uni: list[torch.Tensor], labels: torch.Tensor, fused: torch.Tensor, epoch: int = 0):
    names = method.modalities
    output = SimpleNamespace(logits=fused, unimodal_logits=dict(zip(names, uni, strict=True)))
    step = BalanceStep(labels, epoch=epoch)
    return method.adjust_loss(step, output, F.cross_entropy(fused, labels)), step


# --------------------------------------------------------------------------------------------------
# maths


@pytest.mark.parametrize("modalities", [2, 3])
def test_loss_and_gradients_equal_the_port_of_balancemm(modalities: int) -> None:
    uni = _logits(modalities)
    fused = sum(uni)
    labels = _labels()
    names = ["audio", "image", "text"][:modalities]
    space = "logits" if modalities == 2 else "probs"  # BalanceMM's two branches
    total, step = _run(MBSD(names, space=space), uni, labels, fused)
    grads = torch.autograd.grad(total, uni)

    ref = port_balancemm(fused, uni, labels)
    ref_grads = torch.autograd.grad(ref, uni)
    assert total.item() == pytest.approx(ref.item(), rel=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert step.metrics["balance/mbsd/weight"] > 0  # the batch has weighted samples
    assert {f"balance/mbsd/ce/{m}" for m in names} <= set(step.metrics)


@pytest.mark.parametrize("space", ["logits", "probs"])
@pytest.mark.parametrize("divergence", ["balancemm", "kl"])
@pytest.mark.parametrize("modalities", [2, 4])
def test_regularizer_matches_a_float_reference_for_any_number_of_modalities(
    space: str, divergence: str, modalities: int
) -> None:
    uni = _logits(modalities, seed=modalities)
    labels = _labels(seed=modalities)
    term, _ = mbsd_regularizer(uni, labels, space, divergence)
    ref = ref_float([z.tolist() for z in uni], labels.tolist(), space, divergence)
    assert term.item() == pytest.approx(ref, rel=1e-5, abs=1e-7)


def test_hand_derived_two_sample_case() -> None:
    # sample 0: p^a = (3/4, 1/4), p^v = (1/2, 1/2), y = 0: audio is right, w = 3/4 - 1/2 = 1/4
    # sample 1: p^a = (1/4, 3/4), p^v = (1/3, 2/3), y = 0: both wrong, w = 0
    za = torch.tensor([[math.log(3), 0.0], [0.0, math.log(3)]])
    zv = torch.tensor([[0.0, 0.0], [0.0, math.log(2)]])
    labels = torch.tensor([0, 0])
    terms = mbsd_pair_terms(za, zv, labels)
    assert terms.weight.tolist() == pytest.approx([0.25, 0.0])
    assert terms.distance[0].item() == pytest.approx(math.log(3) ** 2 / 2)  # ((log 3)^2 + 0) / C
    assert terms.divergence[0].item() == pytest.approx(0.5 * (math.log(0.5) - 0.75))  # t (log t - s)

    reg, parts = mbsd_regularizer([za, zv], labels)
    expected = 0.25 * (math.log(3) ** 2 / 2 + 0.5 * math.log(0.5) - 0.375) / 2
    assert reg.item() == pytest.approx(expected, rel=1e-6)
    assert parts["weight"].item() == pytest.approx(0.125)

    probs_reg, _ = mbsd_regularizer([za, zv], labels, space="probs")
    assert probs_reg.item() == pytest.approx(0.25 * (1 / 16 + 0.5 * math.log(0.5) - 0.375) / 2, rel=1e-6)
    kl_reg, _ = mbsd_regularizer([za, zv], labels, divergence="kl")
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # KL((3/4, 1/4) || (1/2, 1/2))
    assert kl_reg.item() == pytest.approx(0.25 * (math.log(3) ** 2 / 2 + kl) / 2, rel=1e-6)

    # the whole objective adds the unimodal cross-entropies: -log(3/4) - log(1/2), -log(1/4) - log(1/3)
    method = MBSD(["audio", "image"])
    added, metrics = method.objective({"audio": za, "image": zv}, labels)
    ce_a, ce_v = (math.log(4 / 3) + math.log(4)) / 2, (math.log(2) + math.log(3)) / 2
    assert added.item() == pytest.approx(expected + ce_a + ce_v, rel=1e-6)
    assert metrics["balance/mbsd/ce/audio"] == pytest.approx(ce_a, rel=1e-6)
    assert metrics["balance/mbsd/loss"] == pytest.approx(expected, rel=1e-6)


def test_samples_with_both_modalities_wrong_get_no_regularizer_gradient() -> None:
    za = torch.tensor([[0.0, 2.0], [3.0, 0.0]], requires_grad=True)
    zv = torch.tensor([[0.0, 1.0], [0.0, 0.5]], requires_grad=True)
    labels = torch.tensor([0, 0])  # sample 0: both predict class 1; sample 1: audio right
    reg, _ = mbsd_regularizer([za, zv], labels)
    ga, gv = torch.autograd.grad(reg, [za, zv])
    assert ga[0].abs().sum().item() == 0.0 == gv[0].abs().sum().item()
    assert ga[1].abs().sum().item() > 0


def test_detaching_the_weight_keeps_the_value_and_changes_the_gradient() -> None:
    uni = _logits(2, seed=3)
    labels = _labels(seed=3)
    flowing, _ = mbsd_regularizer(uni, labels)
    detached, _ = mbsd_regularizer(uni, labels, detach_weight=True)
    assert flowing.item() == pytest.approx(detached.item(), rel=1e-7)
    g_flow = torch.autograd.grad(flowing, uni)
    g_det = torch.autograd.grad(detached, uni)
    assert not torch.allclose(g_flow[0], g_det[0])
    # with the weight a constant, the gradient is that of Σ_i w_i (R_i + D_i) / B with w fixed
    w = mbsd_pair_terms(uni[0], uni[1], labels).weight.detach()
    t = mbsd_pair_terms(uni[0], uni[1], labels)
    manual = torch.autograd.grad((w * (t.distance + t.divergence)).mean(), uni)
    torch.testing.assert_close(g_det[0], manual[0])


def test_kl_divergence_trains_only_the_weaker_modality_of_each_sample() -> None:
    za = torch.tensor([[2.0, 0.0, 0.0]], requires_grad=True)  # strong on the true class 0
    zv = torch.tensor([[0.5, 0.0, 1.0]], requires_grad=True)
    terms = mbsd_pair_terms(za, zv, torch.tensor([0]), divergence="kl", detach_weight=True)
    ga, gv = torch.autograd.grad(terms.divergence.sum(), [za, zv])
    assert ga.abs().sum().item() == 0.0 and gv.abs().sum().item() > 0
    assert terms.divergence.item() > 0


def test_outside_its_epochs_mbsd_returns_the_loss_unchanged() -> None:
    method = MBSD(["audio", "image"], start_epoch=1, end_epoch=3)
    assert [method.active(e) for e in range(4)] == [False, True, True, False]
    uni = _logits(2)
    fused = sum(uni).detach()
    labels = _labels()
    output = SimpleNamespace(logits=fused, unimodal_logits={"audio": uni[0], "image": uni[1]})
    step = BalanceStep(labels, epoch=0)
    loss = torch.tensor(0.9)
    assert method.adjust_loss(step, output, loss) is loss and not step.metrics
    later, _ = _run(method, uni, labels, fused, epoch=1)
    assert later.item() > F.cross_entropy(fused, labels).item()


def test_without_unimodal_ce_only_the_regularizer_is_added() -> None:
    uni = _logits(3, seed=5)
    labels = _labels(seed=5)
    added, metrics = MBSD(["a", "b", "c"], unimodal_ce=False).objective(
        dict(zip("abc", uni, strict=True)), labels
    )
    reg, _ = mbsd_regularizer(uni, labels)
    assert added.item() == pytest.approx(reg.item(), rel=1e-7)
    assert not any(k.startswith("balance/mbsd/ce/") for k in metrics)


# --------------------------------------------------------------------------------------------------
# bad input and config


def test_mbsd_needs_two_modalities_valid_settings_and_its_logits(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="balances modalities"):
        MBSD(["audio"])
    with pytest.raises(ConfigError, match="space must be one of"):
        MBSD(["audio", "image"], space="features")
    with pytest.raises(ConfigError, match="start_epoch < end_epoch"):
        MBSD(["audio", "image"], start_epoch=4, end_epoch=4)
    with pytest.raises(InputError, match="no unimodal logits for"):
        MBSD(["audio", "image"]).objective({"audio": torch.zeros(2, 3)}, torch.tensor([0, 1]))
    with pytest.raises(InputError, match="at least 2 modalities"):
        mbsd_regularizer([torch.zeros(2, 3)], torch.tensor([0, 1]))
    with pytest.raises(InputError, match="one shape"):
        mbsd_pair_terms(torch.zeros(2, 3), torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match=r"balance\[0\]\.space"):
        tiny_experiment(tmp_path, "balance=[{name: mbsd, space: features}]")
    with pytest.raises(ConfigError, match=r"balance\[0\]\.divergence"):
        tiny_experiment(tmp_path, "balance=[{name: mbsd, divergence: js}]")
    with pytest.raises(ConfigError, match=r"balance\[0\]\.end_epoch"):
        tiny_experiment(tmp_path, "balance=[{name: mbsd, end_epoch: 0}]")
    with pytest.raises(ConfigError, match=r"balance\[0\]\.start_epoch"):
        tiny_experiment(tmp_path, "balance=[{name: mbsd, start_epoch: -1}]")
    with pytest.raises(ConfigError, match="balances modalities"):
        tiny_experiment(tmp_path, "balance=[mbsd]", "data.modalities=[image]")
    cfg = tiny_experiment(tmp_path, "balance=[{name: mbsd, space: probs, divergence: kl, end_epoch: 80}]")
    assert cfg.balance[0].settings == MBSDSettings(space="probs", divergence="kl", end_epoch=80)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# end to end


@pytest.mark.integration
def test_mbsd_training_logs_its_terms_and_resumes_exactly(tmp_path: Path) -> None:
    run = train_interrupted_and_resumed(tmp_path, "balance=[mbsd]", "train.probe=false")
    keys = {f"balance/mbsd/{k}" for k in ("loss", "weight", "distance", "divergence")}
    keys |= {f"balance/mbsd/ce/{m}" for m in ("audio", "image")}
    assert all(keys <= set(r) for r in run.steps)
    assert all(math.isfinite(r["balance/mbsd/loss"]) for r in run.steps)
    assert any(r["balance/mbsd/weight"] > 0 for r in run.steps)
