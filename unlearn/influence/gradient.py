"""First-order influence without curvature: gradient dot products and gradient cosines.

Both replace ``(H + λI)⁻¹`` by the identity, so they need no fitting beyond counting the
training set, and cost one pass of per-sample gradients over the query and training data.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unlearn.influence.base import InfluenceEstimator


class GradientDotInfluence(InfluenceEstimator):
    """``scores[q, i] = (1/n) ∇ℓ_qᵀ ∇ℓ_i``: the influence formula with ``H + λI`` replaced by
    the identity (Charpiat et al. 2019's "grad-dot").

    On the leave-one-out scale only up to the missing curvature; ``damping`` is accepted so
    that every estimator builds the same way, but it is *unused*. ``inverse_hvp(v)`` returns
    ``v`` unchanged, and ``self_influence`` is ``(1/n) ||∇ℓ_i||²``.
    """

    name = "gradient_dot"
    inverts_curvature = False

    def _precondition(self, G: Tensor) -> Tensor:
        return G


class GradientCosineInfluence(InfluenceEstimator):
    """``scores[q, i] = cos(∇ℓ_q, ∇ℓ_i)`` in ``[-1, 1]``, without the ``1/n`` factor.

    Cosine removes the gradient norm, which otherwise lets a few high-loss examples dominate
    every query's ranking. The sign convention holds (positive: a step on i lowers q's loss),
    but the scale is not a loss change. A zero gradient has cosine 0 with everything.

    ``self_influence`` returns the diagonal of ``scores(train, train)``, which is 1 for every
    example with a non-zero gradient (0 otherwise) and so carries no ranking information; use
    :class:`GradientDotInfluence` (squared gradient norms) to flag unusual examples.
    ``inverse_hvp(v)`` returns ``v`` (no curvature); ``damping`` is unused.
    """

    name = "gradient_cosine"
    inverts_curvature = False

    def _transform(self, G: Tensor) -> Tensor:
        norms = G.norm(dim=1, keepdim=True)
        return G / norms.clamp_min(torch.finfo(G.dtype).tiny)

    def _score_scale(self) -> float:
        return 1.0

    def _precondition(self, G: Tensor) -> Tensor:
        return G
