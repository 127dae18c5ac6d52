"""UnlearnRec: a pre-trained influence encoder that removes interactions from a LightGCN.

After Chen, Xia and Huang, "Pre-training for Recommendation Unlearning" (SIGIR 2025). The
backbone (a ``torch_geometric.nn.models.LightGCN`` over users ``0..U-1`` and items ``U..U+I-1``)
stays frozen; only its layer-0 embedding table ``E`` changes. For a set of deleted
interactions the :class:`InfluenceEncoder` predicts ``ΔE`` from

* learnable influence embeddings ``H`` (one row per node) and a learnable per-node withdraw
  rate ``η``, combined as ``w = H − η ⊙ E``: each endpoint of a deleted edge gives back a
  learned share of the pull its deleted neighbours exerted on it;
* ``w`` propagated LightGCN style over the *deleted* edges, ``Σ_{l=1..L} Â_Δ^l w``, where
  ``Â_Δ`` is the deleted edges' part of the training graph's normalised adjacency (weights
  ``1/sqrt(d_u d_i)`` with the training graph's degrees: an item losing one of its 300 edges
  moves little), plus the node's own ``s ⊙ w`` with ``s`` the share of its edges deleted
  (a user deleted as a whole can drop their whole embedding);
* a bias-free MLP correction of that sum ``z``: ``ΔE = z + MLP(z)`` (bias-free so that a node
  the request never touches gets exactly ``ΔE = 0``).

``E + ΔE`` then goes through the frozen backbone on the *remaining* graph, which also removes
the deleted edges from message passing. Pre-training fits the encoder to simulated requests
(random edge drops and random whole users of the training graph) with four losses:

* model: BPR on remaining edges against random items;
* unlearning (:func:`unlearn_hinge`): a deleted pair scoring above a reference level is
  penalised, a hinge, so pairs already below it are left alone; with ``unlearn_floor`` the
  hinge is two-sided and a deleted pair more than ``unlearn_floor`` below the level is pulled
  back up (pushing deleted pairs far below what an arbitrary pair scores would itself reveal
  that they were deleted: over-forgetting). The level (``unlearn_reference``) is the mean
  score of random (user, item) pairs (``"global"``) or of random items the deleted pair's own
  user never interacted with (``"user"``, which also adds those pairs to the preservation
  loss);
* preservation: squared error between the new and the original model's scores on remaining
  edges and random pairs;
* contrast: InfoNCE between the encoder outputs of two edge-dropout views of the same
  request, so the encoder generalises to requests it has not seen.

A real request costs one encoder pass and ``finetune_steps`` steps of the same losses on that
request (on a private copy of the pre-trained encoder, which stays unchanged for the next
request; the default, chosen on validation, is no fine-tuning). Pre-training time is
reported apart from the request's seconds.
"""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unlearn.recommend.data import InteractionGraph, in_sorted
from unlearn.recommend.protocol import RecRemovalMethod
from unlearn.recommend.sparse import as_symmetric_csr, symmetric_matmul
from unlearn.removal.base import RemovalResult

__all__ = ["UnlearnRecConfig", "InfluenceEncoder", "UnlearnRec", "PretrainReport", "RecEdges",
           "as_rec_edges", "normalized_adjacency", "lightgcn_embeddings", "pair_scores",
           "unlearn_hinge"]


# ---------------------------------------------------------------------------- graph helpers


@dataclass(frozen=True)
class RecEdges:
    """User-item interactions as tensors: ``users[k]``, ``items[k]`` (0-based item index) and
    the stable interaction id ``ids[k]``."""

    users: Tensor
    items: Tensor
    ids: Tensor
    num_users: int
    num_items: int

    @property
    def num_nodes(self) -> int:
        return self.num_users + self.num_items

    def __len__(self) -> int:
        return int(self.users.numel())

    def select(self, mask: Tensor) -> RecEdges:
        return RecEdges(self.users[mask], self.items[mask], self.ids[mask], self.num_users,
                        self.num_items)

    def keys(self) -> Tensor:
        """One integer per (user, item) pair, for membership tests."""
        return self.users * self.num_items + self.items


