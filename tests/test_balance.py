"""OGM, OGM-GE and OPM checked against hand-derived values (TPAMI 2025 Eq. 7, 8, 11; CVPR 2022 Eq. 10)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from harmonia.balance import (
    OGM,
    OPM,
    conv_weights_only,
    discrepancy_ratio,
    ogm_coefficient,
    opm_drop_probability,
    unimodal_scores,
)
from harmonia.errors import ConfigError, InputError
from helpers import train_interrupted_and_resumed


def logits_with_true_class_probs(
    p_true: list[float], num_classes: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose softmax puts probability p on class 0 (the label) and the rest evenly elsewhere."""
    rows = []
    for p in p_true:
        probs = [p] + [(1 - p) / (num_classes - 1)] * (num_classes - 1)
        rows.append([math.log(x) for x in probs])
    return torch.tensor(rows), torch.zeros(len(p_true), dtype=torch.long)


def test_scores_and_ratio_for_two_modalities() -> None:
    audio, labels = logits_with_true_class_probs([0.9, 0.8, 0.7])  # S^a = 2.4
    image, _ = logits_with_true_class_probs([0.4, 0.3, 0.5])  # S^v = 1.2
    scores = unimodal_scores({"audio": audio, "image": image}, labels)
    assert float(scores["audio"]) == pytest.approx(2.4, abs=1e-5)
    assert float(scores["image"]) == pytest.approx(1.2, abs=1e-5)
    rho = discrepancy_ratio({"audio": audio, "image": image}, labels)
    assert float(rho["audio"]) == pytest.approx(2.0, abs=1e-5)
    assert float(rho["image"]) == pytest.approx(0.5, abs=1e-5)


def test_ratio_for_three_modalities() -> None:
    # S = (2.0, 1.0, 0.5): ρ^a = (2/1 + 2/0.5)/2 = 3; ρ^b = (1/2 + 1/0.5)/2 = 1.25;
    # ρ^c = (0.5/2 + 0.5/1)/2 = 0.375
    a, labels = logits_with_true_class_probs([1.0 - 1e-6, 1.0 - 1e-6])
    b, _ = logits_with_true_class_probs([0.5, 0.5])
    c, _ = logits_with_true_class_probs([0.25, 0.25])
    rho = discrepancy_ratio({"a": a, "b": b, "c": c}, labels)
    assert [round(float(rho[m]), 4) for m in "abc"] == [3.0, 1.25, 0.375]


def test_ratio_needs_two_modalities_and_matching_shapes() -> None:
    a, labels = logits_with_true_class_probs([0.5, 0.5])
    with pytest.raises(InputError, match="at least 2"):
        discrepancy_ratio({"a": a}, labels)
    with pytest.raises(InputError, match="'b' must be \\[B, C\\]"):
        discrepancy_ratio({"a": a, "b": a[:1]}, labels)


@pytest.mark.parametrize(
    ("rho", "form", "alpha", "expected"),
    [
        (2.0, "tpami", 0.8, 1 - 0.8 * math.tanh(1.0)),  # 0.390725
        (2.0, "cvpr", 0.8, 1 - math.tanh(1.6)),  # 0.078331
        (0.5, "tpami", 0.8, 1.0),
        (0.5, "cvpr", 0.8, 1.0),
        (1.0, "tpami", 0.8, 1.0),
        (5.0, "tpami", 3.0, 0.0),  # 1 - 3·tanh(4) < 0 is clipped to 0
    ],
)
def test_ogm_coefficient_by_hand(rho: float, form: str, alpha: float, expected: float) -> None:
    assert float(ogm_coefficient(torch.tensor(rho), alpha, form)) == pytest.approx(expected, abs=1e-6)


def test_tpami_coefficient_is_continuous_at_one() -> None:
    assert float(ogm_coefficient(torch.tensor(1.0 + 1e-6), 0.8)) == pytest.approx(1.0, abs=1e-5)


class TwoTower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict({"audio": nn.Linear(3, 4), "image": nn.Conv2d(1, 2, 3)})
        self.head = nn.Linear(4, 2)


