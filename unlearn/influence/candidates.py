"""Candidate filtering: score each query only against a short list of training examples.

Grosse et al. (2023, "Studying large language model generalization with influence functions")
first pick, per query, the training sequences most similar to it by TF-IDF and compute
influence on those only. :func:`tfidf_candidates` does this for token sequences
(:class:`TfidfIndex` keeps the training side for later queries);
:func:`knn_candidates` picks nearest neighbours in any feature space (raw inputs, or a layer's
activations from :func:`layer_inputs`). :func:`scores_on_candidates` then computes influence
on the candidates only, grouping queries so that each training gradient is computed once per
group. Filtering trades recall of the truly most influential examples for speed; measure it
on your data (``experiments/candidate_recall.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from unlearn.influence.base import InfluenceEstimator
from unlearn.influence.grads import check_loader, to_model

__all__ = ["TfidfIndex", "tfidf_candidates", "knn_candidates", "layer_inputs",
           "scores_on_candidates"]

METRICS = ("cosine", "dot", "euclidean")
_BLOCK_ELEMENTS = 1 << 24  # similarity entries held at once


class TfidfIndex:
    """The training sequences' TF-IDF matrix, built once: :meth:`candidates` picks each
    query's k most similar training sequences without rebuilding it (what
    :func:`tfidf_candidates` does per call; for one query at a time on a large corpus the
    rebuild is most of the cost).

    Sequences are lists of token ids (or rows of a 2-D integer tensor, where ``pad_id``
    marks padding). Terms are the token n-grams of lengths 1..``ngram``. IDF is computed on
    the training sequences, smoothed: ``idf = ln((1 + N) / (1 + df)) + 1``; term frequency is
    ``1 + ln(count)`` with ``sublinear_tf`` (the raw count otherwise); rows are L2-normalised.
    Query terms never seen in training are ignored.
    """

    def __init__(self, train_tokens: Sequence[Sequence[int]] | Tensor, *, ngram: int = 1,
                 pad_id: int | None = None, sublinear_tf: bool = True) -> None:
        if not isinstance(ngram, int) or ngram < 1:
            raise ValueError(f"ngram must be a positive integer, got {ngram!r}")
        self.ngram, self.pad_id, self.sublinear_tf = ngram, pad_id, sublinear_tf
        train = _as_sequences(train_tokens, pad_id, "train_tokens")
        self.vocab: dict[tuple[int, ...], int] = {}
        T = _counts(train, ngram, self.vocab, grow=True)
        df = np.bincount(T.indices, minlength=len(self.vocab))
        self.idf = np.log((1.0 + T.shape[0]) / (1.0 + df)) + 1.0
        # stored transposed ([terms, train]): a query block's product with it needs no
        # per-query conversion, and one copy is kept, not two
        self.matrix_t = _tfidf(T, self.idf, sublinear_tf).T.tocsr()

    def __len__(self) -> int:
        return self.matrix_t.shape[1]

    def candidates(self, query_tokens: Sequence[Sequence[int]] | Tensor, k: int) -> Tensor:
        """Indices ``[n_query, k]`` of each query's k training sequences of largest TF-IDF
        cosine similarity, most similar first (ties: the lower index)."""
        query = _as_sequences(query_tokens, self.pad_id, "query_tokens")
        k = _check_k(k, len(self))
        Q = _tfidf(_counts(query, self.ngram, self.vocab, grow=False), self.idf,
                   self.sublinear_tf)
        out = []
        rows = max(1, _BLOCK_ELEMENTS // max(len(self), 1))
        for s in range(0, Q.shape[0], rows):
            sims = torch.from_numpy((Q[s : s + rows] @ self.matrix_t).toarray())
            out.append(_top_k_stable(sims, k))
        return torch.cat(out) if out else torch.empty(0, k, dtype=torch.long)


def tfidf_candidates(query_tokens: Sequence[Sequence[int]] | Tensor,
                     train_tokens: Sequence[Sequence[int]] | Tensor, k: int, *,
                     ngram: int = 1, pad_id: int | None = None,
                     sublinear_tf: bool = True) -> Tensor:
    """Indices ``[n_query, k]`` of the k training sequences most similar to each query by
    TF-IDF cosine similarity, most similar first: ``TfidfIndex(train_tokens, ...)
    .candidates(query_tokens, k)`` (see :class:`TfidfIndex`; build the index once to pick
    candidates for queries arriving one by one)."""
    return TfidfIndex(train_tokens, ngram=ngram, pad_id=pad_id,
                      sublinear_tf=sublinear_tf).candidates(query_tokens, k)


def knn_candidates(query_features: Tensor, train_features: Tensor, k: int, *,
                   metric: str = "cosine", chunk_size: int | None = None) -> Tensor:
    """Indices ``[n_query, k]`` of each query's k nearest training examples in a feature
    space (``[n, d]`` tensors, or anything flattening to it), nearest first.

    ``metric``: ``"cosine"`` (largest cosine similarity), ``"dot"`` (largest inner product)
    or ``"euclidean"`` (smallest distance). Training features are visited in chunks of
    ``chunk_size`` rows with a running top-k, so memory stays bounded by
    ``n_query × (chunk_size + k)`` similarities; ties go to the lower index.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    Xq = _as_features(query_features, "query_features")
    Xt = _as_features(train_features, "train_features")
    if Xq.shape[1] != Xt.shape[1]:
        raise ValueError(f"query_features have {Xq.shape[1]} features per row, train_features "
                         f"{Xt.shape[1]}")
    k = _check_k(k, Xt.shape[0])
    if chunk_size is None:
        chunk_size = max(k, _BLOCK_ELEMENTS // max(Xq.shape[0], 1))
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    dtype = torch.promote_types(Xq.dtype, torch.float32)
    Xq = Xq.to(dtype)
    if metric == "cosine":
        Xq = _normalise(Xq)
    best_v = Xq.new_full((Xq.shape[0], 0), float("-inf"))
    best_i = torch.zeros((Xq.shape[0], 0), dtype=torch.long, device=Xq.device)
    for s in range(0, Xt.shape[0], chunk_size):
        C = Xt[s : s + chunk_size].to(device=Xq.device, dtype=dtype)
        sims = _similarity(Xq, C, metric)
        idx = torch.arange(s, s + C.shape[0], device=Xq.device).expand(Xq.shape[0], -1)
        vals, ids = torch.cat([best_v, sims], 1), torch.cat([best_i, idx], 1)
        pos = _top_k_stable(vals, min(k, vals.shape[1]))
        best_v, best_i = vals.gather(1, pos), ids.gather(1, pos)
    return best_i.cpu()


def layer_inputs(model: nn.Module, loader: DataLoader, module: str | nn.Module) -> Tensor:
    """The inputs of ``module`` (e.g. the last Linear layer: penultimate activations) for
    every example of ``loader``, flattened to ``[n, d]``, in the loader's order."""
    target = dict(model.named_modules()).get(module) if isinstance(module, str) else module
    if not isinstance(target, nn.Module) or all(m is not target for m in model.modules()):
        names = [n for n, _ in model.named_modules() if n]
        raise ValueError(f"module {module!r} is not part of the model (it has {names[:20]})")
    check_loader(loader, "loader")
    seen: list[Tensor] = []
    handle = target.register_forward_pre_hook(
        lambda _m, inputs: seen.append(inputs[0].detach().flatten(1).cpu()))
    from unlearn.tasks import ClassificationTask

    task = ClassificationTask()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                inputs, _ = task.split_batch(to_model(batch, model))
                model(inputs)
    finally:
        handle.remove()
        model.train(was_training)
    if not seen:
        raise ValueError(f"module {module!r} was never called in the forward pass")
    return torch.cat(seen)


def scores_on_candidates(estimator: InfluenceEstimator, query_loader: DataLoader,
                         train_dataset: Dataset, candidates: Tensor, *, batch_size: int = 256,
                         group_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Influence of each query's candidate training examples only.

    ``candidates[q]`` holds the training positions (in ``train_dataset``) of query q's
    candidates. Queries are processed in groups of ``group_size`` consecutive queries
    (default: all at once); each group scores the union of its candidates once and keeps each
    query's own entries. Returns ``(values, indices)``, both ``[n_query, k]``, each row
    sorted by score, largest (most helpful) first: ``values[q, j]`` equals
    ``estimator.scores(...)[q, indices[q, j]]``.
    """
    estimator._require_fitted()
    check_loader(query_loader, "query_loader")
    n_train = len(train_dataset)  # type: ignore[arg-type]
    cand = _check_candidates(candidates, n_train)
    n_query = len(query_loader.dataset)  # type: ignore[arg-type]
    if cand.shape[0] != n_query:
        raise ValueError(f"candidates has {cand.shape[0]} rows but query_loader has {n_query} "
                         "queries")
    if group_size is None:
        group_size = max(n_query, 1)
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    n_fit = estimator.n_train
    if n_fit != n_train:
        raise ValueError(f"the estimator was fitted on {n_fit} examples but train_dataset has "
                         f"{n_train}; pass the data it was fitted on")
    values = []
    for s in range(0, n_query, group_size):
        rows = list(range(s, min(s + group_size, n_query)))
        qloader = DataLoader(Subset(query_loader.dataset, rows), batch_size=query_loader.batch_size
                             or batch_size, collate_fn=query_loader.collate_fn)
        values.append(_score_group(estimator, qloader, train_dataset, cand[rows], batch_size))
    vals = torch.cat(values)
    order = vals.argsort(dim=1, descending=True, stable=True)
    return vals.gather(1, order), cand.gather(1, order)


def _score_group(estimator: InfluenceEstimator, qloader: DataLoader, train: Dataset,
                 cand: Tensor, batch_size: int) -> Tensor:
    union = torch.unique(cand)  # sorted
    loader = DataLoader(Subset(train, union.tolist()), batch_size=batch_size)
    S = estimator.scores(qloader, loader)  # [group, |union|], scaled by 1/n_train (fitted n)
    cols = torch.searchsorted(union, cand)
    return S.gather(1, cols)


# --------------------------------------------------------------------------- helpers


def _check_k(k: int, n: int) -> int:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer in 1..{n} (the number of training examples), "
                         f"got {k!r}")
    return int(k)


def _check_candidates(candidates: Tensor, n_train: int) -> Tensor:
    cand = torch.as_tensor(candidates)
    if cand.dim() != 2 or cand.dtype in (torch.bool,) or cand.is_floating_point():
        raise ValueError(f"candidates must be an integer tensor [n_query, k], got "
                         f"{cand.dtype} of shape {tuple(cand.shape)}")
    cand = cand.long().cpu()
    if cand.numel() and (int(cand.min()) < 0 or int(cand.max()) >= n_train):
        bad = int(cand.min()) if int(cand.min()) < 0 else int(cand.max())
        raise ValueError(f"candidate index {bad} is out of range for {n_train} training "
                         "examples")
    return cand


def _top_k_stable(values: Tensor, k: int) -> Tensor:
    """Positions of the k largest entries per row, ties to the lower position."""
    return values.argsort(dim=1, descending=True, stable=True)[:, :k]


def _as_features(x: Tensor, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"{what} must be [n, d] with n >= 1, got shape {tuple(x.shape)}")
    x = x.flatten(1)
    if not x.is_floating_point():
        x = x.float()
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} holds NaN or inf")
    return x


def _normalise(x: Tensor) -> Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def _similarity(q: Tensor, c: Tensor, metric: str) -> Tensor:
    """Larger is more similar; ``q`` is already normalised for cosine."""
    if metric == "cosine":
        return q @ _normalise(c).T
    if metric == "dot":
        return q @ c.T
    # -||q - c||², expanded; clamped at 0 against rounding
    d2 = (q * q).sum(1, keepdim=True) - 2 * q @ c.T + (c * c).sum(1)
    return -d2.clamp_min(0)


def _as_sequences(tokens: Sequence[Sequence[int]] | Tensor, pad_id: int | None,
                  what: str) -> list[list[int]]:
    if isinstance(tokens, Tensor):
        if tokens.dim() != 2 or tokens.is_floating_point():
            raise ValueError(f"{what} as a tensor must be integer [n, length], got "
                             f"{tokens.dtype} of shape {tuple(tokens.shape)}")
        rows = tokens.tolist()
    else:
        rows = [list(map(int, seq)) for seq in tokens]
    if pad_id is not None:
        rows = [[t for t in r if t != pad_id] for r in rows]
    if not rows:
        raise ValueError(f"{what} is empty")
    return rows


def _counts(seqs: list[list[int]], ngram: int, vocab: dict[tuple[int, ...], int],
            grow: bool) -> sp.csr_matrix:
    """Sparse term counts ``[len(seqs), len(vocab)]``; n-grams unseen in training (when not
    ``grow``) are dropped: they have zero weight in every training row anyway."""
    indptr, indices = [0], []
    for seq in seqs:
        for n in range(1, ngram + 1):
            for i in range(len(seq) - n + 1):
                term = tuple(seq[i : i + n])
                j = vocab.get(term)
                if j is None and grow:
                    j = vocab[term] = len(vocab)
                if j is not None:
                    indices.append(j)
        indptr.append(len(indices))
    data = np.ones(len(indices), dtype=np.float64)
    m = sp.csr_matrix((data, np.asarray(indices, dtype=np.int64), np.asarray(indptr)),
                      shape=(len(seqs), len(vocab)))
    m.sum_duplicates()
    return m


def _tfidf(counts: sp.csr_matrix, idf: np.ndarray, sublinear: bool) -> sp.csr_matrix:
    m = counts.astype(np.float64, copy=True)
    if sublinear:
        m.data = 1.0 + np.log(m.data)
    m = m.multiply(idf[np.newaxis, :]).tocsr()
    norms = np.sqrt(np.asarray(m.multiply(m).sum(axis=1)).ravel())
    norms[norms == 0] = 1.0
    return sp.diags(1.0 / norms) @ m

