"""MLA (Zhang et al., CVPR 2024) checked against direct re-computations of the official code's equations."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from harmonia.balance import MLA, BalanceStep, MLASettings, mla_fuse, mla_weights, owm_update, tie_sum_fusion
from harmonia.errors import ConfigError
from harmonia.models.fusion import ConcatFusion, SumFusion
from helpers import tiny_experiment, train_interrupted_and_resumed

# --------------------------------------------------------------------------------------------------
# independent references with Python floats


def ref_update(p: list[list[float]], r: list[float], alpha: float, normalize: bool) -> list[list[float]]:
    d = len(r)
    k = [sum(p[i][j] * r[j] for j in range(d)) for i in range(d)]
    denom = alpha + sum(r[i] * k[i] for i in range(d))
    out = [[p[i][j] - k[i] * k[j] / denom for j in range(d)] for i in range(d)]
    if normalize:
        norm = math.sqrt(sum(v * v for row in out for v in row))
        out = [[v / norm for v in row] for row in out]
    return out


def ref_entropy(z: list[float]) -> float:
    top = max(z)
    e = [math.exp(v - top) for v in z]
    p = [v / sum(e) for v in e]
    return -sum(v * math.log(v) for v in p)


def _model(dims: dict[str, int] | None = None, classes: int = 3) -> SimpleNamespace:
    dims = dims or {"audio": 4, "image": 4}
    return SimpleNamespace(modalities=tuple(dims), fusion=SumFusion(tuple(dims), dims, classes))


# --------------------------------------------------------------------------------------------------
# maths


def test_projector_update_matches_the_formula_by_hand() -> None:
    torch.manual_seed(0)
    p = torch.eye(3, dtype=torch.float64) + 0.1 * torch.ones(3, 3, dtype=torch.float64)
    r = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    for normalize in (False, True):
        got = owm_update(p, r, 0.1, normalize)
        want = torch.tensor(ref_update(p.tolist(), r.tolist(), 0.1, normalize), dtype=torch.float64)
        torch.testing.assert_close(got, want)
    assert math.isclose(float(torch.linalg.matrix_norm(owm_update(p, r, 0.1, True))), 1.0)


def test_unnormalized_projector_is_recursive_least_squares() -> None:
    # P_0 = I, n updates: P_n = α (α I + Σ_j r_j r_jᵀ)⁻¹ (Sherman-Morrison, applied n times)
    torch.manual_seed(1)
    rs = torch.randn(4, 6, dtype=torch.float64)
    p = torch.eye(6, dtype=torch.float64)
    for r in rs:
        p = owm_update(p, r, 0.3, normalize=False)
    want = 0.3 * torch.linalg.inv(0.3 * torch.eye(6, dtype=torch.float64) + rs.T @ rs)
    torch.testing.assert_close(p, want)


@pytest.mark.parametrize("normalize", [False, True])
def test_projected_gradient_is_orthogonal_to_the_stored_directions(normalize: bool) -> None:
    torch.manual_seed(2)
    rs = torch.randn(3, 8, dtype=torch.float64)
    p = torch.eye(8, dtype=torch.float64)
    for r in rs:
        p = owm_update(p, r, 1e-10, normalize)
    g = torch.randn(5, 8, dtype=torch.float64)  # a weight gradient [C, d]
    projected = g @ p.T
    # the head's response to every stored direction is unchanged by the update: ΔW r_j = 0
    assert (projected @ rs.T).abs().max() < 1e-6 * projected.abs().max()
    # ... and directions orthogonal to all of them pass (scaled by the normalisation only)
    q, _ = torch.linalg.qr(torch.cat([rs.T, torch.randn(8, 1, dtype=torch.float64)], dim=1))
    free = q[:, 3]
    scale = float(free @ p @ free)
    torch.testing.assert_close(p @ free, scale * free)
    assert scale == pytest.approx(1.0 if not normalize else 1 / math.sqrt(5), rel=1e-6)


def test_entropy_fusion_matches_the_formula_on_hand_made_logits() -> None:
    logits = {
        "audio": torch.tensor([[2.0, 0.0, 0.0], [0.1, 0.0, 0.2]]),
        "image": torch.tensor([[0.0, 0.5, 0.0], [0.0, 5.0, -1.0]]),
        "text": torch.tensor([[1.0, 1.0, 1.0], [0.3, -0.3, 0.0]]),
    }
    fused = mla_fuse(logits)
    for i in range(2):
        ent = {m: ref_entropy(z[i].tolist()) for m, z in logits.items()}
        top = max(ent.values())
        w = {m: math.exp(top - e) for m, e in ent.items()}
        w = {m: v / sum(w.values()) for m, v in w.items()}
        want = [sum(w[m] * float(logits[m][i, c]) for m in logits) for c in range(3)]
        torch.testing.assert_close(fused[i], torch.tensor(want))
    lam = mla_weights(logits)
    torch.testing.assert_close(sum(lam.values()), torch.ones(2))
    assert float(lam["image"][1]) > float(lam["audio"][1])  # the confident modality weighs more


def test_batch_mode_reproduces_the_official_gating() -> None:
    # official calculate_entropy: softmax over dim 0 (the batch), entropy summed over the whole batch
    a = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 2.0]])
    v = torch.tensor([[0.5, 0.5], [0.0, 0.1], [4.0, 0.0]])
    ent = []
    for o in (a, v):
        cols = [[float(o[i, c]) for i in range(3)] for c in range(2)]
        total = 0.0
        for col in cols:
            e = [math.exp(x) for x in col]
            total += -sum(x / sum(e) * math.log(x / sum(e)) for x in e)
        ent.append(total)
    top = max(ent)
    w = [math.exp(top - e) for e in ent]
    w = [x / sum(w) for x in w]
    torch.testing.assert_close(mla_fuse({"a": a, "v": v}, mode="batch"), w[0] * a + w[1] * v)


def test_build_ties_the_sum_heads_into_one_shared_head() -> None:
    model = _model({"audio": 4, "image": 4, "text": 4})
    method = MLA.build(model)
    heads = model.fusion.heads
    assert heads["image"].weight is heads["audio"].weight and heads["text"].bias is heads["audio"].bias
    assert method.head is heads["audio"] and len(list(model.fusion.parameters())) == 2
    assert "projector" in method.state_dict() and not any("weight" in k for k in method.state_dict())
    with pytest.raises(ConfigError, match=r"model\.fusion=sum"):
        tie_sum_fusion(SimpleNamespace(fusion=ConcatFusion(("a", "b"), {"a": 4, "b": 4}, 3)))
    with pytest.raises(ConfigError, match="one feature_dim"):
        MLA.build(_model({"audio": 4, "image": 5}))


def _step_once(method: MLA, feats: dict[str, torch.Tensor], labels: torch.Tensor) -> BalanceStep:
    step = BalanceStep(labels, epoch=0)
    loss = method.adjust_loss(step, SimpleNamespace(features=feats), torch.zeros(()))
    loss.backward()
    return step


def test_per_batch_step_projects_each_modality_gradient_with_its_own_projector() -> None:
    torch.manual_seed(3)
    model = _model({"audio": 4, "image": 4, "text": 4})
    method = MLA.build(model, MLASettings(alpha=0.1))
    head = method.head
    w0, b0 = head.weight.detach().clone(), head.bias.detach().clone()
    labels = torch.tensor([0, 2, 1, 1, 0])
    for t in range(2):
        feats = {m: torch.randn(5, 4, requires_grad=True) for m in method.modalities}
        p = method.projector.clone()
        head.zero_grad()
        step = _step_once(method, feats, labels)
        # reference: official order, the first modality update of training neither recorded nor projected
        want_w = torch.zeros_like(w0)
        want_b = torch.zeros_like(b0)
        for i, m in enumerate(method.modalities):
            w = w0.clone().requires_grad_(True)
            b = b0.clone().requires_grad_(True)
            loss = F.cross_entropy(F.linear(feats[m].detach(), w, b), labels)
            gw, gb = torch.autograd.grad(loss, (w, b))
            assert step.metrics[f"balance/mla/loss/{m}"] == pytest.approx(float(loss.detach()))
            if not (t == 0 and i == 0):
                p = torch.tensor(ref_update(p.tolist(), feats[m].detach().mean(0).tolist(), 0.1, True))
                gw = gw @ p.T
            want_w += gw
            want_b += gb
        torch.testing.assert_close(head.weight.grad, want_w)
        torch.testing.assert_close(head.bias.grad, want_b)  # the bias is not projected
        torch.testing.assert_close(method.projector, p)
        assert all(feats[m].grad is not None for m in method.modalities)
        assert {f"balance/mla/weight/{m}" for m in method.modalities} <= set(step.metrics)
    assert int(method.updates) == 6 and int(method.steps) == 2


def test_per_step_schedule_is_a_round_robin() -> None:
    torch.manual_seed(4)
    method = MLA.build(_model({"audio": 4, "image": 4, "text": 4}), MLASettings(schedule="per_step"))
    seen = []
    for _ in range(7):
        feats = {m: torch.randn(3, 4, requires_grad=True) for m in method.modalities}
        step = _step_once(method, feats, torch.tensor([0, 1, 2]))
        trained = [m for m in method.modalities if f"balance/mla/loss/{m}" in step.metrics]
        assert [m for m in method.modalities if feats[m].grad is not None] == trained
        seen += trained
    assert seen == ["audio", "image", "text", "audio", "image", "text", "audio"]
    assert int(method.updates) == 7


def test_mla_needs_two_modalities_and_valid_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="balances modalities"):
        MLA(["audio"], torch.nn.Linear(4, 3))
    with pytest.raises(ConfigError, match="schedule"):
        MLA(["audio", "image"], torch.nn.Linear(4, 3), schedule="sometimes")
    with pytest.raises(ConfigError, match=r"balance\[0\]\.alpha"):
        tiny_experiment(tmp_path, "balance=[{name: mla, alpha: 0}]", "model.fusion=sum")
    with pytest.raises(ConfigError, match=r"balance\[0\]\.schedule"):
        tiny_experiment(tmp_path, "balance=[{name: mla, schedule: sometimes}]", "model.fusion=sum")
    cfg = tiny_experiment(
        tmp_path,
        "balance=[{name: mla, alpha: 0.01, schedule: per_step, normalize: false}]",
        "model.fusion=sum",
    )
    assert cfg.balance[0].settings == MLASettings(alpha=0.01, schedule="per_step", normalize=False)


# --------------------------------------------------------------------------------------------------
# end to end


@pytest.mark.integration
def test_mla_training_logs_losses_and_weights_and_resumes_exactly(tmp_path: Path) -> None:
    from harmonia.app.train import Trainer

    run = train_interrupted_and_resumed(tmp_path, "balance=[mla]", "model.fusion=sum", "train.probe=false")
    full, steps = run.full, run.steps
    for m in ("audio", "image"):
        assert {f"balance/mla/loss/{m}", f"balance/mla/weight/{m}"} <= set(steps[-1])
        assert all(math.isfinite(r[f"balance/mla/loss/{m}"]) for r in steps)
    mla = full.callbacks[0].methods[0]  # type: ignore[attr-defined]
    assert int(mla.updates) == 2 * full.global_step
    heads = full.model.fusion.heads
    assert heads["audio"].weight is heads["image"].weight
    assert {"accuracy", "unimodal_accuracy/audio", "unimodal_accuracy/image"} <= set(run.full_result.test)

    with pytest.raises(ConfigError, match=r"model\.fusion=sum"):
        Trainer(tiny_experiment(tmp_path / "c", "balance=[mla]"), progress=False)
