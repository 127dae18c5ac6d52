"""Shared pieces of the recommendation tests: a small two-community interaction graph, the
backbone recipe they train with, and where the shared MovieLens-100K copy lives.

Import from a test module as ``from rec_fixtures import community_graph, CONFIG`` (pytest
puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from unlearn.recommend import BPRConfig, InteractionGraph

CONFIG = BPRConfig(dim=16, num_layers=2, epochs=60, lr=1e-2, batch_size=64, seed=0)
ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"


def community_graph(seed: int = 0, n_users: int = 30, n_items: int = 40, per_user: int = 8,
                    test_fraction: float = 0.2) -> InteractionGraph:
    """Two communities of users, each liking ``per_user`` items of its half of the items plus
    one stray item of the other half."""
    g = torch.Generator().manual_seed(seed)
    users, items = [], []
    half = n_items // 2
    for u in range(n_users):
        c = 2 * u // n_users
        own = torch.randperm(half, generator=g)[:per_user] + c * half
        other = torch.randperm(half, generator=g)[:1] + (1 - c) * half
        for i in torch.cat([own, other]).tolist():
            users.append(u)
            items.append(i)
    return InteractionGraph.from_pairs(users, items, n_users=n_users, n_items=n_items,
                                       test_fraction=test_fraction, seed=seed)
