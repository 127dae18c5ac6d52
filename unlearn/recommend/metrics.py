"""Recommendation quality and forgetting metrics.

* :func:`ranking_metrics`: full-ranking Recall@k and NDCG@k over all items, the user's
  training items excluded, averaged over the users with at least one test interaction.
  Recall@k = hits / |test items of u| (the LightGCN paper's definition); NDCG@k with binary
  relevance and the ideal DCG over ``min(k, |test items|)`` positions.
* :func:`deleted_pair_scores`: mean score of the deleted (user, item) pairs against random
  pairs that are in no interaction at all (never seen), against each deleted pair's own
  user's never-seen items (exact: the mean over all of them) and against retained training
  pairs.
* :func:`membership_auc`: AUC of deleted-pair scores against never-seen pairs and against
  retained pairs. A model that still "remembers" deleted edges scores them like retained
  ones; the retrained model is the reference (collaborative signal still ranks them above
  random pairs, so compare with retraining, not with 0.5).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from unlearn.recommend.data import InteractionGraph, in_sorted
from unlearn.recommend.model import score_matrix

__all__ = [
    "auc",
    "deleted_pair_scores",
    "forgetting_report",
    "membership_auc",
    "never_seen_pairs",
    "ranking_metrics",
]


def _scores(model_or_scores: nn.Module | Tensor, graph: InteractionGraph) -> Tensor:
    if isinstance(model_or_scores, Tensor):
        s = model_or_scores
        if s.shape != (graph.n_users, graph.n_items):
            raise ValueError(f"scores must be [{graph.n_users}, {graph.n_items}], got "
                             f"{tuple(s.shape)}")
    else:
        s = score_matrix(model_or_scores, graph)
    if not bool(torch.isfinite(s).all()):
        raise ValueError("scores hold NaN or infinite values")
    return s.detach().float().cpu()


def ranking_metrics(model_or_scores: nn.Module | Tensor, graph: InteractionGraph,
                    k: int = 20, test_pairs: Tensor | None = None) -> dict[str, float]:
    """``{"recall@k", "ndcg@k", "users"}`` on ``graph``'s test interactions (or
    ``test_pairs``), ranking every item the user has no training interaction with."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    scores = _scores(model_or_scores, graph).clone()
    scores[graph.train_matrix()] = -torch.inf
    test = graph.test_pairs() if test_pairs is None else torch.as_tensor(test_pairs).long()
    if len(test) == 0:
        raise ValueError("no test interactions to rank")
    relevant = torch.zeros(graph.n_users, graph.n_items, dtype=torch.bool)
    relevant[test[:, 0], test[:, 1]] = True
    users = torch.nonzero(relevant.any(1)).squeeze(1)
    kk = min(k, graph.n_items)
    top = scores[users].topk(kk, dim=1).indices
    hits = relevant[users].gather(1, top).float()
    n_rel = relevant[users].sum(1).float()
    discounts = 1.0 / torch.log2(torch.arange(kk, dtype=torch.float) + 2.0)
    dcg = (hits * discounts).sum(1)
    ideal = torch.cumsum(discounts, 0)[(n_rel.clamp(max=kk) - 1).long()]
    return {f"recall@{k}": float((hits.sum(1) / n_rel).mean()),
            f"ndcg@{k}": float((dcg / ideal).mean()),
            "users": int(len(users))}