def _fill_grads(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_ogm_without_ge_leaves_exactly_k_times_g_and_the_head_untouched() -> None:
    model = TwoTower()
    before = _fill_grads(model)
    audio, labels = logits_with_true_class_probs([0.9, 0.8, 0.7])
    image, _ = logits_with_true_class_probs([0.4, 0.3, 0.5])
    ogm = OGM(dict(model.encoders), alpha=0.8, ge=False)
    stats = ogm.step({"audio": audio, "image": image}, labels, epoch=0)
    k_audio = 1 - 0.8 * math.tanh(2.0 - 1)
    assert stats.coefficients == pytest.approx({"audio": k_audio, "image": 1.0}, abs=1e-6)
    for name, p in model.named_parameters():
        factor = k_audio if name.startswith("encoders.audio") else 1.0
        torch.testing.assert_close(p.grad, before[name] * factor)


def test_ogm_is_inactive_outside_its_epochs() -> None:
    model = TwoTower()
    before = _fill_grads(model)
    audio, labels = logits_with_true_class_probs([0.9])
    image, _ = logits_with_true_class_probs([0.3])
    ogm = OGM(dict(model.encoders), start_epoch=2, end_epoch=5, warmup_epochs=3)
    for epoch in (0, 1, 2, 5, 9):
        stats = ogm.step({"audio": audio, "image": image}, labels, epoch=epoch)
        assert not stats.active and stats.coefficients == {"audio": 1.0, "image": 1.0}
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, before[name])
    assert ogm.is_active(3) and ogm.is_active(4)


def test_ge_noise_has_the_gradient_std_and_is_the_same_on_every_replica() -> None:
    big = nn.Linear(400, 500)  # 200k weights: the std estimate is tight
    other = nn.Linear(3, 3)
    g = torch.Generator().manual_seed(1)
    grad = 3.0 * torch.randn(big.weight.shape, generator=g)
    big.weight.grad = grad.clone()
    audio, labels = logits_with_true_class_probs([0.99] * 4)
    image, _ = logits_with_true_class_probs([0.01] * 4)
    # ρ^audio = 99 and α = 10: k = 0, so what is left is the noise alone
    ogm = OGM({"audio": big, "image": other}, alpha=10.0, ge=True, seed=7)
    ogm.step({"audio": audio, "image": image}, labels, epoch=0)
    noise = big.weight.grad
    assert noise.mean().item() == pytest.approx(0.0, abs=0.03)
    assert noise.std().item() == pytest.approx(grad.std().item(), rel=0.01)
    assert torch.corrcoef(torch.stack([noise.flatten(), grad.flatten()]))[0, 1].abs() < 0.01

    replica = nn.Linear(400, 500)
    replica.weight.grad = grad.clone()
    twin = OGM({"audio": replica, "image": nn.Linear(3, 3)}, alpha=10.0, ge=True, seed=7)
    twin.step({"audio": audio, "image": image}, labels, epoch=0)
    torch.testing.assert_close(replica.weight.grad, noise, rtol=0, atol=0)


def test_param_filter_selects_what_is_modulated() -> None:
    model = TwoTower()
    model.encoders["audio"] = nn.Conv2d(1, 2, 3)
    before = _fill_grads(model)
    audio, labels = logits_with_true_class_probs([0.4])
    image, _ = logits_with_true_class_probs([0.9])  # image dominant
    ogm = OGM(dict(model.encoders), alpha=0.8, ge=False, param_filter=conv_weights_only)
    ogm.step({"audio": audio, "image": image}, labels, epoch=0)
    k = 1 - 0.8 * math.tanh(0.9 / 0.4 - 1)
    torch.testing.assert_close(model.encoders["image"].weight.grad, before["encoders.image.weight"] * k)
    torch.testing.assert_close(model.encoders["image"].bias.grad, before["encoders.image.bias"])
    with pytest.raises(ConfigError, match="selects no parameter of modality 'audio'"):
        OGM({"audio": nn.Linear(3, 4), "image": nn.Conv2d(1, 2, 3)}, param_filter=conv_weights_only)


