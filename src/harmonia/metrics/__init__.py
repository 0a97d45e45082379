"""Evaluation: classification metrics and linear probes on frozen features."""

from __future__ import annotations

from harmonia.metrics.classification import (
    accuracy,
    average_precision,
    classification_metrics,
    macro_f1,
    mean_average_precision,
)
from harmonia.metrics.probe import ProbeResult, extract_features, linear_probe

__all__ = [
    "ProbeResult",
    "accuracy",
    "average_precision",
    "classification_metrics",
    "extract_features",
    "linear_probe",
    "macro_f1",
    "mean_average_precision",
]