def never_seen_pairs(graph: InteractionGraph, n: int, seed: int = 0) -> Tensor:
    """``[n, 2]`` random (user, item) pairs that are in no interaction of the table (train,
    test or removed): the non-members for membership tests."""
    keys = graph.all_keys()
    total = graph.n_users * graph.n_items
    if total - len(keys) < n:
        raise ValueError(f"only {total - len(keys)} never-seen pairs exist, asked for {n}")
    g = torch.Generator().manual_seed(seed)
    out: list[Tensor] = []
    got = 0
    while got < n:
        cand = torch.randint(total, (2 * (n - got) + 16,), generator=g)
        cand = torch.unique(cand[~in_sorted(cand, keys)])
        cand = cand[torch.randperm(len(cand), generator=g)]
        if out:
            cand = cand[~torch.isin(cand, torch.cat(out))]
        out.append(cand[:n - got])
        got += len(out[-1])
    k = torch.cat(out)
    return torch.stack([k // graph.n_items, k % graph.n_items], dim=1)


def auc(positive: Tensor, negative: Tensor) -> float:
    """P(score of a random positive > a random negative), ties counted half (Mann–Whitney)."""
    pos = torch.as_tensor(positive, dtype=torch.float64).reshape(-1)
    neg = torch.as_tensor(negative, dtype=torch.float64).reshape(-1)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("auc needs at least one positive and one negative score")
    both = torch.cat([pos, neg]).numpy()
    order = both.argsort(kind="mergesort")
    ranks = np.empty(len(both))
    sorted_vals = both[order]
    # average ranks over ties
    uniq, start, counts = np.unique(sorted_vals, return_index=True, return_counts=True)
    avg = start + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    r_pos = ranks[:len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2.0) / (len(pos) * len(neg)))


def deleted_pair_scores(model_or_scores: nn.Module | Tensor, graph: InteractionGraph,
                        deleted_ids: Any, n_random: int = 2000,
                        seed: int = 0) -> dict[str, float]:
    """Mean scores of the deleted pairs, of never-seen random pairs and of retained training
    pairs (a random sample of ``n_random``). ``graph`` is the graph the model propagates on
    (after a removal: the remaining graph).

    Per user: ``user_never_seen_mean`` averages, over the deleted pairs, the mean score of
    all items their user has no interaction with (train, test or removed), and
    ``below_user_never_seen`` is the share of deleted pairs scoring no higher than that
    level of their own user (users differ in score scale, so this is the like-for-like
    comparison)."""
    scores = _scores(model_or_scores, graph)
    deleted, never = _membership_pairs(graph, deleted_ids, n_random, seed)
    retained = _sample_rows(graph.train_pairs(), n_random, seed)
    seen = torch.zeros(graph.n_users, graph.n_items, dtype=torch.bool)
    seen[graph.interactions[:, 0], graph.interactions[:, 1]] = True
    unseen_count = (~seen).sum(1).clamp(min=1)
    user_level = scores.masked_fill(seen, 0.0).sum(1) / unseen_count
    d = scores[deleted[:, 0], deleted[:, 1]]
    level = user_level[deleted[:, 0]]
    return {
        "deleted_mean": float(d.mean()),
        "never_seen_mean": float(scores[never[:, 0], never[:, 1]].mean()),
        "retained_mean": float(scores[retained[:, 0], retained[:, 1]].mean()),
        "user_never_seen_mean": float(level.mean()),
        "below_user_never_seen": float((d <= level).float().mean()),
    }


def _available(graph: InteractionGraph, n: int) -> int:
    """``n``, or fewer on a graph that has fewer never-seen pairs."""
    return min(n, graph.n_users * graph.n_items - len(graph.all_keys()))


def _membership_pairs(graph: InteractionGraph, deleted_ids: Any, n_random: int,
                      seed: int) -> tuple[Tensor, Tensor]:
    """``(deleted, never_seen)`` ``[n, 2]`` pairs the forgetting metrics compare: the
    ``deleted_ids``' pairs and ``n_random`` never-seen pairs (fewer if fewer exist)."""
    deleted = graph.pairs(deleted_ids)
    if len(deleted) == 0:
        raise ValueError("no deleted interaction ids given")
    return deleted, never_seen_pairs(graph, _available(graph, n_random), seed)


def _sample_rows(rows: Tensor, n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return rows[torch.randperm(len(rows), generator=g)[:n]]


def membership_auc(model_or_scores: nn.Module | Tensor, graph: InteractionGraph,
                   deleted_ids: Any, n_random: int = 2000, seed: int = 0) -> dict[str, float]:
    """``auc_vs_never_seen``: AUC of deleted-pair scores (positives) against never-seen pairs;
    ``auc_vs_retained``: AUC of retained-pair scores (positives) against deleted pairs. A model
    that forgot treats deleted pairs like unseen ones: the first AUC falls and the second
    rises, towards the retrained model's values."""
    scores = _scores(model_or_scores, graph)
    deleted, never = _membership_pairs(graph, deleted_ids, n_random, seed)
    retained = _sample_rows(graph.train_pairs(), n_random, seed)
    d = scores[deleted[:, 0], deleted[:, 1]]
    return {
        "auc_vs_never_seen": auc(d, scores[never[:, 0], never[:, 1]]),
        "auc_vs_retained": auc(scores[retained[:, 0], retained[:, 1]], d),
    }


def forgetting_report(model: nn.Module, graph_after: InteractionGraph, deleted_ids: Any,
                      k: int = 20, n_random: int = 2000, seed: int = 0) -> dict[str, float]:
    """Ranking quality on the remaining graph plus the deleted-pair scores and membership
    AUCs, in one dict (one score matrix)."""
    scores = _scores(model, graph_after)
    return {**ranking_metrics(scores, graph_after, k),
            **deleted_pair_scores(scores, graph_after, deleted_ids, n_random, seed),
            **membership_auc(scores, graph_after, deleted_ids, n_random, seed)}
