"""Linear probe on frozen features.

Measures how much class information one modality's encoder carries inside a jointly trained model:
freeze the encoder, extract features, standardize them with the training-set statistics,

    z = (x - mean_train) / max(std_train, 1e-6),

and fit an L2-regularized multinomial logistic regression on ``z``. Wei et al., "On-the-Fly Modulation
for Balanced Multimodal Learning" (TPAMI 2025) use this protocol to show that the weaker modality
of a jointly trained model is under-optimized.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from harmonia.errors import InputError
from harmonia.extras import require
from harmonia.metrics.classification import accuracy, macro_f1

STD_FLOOR = 1e-6


@torch.no_grad()
def extract_features(encoder: nn.Module, batches: Iterable[Tensor]) -> Tensor:
    """Run ``encoder`` in eval mode over ``batches`` and return the outputs concatenated along dim 0.

    The outputs are detached and moved to the CPU; the encoder's previous train/eval mode is restored.
    """
    was_training = encoder.training
    encoder.eval()
    try:
        outputs = [encoder(batch).detach().cpu() for batch in batches]
    finally:
        encoder.train(was_training)
    if not outputs:
        raise InputError("extract_features got no batches; pass a non-empty iterable of input tensors")
    return torch.cat(outputs, dim=0)


@dataclass
class ProbeResult:
    """Linear-probe scores: test accuracy and macro-F1, and accuracy on the training features."""

    accuracy: float
    macro_f1: float
    train_accuracy: float


def _features(x: Tensor | np.ndarray, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise InputError(
            f"{name} must be 2-D [N, D], got shape {tuple(arr.shape)}; flatten features with "
            "x.reshape(len(x), -1)"
        )
    if arr.shape[0] == 0:
        raise InputError(f"{name} has no rows; the probe needs at least one example")
    if not np.all(np.isfinite(arr)):
        raise InputError(
            f"{name} contains NaN or inf; check the encoder output (or the checkpoint it came from)"
        )
    return arr


def _probe_labels(y: Tensor | np.ndarray, n: int, num_classes: int, name: str) -> np.ndarray:
    if isinstance(y, Tensor):
        y = y.detach().cpu().numpy()
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise InputError(f"{name} must be 1-D class indices [N], got shape {tuple(arr.shape)}")
    if arr.shape[0] != n:
        raise InputError(
            f"{name} has {arr.shape[0]} labels but the features have {n} rows; pass one label per row"
        )
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{name} must hold integer class indices, got dtype {arr.dtype}; cast with .long()")
    if arr.min() < 0 or arr.max() >= num_classes:
        raise InputError(
            f"{name} must lie in [0, {num_classes}), got values in [{arr.min()}, {arr.max()}]; "
            "check num_classes"
        )
    return arr.astype(np.int64)


def linear_probe(
    train_x: Tensor | np.ndarray,
    train_y: Tensor | np.ndarray,
    test_x: Tensor | np.ndarray,
    test_y: Tensor | np.ndarray,
    num_classes: int,
    *,
    c: float = 1.0,
    max_iter: int = 2000,
    seed: int = 0,
) -> ProbeResult:
    """Fit a standardized multinomial logistic regression on ``train_x`` and score it on ``test_x``.

    Features are standardized with the training mean and std (floored at 1e-6, so constant features
    become 0); the classifier is sklearn's ``LogisticRegression`` (lbfgs, L2 penalty, inverse strength
    ``C=c``); with two classes sklearn fits the equivalent single-logit (binary) model. The result is
    deterministic for fixed inputs.
    """
    if not isinstance(num_classes, int) or num_classes < 2:
        raise InputError(f"num_classes must be an int >= 2 for a probe, got {num_classes!r}")
    if c <= 0:
        raise InputError(f"c is the inverse L2 strength and must be > 0, got {c}")
    xtr = _features(train_x, "train_x")
    xte = _features(test_x, "test_x")
    if xtr.shape[1] != xte.shape[1]:
        raise InputError(
            f"train_x has {xtr.shape[1]} features but test_x has {xte.shape[1]}; extract both with the "
            "same encoder"
        )
    ytr = _probe_labels(train_y, xtr.shape[0], num_classes, "train_y")
    yte = _probe_labels(test_y, xte.shape[0], num_classes, "test_y")
    if np.unique(ytr).size < 2:
        raise InputError("train_y holds a single class; the probe needs examples of at least two classes")

    mean = xtr.mean(axis=0)
    std = np.maximum(xtr.std(axis=0), STD_FLOOR)
    LogisticRegression = require("sklearn.linear_model", "linear probes").LogisticRegression
    clf = LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter, random_state=seed)
    clf.fit((xtr - mean) / std, ytr)
    pred_te = clf.predict((xte - mean) / std).astype(np.int64)
    pred_tr = clf.predict((xtr - mean) / std).astype(np.int64)
    return ProbeResult(
        accuracy=accuracy(pred_te, yte),
        macro_f1=macro_f1(pred_te, yte, num_classes),
        train_accuracy=accuracy(pred_tr, ytr),
    )
