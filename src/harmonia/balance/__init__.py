"""Modality balancing: unimodal scores, discrepancy ratio, OGM / OGM-GE and OPM (TPAMI 2025, CVPR 2022),
CML (ICML 2023), PMR (CVPR 2023), AGM (ICCV 2023), AMCo (ICASSP 2023), MMPareto (ICML 2024), LFM
(NeurIPS 2024), UME / UMT (ICML 2023), MLA (CVPR 2024), MMCosine (ICASSP 2023), ReconBoost (ICML 2024),
Diagnosing & Re-learning (ECCV 2024), sample-level modality valuation (CVPR 2024), Gradient-Blending
(CVPR 2020), balanced multi-modal learning against greedy learning (ICML 2022) and BalanceMM's MBSD (pairwise
sample-weighted agreement of unimodal predictions).

Each method is one :class:`BalancingMethod` (an ``nn.Module``) with its own settings dataclass; it works in
a plain training loop through its own methods (``OGM.step``, ``OPM.forward`` / ``OPM.update``) and in any
trainer through the hooks of :class:`BalancingMethod`.
"""

from harmonia.balance.agm import AGM, AGMSettings, agm_coefficients, mono_modal_responses, response_scores
from harmonia.balance.amco import AMCo, AMCoSettings, AMCoTarget, amco_mask_ratio, dependence_shares
from harmonia.balance.cml import CML, CMLReduction, CMLSettings, cml_regularizer
from harmonia.balance.gblending import (
    GBlending,
    GBlendingGain,
    GBlendingSettings,
    blended_loss,
    gblending_weights,
    ogr_terms,
)
from harmonia.balance.greedy import (
    Greedy,
    GreedySettings,
    conditional_learning_speeds,
    conditional_utilization_rate,
    learning_speed,
    speed_gap,
)
from harmonia.balance.lfm import LFM, LFMSchedule, LFMSettings, js_divergence, lfm_cls_weight, matching_loss
from harmonia.balance.mbsd import (
    MBSD,
    MBSDDivergence,
    MBSDSettings,
    MBSDSpace,
    mbsd_pair_terms,
    mbsd_regularizer,
)
from harmonia.balance.method import BalanceStep, BalancingMethod, unimodal_heads
from harmonia.balance.mla import (
    MLA,
    MLAFusionMode,
    MLASchedule,
    MLASettings,
    mla_fuse,
    mla_weights,
    owm_update,
    tie_sum_fusion,
)
from harmonia.balance.mmcosine import MMCosine, MMCosineSettings, cosine_head_from
from harmonia.balance.mmpareto import MMPareto, MMParetoSettings
from harmonia.balance.ogm import (
    OGM,
    OGMGE,
    OGMForm,
    OGMGESettings,
    OGMSettings,
    OGMStats,
    conv_weights_only,
    ogm_coefficient,
)
from harmonia.balance.opm import OPM, OPMSettings, opm_drop_probability
from harmonia.balance.pmr import PMR, PMRSettings, pmr_coefficients, prototype_logits
from harmonia.balance.reconboost import ReconBoost, ReconBoostPhase, ReconBoostSettings, reconboost_loss
from harmonia.balance.relearn import Relearn, RelearnSettings, kmeans, purity, relearn_alpha, soft_reinit
from harmonia.balance.scores import discrepancy_ratio, ratios_from_scores, unimodal_scores
from harmonia.balance.ume import UME, UMEReduction, UMESettings, check_additive_fusion, ume_loss
from harmonia.balance.umt import UMT, UMTSettings, load_teacher, state_fingerprint, teacher_state
from harmonia.balance.valuation import (
    SampleValuation,
    SampleValuationSettings,
    resample_copies,
    sample_contributions,
)

__all__ = [
    "AGM",
    "CML",
    "LFM",
    "MBSD",
    "MLA",
    "OGM",
    "OGMGE",
    "OPM",
    "PMR",
    "UME",
    "UMT",
    "AGMSettings",
    "AMCo",
    "AMCoSettings",
    "AMCoTarget",
    "BalanceStep",
    "BalancingMethod",
    "CMLReduction",
    "CMLSettings",
    "GBlending",
    "GBlendingGain",
    "GBlendingSettings",
    "Greedy",
    "GreedySettings",
    "LFMSchedule",
    "LFMSettings",
    "MBSDDivergence",
    "MBSDSettings",
    "MBSDSpace",
    "MLAFusionMode",
    "MLASchedule",
    "MLASettings",
    "MMCosine",
    "MMCosineSettings",
    "MMPareto",
    "MMParetoSettings",
    "OGMForm",
    "OGMGESettings",
    "OGMSettings",
    "OGMStats",
    "OPMSettings",
    "PMRSettings",
    "ReconBoost",
    "ReconBoostPhase",
    "ReconBoostSettings",
    "Relearn",
    "RelearnSettings",
    "SampleValuation",
    "SampleValuationSettings",
    "UMEReduction",
    "UMESettings",
    "UMTSettings",
    "agm_coefficients",
    "amco_mask_ratio",
    "blended_loss",
    "check_additive_fusion",
    "cml_regularizer",
    "conditional_learning_speeds",
    "conditional_utilization_rate",
    "conv_weights_only",
    "cosine_head_from",
    "dependence_shares",
    "discrepancy_ratio",
    "gblending_weights",
    "js_divergence",
    "kmeans",
    "learning_speed",
    "lfm_cls_weight",
    "load_teacher",
    "matching_loss",
    "mbsd_pair_terms",
    "mbsd_regularizer",
    "mla_fuse",
    "mla_weights",
    "mono_modal_responses",
    "ogm_coefficient",
    "ogr_terms",
    "opm_drop_probability",
    "owm_update",
    "pmr_coefficients",
    "prototype_logits",
    "purity",
    "ratios_from_scores",
    "reconboost_loss",
    "relearn_alpha",
    "resample_copies",
    "response_scores",
    "sample_contributions",
    "soft_reinit",
    "speed_gap",
    "state_fingerprint",
    "teacher_state",
    "tie_sum_fusion",
    "ume_loss",
    "unimodal_heads",
    "unimodal_scores",
]
