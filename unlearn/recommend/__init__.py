"""Recommendation unlearning: interaction graphs with stable ids, LightGCN + BPR, metrics and
the removal protocol for recommenders (see docs/recommend.md)."""

from unlearn.recommend.data import InteractionGraph, load_movielens_100k, read_movielens_ratings
from unlearn.recommend.metrics import (
    auc,
    deleted_pair_scores,
    forgetting_report,
    membership_auc,
    never_seen_pairs,
    ranking_metrics,
)
from unlearn.recommend.model import (
    BPRConfig,
    LightGCNModule,
    bpr_loss,
    embeddings,
    fit_bpr,
    interaction_loader,
    make_lightgcn,
    normalized_adjacency,
    propagate,
    sample_negatives,
    sample_triples,
    score_matrix,
    score_pairs,
    train_lightgcn,
)

__all__ = [
    "BPRConfig",
    "InteractionGraph",
    "LightGCNModule",
    "auc",
    "bpr_loss",
    "deleted_pair_scores",
    "embeddings",
    "fit_bpr",
    "forgetting_report",
    "interaction_loader",
    "load_movielens_100k",
    "make_lightgcn",
    "normalized_adjacency",
    "propagate",
    "membership_auc",
    "never_seen_pairs",
    "ranking_metrics",
    "read_movielens_ratings",
    "sample_negatives",
    "sample_triples",
    "score_matrix",
    "score_pairs",
    "train_lightgcn",
]
