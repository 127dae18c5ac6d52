"""Removal modules: one protocol, ``method.unlearn(model, forget=..., retain=...)``."""

from unlearn.removal.base import RemovalMethod, RemovalResult, split_loaders
from unlearn.removal.certified import (
    CertifiedLinearModel,
    CertifiedRemoval,
    CertifiedState,
    OneVsRestTask,
    UnitNorm,
    train_certifiable,
)
from unlearn.removal.gradient_restriction import (
    GradientRestrictionLoss,
    train_with_gradient_restriction,
)
from unlearn.removal.iau import IAU
from unlearn.removal.newton import NewtonRemoval

__all__ = [
    "IAU",
    "CertifiedLinearModel",
    "CertifiedRemoval",
    "CertifiedState",
    "NewtonRemoval",
    "OneVsRestTask",
    "UnitNorm",
    "train_certifiable",
    "GradientRestrictionLoss",
    "RemovalMethod",
    "RemovalResult",
    "split_loaders",
    "train_with_gradient_restriction",
]
