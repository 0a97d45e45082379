"""Balanced multi-modal learning (Wu et al., ICML 2022) against hand-derived values and a port of the
official switching callback."""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harmonia.balance import (
    BalanceStep,
    Greedy,
    GreedySettings,
    conditional_learning_speeds,
    conditional_utilization_rate,
    learning_speed,
    speed_gap,
)
from harmonia.errors import ConfigError, InputError
from helpers import tiny_experiment, train_interrupted_and_resumed

# --------------------------------------------------------------------------------------------------
# independent reference: the official Bias_Mitigation_Strong callback, written out with Python floats.
# In a late-fusion model the "bypass" into modality 0's branch is encoder 1 and its "main" is encoder 0.


class OfficialRule:
    """``src/callbacks.py`` of nyukat/greedy_multimodal_learning, epochs counted from 1."""

    def __init__(self, epsilon: float, window: int, starting_epoch: int) -> None:
        self.epsilon, self.window, self.starting_epoch = epsilon, window, starting_epoch
        self.bypass = [0.0, 0.0]
        self.main = [0.0, 0.0]
        self.curation, self.caring, self.unlock, self.curation_step = False, 0, False, 0

    def epoch_begin(self, epoch: int) -> None:
        if epoch >= self.starting_epoch:
            self.unlock = True

    def compute_bdr(self, mu0: float, mu1: float) -> float:
        self.bypass[0] += mu1
        self.bypass[1] += mu0
        self.main[0] += mu0
        self.main[1] += mu1
        return math.log10(self.bypass[0] / self.main[0]) - math.log10(self.bypass[1] / self.main[1])

    def backward_end(self, mu0: float, mu1: float) -> None:
        if self.unlock:
            if not self.curation:
                d = self.compute_bdr(mu0, mu1)
                if abs(d) > self.epsilon:
                    self.curation, self.curation_step = True, 0
                    self.caring = 1 if d < 0 else 0
                else:
                    self.curation, self.caring = False, 0
            else:
                self.curation_step += 1
                if self.curation_step == self.window:
                    self.curation = False
        else:
            self.compute_bdr(mu0, mu1)
            self.curation, self.caring = False, 0


def _linear_encoders(names: list[str]) -> dict[str, nn.Module]:
    encoders: dict[str, nn.Module] = {}
    for m in names:
        enc = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            enc.weight.fill_(1.0)  # ‖θ‖² = 1: the learning speed is the squared gradient
        encoders[m] = enc
    return encoders


def _sum_head(features: dict[str, torch.Tensor]) -> torch.Tensor:
    """A fusion 'head' whose logits are the sum of the features (d_m = C)."""
    return torch.stack(list(features.values())).sum(0)


def _drive(
    greedy: Greedy, epoch: int, grads: dict[str, float], feats: dict[str, torch.Tensor]
) -> BalanceStep:
    """One training step through the hooks, with the encoders' gradients set to ``grads``."""
    labels = torch.zeros(next(iter(feats.values())).shape[0], dtype=torch.long)
    step = BalanceStep(labels, epoch=epoch)
    greedy.transform_features(step, feats)
    greedy.adjust_loss(step, SimpleNamespace(features=feats), torch.tensor(1.0))
    for m, g in grads.items():
        greedy.params[m][0].grad = torch.tensor([[g]])
    greedy.after_backward(step, None)
    return step


# --------------------------------------------------------------------------------------------------
# maths


def test_learning_speed_is_the_ratio_of_summed_squared_norms() -> None:
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ‖w‖² = 25
    b = nn.Parameter(torch.tensor([0.0]))  # ‖b‖² = 0
    c = nn.Parameter(torch.tensor([2.0]))  # ‖c‖² = 4, no gradient
    w.grad, b.grad = torch.tensor([[0.3, 0.4]]), torch.tensor([1.0])  # ‖∇‖² = 0.25 + 1
    assert float(learning_speed([w, b])) == pytest.approx(1.25 / 25)
    assert float(learning_speed([w, b, c])) == pytest.approx(1.25 / 29)  # a sum of norms, not of ratios
    with pytest.raises(InputError, match="all zero"):
        learning_speed([b])


