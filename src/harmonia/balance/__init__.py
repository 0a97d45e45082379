"""Modality balancing: unimodal scores, discrepancy ratio, OGM / OGM-GE and OPM (TPAMI 2025, CVPR 2022)."""

from harmonia.balance.ogm import OGM, OGMForm, OGMStats, conv_weights_only, ogm_coefficient
from harmonia.balance.opm import OPM, opm_drop_probability
from harmonia.balance.scores import discrepancy_ratio, ratios_from_scores, unimodal_scores

__all__ = [
    "OGM",
    "OPM",
    "OGMForm",
    "OGMStats",
    "conv_weights_only",
    "discrepancy_ratio",
    "ogm_coefficient",
    "opm_drop_probability",
    "ratios_from_scores",
    "unimodal_scores",
]