def normalized_adjacency(users: Tensor, items: Tensor, num_users: int, num_nodes: int,
                         dtype: torch.dtype = torch.float32,
                         degrees: Tensor | None = None) -> Tensor:
    """``D^-1/2 A D^-1/2`` of the bipartite graph (both directions, no self-loops) as a
    sparse CSR matrix: the propagation matrix of torch-geometric's ``LGConv``.
    ``degrees`` replaces ``D`` (e.g. the full training graph's degrees for a subgraph)."""
    row = torch.cat([users, items + num_users])
    col = torch.cat([items + num_users, users])
    deg = (torch.bincount(row, minlength=num_nodes) if degrees is None else degrees).to(dtype)
    inv = deg.pow(-0.5)
    inv[deg == 0] = 0.0
    val = inv[row] * inv[col]
    coo = torch.sparse_coo_tensor(torch.stack([row, col]), val, (num_nodes, num_nodes),
                                  check_invariants=False)
    return as_symmetric_csr(coo, check=False)  # symmetric by construction


def lightgcn_embeddings(model: nn.Module, layer0: Tensor, adj: Tensor) -> Tensor:
    """The backbone's final embeddings ``Σ_l α_l Â^l E`` for layer-0 embeddings ``layer0``
    (equal to ``model.get_embedding(edge_index)`` when ``layer0`` is its own table)."""
    alpha = model.alpha.to(layer0.dtype)
    x, out = layer0, layer0 * alpha[0]
    for layer in range(model.num_layers):
        x = symmetric_matmul(adj, x)
        out = out + x * alpha[layer + 1]
    return out


def pair_scores(final: Tensor, users: Tensor, items: Tensor, num_users: int) -> Tensor:
    """LightGCN scores: the dot product of the user's and the item's final embeddings (the
    indices may live on the CPU while ``final`` is on an accelerator)."""
    users, items = users.to(final.device), items.to(final.device)
    return (final[users] * final[items + num_users]).sum(-1)


def _propagate(adj: Tensor, x: Tensor, layers: int) -> Tensor:
    """``Σ_{l=1..L} adj^l x``: zero on every node the deleted-edge graph does not touch."""
    out = torch.zeros_like(x)
    for _ in range(layers):
        x = symmetric_matmul(adj, x)
        out = out + x
    return out


# ---------------------------------------------------------------------------- the encoder


class InfluenceEncoder(nn.Module):
    """``ΔE = z + MLP(z)`` with ``z = s ⊙ (H − η ⊙ E) + Σ_l Â_Δ^l (H − η ⊙ E)``, ``s`` the
    share of each node's edges the request deletes (module docstring)."""

    def __init__(self, num_nodes: int, dim: int, *, layers: int = 2, hidden: int = 64,
                 init_withdraw: float = 0.1, init_std: float = 0.01) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.layers = int(layers)
        self.influence = nn.Parameter(torch.randn(num_nodes, dim) * init_std)
        self.withdraw = nn.Parameter(torch.full((num_nodes, 1), float(init_withdraw)))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(),
                                 nn.Linear(hidden, dim, bias=False))
        nn.init.zeros_(self.mlp[2].weight)  # the correction starts at zero and is learned

    def forward(self, deleted_adj: Tensor, base: Tensor, lost_share: Tensor | None = None
                ) -> Tensor:
        own = self.influence - self.withdraw * base
        z = _propagate(deleted_adj, self.influence, self.layers) \
            - _propagate(deleted_adj, self.withdraw * base, self.layers)
        if lost_share is not None:  # the node's own term, by the share of its edges deleted
            z = z + lost_share * own
        return z + self.mlp(z)


