"""Which training instances a GAN data cleansing removes: scores → a harm ranking → ids.

Every selector turns its evidence into a *harm* vector (one value per training instance,
higher = more harmful) and the cleansing removes the ``k`` instances with the highest harm:

* ``harm_from_influence(scores, higher_is_better)``: ``scores[i]`` predicts
  ``metric(without i) - metric(with i)`` (the library's sign convention), so removing ``i``
  helps when the score is positive for a higher-is-better metric (ALL, IS) and negative for a
  lower-is-better one (FID, a discriminator loss).
* ``random_harm(n, seed)``: a random ranking, the baseline every method must beat.
* ``isolation_forest_harm(features, seed)``: scikit-learn's Isolation Forest anomaly score on
  the data (2-D points) or on classifier features (images): outliers first.

``removal_count(n, k=..., fraction=...)`` turns a count or a fraction into a number of instances,
and ``select_top(harm, ids, count)`` picks the ids (ties broken towards the earlier position,
so a selection is reproducible).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "removal_count",
    "select_top",
    "harm_from_influence",
    "random_harm",
    "isolation_forest_harm",
    "check_scores",
]


def removal_count(n: int, *, k: int | None = None, fraction: float | None = None) -> int:
    """The number of instances to remove out of ``n``: ``k`` itself, or ``round(fraction * n)``.
    Exactly one of the two must be given; 0 is allowed (nothing removed)."""
    if (k is None) == (fraction is None):
        raise ValueError("give exactly one of k (a count) and fraction (of the training set)")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"k must be a non-negative integer, got {k!r}")
        if k > n:
            raise ValueError(f"k={k} is larger than the training set ({n} instances)")
        return int(k)
    assert fraction is not None
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
            or not math.isfinite(fraction) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
    return int(round(fraction * n))


def check_scores(scores: Any, n: int | None = None, what: str = "scores") -> Tensor:
    """``scores`` as a 1-D float64 tensor; empty, NaN/inf or wrongly sized input raises."""
    t = torch.as_tensor(np.asarray(scores.detach().cpu() if isinstance(scores, Tensor)
                                   else scores, dtype=np.float64))
    if t.dim() != 1:
        raise ValueError(f"{what} must be a 1-D vector (one value per training instance), got "
                         f"shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{what} is empty: there is nothing to rank")
    bad = ~torch.isfinite(t)
    if bad.any():
        pos = bad.nonzero().flatten()[:10].tolist()
        raise ValueError(f"{what} has {int(bad.sum())} NaN/inf value(s), at positions {pos}")
    if n is not None and len(t) != n:
        raise ValueError(f"{what} has {len(t)} values but the training set has {n} instances")
    return t


def harm_from_influence(scores: Any, *, higher_is_better: bool) -> Tensor:
    """Harm of each instance from its predicted metric change on removal (see module doc)."""
    s = check_scores(scores)
    return s if higher_is_better else -s


def random_harm(n: int, seed: int = 0) -> Tensor:
    """A uniformly random ranking of ``n`` instances."""
    if n < 1:
        raise ValueError(f"need at least one instance, got n={n}")
    return torch.rand(n, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)


def isolation_forest_harm(features: Any, seed: int = 0, n_estimators: int = 100) -> Tensor:
    """Isolation Forest anomaly score (``-score_samples``: higher = more anomalous) of each row
    of ``features`` (``[n, d]``; images are flattened), fitted on those same rows."""
    from sklearn.ensemble import IsolationForest

    x = features.detach().cpu().numpy() if isinstance(features, Tensor) else np.asarray(features)
    if x.ndim < 1 or len(x) == 0:
        raise ValueError("isolation_forest_harm needs at least one instance")
    x = x.reshape(len(x), -1).astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    forest = IsolationForest(n_estimators=n_estimators, random_state=int(seed)).fit(x)
    return torch.as_tensor(-forest.score_samples(x), dtype=torch.float64)


def select_top(harm: Any, ids: Any, count: int) -> Tensor:
    """The ``count`` ids with the highest harm, most harmful first (stable: equal harm keeps
    the earlier position first)."""
    h = check_scores(harm, what="harm")
    id_t = torch.as_tensor(ids, dtype=torch.long).flatten()
    if len(id_t) != len(h):
        raise ValueError(f"{len(h)} scores for {len(id_t)} ids: give one score per training id")
    if len(torch.unique(id_t)) != len(id_t):
        raise ValueError("ids must be unique")
    if not 0 <= count <= len(h):
        raise ValueError(f"cannot remove {count} of {len(h)} instances")
    order = torch.sort(-h, stable=True).indices
    return id_t[order[:count]]
