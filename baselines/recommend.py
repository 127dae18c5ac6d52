"""Recommendation-unlearning baselines on the protocol of :mod:`unlearn.recommend.protocol`:
``Method(...).unlearn(model, graph, forget_ids) -> RemovalResult``.

* :class:`RetrainRec` — LightGCN retrained from scratch on the remaining graph, seeded: the
  exact reference every removal is judged against;
* :class:`FineTuneRec` — a few BPR epochs on the remaining graph, starting from the model;
* :class:`InfluenceRec` — one Newton (influence-function) step for the ego embeddings, in the
  manner of IFRU (Zhang et al., "Recommendation Unlearning via Influence Function") and GIF
  (Wu et al., WWW'23): the change of the training objective caused by the deletion counts both
  the deleted interactions' own loss terms and their spill-over, i.e. the changed loss of the
  remaining interactions whose propagated embeddings used the deleted edges;
* :class:`ShardedRetrainRec` with :func:`train_sharded` / :class:`ShardedLightGCN` — SISA for
  recommenders (as in RecEraser, Chen et al. WWW'22, without its learned aggregation): users
  (or interactions) are partitioned into shards, one LightGCN per shard, and a deletion
  retrains only the shards that held the deleted interactions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from baselines.retrain import derive_seed
from unlearn.recommend.data import InteractionGraph
from unlearn.recommend.model import (
    BPRConfig,
    LightGCN,
    _check_model,
    bpr_loss,
    fit_bpr,
    make_lightgcn,
    propagate,
    sample_triples,
    score_matrix,
    train_lightgcn,
)
from unlearn.recommend.protocol import RecRemovalMethod

__all__ = [
    "FineTuneRec",
    "InfluenceRec",
    "RetrainRec",
    "ShardedLightGCN",
    "ShardedRetrainRec",
    "k_hop_nodes",
    "train_sharded",
]


def _config_for(model: LightGCN, config: BPRConfig) -> BPRConfig:
    """``config`` with the model's own embedding size and depth."""
    return replace(config, dim=model.embedding_dim, num_layers=model.num_layers)


class RetrainRec(RecRemovalMethod):
    """Train a fresh LightGCN (same size and depth as the model) on the remaining graph with
    ``config`` (seeded): what the model would be had the interactions never been there."""

    name = "retrain"

    def __init__(self, config: BPRConfig | None = None) -> None:
        self.config = config or BPRConfig()

    def _unlearn(self, model: nn.Module, graph: InteractionGraph, forget_ids: Tensor,
                 remaining: InteractionGraph) -> tuple[nn.Module, dict[str, Any]]:
        _check_model(model, graph)
        config = _config_for(model, self.config)  # type: ignore[arg-type]
        new = train_lightgcn(remaining, config)
        return new, {"config": config.to_dict(), "final_loss": new.bpr_history[-1]
                     if new.bpr_history else None}


class FineTuneRec(RecRemovalMethod):
    """Continue BPR training on the remaining graph for ``epochs`` epochs (Adam at ``lr``)."""

    name = "finetune"

    def __init__(self, epochs: int = 5, lr: float = 1e-3, batch_size: int = 2048,
                 reg: float = 1e-4, seed: int = 0) -> None:
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {epochs!r}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        self.epochs, self.lr, self.batch_size, self.reg, self.seed = (
            epochs, lr, batch_size, reg, seed)

    def _unlearn(self, model: nn.Module, graph: InteractionGraph, forget_ids: Tensor,
                 remaining: InteractionGraph) -> tuple[nn.Module, dict[str, Any]]:
        _check_model(model, graph)
        history = fit_bpr(model, remaining, epochs=self.epochs, lr=self.lr,  # type: ignore
                          batch_size=self.batch_size, reg=self.reg, seed=self.seed)
        return model, {"epochs": self.epochs, "lr": self.lr, "losses": history}


# ----------------------------------------------------------------------------- influence

def k_hop_nodes(graph: InteractionGraph, seeds: Tensor, k: int) -> Tensor:
    """Sorted node indices (users ``0..U-1``, items ``U..``) within ``k`` hops of ``seeds`` in
    ``graph``'s training graph (``seeds`` included)."""
    edge_index = graph.edge_index()
    reached = torch.zeros(graph.num_nodes, dtype=torch.bool)
    reached[seeds] = True
    frontier = reached.clone()
    for _ in range(k):
        nxt = torch.zeros_like(reached)
        nxt[edge_index[1][frontier[edge_index[0]]]] = True
        frontier = nxt & ~reached
        reached |= nxt
        if not bool(frontier.any()):
            break
    return torch.nonzero(reached).squeeze(1)


