"""Influence estimators, one protocol: fit, scores, self_influence, inverse_hvp, save/load."""

from unlearn.influence.base import InfluenceEstimator, NotFittedError
from unlearn.influence.exact import ExactInfluence

__all__ = ["ExactInfluence", "InfluenceEstimator", "NotFittedError"]
