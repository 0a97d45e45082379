"""Gradient-Blending (CVPR 2020): ΔO, ΔG and OGR from hand-made loss curves, w_k ∝ ΔG_k / ΔO_k², the blended
loss on hand-made logits, the super-epoch schedule, the buffers that resume, end-to-end training with an
exact resume and config validation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from harmonia.balance import GBlending, GBlendingSettings, blended_loss, gblending_weights, ogr_terms
from harmonia.errors import ConfigError
from helpers import tiny_experiment, train_interrupted_and_resumed

# --------------------------------------------------------------------------------------------------
# maths


def _hand_weights(
    curves: dict[str, tuple[float, float, float, float]], gain: str = "clip"
) -> dict[str, float]:
    """Weights computed by hand from ``(L^T_before, L^V_before, L^T_now, L^V_now)`` per head."""
    raw = {}
    for k, (t0, v0, t1, v1) in curves.items():
        d_o = (v1 - t1) - (v0 - t0)
        d_g = v0 - v1
        g = max(d_g, 0.0) if gain == "clip" else abs(d_g)
        raw[k] = g / (d_o * d_o + 1e-8)
    z = sum(raw.values())
    return {k: r / z for k, r in raw.items()}


CURVES = {  # (train before, val before, train now, val now)
    "audio": (2.0, 2.1, 1.0, 1.8),  # generalises little (ΔG 0.3), over-fits a lot (ΔO 0.7)
    "image": (2.0, 2.2, 1.5, 1.6),  # ΔG 0.6, ΔO -0.1: generalises well
    "fused": (1.9, 2.0, 0.8, 1.5),  # ΔG 0.5, ΔO 0.6
}


def _tensors(curves: dict[str, tuple[float, ...]]) -> list[torch.Tensor]:
    return [torch.tensor([c[i] for c in curves.values()], dtype=torch.float64) for i in range(4)]


def test_ogr_terms_of_hand_made_loss_curves() -> None:
    delta_o, delta_g, ogr = ogr_terms(*_tensors(CURVES))
    torch.testing.assert_close(delta_o, torch.tensor([0.7, -0.1, 0.6], dtype=torch.float64))
    torch.testing.assert_close(delta_g, torch.tensor([0.3, 0.6, 0.5], dtype=torch.float64))
    torch.testing.assert_close(ogr, torch.tensor([0.7 / 0.3, 0.1 / 0.6, 0.6 / 0.5], dtype=torch.float64))


def test_weights_are_delta_g_over_delta_o_squared_normalised() -> None:
    delta_o, delta_g, _ = ogr_terms(*_tensors(CURVES))
    w = gblending_weights(delta_o, delta_g)
    assert w is not None
    expected = _hand_weights(CURVES)
    torch.testing.assert_close(w, torch.tensor(list(expected.values()), dtype=torch.float64))
    assert float(w.sum()) == pytest.approx(1.0)
    assert int(w.argmax()) == 1  # image: most generalisation per unit of over-fitting
    # 0.3/0.49 : 0.6/0.01 : 0.5/0.36
    assert float(w[1] / w[0]) == pytest.approx((0.6 / 0.01) / (0.3 / 0.49), rel=1e-5)


def test_a_head_whose_validation_loss_rose_gets_zero_or_its_absolute_gain() -> None:
    curves = dict(CURVES, audio=(2.0, 2.0, 1.0, 2.4))  # ΔG = -0.4
    delta_o, delta_g, _ = ogr_terms(*_tensors(curves))
    clip = gblending_weights(delta_o, delta_g, "clip")
    absolute = gblending_weights(delta_o, delta_g, "abs")
    assert clip is not None and absolute is not None
    assert float(clip[0]) == 0.0
    torch.testing.assert_close(clip, torch.tensor(list(_hand_weights(curves).values()), dtype=torch.float64))
    torch.testing.assert_close(
        absolute, torch.tensor(list(_hand_weights(curves, "abs").values()), dtype=torch.float64)
    )
    assert gblending_weights(torch.ones(3), -torch.ones(3)) is None  # nothing generalised: no estimate


def _ce(logits: list[float], label: int) -> float:
    return math.log(sum(math.exp(v) for v in logits)) - logits[label]


def test_blended_loss_on_hand_made_logits() -> None:
    z = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 1.0]])
    o = {
        "audio": torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]),
        "image": torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 2.0]]),
    }
    y = torch.tensor([0, 2])
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)  # audio, image, fused
    total, losses = blended_loss(z, o, y, ("audio", "image"), w)
    ce = {
        "audio": (_ce([0.0, 1.0, 0.0], 0) + _ce([1.0, 0.0, 0.0], 2)) / 2,
        "image": (_ce([3.0, 0.0, 0.0], 0) + _ce([0.0, 0.0, 2.0], 2)) / 2,
        "fused": (_ce([2.0, 0.0, -1.0], 0) + _ce([0.5, 0.5, 1.0], 2)) / 2,
    }
    for k, v in ce.items():
        assert float(losses[k]) == pytest.approx(v, rel=1e-6)
    assert float(total) == pytest.approx(0.2 * ce["audio"] + 0.5 * ce["image"] + 0.3 * ce["fused"], rel=1e-6)


# --------------------------------------------------------------------------------------------------
# the method: schedule, epoch-end estimate, buffers


def _identity_method(**kwargs) -> GBlending:  # type: ignore[no-untyped-def]
    """Features are the unimodal logits themselves and the fused logits their sum."""
    return GBlending(
        ("audio", "image"),
        fusion=lambda f: f["audio"] + f["image"],
        heads=lambda f: {"audio": f["audio"], "image": f["image"]},
        **kwargs,
    )


def _split(seed: int, n: int = 30) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(3, (n,), generator=g)
    onehot = torch.nn.functional.one_hot(y, 3).float()
    a = torch.randn(n, 3, generator=g) + 2 * onehot * (seed % 3)
    i = torch.randn(n, 3, generator=g) + onehot * (seed % 2 + 1)
    return {"audio": a, "image": i}, y


def _losses(split: tuple[dict[str, torch.Tensor], torch.Tensor]) -> list[float]:
    f, y = split
    logits = [f["audio"], f["image"], f["audio"] + f["image"]]
    return [sum(_ce(row.tolist(), int(t)) for row, t in zip(z, y, strict=True)) / len(y) for z in logits]


def test_schedule_of_records_and_estimates() -> None:
    m = _identity_method(first_super_epoch=10, super_epoch=5)
    assert [e for e in range(30) if m.estimates_after(e)] == [9, 14, 19, 24, 29]
    assert [e for e in range(30) if m.records_after(e)] == [0, 9, 14, 19, 24, 29]
    offline = _identity_method(first_super_epoch=4, online=False)
    assert [e for e in range(30) if offline.estimates_after(e)] == [3]


def test_epoch_end_estimates_the_weights_from_the_change_since_the_last_record() -> None:
    m = _identity_method(first_super_epoch=2, super_epoch=1)
    torch.testing.assert_close(m.weights, torch.full((3,), 1 / 3, dtype=torch.float64))
    before = {"train": _split(0), "val": _split(1)}
    now = {"train": _split(2), "val": _split(3)}
    metrics: dict[str, float] = {}
    m.on_epoch_end(0, before.__getitem__, metrics)  # the first record, no estimate
    assert not any("delta" in k or "weight" in k for k in metrics)
    torch.testing.assert_close(m.weights, torch.full((3,), 1 / 3, dtype=torch.float64))
    metrics = {}
    m.on_epoch_end(1, now.__getitem__, metrics)
    t0, v0, t1, v1 = (_losses(s) for s in (before["train"], before["val"], now["train"], now["val"]))
    curves = {k: (t0[i], v0[i], t1[i], v1[i]) for i, k in enumerate(("audio", "image", "fused"))}
    expected = _hand_weights(curves)
    for i, k in enumerate(("audio", "image", "fused")):
        assert metrics[f"balance/gblending/loss_val/{k}"] == pytest.approx(v1[i], rel=1e-9)
        assert metrics[f"balance/gblending/delta_g/{k}"] == pytest.approx(v0[i] - v1[i], rel=1e-9)
        assert metrics[f"balance/gblending/weight/{k}"] == pytest.approx(expected[k], rel=1e-6)
        assert float(m.weights[i]) == pytest.approx(expected[k], rel=1e-6)
    assert int(m.ref_epoch) == 1

    other = _identity_method(first_super_epoch=2, super_epoch=1)
    other.load_state_dict(m.state_dict())  # weights and the last record resume
    assert set(m.state_dict()) == {"weights", "ref_train", "ref_val", "ref_epoch"}
    for name, value in m.state_dict().items():
        assert torch.equal(other.state_dict()[name], value)


def test_adjust_loss_replaces_the_loss_by_the_blend_and_logs_the_weights() -> None:
    from harmonia.balance import BalanceStep
    from harmonia.models import MultimodalOutput

    m = _identity_method()
    m.weights.copy_(torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64))
    (f, y) = _split(4, n=8)
    out = MultimodalOutput(logits=f["audio"] + f["image"], features=dict(f), unimodal_logits=dict(f))
    step = BalanceStep(y, 0)
    loss = m.adjust_loss(step, out, torch.tensor(123.0))
    ce = _losses((f, y))
    assert float(loss) == pytest.approx(0.5 * ce[0] + 0.25 * ce[1] + 0.25 * ce[2], rel=1e-5)
    assert step.metrics == {
        "balance/gblending/weight/audio": 0.5,
        "balance/gblending/weight/image": 0.25,
        "balance/gblending/weight/fused": 0.25,
    }


# --------------------------------------------------------------------------------------------------
# config and end to end


def test_gblending_settings_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"balance\[0\]\.super_epoch"):
        tiny_experiment(tmp_path, "balance=[{name: gblending, super_epoch: 0}]")
    with pytest.raises(ConfigError, match=r"balance\[0\]\.first_super_epoch"):
        tiny_experiment(tmp_path, "balance=[{name: gblending, first_super_epoch: 1}]")
    with pytest.raises(ConfigError, match=r"balance\[0\]\.eps"):
        tiny_experiment(tmp_path, "balance=[{name: gblending, eps: -1}]")
    with pytest.raises(ConfigError, match=r"balance\[0\]\.negative_gain"):
        tiny_experiment(tmp_path, "balance=[{name: gblending, negative_gain: square}]")
    with pytest.raises(ConfigError, match=r"balance\[0\]\.beta"):
        tiny_experiment(tmp_path, "balance=[{name: gblending, beta: 1}]")
    cfg = tiny_experiment(tmp_path, "balance=[{name: gblending, super_epoch: 2, online: false}]")
    assert cfg.balance[0].settings == GBlendingSettings(super_epoch=2, online=False)


@pytest.mark.integration
def test_gblending_training_logs_weights_and_ogr_and_resumes_exactly(tmp_path: Path) -> None:
    from harmonia.app.logs import read_metrics

    overrides = (
        "balance=[{name: gblending, first_super_epoch: 2, super_epoch: 1}]",
        "train.epochs=3",
        "train.probe=false",
        "optim.name=adamw",  # learns within the first epochs of the tiny run (SGD stays at chance)
        "optim.lr=0.003",
    )
    # interrupted in epoch 2, after the estimate at the end of epoch 1
    run = train_interrupted_and_resumed(tmp_path, *overrides, at_epoch=2)
    full, steps = run.full, run.steps
    method = full.callbacks[0].methods[0]  # type: ignore[attr-defined]
    epochs = [r for r in read_metrics(tmp_path / "a" / "tiny" / "metrics.jsonl") if r["kind"] == "epoch"]
    assert len(epochs) == 3
    heads = ("audio", "image", "fused")
    for record in steps:
        assert sum(record[f"balance/gblending/weight/{k}"] for k in heads) == pytest.approx(1.0)
    per_epoch = len(full.train_loader)
    assert all(
        steps[i][f"balance/gblending/weight/{k}"] == pytest.approx(1 / 3)
        for i in range(2 * per_epoch)
        for k in heads
    )
    assert (
        "balance/gblending/loss_val/fused" in epochs[0] and "balance/gblending/delta_o/fused" not in epochs[0]
    )
    for record in epochs[1:]:  # an estimate after epochs 1 and 2
        for k in heads:
            for key in ("delta_o", "delta_g", "ogr", "weight", "loss_train", "loss_val"):
                assert math.isfinite(record[f"balance/gblending/{key}/{k}"]) or key == "ogr"
    estimated = [epochs[1][f"balance/gblending/weight/{k}"] for k in heads]
    assert estimated != pytest.approx([1 / 3] * 3)  # the estimate changed the weights ...
    assert [steps[2 * per_epoch][f"balance/gblending/weight/{k}"] for k in heads] == pytest.approx(estimated)
    assert [float(w) for w in method.weights] == pytest.approx(
        [epochs[2][f"balance/gblending/weight/{k}"] for k in heads]
    )
