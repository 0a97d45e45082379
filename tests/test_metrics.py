"""Tests for harmonia.metrics.classification against scikit-learn and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, average_precision_score, f1_score

from harmonia.errors import InputError
from harmonia.metrics import (
    accuracy,
    average_precision,
    classification_metrics,
    macro_f1,
    mean_average_precision,
)


def _sk_map(scores: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean([average_precision_score(labels == c, scores[:, c]) for c in np.unique(labels)]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn_on_random_data(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, c = 200, 7
    labels = rng.integers(0, c - 1, size=n)  # class c-1 never occurs: mAP must skip it, F1 must count it
    logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[labels]
    pred = logits.argmax(axis=1)
    assert accuracy(logits, labels) == pytest.approx(accuracy_score(labels, pred))
    assert accuracy(torch.from_numpy(pred), torch.from_numpy(labels)) == pytest.approx(
        accuracy_score(labels, pred)
    )
    expected_f1 = f1_score(labels, pred, average="macro", labels=list(range(c)), zero_division=0)
    assert macro_f1(pred, labels, c) == pytest.approx(expected_f1)
    assert mean_average_precision(logits, labels, c) == pytest.approx(_sk_map(logits, labels))


def test_ties_match_sklearn() -> None:
    rng = np.random.default_rng(3)
    n, c = 300, 4
    labels = rng.integers(0, c, size=n)
    scores = rng.integers(0, 5, size=(n, c)).astype(np.float64)  # many tied scores per class
    assert mean_average_precision(scores, labels, c) == pytest.approx(_sk_map(scores, labels))
    for k in range(c):
        assert average_precision(scores[:, k], labels == k) == pytest.approx(
            average_precision_score(labels == k, scores[:, k])
        )


def test_hand_computed_tiny_case() -> None:
    # labels [0, 0, 1, 2], pred [0, 1, 1, 1], C = 4:
    #   accuracy = 2/4 = 0.5
    #   F1_0 = 2*1/(2*1+0+1) = 2/3; F1_1 = 2*1/(2*1+2+0) = 1/2; F1_2 = 0/(0+0+1) = 0; F1_3 = 0 (0/0 -> 0)
    #   macro-F1 = (2/3 + 1/2 + 0 + 0)/4 = 7/24
    labels = np.array([0, 0, 1, 2])
    pred = np.array([0, 1, 1, 1])
    assert accuracy(pred, labels) == pytest.approx(0.5)
    assert macro_f1(pred, labels, 4) == pytest.approx(7 / 24)

    # scores [0.9, 0.8, 0.7, 0.6], positives [1, 0, 1, 0]; thresholds in decreasing order give
    #   (R, P) = (1/2, 1), (1/2, 1/2), (1, 2/3), (1, 1/2)
    #   AP = 1/2*1 + 0*1/2 + 1/2*2/3 + 0*1/2 = 5/6
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0], bool)) == pytest.approx(
        5 / 6
    )

    # Tie: scores [0.9, 0.5, 0.5, 0.1], positives [0, 1, 0, 1]; the two 0.5s form one threshold:
    #   (R, P) = (0, 0), (1/2, 1/3), (1, 2/4)  ->  AP = 0 + 1/2*1/3 + 1/2*1/2 = 5/12
    # (ranking the tied positive first would wrongly give 1/2*1/2 + 1/2*1/2 = 1/2)
    assert average_precision(np.array([0.9, 0.5, 0.5, 0.1]), np.array([0, 1, 0, 1], bool)) == pytest.approx(
        5 / 12
    )

    # mAP over 3 classes where class 2 never occurs: classes 0 and 1 are perfectly ranked -> AP 1 each,
    # class 2 is skipped (its AP is undefined), so mAP = 1 whatever its scores.
    scores = np.array([[0.8, 0.1, 0.9], [0.7, 0.2, 0.9], [0.1, 0.6, 0.9]])
    assert mean_average_precision(scores, np.array([0, 0, 1]), 3) == pytest.approx(1.0)


def test_classification_metrics_uses_softmax_scores() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 5, generator=gen)
    labels = torch.randint(0, 5, (64,), generator=gen)
    out = classification_metrics(logits, labels, 5)
    assert set(out) == {"accuracy", "macro_f1", "mAP"}
    probs = torch.softmax(logits.double(), dim=1).numpy()
    pred = logits.argmax(1).numpy()
    y = labels.numpy()
    assert out["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert out["macro_f1"] == pytest.approx(
        f1_score(y, pred, average="macro", labels=range(5), zero_division=0)
    )
    assert out["mAP"] == pytest.approx(_sk_map(probs, y))
    assert all(isinstance(v, float) for v in out.values())


def test_errors() -> None:
    with pytest.raises(InputError, match="rows"):
        accuracy(np.zeros((3, 2)), np.zeros(4, dtype=int))
    with pytest.raises(InputError, match=r"\[0, 3\)"):
        macro_f1(np.array([0, 1]), np.array([0, 3]), 3)
    with pytest.raises(InputError, match="shape"):
        mean_average_precision(np.zeros((2, 2)), np.array([0, 1]), 3)
    with pytest.raises(InputError, match="NaN"):
        mean_average_precision(np.array([[np.nan, 0.0], [0.0, 1.0]]), np.array([0, 1]), 2)
    with pytest.raises(InputError, match="without a positive"):
        average_precision(np.array([0.3, 0.1]), np.array([False, False]))
    with pytest.raises(InputError, match="empty"):
        accuracy(np.zeros(0, dtype=int), np.zeros(0, dtype=int))
    with pytest.raises(InputError, match=r"torch\.Tensor or numpy"):
        accuracy([0, 1], np.array([0, 1]))  # type: ignore[arg-type]
