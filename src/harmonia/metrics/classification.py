"""Classification metrics: accuracy, macro-F1 and mean average precision (mAP).

Implemented with numpy only, matching scikit-learn's definitions:

* accuracy = (1/N) sum_n [pred_n == y_n]
* macro-F1 = (1/C) sum_c F1_c, with F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c) and F1_c = 0 when the
  denominator is 0 (``f1_score(average="macro", labels=range(C), zero_division=0)``)
* mAP = mean over the classes present in the labels of the one-vs-rest average precision
  AP_c = sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds, in decreasing order
  (``average_precision_score``); this is the mAP that Wei et al., "On-the-Fly Modulation for Balanced
  Multimodal Learning" (TPAMI 2025) report for VGGSound and Kinetics-Sounds.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from harmonia.errors import InputError

ArrayLike = Tensor | np.ndarray


def _to_numpy(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    raise InputError(
        f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}; convert it first"
    )


def _labels(labels: ArrayLike, num_classes: int | None = None, name: str = "labels") -> np.ndarray:
    y = _to_numpy(labels, name)
    if y.ndim != 1:
        raise InputError(f"{name} must be 1-D class indices [N], got shape {tuple(y.shape)}; flatten them")
    if y.size == 0:
        raise InputError(f"{name} is empty; metrics need at least one example")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise InputError(
                f"{name} must hold integer class indices, got dtype {y.dtype} with non-integer values"
            )
        y = y.astype(np.int64)
    if num_classes is not None and (y.min() < 0 or y.max() >= num_classes):
        raise InputError(
            f"{name} must lie in [0, {num_classes}), got values in [{y.min()}, {y.max()}]; "
            "check num_classes or the label mapping"
        )
    return y.astype(np.int64, copy=False)


def _check_num_classes(num_classes: int) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise InputError(f"num_classes must be a positive int, got {num_classes!r}")


def _predictions(logits_or_pred: ArrayLike) -> np.ndarray:
    x = _to_numpy(logits_or_pred, "logits_or_pred")
    if x.ndim == 2:
        return x.argmax(axis=1)
    if x.ndim == 1:
        return _labels(x, name="predictions")
    raise InputError(
        f"expected logits [N, C] or predicted classes [N], got shape {tuple(x.shape)}; reshape the input"
    )


def _same_length(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise InputError(
            f"{what} has {a.shape[0]} rows but labels has {b.shape[0]}; pass one label per example"
        )


def accuracy(logits_or_pred: ArrayLike, labels: ArrayLike) -> float:
    """Top-1 accuracy ``(1/N) sum_n [pred_n == y_n]``.

    ``logits_or_pred`` is either scores ``[N, C]`` (argmax is taken) or predicted classes ``[N]``.
    """
    pred = _predictions(logits_or_pred)
    y = _labels(labels)
    _same_length(pred, y, "logits_or_pred")
    return float(np.mean(pred == y))


def macro_f1(pred: ArrayLike, labels: ArrayLike, num_classes: int) -> float:
    """Macro-averaged F1 over all ``num_classes`` classes.

    ``F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c)``, 0 when a class is neither predicted nor present; the result
    is ``(1/C) sum_c F1_c``, as ``sklearn.metrics.f1_score(average="macro", labels=range(C))``.
    ``pred`` may be predicted classes ``[N]`` or scores ``[N, C]``.
    """
    _check_num_classes(num_classes)
    p = _predictions(pred)
    y = _labels(labels, num_classes)
    _same_length(p, y, "pred")
    if p.min() < 0 or p.max() >= num_classes:
        raise InputError(f"predictions must lie in [0, {num_classes}), got values in [{p.min()}, {p.max()}]")
    tp = np.bincount(y[p == y], minlength=num_classes).astype(np.float64)
    pred_count = np.bincount(p, minlength=num_classes)
    true_count = np.bincount(y, minlength=num_classes)
    denom = pred_count + true_count  # = 2 TP + FP + FN
    f1 = np.divide(2.0 * tp, denom, out=np.zeros(num_classes), where=denom > 0)
    return float(f1.mean())


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """One-vs-rest average precision ``AP = sum_n (R_n - R_{n-1}) P_n``.

    The sum runs over the distinct score thresholds in decreasing order, so tied scores enter together
    (as in ``sklearn.metrics.average_precision_score``). ``positive`` is a boolean mask with at least one
    True value.
    """
    if scores.shape != positive.shape or scores.ndim != 1:
        raise InputError(
            f"scores and positive must be 1-D of equal length, got {scores.shape} and {positive.shape}"
        )
    if not positive.any():
        raise InputError("average precision is undefined without a positive example; skip this class")
    order = np.argsort(-scores, kind="mergesort")
    s = scores[order]
    pos = positive[order].astype(np.float64)
    # Last index of each group of tied scores: the points where the threshold changes.
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = np.cumsum(pos)[last]
    precision = tp / (last + 1)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(scores: ArrayLike, labels: ArrayLike, num_classes: int) -> float:
    """Mean over the classes present in ``labels`` of the one-vs-rest AP of ``scores[:, c]``.

    Classes without a positive example are skipped (their AP is undefined).
    """
    _check_num_classes(num_classes)
    s = _to_numpy(scores, "scores").astype(np.float64)
    y = _labels(labels, num_classes)
    if s.ndim != 2 or s.shape[1] != num_classes:
        raise InputError(
            f"scores must have shape [N, {num_classes}], got {tuple(s.shape)}; pass one column per class"
        )
    _same_length(s, y, "scores")
    if not np.all(np.isfinite(s)):
        raise InputError("scores contain NaN or inf; check the model output before computing mAP")
    aps = [average_precision(s[:, c], y == c) for c in np.unique(y)]
    return float(np.mean(aps))


def classification_metrics(logits: Tensor, labels: Tensor, num_classes: int) -> dict[str, float]:
    """Return ``{"accuracy", "macro_f1", "mAP"}`` for logits ``[N, C]``; mAP uses ``softmax(logits)``."""
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise InputError(f"logits must be a tensor [N, C], got {shape}")
    probs = torch.softmax(logits.detach().double(), dim=1)
    pred = logits.argmax(dim=1)
    return {
        "accuracy": accuracy(pred, labels),
        "macro_f1": macro_f1(pred, labels, num_classes),
        "mAP": mean_average_precision(probs, labels, num_classes),
    }


def auroc(scores: ArrayLike, positive: ArrayLike) -> float:
    """Area under the ROC curve of ``scores`` for detecting ``positive`` (bool) samples.

    The Mann–Whitney form: the probability that a random positive scores higher than a random negative,
    ties counting one half. NaN when either class is empty.
    """
    s = _to_numpy(scores, "scores").astype(np.float64).ravel()
    p = _to_numpy(positive, "positive").astype(bool).ravel()
    _same_length(s, p, "scores and positive")
    n_pos, n_neg = int(p.sum()), int((~p).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(s)  # average ranks for ties
    return float((ranks[p].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def drop_precision(kept: ArrayLike, noisy: ArrayLike) -> dict[str, float]:
    """How well a curriculum's drops find the noisy samples.

    With D the dropped samples (``kept`` False) and the ground-truth flags ``noisy``:

        precision = |D ∩ noisy| / |D|,   base_rate = |noisy| / N,   lift = precision / base_rate

    (a curriculum that drops at random has lift 1). ``precision`` and ``lift`` are NaN when nothing was
    dropped (or, for ``lift``, when nothing is noisy).
    """
    k = _to_numpy(kept, "kept").astype(bool).ravel()
    y = _to_numpy(noisy, "noisy").astype(bool).ravel()
    _same_length(k, y, "kept and noisy")
    if len(k) == 0:
        raise ValueError("drop_precision: no samples")
    dropped = ~k
    base = float(y.mean())
    precision = float(y[dropped].mean()) if dropped.any() else float("nan")
    return {
        "dropped_fraction": float(dropped.mean()),
        "drop_precision": precision,
        "noise_base_rate": base,
        "drop_lift": precision / base if base > 0 else float("nan"),
    }