def _conjugate_gradient(apply: Any, b: Tensor, max_iter: int, tol: float
                        ) -> tuple[Tensor, dict[str, Any]]:
    """Solve ``A x = b`` for a symmetric ``A`` given as ``apply(v)``; stops early on a
    direction of non-positive curvature (the damped BPR Hessian need not be positive)."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = float((r * r).sum())
    b_norm = rs ** 0.5
    info: dict[str, Any] = {"iterations": 0, "converged": b_norm == 0.0,
                            "negative_curvature": False}
    if b_norm == 0.0:
        return x, info
    for it in range(1, max_iter + 1):
        ap = apply(p)
        curv = float((p * ap).sum())
        if curv <= 0:
            info["negative_curvature"] = True
            break
        alpha = rs / curv
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = float((r * r).sum())
        info["iterations"] = it
        if rs_new ** 0.5 <= tol * b_norm:
            info["converged"] = True
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    info["relative_residual"] = float((r * r).sum()) ** 0.5 / b_norm
    return x, info


def _bpr_ggn_operator(model: LightGCN, graph: InteractionGraph, triples: Tensor,
                      weight: Tensor, reg: float) -> Any:
    """``p -> G p`` for the Gauss–Newton matrix of the summed BPR objective at ``weight``:
    ``Σ_t σ(m_t)σ(-m_t) ∇m_t ∇m_tᵀ`` over the triples' margins ``m_t = s_up - s_un``, plus
    the regulariser's exact Hessian ``reg · (times a node occurs in a triple)``. Positive
    semi-definite wherever the weights are, unlike the Hessian of a half-trained model."""
    out = propagate(model, graph, weight)
    n_users = graph.n_users
    u, pos, neg = triples[:, 0], triples[:, 1] + n_users, triples[:, 2] + n_users
    margins = (out[u] * (out[pos] - out[neg])).sum(-1)
    curvature = (torch.sigmoid(margins) * torch.sigmoid(-margins)).detach()
    counts = torch.bincount(torch.cat([u, pos, neg]), minlength=graph.num_nodes)
    reg_diag = (reg * counts).to(weight.dtype).unsqueeze(1)
    dummy = torch.zeros_like(margins, requires_grad=True)
    # J^T d as a differentiable function of d: back-propagating through it gives J p
    jt, = torch.autograd.grad(margins, weight, grad_outputs=dummy, create_graph=True)

    def apply(p: Tensor) -> Tensor:
        jp, = torch.autograd.grad(jt, dummy, grad_outputs=p, retain_graph=True)
        gp, = torch.autograd.grad(margins, weight, grad_outputs=curvature * jp,
                                  retain_graph=True)
        return gp + reg_diag * p

    return apply


class InfluenceRec(RecRemovalMethod):
    """One damped Newton step on the ego embeddings of the nodes near the deletion.

    The objective is the BPR loss summed over the training interactions with one fixed
    negative each (:func:`sample_triples`, seeded by ``neg_seed``) plus ``reg/2`` times the
    triples' squared ego-embedding norms (the training loss, without the sampling noise).
    With ``L`` on the full graph and ``L'`` on the remaining graph (deleted triples dropped,
    propagation on the remaining edges), the update is

        Δθ_A = (H'_AA + λI)⁻¹ [∇_A L(θ) − ∇_A L'(θ)]

    restricted to the rows ``A`` of the nodes within ``k_hops`` of a deleted interaction's
    user or item (default: the model's number of layers, the reach of the propagation). The
    gradient difference holds the deleted terms and the spill-over of the changed propagation
    onto the remaining terms; the difference form also cancels the part of ``∇L'`` that is
    there because training stopped short of a minimum. A user left with no interaction has no
    term in ``L'``; its ego embedding is set to zero (it then scores 0 for every item), where
    retraining would leave it at its small random initialisation. ``H'`` is the Hessian of ``L'``
    (``curvature="hessian"``: Hessian-vector products by double back-propagation) or, by
    default, its Gauss–Newton approximation (``"ggn"``, positive semi-definite even away from
    a minimum, where the Hessian of BPR is often indefinite), solved by conjugate gradients
    with damping ``λ``; ``scale`` multiplies the step.
    """

    name = "influence"

    def __init__(self, damping: float = 0.1, k_hops: int | None = None, reg: float = 1e-4,
                 cg_iters: int = 100, cg_tol: float = 1e-5, scale: float = 1.0,
                 neg_seed: int = 0, curvature: str = "ggn") -> None:
        if curvature not in ("ggn", "hessian"):
            raise ValueError(f"curvature must be 'ggn' or 'hessian', got {curvature!r}")
        self.curvature = curvature
        if not damping >= 0:
            raise ValueError(f"damping must be >= 0, got {damping!r}")
        if k_hops is not None and (not isinstance(k_hops, int) or k_hops < 0):
            raise ValueError(f"k_hops must be a non-negative int or None, got {k_hops!r}")
        if not isinstance(cg_iters, int) or cg_iters < 1:
            raise ValueError(f"cg_iters must be a positive int, got {cg_iters!r}")
        self.damping, self.k_hops, self.reg = float(damping), k_hops, float(reg)
        self.cg_iters, self.cg_tol, self.scale = cg_iters, float(cg_tol), float(scale)
        self.neg_seed = int(neg_seed)

    def _unlearn(self, model: nn.Module, graph: InteractionGraph, forget_ids: Tensor,
                 remaining: InteractionGraph) -> tuple[nn.Module, dict[str, Any]]:
        _check_model(model, graph)
        assert isinstance(model, LightGCN)
        triples = sample_triples(graph, self.neg_seed)          # rows follow graph.train_ids
        keep = ~torch.isin(graph.train_ids, forget_ids)
        kept = triples[keep]                                     # rows follow remaining.train_ids
        deleted = graph.pairs(forget_ids)
        seeds = torch.cat([deleted[:, 0], deleted[:, 1] + graph.n_users]).unique()
        k = model.num_layers if self.k_hops is None else self.k_hops
        nodes = k_hop_nodes(graph, seeds, k)
        # A user with no interaction left has no term in L' at all: its Newton step would be
        # its deleted gradient over the damping alone. Like retraining (which leaves such a
        # user at its small random initialisation), zero its embedding: it scores 0 everywhere.
        left = torch.zeros(graph.n_users, dtype=torch.bool)
        left[remaining.train_pairs()[:, 0]] = True
        gone_users = deleted[:, 0].unique()
        gone_users = gone_users[~left[gone_users]]
        mask = torch.zeros(graph.num_nodes, 1, dtype=model.embedding.weight.dtype)
        mask[nodes] = 1.0
        mask[gone_users] = 0.0

        weight = model.embedding.weight.detach().clone().requires_grad_(True)

        def loss(g: InteractionGraph, t: Tensor, w: Tensor) -> Tensor:
            return bpr_loss(model, g, t[:, 0], t[:, 1], t[:, 2], self.reg, "sum", weight=w)

        grad_full, = torch.autograd.grad(loss(graph, triples, weight), weight)
        grad_rem, = torch.autograd.grad(loss(remaining, kept, weight), weight,
                                        create_graph=self.curvature == "hessian")
        v = (grad_full - grad_rem.detach()) * mask
        if self.curvature == "hessian":
            def curv(p: Tensor) -> Tensor:
                hv, = torch.autograd.grad(grad_rem, weight, grad_outputs=p, retain_graph=True)
                return hv
        else:
            curv = _bpr_ggn_operator(model, remaining, kept, weight, self.reg)

        def hvp(p: Tensor) -> Tensor:
            return curv(p * mask) * mask + self.damping * p

        delta, info = _conjugate_gradient(hvp, v, self.cg_iters, self.cg_tol)
        with torch.no_grad():
            model.embedding.weight.add_(self.scale * delta * mask)
            model.embedding.weight[gone_users] = 0.0
        return model, {"updated_nodes": int(mask.sum()), "k_hops": k,
                       "reset_users": gone_users.tolist(),
                       "damping": self.damping, "curvature": self.curvature, "cg": info,
                       "step_norm": float(delta.norm()), "gradient_norm": float(v.norm())}


# ----------------------------------------------------------------------------- sharded

_PARTITIONS = ("user", "interaction")


class ShardedLightGCN(nn.Module):
    """One LightGCN per shard. ``partition="user"``: every user belongs to one shard, whose
    model holds all of the user's interactions and scores the user; ``"interaction"``:
    interactions are spread over shards and the scores are the mean of the shard models'.
    ``shard_ids[s]`` are shard ``s``'s training interaction ids (ids of the shared table)."""

    def __init__(self, models: Sequence[LightGCN], shard_ids: Sequence[Tensor],
                 partition: str, user_shard: Tensor | None, config: BPRConfig,
                 seed: int) -> None:
        super().__init__()
        if partition not in _PARTITIONS:
            raise ValueError(f"partition must be one of {_PARTITIONS}, got {partition!r}")
        if len(models) != len(shard_ids) or not models:
            raise ValueError("need one model per shard and at least one shard")
        self.models = nn.ModuleList(models)
        self.shard_ids = [torch.as_tensor(s, dtype=torch.long) for s in shard_ids]
        self.partition = partition
        self.user_shard = user_shard
        self.config = config
        self.seed = seed
        self.num_nodes = models[0].num_nodes

    @property
    def n_shards(self) -> int:
        return len(self.models)

    def shard_graph(self, graph: InteractionGraph, s: int) -> InteractionGraph:
        return InteractionGraph(graph.n_users, graph.n_items, graph.interactions,
                                self.shard_ids[s], graph.test_ids)

    @torch.no_grad()
    def score_matrix(self, graph: InteractionGraph) -> Tensor:
        """``[U, I]`` aggregated scores; every shard model propagates on its own shard graph
        (``graph`` supplies the interaction table)."""
        out = torch.zeros(graph.n_users, graph.n_items)
        if self.partition == "user":
            assert self.user_shard is not None
            for s, model in enumerate(self.models):
                users = torch.nonzero(self.user_shard == s).squeeze(1)
                if len(users) and len(self.shard_ids[s]):
                    out[users] = score_matrix(model, self.shard_graph(graph, s))[users]
            return out
        used = 0
        for s, model in enumerate(self.models):
            if len(self.shard_ids[s]):
                out += score_matrix(model, self.shard_graph(graph, s))
                used += 1
        return out / max(used, 1)


def _train_shard(graph: InteractionGraph, ids: Tensor, config: BPRConfig, seed: int,
                 shard: int) -> LightGCN:
    shard_config = replace(config, seed=derive_seed(seed, shard) % (2**31))
    if len(ids) == 0:  # nothing left to learn: an untrained model that scores nobody
        return make_lightgcn(graph, config.dim, config.num_layers, shard_config.seed)
    sub = InteractionGraph(graph.n_users, graph.n_items, graph.interactions, ids,
                           graph.test_ids)
    return train_lightgcn(sub, shard_config)


def train_sharded(graph: InteractionGraph, n_shards: int = 4, partition: str = "user",
                  config: BPRConfig | None = None, seed: int = 0) -> ShardedLightGCN:
    """Partition ``graph`` at random (seeded) into ``n_shards`` shards of users (or of
    interactions) and train one LightGCN per shard with ``config`` (shard ``s`` under the seed
    derived from ``(seed, s)``: retraining a shard reproduces what training it from scratch
    would give)."""
    if not isinstance(n_shards, int) or n_shards < 1:
        raise ValueError(f"n_shards must be a positive int, got {n_shards!r}")
    if partition not in _PARTITIONS:
        raise ValueError(f"partition must be one of {_PARTITIONS}, got {partition!r}")
    config = config or BPRConfig()
    gen = torch.Generator().manual_seed(seed)
    user_shard = None
    if partition == "user":
        if n_shards > graph.n_users:
            raise ValueError(f"{n_shards} shards for {graph.n_users} users")
        user_shard = torch.randperm(graph.n_users, generator=gen) % n_shards
        owner = user_shard[graph.interactions[graph.train_ids, 0]]
    else:
        if n_shards > graph.n_train:
            raise ValueError(f"{n_shards} shards for {graph.n_train} interactions")
        owner = torch.randperm(graph.n_train, generator=gen) % n_shards
    shard_ids = [graph.train_ids[owner == s] for s in range(n_shards)]
    models = [_train_shard(graph, ids, config, seed, s) for s, ids in enumerate(shard_ids)]
    return ShardedLightGCN(models, shard_ids, partition, user_shard, config, seed)


class ShardedRetrainRec(RecRemovalMethod):
    """Retrain, from scratch and under their own seeds, only the shards of a
    :class:`ShardedLightGCN` that held deleted interactions; the others are kept as they are.
    The result equals :func:`train_sharded` on the remaining graph with the same partition."""

    name = "sharded-retrain"

    def _check_model(self, model: nn.Module, graph: InteractionGraph) -> None:
        if not isinstance(model, ShardedLightGCN):
            raise TypeError(f"ShardedRetrainRec needs a ShardedLightGCN (see train_sharded), "
                            f"got {type(model).__name__}")
        super()._check_model(model, graph)
        held = torch.cat(model.shard_ids)
        if len(held) != graph.n_train or not bool(torch.isin(held, graph.train_ids).all()):
            raise ValueError("the shards' interactions are not this graph's training graph")

    def _unlearn(self, model: nn.Module, graph: InteractionGraph, forget_ids: Tensor,
                 remaining: InteractionGraph) -> tuple[nn.Module, dict[str, Any]]:
        assert isinstance(model, ShardedLightGCN)
        retrained = []
        for s in range(model.n_shards):
            hit = torch.isin(model.shard_ids[s], forget_ids)
            if bool(hit.any()):
                model.shard_ids[s] = model.shard_ids[s][~hit]
                model.models[s] = _train_shard(graph, model.shard_ids[s], model.config,
                                               model.seed, s)
                retrained.append(s)
        return model, {"retrained_shards": retrained, "n_shards": model.n_shards,
                       "partition": model.partition}