def test_opm_drop_probability_by_hand() -> None:
    rho = torch.tensor([2.0, 0.5, 1.0])
    expected = [0.5 * (1 + 0.5 * math.tanh(1.0)), 0.0, 0.0]  # 0.690399
    assert opm_drop_probability(rho).tolist() == pytest.approx(expected, abs=1e-6)
    assert float(opm_drop_probability(torch.tensor(50.0), q_base=0.9, lam=1.0)) == 1.0


def _opm_with_q(modalities: list[str], p_true: list[float], **kwargs: float) -> OPM:
    opm = OPM(modalities, **kwargs)
    logits = {}
    for m, p in zip(modalities, p_true, strict=True):
        logits[m], labels = logits_with_true_class_probs([p] * 8)
    opm.update(logits, labels)
    return opm


def test_opm_empirical_drop_rate_matches_q_and_rescales() -> None:
    opm = _opm_with_q(["audio", "image"], [0.9, 0.3], p_exe=1.0)  # ρ^audio = 3
    q = opm.drop_probabilities()
    assert q["image"] == 0.0
    assert q["audio"] == pytest.approx(0.5 * (1 + 0.5 * math.tanh(2.0)), abs=1e-6)
    feats = {"audio": torch.ones(40_000, 5), "image": torch.ones(40_000, 5)}
    out = opm.train()(feats)
    dropped = (out["audio"] == 0).all(dim=1).float().mean().item()
    assert dropped == pytest.approx(q["audio"], abs=0.01)
    kept = out["audio"][(out["audio"] != 0).all(dim=1)]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - q["audio"])))
    torch.testing.assert_close(out["image"], feats["image"])
    # the expected input of the fusion head is unchanged
    assert out["audio"].mean().item() == pytest.approx(1.0, abs=0.02)


def test_opm_never_drops_every_modality_of_a_sample() -> None:
    opm = _opm_with_q(["a", "b", "c"], [0.99, 0.98, 0.01], q_base=1.0, lam=1.0, p_exe=1.0)
    assert opm.drop_probabilities()["a"] == 1.0 and opm.drop_probabilities()["b"] == 1.0
    opm.q[2] = 0.9  # force situations where all three would be dropped
    feats = {m: torch.ones(5000, 3) for m in "abc"}
    out = opm.train()(feats)
    alive = torch.stack([(out[m] != 0).any(dim=1) for m in "abc"], dim=1)
    assert alive.any(dim=1).all()


def test_opm_eval_mode_and_p_exe_zero_change_nothing() -> None:
    opm = _opm_with_q(["audio", "image"], [0.9, 0.3], p_exe=1.0)
    feats = {"audio": torch.randn(64, 4), "image": torch.randn(64, 4)}
    out = opm.eval()(feats)
    for m in feats:
        assert out[m] is feats[m]
    lazy = _opm_with_q(["audio", "image"], [0.9, 0.3], p_exe=0.0).train()
    for m, t in lazy(feats).items():
        torch.testing.assert_close(t, feats[m])


def test_opm_is_reproducible_and_resumable() -> None:
    a = _opm_with_q(["audio", "image"], [0.9, 0.3], p_exe=1.0, seed=3).train()
    feats = {"audio": torch.ones(256, 2), "image": torch.ones(256, 2)}
    a(feats)
    state = a.state_dict()
    next_a = a(feats)
    b = OPM(["audio", "image"], p_exe=1.0, seed=3).train()
    b.load_state_dict(state)
    torch.testing.assert_close(b(feats)["audio"], next_a["audio"])


