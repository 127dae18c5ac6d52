"""LightGCN (torch-geometric) trained with BPR on an :class:`InteractionGraph`.

The model is :class:`torch_geometric.nn.models.LightGCN` itself, over ``U + I`` nodes (users
first, items offset by ``U``); the graph it propagates on is ``graph.edge_index()`` of whichever
training graph applies (after a removal: the remaining graph). Training is the original
LightGCN recipe: for every training interaction (u, i) one item j the user has not interacted
with, drawn uniformly; loss ``-log σ(s_ui - s_uj) + reg/2 (|e_u|² + |e_i|² + |e_j|²)`` on the
*ego* (layer-0) embeddings of the triple, averaged over the batch; Adam.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torch_geometric.nn.conv.gcn_conv import gcn_norm
from torch_geometric.nn.models import LightGCN

from unlearn.recommend.data import InteractionGraph, in_sorted
from unlearn.recommend.sparse import as_symmetric_csr, symmetric_matmul

__all__ = [
    "BPRConfig",
    "LightGCN",
    "LightGCNModule",
    "bpr_loss",
    "embeddings",
    "fit_bpr",
    "interaction_loader",
    "make_lightgcn",
    "normalized_adjacency",
    "propagate",
    "sample_negatives",
    "sample_triples",
    "score_matrix",
    "score_pairs",
    "train_lightgcn",
]


@dataclass(frozen=True)
class BPRConfig:
    """How LightGCN is built and trained. ``lr`` and ``epochs`` were chosen on a validation
    split of ML-100K's training interactions (rating >= 4; ``experiments/
    recommend_unlearning.py --tune``, docs/results/recommend.md): the fewest epochs within
    1 % of the best mean validation Recall@20 over 3 seeds."""

    dim: int = 64
    num_layers: int = 3
    epochs: int = 40
    lr: float = 1e-2
    batch_size: int = 2048
    reg: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("dim", "num_layers", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(f"epochs must be a non-negative int, got {self.epochs!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not self.reg >= 0:
            raise ValueError(f"reg must be >= 0, got {self.reg!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def _fork_rng(seed: int) -> Iterator[torch.Generator]:
    """Seed torch's CPU RNG inside the block (restored after); yields a generator alike."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed)


def make_lightgcn(graph: InteractionGraph, dim: int = 64, num_layers: int = 3,
                  seed: int = 0) -> LightGCN:
    """A freshly initialised LightGCN for ``graph`` (Xavier-uniform embeddings, seeded)."""
    with _fork_rng(seed):
        return LightGCN(num_nodes=graph.num_nodes, embedding_dim=dim, num_layers=num_layers)


def _check_model(model: nn.Module, graph: InteractionGraph) -> None:
    if not isinstance(model, LightGCN):
        raise TypeError(f"expected a torch_geometric LightGCN, got {type(model).__name__}")
    if not all(getattr(conv, "normalize", True) for conv in model.convs):
        raise ValueError("LightGCN with normalize=False is not supported: the propagation "
                         "here uses the symmetric normalisation of LGConv's default")
    if model.num_nodes != graph.num_nodes:
        raise ValueError(f"model has {model.num_nodes} nodes but the graph has "
                         f"{graph.n_users} users + {graph.n_items} items = {graph.num_nodes}")


def sample_negatives(graph: InteractionGraph, users: Tensor,
                     generator: torch.Generator | None = None, max_tries: int = 50) -> Tensor:
    """For each user, an item drawn uniformly from those it has no training interaction with
    (rejection sampling)."""
    keys = graph.train_keys()
    neg = torch.randint(graph.n_items, (len(users),), generator=generator)
    todo = torch.ones(len(users), dtype=torch.bool)
    for _ in range(max_tries):
        hit = in_sorted(users[todo] * graph.n_items + neg[todo], keys)
        idx = torch.nonzero(todo).squeeze(1)
        todo[idx[~hit]] = False
        if not bool(todo.any()):
            return neg
        neg[todo] = torch.randint(graph.n_items, (int(todo.sum()),), generator=generator)
    raise RuntimeError("could not sample negatives: some user has interacted with (almost) "
                       "every item")


def sample_triples(graph: InteractionGraph, seed: int = 0) -> Tensor:
    """``[E, 3]`` (user, positive item, negative item), one negative per training interaction
    in ``graph.train_ids`` order: a fixed BPR objective (used by influence-based removal)."""
    g = torch.Generator().manual_seed(seed)
    p = graph.train_pairs()
    return torch.stack([p[:, 0], p[:, 1], sample_negatives(graph, p[:, 0], g)], dim=1)


