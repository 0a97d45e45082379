"""Modality balancing: unimodal scores, discrepancy ratio, OGM / OGM-GE and OPM (TPAMI 2025, CVPR 2022),
CML (ICML 2023), AGM (ICCV 2023), PMR (CVPR 2023) and MMPareto (ICML 2024).

Each method is one :class:`BalancingMethod` (an ``nn.Module``) with its own settings dataclass; it works in
a plain training loop through its own methods (``OGM.step``, ``OPM.forward`` / ``OPM.update``) and in any
trainer through the hooks of :class:`BalancingMethod`.
"""

from harmonia.balance.agm import AGM, AGMSettings, agm_coefficients, mono_modal_responses, response_scores
from harmonia.balance.cml import CML, CMLReduction, CMLSettings, cml_regularizer
from harmonia.balance.method import BalanceStep, BalancingMethod, unimodal_heads
from harmonia.balance.mmpareto import MMPareto, MMParetoSettings
from harmonia.balance.ogm import OGM, OGMForm, OGMSettings, OGMStats, conv_weights_only, ogm_coefficient
from harmonia.balance.opm import OPM, OPMSettings, opm_drop_probability
from harmonia.balance.pmr import PMR, PMRSettings, pmr_coefficients, prototype_logits
from harmonia.balance.scores import discrepancy_ratio, ratios_from_scores, unimodal_scores

__all__ = [
    "AGM",
    "CML",
    "OGM",
    "OPM",
    "PMR",
    "AGMSettings",
    "BalanceStep",
    "BalancingMethod",
    "CMLReduction",
    "CMLSettings",
    "MMPareto",
    "MMParetoSettings",
    "OGMForm",
    "OGMSettings",
    "OGMStats",
    "OPMSettings",
    "PMRSettings",
    "agm_coefficients",
    "cml_regularizer",
    "conv_weights_only",
    "discrepancy_ratio",
    "mono_modal_responses",
    "ogm_coefficient",
    "opm_drop_probability",
    "pmr_coefficients",
    "prototype_logits",
    "ratios_from_scores",
    "response_scores",
    "unimodal_heads",
    "unimodal_scores",
]
