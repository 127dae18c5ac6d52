"""Influence estimators, one protocol: fit, scores, self_influence, inverse_hvp, save/load.

Names are imported lazily so that importing one estimator does not load them all.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "InfluenceEstimator": "base",
    "NotFittedError": "base",
    "ExactInfluence": "exact",
    "CGInfluence": "cg",
    "LiSSAInfluence": "lissa",
    "ArnoldiInfluence": "arnoldi",
    "KFACInfluence": "ekfac",
    "EKFACInfluence": "ekfac",
    "TracInInfluence": "tracin",
    "SGDInfluence": "sgd",
    "GradientDotInfluence": "gradient",
    "GradientCosineInfluence": "gradient",
    "save_scores": "io",
    "load_scores": "io",
    "fit_distributed": "distributed",
    "scores_distributed": "distributed",
    "TfidfIndex": "candidates",
    "tfidf_candidates": "candidates",
    "knn_candidates": "candidates",
    "layer_inputs": "candidates",
    "scores_on_candidates": "candidates",
    "GANInfluence": "gan",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'unlearn.influence' has no attribute {name!r}")
    return getattr(importlib.import_module(f"unlearn.influence.{_WHERE[name]}"), name)