# ---------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class UnlearnRecConfig:
    """Hyper-parameters of the encoder, its pre-training and the per-request fine-tuning."""

    layers: int = 2  # propagation depth over the deleted-edge graph
    hidden: int = 64
    pretrain_steps: int = 150
    drop_rate: float = 0.05  # share of training edges a simulated request removes
    user_request_share: float = 0.5  # simulated requests that remove whole users
    lr: float = 0.01
    # the request's fine-tuning steps, the unlearning loss's reference, floor and weight were
    # chosen on a validation split of ML-100K's training interactions
    # (experiments/recommend_unlearning.py --tune): there the pre-trained encoder's one pass
    # was as good as any fine-tuning within the recall and over-forgetting bounds
    finetune_steps: int = 0
    finetune_lr: float = 0.01
    batch_size: int = 2048  # remaining edges / random pairs per step
    lambda_model: float = 1.0
    lambda_unlearn: float = 1.0
    unlearn_margin: float = 0.0  # how far below the reference level deleted pairs go
    unlearn_reference: str = "global"  # "global": any random pairs; "user": that user's items
    unlearn_floor: float | None = None  # deleted pairs below level - floor are pulled up
    unlearn_negatives: int = 4  # random items per deleted pair for the "user" reference
    lambda_preserve: float = 1.0
    lambda_contrast: float = 0.01
    contrast_dropout: float = 0.2
    contrast_nodes: int = 256
    temperature: float = 0.5
    # a user the request leaves without any edge (a deleted account) gets a fresh draw of
    # LightGCN's initialisation: in a retraining that user never receives a gradient (users
    # are never sampled as negatives), so that is exactly what retraining gives it, and its row
    # keeps nothing of the deleted history. Items are left to the encoder: as negatives they
    # keep receiving gradients in a retraining even without edges.
    reset_emptied_users: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        positive_ints = ("layers", "hidden", "batch_size", "contrast_nodes",
                         "unlearn_negatives")
        for name in positive_ints:
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("pretrain_steps", "finetune_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        for name in ("drop_rate", "contrast_dropout"):
            v = getattr(self, name)
            if not 0 < v < 1:
                raise ValueError(f"{name} must lie in (0, 1), got {v!r}")
        if not isinstance(self.reset_emptied_users, bool):
            raise ValueError(f"reset_emptied_users must be True or False, got "
                             f"{self.reset_emptied_users!r}")
        if self.unlearn_reference not in ("user", "global"):
            raise ValueError(f"unlearn_reference must be 'user' or 'global', got "
                             f"{self.unlearn_reference!r}")
        if not 0 <= self.user_request_share <= 1:
            raise ValueError(f"user_request_share must lie in [0, 1], got "
                             f"{self.user_request_share!r}")
        for name in ("lr", "finetune_lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.unlearn_floor is not None and not self.unlearn_floor > 0:
            raise ValueError(f"unlearn_floor must be positive or None, got "
                             f"{self.unlearn_floor!r}")
        for name in ("lambda_model", "lambda_unlearn", "lambda_preserve", "lambda_contrast",
                     "unlearn_margin"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")


# ---------------------------------------------------------------------------- one request


@dataclass
class _Request:
    """What the losses need about one (simulated or real) request."""

    deleted: RecEdges
    remaining: RecEdges
    deleted_adj: Tensor
    remaining_adj: Tensor
    lost_share: Tensor  # [N, 1]: deleted edges / training edges of each node
    degrees: Tensor  # the training graph's node degrees (normalise the deleted edges by them)


def _degrees(edges: RecEdges) -> Tensor:
    return torch.bincount(torch.cat([edges.users, edges.items + edges.num_users]),
                          minlength=edges.num_nodes)


def _encoder_inputs(graph: RecEdges, drop: Tensor, degrees: Tensor, dtype: torch.dtype,
                    device: torch.device | str) -> tuple[RecEdges, Tensor, Tensor]:
    """What the encoder reads of a request: the deleted edges, their adjacency normalised by
    the training graph's ``degrees`` and each node's share of deleted edges (the last two on
    ``device``)."""
    deleted = graph.select(drop)
    lost = _degrees(deleted).to(dtype) / degrees.clamp(min=1).to(dtype)
    adj = normalized_adjacency(deleted.users, deleted.items, graph.num_users, graph.num_nodes,
                               dtype, degrees=degrees)
    return deleted, adj.to(device), lost[:, None].to(device)


def _make_request(graph: RecEdges, drop: Tensor, degrees: Tensor,
                  dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> _Request:
    """The request's tensors; the edges and degrees stay on the CPU (sampling), the
    adjacencies and shares go to ``device`` (the model's)."""
    deleted, deleted_adj, lost = _encoder_inputs(graph, drop, degrees, dtype, device)
    remaining = graph.select(~drop)
    remaining_adj = normalized_adjacency(remaining.users, remaining.items, graph.num_users,
                                         graph.num_nodes, dtype).to(device)
    return _Request(deleted, remaining, deleted_adj, remaining_adj, lost, degrees)


def _drop_view(req: _Request, rate: float, gen: torch.Generator) -> Tensor:
    deleted = req.deleted
    keep = torch.rand(len(deleted), generator=gen) >= rate
    if not keep.any():
        keep[0] = True
    kept = deleted.select(keep)
    return normalized_adjacency(kept.users, kept.items, deleted.num_users, deleted.num_nodes,
                                req.lost_share.dtype, degrees=req.degrees
                                ).to(req.lost_share.device)


@dataclass
class _Context:
    """The fixed parts of a fit: the backbone, its layer-0 and final embeddings, the training
    graph's pair keys (to skip interacted items when sampling negatives)."""

    model: nn.Module
    base: Tensor
    original_final: Tensor
    train_keys: Tensor
    degrees: Tensor


def _random_items(users: Tensor, num_items: int, train_keys: Tensor,
                  gen: torch.Generator) -> Tensor:
    """An item per user, resampled once where it hits a training interaction (ML-100K is 6 %
    dense, so one round leaves ~0.4 % collisions, harmless as negatives)."""
    items = torch.randint(num_items, users.shape, generator=gen)
    hit = in_sorted(users * num_items + items, train_keys)
    if hit.any():
        items[hit] = torch.randint(num_items, (int(hit.sum()),), generator=gen)
    return items


def _sample(n: int, k: int, gen: torch.Generator) -> Tensor:
    return torch.randperm(n, generator=gen)[:k] if n > k else torch.arange(n)


def unlearn_hinge(deleted: Tensor, level: Tensor, margin: float = 0.0,
                  floor: float | None = None) -> Tensor:
    """The unlearning loss of deleted-pair scores against their reference ``level``: the mean
    of ``relu(score - level + margin)`` (a pair already ``margin`` below its level gets no
    gradient), plus, with ``floor``, ``relu(level - floor - score)``: a pair pushed more than
    ``floor`` below the level is pulled back up, since scoring deleted pairs far below what
    an arbitrary pair scores tells a membership attacker they were deleted (retraining
    leaves a deleted user at its random initialisation: scores near zero, not negative)."""
    loss = F.relu(deleted - level + margin).mean()
    if floor is not None:
        loss = loss + F.relu(level - floor - deleted).mean()
    return loss


def _losses(encoder: InfluenceEncoder, ctx: _Context, req: _Request, cfg: UnlearnRecConfig,
            gen: torch.Generator) -> dict[str, Tensor]:
    g = req.remaining
    nu, ni = g.num_users, g.num_items
    delta = encoder(req.deleted_adj, ctx.base, req.lost_share)
    final = lightgcn_embeddings(ctx.model, ctx.base + delta, req.remaining_adj)

    # model loss: BPR on remaining edges
    pick = _sample(len(g), cfg.batch_size, gen)
    u, i = g.users[pick], g.items[pick]
    j = _random_items(u, ni, ctx.train_keys, gen)
    model_loss = -F.logsigmoid(pair_scores(final, u, i, nu) - pair_scores(final, u, j, nu)).mean()

    # unlearning loss: a hinge on each deleted pair's score above a reference level, detached
    # so that only the deleted pairs move. "user": the mean score of ``unlearn_negatives``
    # random items the same user never interacted with (a deleted pair ends just below what
    # its user scores an arbitrary item; pairs already there get no gradient); "global": the
    # mean score of random pairs of any user.
    d = req.deleted.select(_sample(len(req.deleted), cfg.batch_size, gen))
    rand_u = torch.randint(nu, (cfg.batch_size,), generator=gen)
    rand_i = torch.randint(ni, (cfg.batch_size,), generator=gen)
    ru, ri = [u, rand_u], [i, rand_i]
    if cfg.unlearn_reference == "user":
        du = d.users.repeat_interleave(cfg.unlearn_negatives)
        dj = _random_items(du, ni, ctx.train_keys, gen)
        ru.append(du)
        ri.append(dj)
    ru_t, ri_t = torch.cat(ru), torch.cat(ri)
    new_scores = pair_scores(final, ru_t, ri_t, nu)
    if cfg.unlearn_reference == "user":
        level = new_scores[len(u) + len(rand_u):].detach().view(len(d), -1).mean(1)
    else:
        unseen = ~in_sorted(rand_u * ni + rand_i, ctx.train_keys)
        level = new_scores[len(u):len(u) + len(rand_u)][unseen.to(new_scores.device)
                                                         ].mean().detach()
    unlearn_loss = unlearn_hinge(pair_scores(final, d.users, d.items, nu), level,
                                 cfg.unlearn_margin, cfg.unlearn_floor)

    # preservation loss: remaining edges and random pairs (with "user", also the deleted
    # pairs' users' random items, which anchors those users' overall score level: pushing
    # a deleted user's whole embedding past zero would flip all its scores) keep their
    # original scores
    preserve_loss = F.mse_loss(new_scores, pair_scores(ctx.original_final, ru_t, ri_t, nu))

    out = {"model": model_loss, "unlearn": unlearn_loss, "preserve": preserve_loss}
    if cfg.lambda_contrast > 0:
        out["contrast"] = _contrast(encoder, ctx, req, cfg, gen)
    return out


def _contrast(encoder: InfluenceEncoder, ctx: _Context, req: _Request, cfg: UnlearnRecConfig,
              gen: torch.Generator) -> Tensor:
    """InfoNCE between two edge-dropout views of the request, over the nodes it touches."""
    d = req.deleted
    touched = torch.unique(torch.cat([d.users, d.items + d.num_users]))
    nodes = touched[_sample(touched.numel(), cfg.contrast_nodes, gen)]
    if nodes.numel() < 2:
        return ctx.base.new_zeros(())
    views = [encoder(_drop_view(req, cfg.contrast_dropout, gen), ctx.base, req.lost_share)
             for _ in range(2)]
    z1, z2 = (F.normalize(v[nodes], dim=1) for v in views)
    logits = z1 @ z2.T / cfg.temperature
    return F.cross_entropy(logits, torch.arange(nodes.numel(), device=logits.device))


def _total(losses: dict[str, Tensor], cfg: UnlearnRecConfig) -> Tensor:
    return (cfg.lambda_model * losses["model"] + cfg.lambda_unlearn * losses["unlearn"]
            + cfg.lambda_preserve * losses["preserve"]
            + cfg.lambda_contrast * losses.get("contrast", losses["model"].new_zeros(())))


# ---------------------------------------------------------------------------- the method


@dataclass
class PretrainReport:
    """What pre-training cost and how its losses ended (mean of the last 10 steps)."""

    seconds: float
    steps: int
    final_losses: dict[str, float] = field(default_factory=dict)


class UnlearnRec(RecRemovalMethod):
    """The removal method on the recommender protocol. ``pretrain(model, graph)`` once (or
    let the first request do it), then ``unlearn(model, graph, forget_ids)`` per request; the
    pre-training time is reported in ``details['pretrain_seconds']`` (this call's) and
    ``details['pretrain_seconds_total']``, never in ``seconds``."""

    name = "unlearnrec"

    def __init__(self, config: UnlearnRecConfig | None = None, **overrides: Any) -> None:
        base = config or UnlearnRecConfig()
        self.config = UnlearnRecConfig(**{**asdict(base), **overrides}) if overrides else base
        self.encoder: InfluenceEncoder | None = None
        self.pretrain_report: PretrainReport | None = None
        self._fingerprint: str | None = None

    # --------------------------------------------------------------- pre-training

    def pretrain(self, model: nn.Module, graph: InteractionGraph) -> PretrainReport:
        """Fit the encoder to simulated requests on ``graph`` (the model's training graph)."""
        if not isinstance(graph, InteractionGraph):
            raise TypeError(f"graph must be an InteractionGraph, got {type(graph).__name__}")
        self._check_model(model, graph)
        edges = as_rec_edges(graph)
        emb = model.embedding.weight
        cfg = self.config
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            encoder = InfluenceEncoder(edges.num_nodes, emb.shape[1], layers=cfg.layers,
                                       hidden=cfg.hidden).to(device=emb.device, dtype=emb.dtype)
        ctx = _context(model, edges)
        opt = torch.optim.Adam(encoder.parameters(), lr=cfg.lr)
        history: list[dict[str, float]] = []
        for _ in range(cfg.pretrain_steps):
            req = _make_request(edges, _simulated_drop(edges, cfg, gen), ctx.degrees,
                                ctx.base.dtype, ctx.base.device)
            losses = _losses(encoder, ctx, req, cfg, gen)
            opt.zero_grad()
            _total(losses, cfg).backward()
            opt.step()
            history.append({k: float(v.detach()) for k, v in losses.items()})
        tail = history[-10:]
        final = {k: sum(h[k] for h in tail) / len(tail) for k in tail[0]} if tail else {}
        self.encoder = encoder.requires_grad_(False)
        self._fingerprint = _fingerprint(emb)
        self.pretrain_report = PretrainReport(time.perf_counter() - start, cfg.pretrain_steps,
                                              final)
        return self.pretrain_report

    #: the fields only a request reads (its fine-tuning, the reset of emptied users):
    #: changing them keeps the pre-trained encoder
    REQUEST_FIELDS = ("finetune_steps", "finetune_lr", "reset_emptied_users")

    def with_request_settings(self, **changes: Any) -> UnlearnRec:
        """A method sharing this one's pre-trained encoder, with other per-request settings
        (``finetune_steps``, ``finetune_lr``, ``reset_emptied_users``): what one pre-training
        serves when requests want, e.g., different depths of fine-tuning. The encoder is
        never changed in place."""
        unknown = set(changes) - set(self.REQUEST_FIELDS)
        if unknown:
            raise ValueError(f"with_request_settings changes only "
                             f"{', '.join(self.REQUEST_FIELDS)}; {', '.join(sorted(unknown))} "
                             "would need a new pre-training")
        other = UnlearnRec(self.config, **changes)
        other.encoder, other.pretrain_report = self.encoder, self.pretrain_report
        other._fingerprint = self._fingerprint
        return other

    def is_pretrained_for(self, model: nn.Module) -> bool:
        """Whether the encoder was pre-trained on exactly these embeddings."""
        emb = getattr(getattr(model, "embedding", None), "weight", None)
        return (self.encoder is not None and isinstance(emb, Tensor)
                and _fingerprint(emb) == self._fingerprint)

    # --------------------------------------------------------------- a request

    def _check_model(self, model: nn.Module, graph: InteractionGraph) -> None:
        emb = getattr(getattr(model, "embedding", None), "weight", None)
        if not isinstance(emb, Tensor) or not hasattr(model, "alpha") \
                or not hasattr(model, "num_layers"):
            raise TypeError(f"UnlearnRec needs a torch_geometric LightGCN (embedding, alpha, "
                            f"num_layers), got {type(model).__name__}")
        if emb.shape[0] != graph.num_nodes:
            raise ValueError(f"the model has {emb.shape[0]} nodes but the graph has "
                             f"{graph.n_users} users + {graph.n_items} items = "
                             f"{graph.num_nodes}")
        if not bool(torch.isfinite(emb).all()):
            raise ValueError("the model's embeddings contain NaN/inf")

    def unlearn(self, model: nn.Module, graph: InteractionGraph, forget_ids: Any
                ) -> RemovalResult:
        """Forget the training interactions ``forget_ids`` of ``graph``. Pre-trains first
        (outside the request's timer) when the encoder does not fit this model's size; an
        encoder pre-trained on an earlier version of the model (e.g. before a previous
        request) is reused, as in the paper's sequential requests."""
        pretrain_seconds = 0.0
        if isinstance(model, nn.Module) and isinstance(graph, InteractionGraph):
            self._check_model(model, graph)
            emb = model.embedding.weight
            if self.encoder is None or tuple(self.encoder.influence.shape) != tuple(emb.shape):
                # a bad request fails (in the protocol's checks) before pre-training
                if len(graph.check_train_ids(forget_ids)) == graph.n_train:
                    return super().unlearn(model, graph, forget_ids)
                pretrain_seconds = self.pretrain(model, graph).seconds
        result = super().unlearn(model, graph, forget_ids)
        result.details["pretrain_seconds"] = pretrain_seconds
        result.details["pretrain_seconds_total"] = (
            self.pretrain_report.seconds if self.pretrain_report else None)
        return result

    def _unlearn(self, model: nn.Module, graph: InteractionGraph, forget_ids: Tensor,
                 remaining: InteractionGraph) -> tuple[nn.Module, dict[str, Any]]:
        assert self.encoder is not None
        cfg = self.config
        edges = as_rec_edges(graph)
        pretrained_here = self.is_pretrained_for(model)
        drop = torch.isin(edges.ids, forget_ids)
        last: dict[str, float] = {}
        if cfg.finetune_steps == 0:
            base = model.embedding.weight.detach().clone()
            # the encoder's one pass: no losses, so neither the original model's scores nor
            # the remaining graph's adjacency are needed
            encoder = self.encoder  # not changed: no gradient, no step
            if next(encoder.parameters()).device != base.device:
                encoder = copy.deepcopy(encoder).to(base.device)
            _, deleted_adj, lost = _encoder_inputs(edges, drop, _degrees(edges), base.dtype,
                                                   base.device)
        else:
            gen = torch.Generator().manual_seed(cfg.seed + 1)
            ctx = _context(model, edges)
            base = ctx.base
            req = _make_request(edges, drop, ctx.degrees, base.dtype, base.device)
            encoder = copy.deepcopy(self.encoder).to(base.device).requires_grad_(True)
            opt = torch.optim.Adam(encoder.parameters(), lr=cfg.finetune_lr)
            for _ in range(cfg.finetune_steps):
                losses = _losses(encoder, ctx, req, cfg, gen)
                opt.zero_grad()
                _total(losses, cfg).backward()
                opt.step()
                last = {k: float(v.detach()) for k, v in losses.items()}
            deleted_adj, lost = req.deleted_adj, req.lost_share
        with torch.no_grad():
            delta = encoder(deleted_adj, base, lost)
            model.embedding.weight.add_(delta)
            emptied = (_emptied_users(edges, drop) if cfg.reset_emptied_users
                       else torch.zeros(0, dtype=torch.long))
            if len(emptied):
                weight = model.embedding.weight
                fresh = _initial_rows(emptied, weight.shape, cfg.seed + 2)
                weight[emptied.to(weight.device)] = fresh.to(weight)
        return model, {"n_retain": remaining.n_train, "finetune_steps": cfg.finetune_steps,
                       "reset_users": int(len(emptied)),
                       "finetune_losses": last, "delta_norm": float(delta.norm()),
                       "changed_nodes": int((delta.abs().sum(1) > 0).sum()),
                       "pretrained_on_this_model": pretrained_here, "config": asdict(cfg)}


def _emptied_users(edges: RecEdges, drop: Tensor) -> Tensor:
    """The users that had training edges and have none left once ``drop`` is removed."""
    had = torch.bincount(edges.users, minlength=edges.num_users) > 0
    left = torch.bincount(edges.users[~drop], minlength=edges.num_users) > 0
    return torch.nonzero(had & ~left).squeeze(1)


def _initial_rows(nodes: Tensor, shape: torch.Size, seed: int) -> Tensor:
    """Rows ``nodes`` of an embedding table of ``shape`` drawn as the torch-geometric LightGCN
    initialises its own (``xavier_uniform_``: uniform on ``±sqrt(6 / (rows + dim))``). Each
    node's row comes from its own generator (``seed``, node): a node re-drawn by two requests
    gets the same row, two nodes draw from different generators, and the cost is that of
    the rows drawn, not of the table."""
    bound = (6.0 / (shape[0] + shape[1])) ** 0.5
    rows = [torch.rand(shape[1], generator=torch.Generator().manual_seed(
        seed * 1_000_003 + int(node))) for node in nodes]
    return (torch.stack(rows) * 2 - 1) * bound


def _context(model: nn.Module, edges: RecEdges) -> _Context:
    base = model.embedding.weight.detach().clone()
    adj = normalized_adjacency(edges.users, edges.items, edges.num_users, edges.num_nodes,
                               base.dtype).to(base.device)
    with torch.no_grad():
        final = lightgcn_embeddings(model, base, adj)
    return _Context(model, base, final, torch.sort(edges.keys()).values, _degrees(edges))


def _simulated_drop(edges: RecEdges, cfg: UnlearnRecConfig, gen: torch.Generator) -> Tensor:
    """A random request: ``drop_rate`` of the edges, either at random or as whole users."""
    n = len(edges)
    if float(torch.rand((), generator=gen)) < cfg.user_request_share:
        order = torch.randperm(edges.num_users, generator=gen)
        counts = torch.bincount(edges.users, minlength=edges.num_users)[order]
        take = int(torch.searchsorted(torch.cumsum(counts, 0), cfg.drop_rate * n)) + 1
        drop = torch.isin(edges.users, order[:take])
    else:
        drop = torch.rand(n, generator=gen) < cfg.drop_rate
    if drop.all():
        drop[0] = False
    return drop


def _fingerprint(emb: Tensor) -> str:
    return hashlib.sha256(emb.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def as_rec_edges(graph: InteractionGraph) -> RecEdges:
    """The training interactions of ``graph`` as a :class:`RecEdges`."""
    ids = graph.train_ids
    pairs = graph.interactions[ids]
    return RecEdges(pairs[:, 0], pairs[:, 1], ids, graph.n_users, graph.n_items)