@pytest.mark.parametrize(
    ("sums", "v01", "gap", "slowest"),
    [
        ([0.01, 0.1], 1.0, 2.0, 0),  # v(m1|m0) = log10(0.1/0.01) = 1, v(m0|m1) = -1, d = 2: accelerate m0
        ([0.1, 0.01], -1.0, 2.0, 1),
        ([0.5, 0.5], 0.0, 0.0, 0),
    ],
)
def test_two_modality_conditional_speeds_and_gap(
    sums: list[float], v01: float, gap: float, slowest: int
) -> None:
    v = conditional_learning_speeds(torch.tensor(sums, dtype=torch.float64))
    assert v.flatten().tolist() == pytest.approx([0.0, v01, -v01, 0.0])
    d, i = speed_gap(torch.tensor(sums, dtype=torch.float64))
    assert d == pytest.approx(gap) and i == slowest


def test_three_modality_gap_is_that_of_the_most_unequal_pair() -> None:
    sums = torch.tensor([10.0, 1000.0, 1.0], dtype=torch.float64)  # log10: 1, 3, 0
    v = conditional_learning_speeds(sums)
    assert v[0, 1].item() == pytest.approx(2.0) and v[2, 1].item() == pytest.approx(3.0)
    assert v[1, 0].item() == pytest.approx(-2.0)
    d, slowest = speed_gap(sums)
    assert d == pytest.approx(2 * 3.0) and slowest == 2  # v(m1|m2) - v(m2|m1) = 3 - (-3)
    with pytest.raises(ConfigError, match="at least 2"):
        speed_gap(torch.tensor([1.0]))


