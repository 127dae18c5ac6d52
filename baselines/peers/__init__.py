"""Adapters that run peer influence libraries (kronfluence, dattri) on OUR trained model and
data and return scores in OUR convention: ``scores[q, i]`` predicts
``loss_q(θ without i) − loss_q(θ)`` = ``(1/n) ∇ℓ_qᵀ (H + λI)⁻¹ ∇ℓ_i`` with H the curvature
of the MEAN training loss.

The peers are optional (the ``bench`` extra); import the adapter modules only when they are
installed (:func:`kronfluence_available`, :func:`dattri_available`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["PeerResult", "kronfluence_available", "dattri_available"]


@dataclass
class PeerResult:
    """One peer run: wall time of fitting (factors / caches) and of scoring, separately, and
    ``scores[n_query, n_train]`` in our sign convention and scale."""

    fit_s: float
    score_s: float
    scores: Tensor
    info: dict[str, Any] = field(default_factory=dict)


def kronfluence_available() -> bool:
    """Whether kronfluence imports (``pip install -e .[bench]``)."""
    return importlib.util.find_spec("kronfluence") is not None


def dattri_available() -> bool:
    """Whether dattri imports (``pip install -e .[bench]``)."""
    return importlib.util.find_spec("dattri") is not None