@pytest.mark.integration
def test_balance_curves_average_the_step_records_per_epoch(tmp_path) -> None:
    import json

    from harmonia.app.plots import balance_curves, plot_balance_curves

    records = [
        {"kind": "step", "step": 1, "epoch": 0, "balance/rho/a": 1.0},
        {"kind": "step", "step": 2, "epoch": 0, "balance/rho/a": 3.0},
        {"kind": "step", "step": 3, "epoch": 1, "balance/rho/a": 5.0, "train/loss": 0.1},
        {"kind": "epoch", "step": 3, "epoch": 1, "balance/rho/a": 99.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert balance_curves(tmp_path) == {"balance/rho/a": {0: 2.0, 1: 5.0}}
    assert plot_balance_curves({"run": tmp_path}, tmp_path / "c.png")
    (tmp_path / "metrics.jsonl").write_text(json.dumps(records[-1]) + "\n")
    assert not plot_balance_curves({"run": tmp_path}, tmp_path / "d.png")


def _tiny_classifier(seed: int = 0) -> nn.Module:
    from harmonia.models import build_classifier

    torch.manual_seed(seed)
    return build_classifier(
        ["audio", "image"], {"audio": 1, "image": 1}, 3, encoder_widths=[4], feature_dim=8
    )


@pytest.mark.parametrize("order", [("ogm", "opm"), ("opm", "ogm")])
def test_combined_methods_share_one_rho_and_match_a_hand_computation(
    order: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """OPM + OGM through the hooks, in either order: ρ is computed once per step, on the features before
    any drop, and OGM scales each encoder's gradient by k(ρ) computed here independently."""
    from harmonia.balance import BalanceStep, OGMSettings, OPMSettings, discrepancy_ratio
    from harmonia.balance import method as method_module

    model = _tiny_classifier()
    x = {"audio": torch.randn(6, 1, 8, 8), "image": torch.randn(6, 1, 8, 8)}
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    built = {
        "ogm": OGM.build(model, OGMSettings(alpha=0.8, ge=False)),
        "opm": OPM.build(model, OPMSettings(p_exe=0.0)),  # never drops: the forward is the plain one
    }
    methods = [built[name] for name in order]

    # the reference: a plain step, ρ from the unimodal logits of the same features, k by the TPAMI formula
    plain = model(x)
    torch.nn.functional.cross_entropy(plain.logits, y).backward()
    rho = {m: float(r) for m, r in discrepancy_ratio(plain.unimodal_logits, y).items()}
    expected = {
        m: [
            p.grad.clone() * float(ogm_coefficient(torch.tensor(rho[m]), 0.8))
            for p in model.encoders[m].parameters()
        ]
        for m in ("audio", "image")
    }
    model.zero_grad()

    calls = []
    real = method_module.discrepancy_ratio
    monkeypatch.setattr(method_module, "discrepancy_ratio", lambda *a: calls.append(1) or real(*a))
    step = BalanceStep(y, epoch=0)
    for m in methods:
        m.before_forward(step)

    def transform(features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for m in methods:
            features = m.transform_features(step, features)
        return features

    out = model(x, transform=transform)
    torch.nn.functional.cross_entropy(out.logits, y).backward()
    for m in methods:
        m.after_backward(step, out)
    assert len(calls) == 1
    assert step.metrics["balance/rho/audio"] == pytest.approx(rho["audio"], rel=1e-6)
    for m in ("audio", "image"):
        for got, want in zip(model.encoders[m].parameters(), expected[m], strict=True):
            torch.testing.assert_close(got.grad, want, rtol=1e-5, atol=1e-7)


def test_a_method_state_round_trips_through_state_dict() -> None:
    model = _tiny_classifier()
    ogm, opm = OGM.build(model), OPM.build(model)
    ogm.modulate({"audio": torch.tensor(2.0), "image": torch.tensor(0.5)}, epoch=0)
    opm.set_ratios({"audio": torch.tensor(2.0), "image": torch.tensor(0.5)})
    twin_ogm, twin_opm = OGM.build(model), OPM.build(model)
    twin_ogm.load_state_dict(ogm.state_dict())
    twin_opm.load_state_dict(opm.state_dict())
    assert int(twin_ogm.num_steps) == 1
    torch.testing.assert_close(twin_opm.q, opm.q)
    assert float(twin_opm.q[0]) > 0 and float(twin_opm.q[1]) == 0


def test_opm_mean_q_rescales_every_kept_feature_by_the_size_weighted_mean_q() -> None:
    """The official code's rescaling: kept features / (1 - θ), θ = Σ_m d_m q^m / Σ_m d_m."""
    opm = OPM(["a", "b"], p_exe=1.0, rescale_with="mean_q").train()
    opm.q.copy_(torch.tensor([0.5, 0.2]))
    out = opm({"a": torch.ones(64, 4), "b": torch.ones(64, 2)})
    theta = (4 * 0.5 + 2 * 0.2) / 6  # = 0.4
    kept = torch.cat([out["a"].flatten(), out["b"].flatten()])
    kept = kept[kept != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - theta)))
    own = OPM(["a", "b"], p_exe=1.0).train()
    own.q.copy_(torch.tensor([0.5, 0.2]))
    out = own({"a": torch.ones(64, 4), "b": torch.ones(64, 2)})
    assert set(out["a"][out["a"] != 0].tolist()) == {2.0} and set(out["b"][out["b"] != 0].tolist()) == {1.25}


@pytest.mark.parametrize("q_from", ["previous", "current"])
def test_opm_q_from_the_previous_or_the_current_batch(q_from: str) -> None:
    from harmonia.balance import BalanceStep, OPMSettings, discrepancy_ratio

    model = _tiny_classifier()
    opm = OPM.build(model, OPMSettings(p_exe=1.0, q_from=q_from)).train()
    features = {"audio": torch.randn(6, 8), "image": torch.randn(6, 8)}
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    step = BalanceStep(labels, epoch=0)
    opm.transform_features(step, features)
    with torch.no_grad():
        rho = discrepancy_ratio(model.fusion.unimodal_logits(features), labels)
    this_batch = opm_drop_probability(torch.stack([rho["audio"], rho["image"]]), 0.5, 0.5)
    logged = torch.tensor([step.metrics["balance/q/audio"], step.metrics["balance/q/image"]])
    expected = this_batch if q_from == "current" else torch.zeros(2)  # previous: the initial q is 0
    torch.testing.assert_close(logged, expected)
    assert float(this_batch.max()) > 0  # the batch has a dominant modality, so the two cases differ


def test_opm_does_not_drop_during_its_warmup_epochs() -> None:
    from harmonia.balance import BalanceStep, OPMSettings

    model = _tiny_classifier()
    opm = OPM.build(model, OPMSettings(p_exe=1.0, q_from="current", q_base=1.0, warmup_epochs=2)).train()
    features = {"audio": torch.randn(32, 8) + 3, "image": torch.randn(32, 8)}
    labels = torch.arange(32) % 3
    for epoch, drops in ((1, False), (2, True)):
        out = opm.transform_features(BalanceStep(labels, epoch=epoch), dict(features))
        changed = any(not torch.equal(out[m], features[m]) for m in features)
        assert changed is drops, epoch


def test_the_official_opm_options_load_from_config() -> None:
    from harmonia.app.config import load_config

    cfg = load_config(
        None, ["balance=[{name: opm, rescale_with: mean_q, q_from: current, warmup_epochs: 6}]"]
    )
    settings = cfg.balance[0].settings
    assert (settings.rescale_with.value, settings.q_from.value, settings.warmup_epochs) == (
        "mean_q",
        "current",
        6,
    )


def test_ogm_and_ogm_ge_differ_only_in_the_noise_default() -> None:
    from harmonia.app.config import load_config
    from harmonia.balance import OGMGE

    plain, ge = load_config(None, ["balance=[ogm, ogm_ge]"]).balance
    assert (plain.name, plain.settings.ge, ge.name, ge.settings.ge) == ("ogm", False, "ogm_ge", True)
    model = _tiny_classifier()
    built = OGMGE.build(model)
    assert isinstance(built, OGM) and built.ge and not OGM.build(model).ge
    assert OGMGE.build(model, ge.settings).alpha == OGM.build(model, plain.settings).alpha == 0.8


def test_methods_that_train_one_modality_at_a_time_make_ddp_look_for_unused_parameters() -> None:
    from harmonia.app.config import load_config
    from harmonia.app.registry import BALANCING

    def unused(balance: str) -> bool:
        entries = load_config(None, [f"balance={balance}", "model.fusion=sum"]).balance
        return any(BALANCING.get(e.name).leaves_parameters_unused(e.settings) for e in entries)

    assert unused("[reconboost]") and unused("[{name: mla, schedule: per_step}]")
    assert not unused("[mla]") and not unused("[ogm_ge, opm]") and not unused("[]")


@pytest.mark.integration
@pytest.mark.parametrize(
    ("methods", "logged"),
    [
        ("opm,agm", ("balance/q/", "balance/agm/")),
        ("opm,pmr", ("balance/q/", "balance/pmr/")),
        ("ogm_ge,cml", ("balance/k/", "balance/cml/")),
        ("opm,greedy", ("balance/q/", "balance/greedy/")),
    ],
)
def test_methods_compose_through_the_list_config(
    tmp_path: Path, methods: str, logged: tuple[str, ...]
) -> None:
    """Two methods of different families in one ``balance`` list both act, and the run resumes exactly."""
    run = train_interrupted_and_resumed(tmp_path, f"balance=[{methods}]", "train.probe=false")
    for prefix in logged:
        assert any(k.startswith(prefix) for k in run.steps[-1]), prefix


def _linear_classifier() -> nn.Module:
    from harmonia.models import ConcatFusion, MultimodalClassifier

    torch.manual_seed(0)
    return MultimodalClassifier(
        {"audio": nn.Linear(6, 4), "image": nn.Linear(5, 4)},
        ConcatFusion(["audio", "image"], {"audio": 4, "image": 4}, num_classes=3),
    )


def test_attached_opm_drops_in_training_and_is_switched_off_by_model_eval() -> None:
    from harmonia.balance import OPMSettings

    model = _linear_classifier()
    inputs = {"audio": torch.randn(32, 6), "image": torch.randn(32, 5)}
    plain = model(inputs).logits.detach()
    model.feature_transform = OPM.build(model, OPMSettings(p_exe=1.0))
    model.feature_transform.set_ratios({"audio": 1.0, "image": 9.0})  # q_image = 0.5·(1 + 0.5·tanh 8)
    assert "feature_transform.q" in model.state_dict()  # saved with the model
    model.train()
    dropped = model(inputs).logits.detach()
    assert not torch.allclose(dropped, plain)
    model.eval()
    assert not model.feature_transform.training
    assert torch.equal(model(inputs).logits, plain)


def test_opm_step_takes_the_ratio_of_the_features_before_dropping() -> None:
    from harmonia.balance import OPMSettings

    model = _linear_classifier()
    opm = OPM.build(model, OPMSettings(p_exe=1.0))
    opm.set_ratios({"audio": 1.0, "image": 9.0})
    inputs = {"audio": torch.randn(32, 6), "image": torch.randn(32, 5)}
    labels = torch.randint(0, 3, (32,))
    model(inputs, transform=opm)
    ratios = opm.step(labels)
    with torch.no_grad():  # by hand: ρ^a = S^a / S^v, S^m = Σ_i softmax(W_m^head f_m(x_i))[y_i], no drop
        head = model.fusion.unimodal_logits({m: model.encoders[m](inputs[m]) for m in inputs})
        score = {m: head[m].softmax(1)[torch.arange(32), labels].sum() for m in head}
    assert ratios["audio"] == pytest.approx(float(score["audio"] / score["image"]), rel=1e-5)
    expected_q = opm_drop_probability(torch.tensor(ratios["audio"]))
    assert opm.drop_probabilities()["audio"] == pytest.approx(float(expected_q))
    with pytest.raises(ConfigError, match="no features seen"):
        opm.step(labels)  # each forward feeds one step
    with pytest.raises(ConfigError, match="unimodal heads"):
        OPM(["audio", "image"]).step(labels)


def test_opm_passed_in_training_mode_to_an_eval_model_warns() -> None:
    model = _linear_classifier().eval()
    opm = OPM(model.modalities).train()
    with pytest.warns(UserWarning, match=r"model.feature_transform"):
        model({"audio": torch.randn(2, 6), "image": torch.randn(2, 5)}, transform=opm)