def test_conditional_utilization_rate_by_hand() -> None:
    assert conditional_utilization_rate(0.8, 0.6) == pytest.approx(0.25)  # (0.8 - 0.6) / 0.8
    assert conditional_utilization_rate(0.5, 0.55) == pytest.approx(-0.1)
    with pytest.raises(InputError, match="> 0"):
        conditional_utilization_rate(0.0, 0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_switching_rule_matches_the_official_callback(seed: int) -> None:
    rng = random.Random(seed)
    epsilon, window, epochs, per_epoch = 0.05, 2, 6, 7
    greedy = Greedy(_linear_encoders(["a", "b"]), fuse=_sum_head, alpha=epsilon, rebalance_steps=window)
    official = OfficialRule(epsilon, window, starting_epoch=2)  # = harmonia's start_epoch 1
    feats = {m: torch.randn(4, 3) for m in ("a", "b")}
    seen: set[str] = set()
    for epoch in range(epochs):
        official.epoch_begin(epoch + 1)
        for t in range(per_epoch):
            # modality b learns faster early on, a later: both directions get re-balanced
            early = epoch * per_epoch + t < 10
            raw = {
                "a": (1.0 if early else 3.0) * rng.uniform(0.5, 1.0),
                "b": (2.0 if early else 0.1) * rng.uniform(0.5, 1.0),
            }
            g = {
                m: float(torch.tensor(v, dtype=torch.float32)) for m, v in raw.items()
            }  # the grads' precision
            expected = f"rebalance {'ab'[official.caring]}" if official.curation else "regular"
            official.backward_end(g["a"] ** 2, g["b"] ** 2)
            step = _drive(greedy, epoch, g, feats)
            flags = [step.metrics[f"balance/greedy/rebalance/{m}"] for m in ("a", "b")]
            got = "regular" if flags == [0.0, 0.0] else f"rebalance {'ab'[flags.index(1.0)]}"
            assert got == expected, (epoch, t)
            seen.add(got)
            # harmonia's S^m is the official main sum (re-balancing steps add nothing to either)
            for i, m in enumerate(("a", "b")):
                assert step.metrics[f"balance/greedy/speed/{m}"] == pytest.approx(
                    math.log10(official.main[i])
                )
            d = math.log10(official.bypass[0] / official.main[0]) - math.log10(
                official.bypass[1] / official.main[1]
            )
            assert step.metrics["balance/greedy/gap"] == pytest.approx(abs(d))
    assert seen == {"regular", "rebalance a", "rebalance b"}


def test_no_rebalancing_before_start_nor_from_end_epoch_and_pending_steps_are_dropped() -> None:
    greedy = Greedy(_linear_encoders(["a", "b"]), fuse=_sum_head, alpha=0.0, rebalance_steps=5, end_epoch=2)
    feats = {m: torch.randn(2, 3) for m in ("a", "b")}
    kinds = []
    for epoch, _ in [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]:
        step = _drive(greedy, epoch, {"a": 1.0, "b": 2.0}, feats)
        kinds.append(step.metrics["balance/greedy/rebalance/a"])
    # epoch 0: warm-up; epoch 1: regular, then re-balancing a; epoch 2: past end_epoch, the rest dropped
    assert kinds == [0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert int(greedy.remaining) == 0
    assert float(greedy.speed_sums[0]) == pytest.approx(5 * 1.0)  # the 2 re-balancing steps add nothing


def test_three_modality_rebalancing_step_keeps_the_slowest_and_weights_the_loss_by_m() -> None:
    names = ["a", "b", "c"]
    greedy = Greedy(_linear_encoders(names), fuse=_sum_head, alpha=0.1, rebalance_steps=1, start_epoch=0)
    gen = torch.Generator().manual_seed(4)
    first = {m: torch.randn(3, 4, generator=gen) for m in names}
    step = _drive(greedy, 0, {"a": 1.0, "b": 0.1, "c": 3.0}, first)  # b learns least: re-balance b next
    assert int(greedy.remaining) == 1 and int(greedy.target) == 1
    assert step.metrics["balance/greedy/gap"] == pytest.approx(2 * (math.log10(9.0) - math.log10(0.01)))

    second = {m: torch.randn(2, 4, generator=gen).requires_grad_() for m in names}
    labels = torch.tensor([2, 0])
    step = BalanceStep(labels, epoch=0)
    greedy.transform_features(step, second)
    loss = torch.tensor(0.9)
    out = greedy.adjust_loss(step, SimpleNamespace(features=second), loss)
    # by hand: a and c replaced by their means over the 5 samples seen, logits = the sum of the features
    mean = {m: torch.cat([first[m], second[m].detach()]).mean(0) for m in names}
    logits = second["b"].detach() + mean["a"] + mean["c"]
    ce = sum(-torch.log_softmax(logits[i], 0)[labels[i]].item() for i in range(2)) / 2
    assert out.item() == pytest.approx((2 * 0.9 + ce) / 3, rel=1e-6)
    out.backward()
    assert second["a"].grad is None and second["c"].grad is None  # imputed: no gradient
    assert second["b"].grad is not None


def _tiny_model() -> nn.Module:
    from harmonia.models import build_classifier

    torch.manual_seed(0)
    return build_classifier(
        ["audio", "image"], {"audio": 1, "image": 1}, 3, encoder_widths=[4], feature_dim=8
    )


def test_a_rebalancing_step_on_the_classifier_adds_the_imputed_branch_loss() -> None:
    model = _tiny_model()
    greedy = Greedy.build(model, GreedySettings(start_epoch=0))
    gen = torch.Generator().manual_seed(5)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    earlier = {m: torch.randn(6, 1, 8, 8, generator=gen) for m in ("audio", "image")}
    inputs = {m: torch.randn(6, 1, 8, 8, generator=gen) for m in ("audio", "image")}
    with torch.no_grad():
        greedy.transform_features(BalanceStep(labels, 0), model.encode(earlier))
        seen_before = model.encode(earlier)["image"]
    greedy.remaining.fill_(2)
    greedy.target.fill_(0)  # as if a regular step had found audio the slower
    plain = copy.deepcopy(model)

    step = BalanceStep(labels, epoch=0)
    output = model(inputs, transform=lambda f: greedy.transform_features(step, f))
    loss = F.cross_entropy(output.logits, labels)
    total = greedy.adjust_loss(step, output, loss)
    total.backward()
    greedy.after_backward(step, output)

    # the reference: the concat head's weights applied to [φ^audio; mean of every image feature seen]
    feats = plain.encode(inputs)
    mean_image = torch.cat([seen_before, feats["image"].detach()]).mean(0)
    w, b = plain.fusion.fc.weight, plain.fusion.fc.bias
    imputed = feats["audio"] @ w[:, :8].T + mean_image @ w[:, 8:].T + b
    fused = F.cross_entropy(plain.fusion(feats), labels)
    expected = (fused + F.cross_entropy(imputed, labels)) / 2
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    fused_only = copy.deepcopy(plain)
    F.cross_entropy(fused_only(inputs).logits, labels).backward()
    for (name, p), q in zip(
        model.encoders["image"].named_parameters(), fused_only.encoders["image"].parameters(), strict=True
    ):
        # image is imputed in the extra term: its encoder gets only half the fused loss's gradient
        torch.testing.assert_close(p.grad, 0.5 * q.grad, rtol=1e-4, atol=1e-7, msg=name)
    expected.backward()
    for (name, p), q in zip(
        model.encoders["audio"].named_parameters(), plain.encoders["audio"].parameters(), strict=True
    ):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=name)
    assert step.metrics["balance/greedy/rebalance/audio"] == 1.0 and int(greedy.remaining) == 1
    assert greedy.speed_sums.tolist() == [0.0, 0.0]  # a re-balancing step measures nothing


def test_utilization_diagnostic_matches_hand_counted_accuracies() -> None:
    greedy = Greedy(_linear_encoders(["a", "b"]), fuse=_sum_head, utilization_split="val")
    labels = torch.tensor([0, 1, 1, 0])
    # logits = features; the running means come from one training batch
    greedy.transform_features(
        BalanceStep(labels, 0), {"a": torch.tensor([[0.9, 0.0]] * 4), "b": torch.zeros(4, 2)}
    )
    means = {"a": [0.9, 0.0], "b": [0.0, 0.0]}
    a = [[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [0.5, 0.0]]
    b = [[0.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 0.7]]

    def accuracy(fa: list[list[float]], fb: list[list[float]]) -> float:
        hits = 0
        for x, y, label in zip(fa, fb, labels.tolist(), strict=True):
            s = [x[0] + y[0], x[1] + y[1]]
            hits += int(s.index(max(s)) == label)
        return hits / 4

    joint = accuracy(a, b)
    without_a = accuracy([means["a"]] * 4, b)
    without_b = accuracy(a, [means["b"]] * 4)
    assert (joint, without_a, without_b) == (0.75, 0.5, 1.0)  # the case is not degenerate
    metrics: dict[str, float] = {}
    greedy.on_epoch_end(0, lambda split: ({"a": torch.tensor(a), "b": torch.tensor(b)}, labels), metrics)
    assert metrics == pytest.approx(
        {
            "balance/greedy/utilization/a": (joint - without_a) / joint,
            "balance/greedy/utilization/b": (joint - without_b) / joint,
        }
    )


def test_state_dict_resumes_speeds_means_and_pending_steps_exactly() -> None:
    gen = torch.Generator().manual_seed(6)
    plan = [(0, {"a": 1.0, "b": 0.2}), (0, {"a": 0.3, "b": 1.0}), (1, {"a": 0.9, "b": 0.1})] * 3
    feats = [{m: torch.randn(3, 2, generator=gen) for m in ("a", "b")} for _ in plan]

    def run(greedy: Greedy, part: range) -> list[dict[str, float]]:
        return [dict(_drive(greedy, plan[i][0], plan[i][1], feats[i]).metrics) for i in part]

    first = Greedy(_linear_encoders(["a", "b"]), fuse=_sum_head, alpha=0.01, rebalance_steps=2, start_epoch=0)
    run(first, range(4))
    assert int(first.remaining) > 0  # the checkpoint falls inside a re-balancing window
    saved = copy.deepcopy(first.state_dict())
    second = Greedy(
        _linear_encoders(["a", "b"]), fuse=_sum_head, alpha=0.01, rebalance_steps=2, start_epoch=0
    )
    second.load_state_dict(saved)  # the feature sums are still empty here: re-sized on load
    assert run(first, range(4, 9)) == run(second, range(4, 9))
    assert set(saved) == {
        "speed_sums", "feature_sums_0", "feature_sums_1", "feature_count", "remaining", "target",
    }  # fmt: skip


def test_greedy_needs_two_trainable_encoders_a_head_and_valid_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least 2 encoders"):
        Greedy(_linear_encoders(["audio"]))
    frozen = _linear_encoders(["audio", "image"])
    frozen["image"].requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        Greedy(frozen)

    class NoHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoders = nn.ModuleDict(_linear_encoders(["audio", "image"]))

    with pytest.raises(ConfigError, match="fusion head"):
        Greedy.build(NoHead())
    with pytest.raises(ConfigError, match=r"balance\[0\]\.alpha"):
        tiny_experiment(tmp_path, "balance=[{name: greedy, alpha: -0.1}]")
    with pytest.raises(ConfigError, match=r"balance\[0\]\.rebalance_steps"):
        tiny_experiment(tmp_path, "balance=[{name: greedy, rebalance_steps: 0}]")
    with pytest.raises(ConfigError, match=r"balance\[0\]\.window"):
        tiny_experiment(tmp_path, "balance=[{name: greedy, window: 5}]")
    with pytest.raises(ConfigError, match="balances modalities"):
        tiny_experiment(tmp_path, "balance=[greedy]", "data.modalities=[image]")
    cfg = tiny_experiment(tmp_path, "balance=[{name: greedy, alpha: 0.001, start_epoch: 0, end_epoch: 80}]")
    assert cfg.balance[0].settings == GreedySettings(alpha=0.001, start_epoch=0, end_epoch=80)
    from harmonia.app.registry import BALANCING

    assert not BALANCING.get("greedy").leaves_parameters_unused(cfg.balance[0].settings)


# --------------------------------------------------------------------------------------------------
# end to end


@pytest.mark.integration
def test_greedy_training_rebalances_logs_utilization_and_resumes_exactly(tmp_path: Path) -> None:
    run = train_interrupted_and_resumed(
        tmp_path,
        "balance=[{name: greedy, start_epoch: 0, rebalance_steps: 2, utilization_split: val}]",
        "train.probe=false",
    )
    steps = run.steps
    for m in ("audio", "image"):
        assert {f"balance/greedy/speed/{m}", f"balance/greedy/rebalance/{m}"} <= set(steps[-1])
        assert all(math.isfinite(r[f"balance/greedy/speed/{m}"]) for r in steps)
    kinds = [sum(r[f"balance/greedy/rebalance/{m}"] for m in ("audio", "image")) for r in steps]
    assert kinds[0] == 0.0 and 1.0 in kinds  # step 0 is regular; re-balancing steps follow
    greedy = run.full.callbacks[0].methods[0]  # type: ignore[attr-defined]
    assert float(greedy.feature_count) == 3 * run.full.dataset.train_size  # every sample of 3 epochs
    from harmonia.app.logs import read_metrics

    epochs = [r for r in read_metrics(tmp_path / "a" / "tiny" / "metrics.jsonl") if r["kind"] == "epoch"]
    assert all(math.isfinite(r["balance/greedy/utilization/audio"]) for r in epochs)
