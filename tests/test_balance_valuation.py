"""Sample-level modality valuation (CVPR 2024): contributions, the re-sampling rule, training."""

from __future__ import annotations

import math
from itertools import combinations
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harmonia.balance import BalanceStep, SampleValuation, resample_copies, sample_contributions
from harmonia.errors import ConfigError
from helpers import tiny_experiment, train_interrupted_and_resumed


def _lookup_fuse(table: dict[frozenset[str], torch.Tensor], names: list[str]):
    """A 'head' returning hand-made logits for each subset of kept (non-zero) modalities."""

    def fuse(kept):
        key = frozenset(m for m in names if bool(kept[m].abs().sum() > 0))
        return table[key]

    return fuse


def reference_phi(correct: dict[frozenset[str], list[bool]], names: list[str], i: int, m: str, scale: bool):
    """Shapley value written out with Python floats (official: v(S) = |S|·[correct], v(∅) = 0)."""
    n = len(names)

    def v(s: frozenset[str]) -> float:
        if not s:
            return 0.0
        return (len(s) if scale else 1.0) * float(correct[s][i])

    others = [o for o in names if o != m]
    total = 0.0
    for k in range(n):
        for sub in combinations(others, k):
            s = frozenset(sub)
            w = math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
            total += w * (v(s | {m}) - v(s))
    return total


@pytest.mark.parametrize("names", [["audio", "image"], ["audio", "image", "text"]])
@pytest.mark.parametrize("scale", [True, False])
def test_contributions_match_an_independent_shapley_of_correctness(names: list[str], scale: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    batch, classes = 16, 3
    labels = torch.randint(0, classes, (batch,), generator=gen)
    table, correct = {}, {}
    for k in range(1, len(names) + 1):
        for sub in combinations(names, k):
            logits = torch.randn(batch, classes, generator=gen)
            table[frozenset(sub)] = logits
            correct[frozenset(sub)] = (logits.argmax(1) == labels).tolist()
    features = {m: torch.ones(batch, 2) for m in names}
    phi = sample_contributions(_lookup_fuse(table, names), features, labels, scale_by_size=scale)
    for m in names:
        for i in range(batch):
            assert phi[m][i].item() == pytest.approx(reference_phi(correct, names, i, m, scale))
    full = frozenset(names)
    total = sum(phi[m] for m in names)
    expected = torch.tensor(
        [(len(names) if scale else 1) * float(c) for c in correct[full]], dtype=total.dtype
    )
    torch.testing.assert_close(total, expected)


def test_two_modalities_give_the_official_values() -> None:
    # official: contrib_a = (v_a + v_all - v_v) / 2 with v_all = 2 when the fused prediction is right
    names = ["audio", "image"]
    labels = torch.tensor([0, 0, 0, 0])
    right, wrong = torch.tensor([5.0, 0.0]), torch.tensor([0.0, 5.0])
    rows = {  # (audio alone, image alone, fused)
        0: (right, right, right),  # φ = 1, 1
        1: (right, wrong, right),  # φ = 1.5, 0.5
        2: (wrong, right, wrong),  # φ = -0.5, 0.5
        3: (wrong, wrong, wrong),  # φ = 0, 0
    }
    table = {
        frozenset(["audio"]): torch.stack([rows[i][0] for i in range(4)]),
        frozenset(["image"]): torch.stack([rows[i][1] for i in range(4)]),
        frozenset(names): torch.stack([rows[i][2] for i in range(4)]),
    }
    phi = sample_contributions(_lookup_fuse(table, names), {m: torch.ones(4, 1) for m in names}, labels)
    assert phi["audio"].tolist() == [1.0, 1.5, -0.5, 0.0]
    assert phi["image"].tolist() == [1.0, 0.5, 0.5, 0.0]


def test_resample_rule_is_the_official_bins() -> None:
    phi = torch.tensor([1.5, 1.0, 0.5, 0.0, -0.5, 0.45, 0.4, -0.1, 0.99], dtype=torch.float64)
    assert resample_copies(phi).tolist() == [0, 0, 1, 2, 3, 1, 0, 0, 1]


class _Head(torch.nn.Module):
    def __init__(self, names: list[str], dim: int, classes: int) -> None:
        super().__init__()
        self.names = names
        self.linear = torch.nn.Linear(dim * len(names), classes)

    def forward(self, feats):
        return self.linear(torch.cat([feats[m] for m in self.names], dim=1))


def test_the_loss_is_the_mean_over_the_batch_and_its_copies() -> None:
    torch.manual_seed(0)
    names = ["audio", "image"]
    head = _Head(names, 3, 4)
    method = SampleValuation(names, fuse=head.__call__, start_epoch=0)
    feats = {m: torch.randn(8, 3, requires_grad=True) for m in names}
    labels = torch.randint(0, 4, (8,))
    step = BalanceStep(labels, epoch=0)
    out = method.transform_features(step, feats)
    loss = F.cross_entropy(head(out), labels)
    new = method.adjust_loss(step, None, loss)
    phi = sample_contributions(head, {m: f.detach() for m, f in feats.items()}, labels)
    total, count = 8 * loss.item(), 8.0
    for m in names:
        c = resample_copies(phi[m]).double()
        kept = {o: feats[o] if o == m else torch.zeros_like(feats[o]) for o in names}
        ce = F.cross_entropy(head(kept), labels, reduction="none").double()
        total += float((c * ce).sum().detach())
        count += float(c.sum())
        assert step.metrics[f"balance/valuation/copies/{m}"] == pytest.approx(float(c.sum()) / 8)
        assert step.metrics[f"balance/valuation/contribution/{m}"] == pytest.approx(float(phi[m].mean()))
    assert new.item() == pytest.approx(total / count, rel=1e-6)
    new.backward()
    assert all(f.grad is not None for f in feats.values())
    assert head.training


def test_before_its_start_epoch_the_loss_is_unchanged() -> None:
    names = ["audio", "image"]
    head = _Head(names, 2, 3)
    method = SampleValuation(names, fuse=head.__call__, start_epoch=5)
    feats = {m: torch.randn(4, 2) for m in names}
    labels = torch.tensor([0, 1, 2, 0])
    step = BalanceStep(labels, epoch=4)
    loss = F.cross_entropy(head(method.transform_features(step, feats)), labels)
    assert method.adjust_loss(step, None, loss) is loss
    assert step.metrics["balance/valuation/copies/audio"] == 0.0


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="balances modalities"):
        SampleValuation(["audio"])
    with pytest.raises(ConfigError, match=r"balance\[0\]\.start_epoch"):
        tiny_experiment(tmp_path, "balance=[{name: valuation, start_epoch: -1}]")
    with pytest.raises(ConfigError, match=r"balance\[0\]\.rate"):
        tiny_experiment(tmp_path, "balance=[{name: valuation, rate: 1.0}]")
    assert tiny_experiment(tmp_path, "balance=[{name: valuation, start_epoch: 0, scale_by_size: false}]")


@pytest.mark.integration
def test_valuation_training_logs_and_resumes_exactly(tmp_path: Path) -> None:
    steps = train_interrupted_and_resumed(
        tmp_path, "balance=[{name: valuation, start_epoch: 1}]", "train.probe=false"
    ).steps
    for m in ("audio", "image"):
        assert {f"balance/valuation/contribution/{m}", f"balance/valuation/copies/{m}"} <= set(steps[-1])
    assert any(r["balance/valuation/copies/audio"] + r["balance/valuation/copies/image"] > 0 for r in steps)
