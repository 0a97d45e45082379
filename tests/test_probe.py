"""Tests for harmonia.metrics.probe: feature extraction and the linear probe."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from harmonia.errors import InputError
from harmonia.metrics import ProbeResult, extract_features, linear_probe


def _clusters(n_per_class: int, num_classes: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = 10.0 * np.eye(num_classes, dim)
    y = np.repeat(np.arange(num_classes), n_per_class)
    x = centers[y] + rng.normal(scale=0.5, size=(y.size, dim))
    return x, y


def test_separable_clusters_are_probed_perfectly() -> None:
    xtr, ytr = _clusters(30, 4, 8, seed=0)
    xte, yte = _clusters(20, 4, 8, seed=1)
    xtr[:, -1] = 3.0  # a constant feature must not break standardization
    xte[:, -1] = 3.0
    res = linear_probe(torch.from_numpy(xtr).float(), torch.from_numpy(ytr), xte, yte, 4)
    assert isinstance(res, ProbeResult)
    assert res.accuracy == pytest.approx(1.0)
    assert res.macro_f1 == pytest.approx(1.0)
    assert res.train_accuracy == pytest.approx(1.0)


def test_noise_features_give_chance_on_test() -> None:
    rng = np.random.default_rng(0)
    num_classes = 4
    xtr, xte = rng.normal(size=(400, 16)), rng.normal(size=(2000, 16))
    ytr, yte = rng.integers(0, num_classes, 400), rng.integers(0, num_classes, 2000)
    res = linear_probe(xtr, ytr, xte, yte, num_classes)
    assert abs(res.accuracy - 1 / num_classes) < 0.05
    assert res.train_accuracy > res.accuracy  # it can only memorize noise


def test_deterministic() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(120, 6)), rng.integers(0, 3, 120)
    a = linear_probe(x[:80], y[:80], x[80:], y[80:], 3, seed=5)
    b = linear_probe(x[:80], y[:80], x[80:], y[80:], 3, seed=5)
    assert a == b


@pytest.mark.parametrize("start_training", [True, False])
def test_extract_features_restores_mode(start_training: bool) -> None:
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5), nn.BatchNorm1d(4))
    encoder.train(start_training)
    seen: list[bool] = []
    encoder.register_forward_pre_hook(lambda mod, args: seen.append(mod.training))
    batches = [torch.randn(3, 5), torch.randn(2, 5)]
    feats = extract_features(encoder, batches)
    assert feats.shape == (5, 4)
    assert not feats.requires_grad
    assert seen == [False, False]
    assert encoder.training is start_training
    assert all(m.training is start_training for m in encoder.modules())
    again = extract_features(encoder, iter(batches))  # eval mode: dropout off, so the output repeats
    assert torch.equal(feats, again)


def test_extract_features_restores_mode_on_error() -> None:
    encoder = nn.Linear(5, 4).train()
    with pytest.raises(RuntimeError):
        extract_features(encoder, [torch.randn(2, 3)])
    assert encoder.training
    with pytest.raises(InputError, match="no batches"):
        extract_features(encoder, [])


def test_errors() -> None:
    x, y = np.zeros((6, 3)), np.array([0, 1, 0, 1, 0, 1])
    with pytest.raises(InputError, match="2-D"):
        linear_probe(np.zeros(6), y, x, y, 2)
    with pytest.raises(InputError, match="one label per row"):
        linear_probe(x, y[:5], x, y, 2)
    with pytest.raises(InputError, match="one label per row"):
        linear_probe(x, y, x, y[:4], 2)
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(InputError, match="NaN or inf"):
        linear_probe(bad, y, x, y, 2)
    with pytest.raises(InputError, match="NaN or inf"):
        linear_probe(x, y, np.full((6, 3), np.inf), y, 2)
    with pytest.raises(InputError, match="features"):
        linear_probe(x, y, np.zeros((6, 4)), y, 2)
    with pytest.raises(InputError, match="single class"):
        linear_probe(x, np.zeros(6, dtype=int), x, y, 2)
    with pytest.raises(InputError, match="integer"):
        linear_probe(x, y.astype(float), x, y, 2)