def normalized_adjacency(graph: InteractionGraph, device: torch.device | str = "cpu") -> Tensor:
    """The symmetric-normalised adjacency ``D^-1/2 A D^-1/2`` of the training graph as a sparse
    CSR ``[N, N]`` matrix (cached on the graph): what every LGConv layer applies."""
    key = f"norm_adj:{device}"
    if key not in graph._cache:
        ei = graph.edge_index()
        ei_n, w = gcn_norm(ei, None, graph.num_nodes, add_self_loops=False)
        # LGConv's flow is source -> target: out[target] += w * x[source], so A[target, source]
        adj = torch.sparse_coo_tensor(ei_n.flip(0), w, (graph.num_nodes,) * 2,
                                      check_invariants=True)
        graph._cache[key] = as_symmetric_csr(adj).to(device)
    return graph._cache[key]


def propagate(model: LightGCN, graph: InteractionGraph, weight: Tensor | None = None) -> Tensor:
    """``model.get_embedding(graph.edge_index())`` computed with a cached sparse adjacency
    (several times faster; same numbers). ``weight`` replaces the ego embeddings (e.g. a
    perturbed copy for Hessian-vector products)."""
    _check_model(model, graph)
    x = model.embedding.weight if weight is None else weight
    adj = normalized_adjacency(graph, x.device)
    alpha = model.alpha.to(x.dtype)
    out = x * alpha[0]
    for layer in range(model.num_layers):
        x = symmetric_matmul(adj, x)
        out = out + x * alpha[layer + 1]
    return out


