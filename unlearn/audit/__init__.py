"""Auditing a removal: accuracies, model-to-model comparisons and membership inference."""

from unlearn.audit.certificate import SCHEMA, Certificate, Check, certify
from unlearn.audit.lira import LiRAResult, OfflineLiRA
from unlearn.audit.metrics import (
    GAP_KEYS,
    SampleOutputs,
    accuracy,
    average_gap,
    kl_divergence,
    parameter_distance,
    per_sample_outputs,
    predict,
    prediction_agreement,
)
from unlearn.audit.mia import FEATURES, MIAResult, PopulationMIA, attack_features, mia_efficacy

__all__ = [
    "SCHEMA",
    "Certificate",
    "Check",
    "LiRAResult",
    "OfflineLiRA",
    "certify",
    "FEATURES",
    "GAP_KEYS",
    "MIAResult",
    "PopulationMIA",
    "SampleOutputs",
    "accuracy",
    "attack_features",
    "average_gap",
    "kl_divergence",
    "mia_efficacy",
    "parameter_distance",
    "per_sample_outputs",
    "predict",
    "prediction_agreement",
]