def bpr_loss(model: LightGCN, graph: InteractionGraph, users: Tensor, pos: Tensor,
             neg: Tensor, reg: float, reduction: str = "mean",
             weight: Tensor | None = None) -> Tensor:
    """BPR loss of the triples ``(users, pos, neg)`` (local indices) with the LightGCN
    propagation on ``graph``'s training graph, plus ``reg/2`` times the squared norms of the
    triple's ego embeddings. ``reduction``: "mean", "sum" or "none". ``weight`` replaces the
    ego embedding matrix (see :func:`propagate`)."""
    n_users = graph.n_users
    out = propagate(model, graph, weight)
    users, pos, neg = (t.to(out.device) for t in (users, pos, neg))
    eu, ep, en = out[users], out[pos + n_users], out[neg + n_users]
    terms = -F.logsigmoid((eu * ep).sum(-1) - (eu * en).sum(-1))
    if reg:
        w = model.embedding.weight if weight is None else weight
        terms = terms + 0.5 * reg * (w[users].pow(2).sum(-1) + w[pos + n_users].pow(2).sum(-1)
                                     + w[neg + n_users].pow(2).sum(-1))
    if reduction == "mean":
        return terms.mean()
    if reduction == "sum":
        return terms.sum()
    if reduction == "none":
        return terms
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def fit_bpr(model: LightGCN, graph: InteractionGraph, *, epochs: int, lr: float,
            batch_size: int = 2048, reg: float = 1e-4, seed: int = 0,
            params: list[Tensor] | None = None,
            on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``model`` in place on ``graph``'s training interactions with BPR and Adam
    (fresh negatives every epoch, seeded). Returns the mean loss of each epoch;
    ``on_epoch(epoch, loss)`` is called after each (progress, evaluation)."""
    _check_model(model, graph)
    pairs = graph.train_pairs()
    opt = torch.optim.Adam(params if params is not None else model.parameters(), lr=lr)
    history: list[float] = []
    model.train()
    with _fork_rng(seed) as gen:
        for _ in range(epochs):
            order = torch.randperm(len(pairs), generator=gen)
            negs = sample_negatives(graph, pairs[:, 0], gen)
            total = 0.0
            for start in range(0, len(order), batch_size):
                b = order[start:start + batch_size]
                loss = bpr_loss(model, graph, pairs[b, 0], pairs[b, 1], negs[b], reg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(b)
            history.append(total / max(len(order), 1))
            if on_epoch is not None:
                model.eval()
                on_epoch(len(history), history[-1])
                model.train()
    model.eval()
    return history


def train_lightgcn(graph: InteractionGraph, config: BPRConfig | None = None, *,
                   device: torch.device | str = "cpu", **overrides: Any) -> LightGCN:
    """A LightGCN trained from scratch on ``graph`` (seeded: same graph and config, same
    weights), on ``device``. ``overrides`` replace fields of ``config`` (``dim``,
    ``num_layers``, ``epochs``, ``lr``, ``batch_size``, ``reg``, ``seed``). The losses are in
    ``model.bpr_history``."""
    config = replace(config or BPRConfig(), **overrides)
    model = make_lightgcn(graph, config.dim, config.num_layers, config.seed).to(device)
    history = fit_bpr(model, graph, epochs=config.epochs, lr=config.lr,
                      batch_size=config.batch_size, reg=config.reg, seed=config.seed + 1)
    model.bpr_history = history  # type: ignore[attr-defined]
    return model


@torch.no_grad()
def embeddings(model: LightGCN, graph: InteractionGraph) -> tuple[Tensor, Tensor]:
    """Final (layer-combined) ``(user_emb [U, d], item_emb [I, d])`` on ``graph``'s training
    graph."""
    _check_model(model, graph)
    out = propagate(model, graph)
    return out[:graph.n_users], out[graph.n_users:]


@torch.no_grad()
def score_matrix(model: nn.Module, graph: InteractionGraph) -> Tensor:
    """``[U, I]`` predicted scores. Models with their own ``score_matrix(graph)`` (e.g. a
    sharded ensemble) use it; a LightGCN propagates on ``graph.edge_index()``."""
    if hasattr(model, "score_matrix") and not isinstance(model, LightGCN):
        return model.score_matrix(graph)
    users, items = embeddings(model, graph)  # type: ignore[arg-type]
    return users @ items.T


@torch.no_grad()
def score_pairs(model: nn.Module, graph: InteractionGraph, pairs: Tensor) -> Tensor:
    """Scores of ``[n, 2]`` (user, item) pairs."""
    pairs = torch.as_tensor(pairs, dtype=torch.long).reshape(-1, 2)
    if hasattr(model, "score_matrix") and not isinstance(model, LightGCN):
        return model.score_matrix(graph)[pairs[:, 0], pairs[:, 1]]
    users, items = embeddings(model, graph)  # type: ignore[arg-type]
    pairs = pairs.to(users.device)
    return (users[pairs[:, 0]] * items[pairs[:, 1]]).sum(-1)


# ------------------------------------------------------------------------------- Lightning

def interaction_loader(graph: InteractionGraph, batch_size: int = 2048, shuffle: bool = True,
                       seed: int = 0) -> DataLoader:
    """Batches of ``(interaction ids, users, positive items)`` over the training graph: the
    ``(ids, x, y)`` layout :class:`~unlearn.lightning.TrainingLogCallback` records."""
    p = graph.train_pairs()
    ds = TensorDataset(graph.train_ids.clone(), p[:, 0].clone(), p[:, 1].clone())
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen)


class LightGCNModule(pl.LightningModule):
    """LightGCN + BPR as a LightningModule. Feed it :func:`interaction_loader` batches; the
    negatives are drawn in ``training_step`` from a generator seeded with ``seed``.

    >>> module = LightGCNModule(graph, dim=64, num_layers=3, lr=1e-2)
    >>> pl.Trainer(max_epochs=40).fit(module, interaction_loader(graph))
    >>> module.model                                 # the trained torch_geometric LightGCN
    """

    def __init__(self, graph: InteractionGraph, dim: int = 64, num_layers: int = 3,
                 lr: float = 1e-2, reg: float = 1e-4, seed: int = 0,
                 model: LightGCN | None = None) -> None:
        super().__init__()
        self.graph = graph
        self.model = model if model is not None else make_lightgcn(graph, dim, num_layers, seed)
        _check_model(self.model, graph)
        self.lr, self.reg = float(lr), float(reg)
        self._gen = torch.Generator().manual_seed(seed + 1)

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        out = propagate(self.model, self.graph)
        return (out[users] * out[items + self.graph.n_users]).sum(-1)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        _, users, pos = batch
        neg = sample_negatives(self.graph, users.cpu(), self._gen).to(users.device)
        loss = bpr_loss(self.model, self.graph, users, pos, neg, self.reg)
        self.log("train_bpr", loss, prog_bar=True, batch_size=len(users))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.parameters(), lr=self.lr)
