"""Scoring for K-FAC / EK-FAC in the Kronecker eigenbasis, without ``[B, P]`` gradients.

Per covered layer the preconditioned query is ``Q_G [(Q_Gᵀ DW_q Q_A) / (Λ + λ)] Q_Aᵀ`` and a
score is its inner product with a training example's ``DW_i``. Both sides are rotated
instead: queries are stored as ``R_q = (Q_Gᵀ DW_q Q_A) / (Λ + λ)`` (``[d_out, d_in]`` each,
or rank-r factors of it for ``query_rank``), and a training example enters as
``Q_Gᵀ DW_i Q_A``. For a layer used at one position per example (``Linear`` on ``[B, d]``)
that is ``g̃ ãᵀ`` with ``g̃ = Q_Gᵀ g`` and ``ã = Q_Aᵀ a``, so

    score(q, i) = Σ_layers g̃_iᵀ R_q ã_i

is one GEMM ``[n_q·d_out, d_in] × [d_in, B]`` plus an elementwise product per layer: no
per-sample gradient matrix is ever built, and the queries need no rotation back. Layers with
several positions (Conv2d, sequences, a layer called twice) and embeddings build the rotated
per-sample matrices ``Σ_t g̃_t ã_tᵀ`` in bounded chunks and take ordinary dot products.

Rotating a training example costs ``d_in²`` per layer, as much as its dot product with
``d_out`` query rows: with few queries and many training examples (100 queries, 100,000
examples of a 784→10 model) the queries are rotated back instead (``Q_G R_q Q_Aᵀ``, once
per query) and the training gradients enter unrotated; :func:`raw_is_cheaper` picks the
side with fewer FLOPs, layer by layer.

The factors ``(a, g)`` come from layer hooks (:mod:`unlearn.influence.hook_grads`); a batch
the hooks cannot describe exactly falls back to vmap's dense per-sample gradients, rotated.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from unlearn.influence.base import _ScoreSink
from unlearn.influence.grads import (
    ParamSpace,
    check_finite_batch,
    check_finite_grads,
    per_sample_grads,
    to_model,
)
from unlearn.influence.hook_grads import LayerGrads, capture_layer_grads, materialise
from unlearn.influence.layers import LayerAdapter
from unlearn.tasks import Task

__all__ = ["EigenBasis", "RotatedBatch", "EigenQueries", "RowGroupSink", "rotated_batches",
           "raw_is_cheaper", "self_scores"]

# [n_q, d, c] intermediates of the factored dot product: large enough that the GEMM's
# third side (c training examples) runs near the matmul rate (measured: c ≈ 100 → 65,
# c ≈ 400 → 90 GFLOP/s in float32 on one core)
_BLOCK_ELEMENTS = 1 << 22
_MATERIALISE_ELEMENTS = 1 << 24  # rotated per-sample [c, d_out, d_in] matrices at once


@dataclass
class EigenBasis:
    """One layer's ``Q_G``, ``Q_A`` (``None`` for an embedding) and ``Λ + λ``. With ``raw``
    (the input columns where ``Q_A`` has a non-zero row) the layer is scored unrotated:
    gradients enter as ``DW[:, raw]`` and queries as ``Q_G R_q Q_A[raw]ᵀ`` (see
    :func:`raw_is_cheaper`)."""

    layer: LayerAdapter
    qg: Tensor
    qa: Tensor | None
    denom: Tensor
    raw: Tensor | None = None


def raw_is_cheaper(basis: EigenBasis, n_query: int, n_train: int) -> Tensor | None:
    """The input columns to score ``basis``'s layer unrotated, where that costs fewer FLOPs
    than rotating every training example (``n_query · d_out`` query rows against
    ``n_train`` examples: few queries, many examples); else ``None``. Either way the scores
    are the same: ``Q_A``'s zero rows multiply nothing."""
    if basis.qa is None:
        return None
    cols = (basis.qa != 0).any(dim=1).nonzero().squeeze(1)
    d_out, (d_in, kept) = basis.qg.shape[0], basis.qa.shape
    rotate = n_train * (d_in * kept + d_out * d_out + n_query * d_out * kept)
    raw = n_query * d_out * (kept * len(cols) + d_out * kept) + n_train * n_query * d_out * \
        len(cols)
    return cols if raw < rotate else None


@dataclass
class RotatedBatch:
    """A batch of training (or query) gradients in the eigenbases: per layer either the
    rotated factors ``(g̃ [B, d_out], ã [B, d_in])`` of a one-position layer or the rotated
    per-sample matrices ``[B, d_out, d_in]``."""

    size: int
    factors: dict[str, tuple[Tensor, Tensor]]
    matrices: dict[str, Tensor]

    @property
    def nbytes(self) -> int:
        ts = [t for pair in self.factors.values() for t in pair] + list(self.matrices.values())
        return sum(t.numel() * t.element_size() for t in ts)

    def matrix(self, name: str) -> Tensor:
        if name in self.matrices:
            return self.matrices[name]
        g, a = self.factors[name]
        return g[:, :, None] * a[:, None, :]


def _rotate_factors(basis: EigenBasis, lg: LayerGrads) -> tuple[Tensor, Tensor] | Tensor:
    layer, raw = basis.layer, basis.raw
    if not layer.diagonal_a and lg.positions == 1:
        if raw is not None:
            return lg.g[:, 0], lg.a[:, 0, raw]
        return lg.g[:, 0] @ basis.qg, lg.a[:, 0] @ basis.qa
    B = lg.g.shape[0]
    chunk = max(1, _MATERIALISE_ELEMENTS // max(1, layer.d_out * layer.d_in))
    qg, qa = (basis.qg, basis.qa) if raw is None else (None, None)
    parts = [materialise(layer, LayerGrads(lg.a[s : s + chunk], lg.g[s : s + chunk]), qg, qa)
             for s in range(0, B, chunk)]
    out = torch.cat(parts) if parts else lg.g.new_zeros(0, layer.d_out, layer.d_in)
    return out if raw is None else out[:, :, raw]


def _rotate_dense(bases: Sequence[EigenBasis], space: ParamSpace, G: Tensor) -> RotatedBatch:
    parts = space.unflatten(G)
    mats = {}
    for b in bases:
        M = b.layer.to_matrix(parts)
        if b.raw is not None:
            mats[b.layer.name] = M[:, :, b.raw]
            continue
        M = b.qg.T @ M
        mats[b.layer.name] = M if b.qa is None else M @ b.qa
    return RotatedBatch(G.shape[0], {}, mats)


def rotated_batches(model: Any, task: Task, loader: Any, space: ParamSpace,
                    bases: Sequence[EigenBasis], clone: set[str], *, query: bool,
                    progress: Any) -> Iterator[RotatedBatch]:
    """The loader's per-sample gradients, batch by batch, in the eigenbases: from layer
    hooks where they are exact, else from vmap (dense, then rotated)."""
    layers = [b.layer for b in bases]
    for raw in progress(iter(loader)):
        batch = to_model(raw, model)
        check_finite_batch(batch)
        inputs, targets = task.split_batch(batch)
        grads = capture_layer_grads(model, task, inputs, targets, layers, clone, query=query)
        if grads is None:
            G = per_sample_grads(model, task, batch, space, query=query, hooks=False)
            yield _rotate_dense(bases, space, G)
            continue
        factors, mats, size = {}, {}, 0
        for b in bases:
            lg = grads[b.layer.name]
            check_finite_grads(lg.g)
            size = lg.g.shape[0]
            r = _rotate_factors(b, lg)
            if isinstance(r, tuple):
                factors[b.layer.name] = r
            else:
                mats[b.layer.name] = r
        yield RotatedBatch(size, factors, mats)


class EigenQueries:
    """Preconditioned queries ``R_q = (Q_Gᵀ DW_q Q_A) / (Λ + λ)`` per layer, dense or as
    rank-r factors (``query_rank``); :meth:`dot` scores a :class:`RotatedBatch`."""

    def __init__(self, bases: Sequence[EigenBasis], rank: int | None) -> None:
        self.bases = list(bases)
        self.rank = rank
        self.blocks: list[dict[str, Any]] = []
        self.n = 0
        self.dtype = torch.float32

    def add(self, batch: RotatedBatch) -> None:
        self.n += batch.size
        block: dict[str, Any] = {}
        for b in self.bases:
            name = b.layer.name
            if b.raw is None:
                R = batch.matrix(name).div_(b.denom)  # a fresh tensor (or the batch's own)
            else:  # precondition in the eigenbasis, then rotate back onto the raw columns
                assert b.qa is not None
                qa = b.qa[b.raw]
                R = b.qg @ ((b.qg.T @ batch.matrix(name) @ qa) / b.denom) @ qa.T
            self.dtype = R.dtype
            if self.rank is not None and min(R.shape[1:]) > self.rank:
                U, S, Vh = torch.linalg.svd(R, full_matrices=False)
                r = self.rank
                block[name] = ("lowrank", (U[:, :, :r] * S[:, None, :r]).contiguous(),
                               Vh[:, :r, :].contiguous())
            elif R.shape[1] <= R.shape[2]:  # contract over the larger side (d_in) first
                block[name] = ("dense", R.contiguous(), False)
            else:
                block[name] = ("dense", R.transpose(1, 2).contiguous(), True)
        self.blocks.append(block)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for block in self.blocks
                   for entry in block.values() for t in entry[1:] if isinstance(t, Tensor))

    def dot(self, train: RotatedBatch) -> Tensor:
        """Scores ``[n_query, B]`` (unscaled)."""
        if not self.blocks:
            return torch.zeros(0, train.size, dtype=self.dtype)
        out = []
        for block in self.blocks:
            total: Tensor | None = None
            for b in self.bases:
                name = b.layer.name
                s = _layer_dot(block[name], train, name)
                total = s if total is None else total + s
            out.append(total)
        return torch.cat(out)


def _layer_dot(entry: tuple, train: RotatedBatch, name: str) -> Tensor:
    kind = entry[0]
    if name in train.factors:
        g, a = train.factors[name]  # [B, d_out], [B, d_in]
        if kind == "lowrank":
            _, US, Vh = entry  # [q, d_out, r], [q, r, d_in]
            left = torch.matmul(g, US)  # [q, B, r]
            right = torch.matmul(Vh, a.T)  # [q, r, B]
            return (left * right.transpose(1, 2)).sum(-1)
        _, R, transposed = entry  # [q, d_small, d_large]
        first, second = (g, a) if transposed else (a, g)  # contract the larger side first
        q, ds, dl = R.shape
        B = first.shape[0]
        chunk = max(1, _BLOCK_ELEMENTS // max(1, q * ds))
        cols = []
        for s in range(0, B, chunk):
            X = (R.reshape(q * ds, dl) @ first[s : s + chunk].T).reshape(q, ds, -1)
            cols.append(X.mul_(second[s : s + chunk].T.unsqueeze(0)).sum(1))
        return torch.cat(cols, dim=1)
    M = train.matrices[name]  # [B, d_out, d_in]
    if kind == "lowrank":
        _, US, Vh = entry
        proj = torch.einsum("bmd,qrd->qbmr", M, Vh)
        return torch.einsum("qbmr,qmr->qb", proj, US)
    _, R, transposed = entry
    if transposed:
        M = M.transpose(1, 2)
    return R.reshape(R.shape[0], -1) @ M.reshape(M.shape[0], -1).T


def self_scores(bases: Sequence[EigenBasis], batch: RotatedBatch) -> Tensor:
    """``Σ_layers Σ (Q_Gᵀ DW Q_A)² / (Λ + λ)`` per example (unscaled self-influence)."""
    total: Tensor | None = None
    for b in bases:
        name = b.layer.name
        if name in batch.factors:
            g, a = batch.factors[name]
            s = ((g**2) @ (1.0 / b.denom) * a**2).sum(1)
        else:
            s = (batch.matrices[name] ** 2 / b.denom).sum((1, 2))
        total = s if total is None else total + s
    assert total is not None
    return total


class RowGroupSink:
    """Score rows that arrive in groups of queries, each group scored against all training
    examples before the next: dense and memmap results are written in place (through the
    base class's sink), top-k lists are kept per group and stacked at the end."""

    def __init__(self, rows: int, cols: int, top_k: int | None, out: Any,
                 dtype: torch.dtype) -> None:
        self.top_k, self.cols, self.dtype = top_k, cols, dtype
        self.groups: list[_ScoreSink] = []
        self.whole = None if top_k is not None else _ScoreSink(rows, cols, None, out, dtype)

    def begin(self, rows: int) -> None:
        if self.top_k is not None:
            self.groups.append(_ScoreSink(rows, self.cols, self.top_k, None, self.dtype))

    def add(self, row: int, col: int, block: Tensor) -> None:
        if self.top_k is not None:
            self.groups[-1].add(col, block)
            return
        block = block.detach().cpu()
        rows, cols = slice(row, row + block.shape[0]), slice(col, col + block.shape[1])
        assert self.whole is not None
        if self.whole.out is not None:
            self.whole.mm[rows, cols] = block.numpy()
        else:
            self.whole.dense[rows, cols] = block

    def abort(self) -> None:
        if self.whole is not None:
            self.whole.abort()

    def result(self) -> Any:
        if self.whole is not None:
            return self.whole.result()
        if not self.groups:
            return (torch.empty(0, 0, dtype=self.dtype), torch.empty(0, 0, dtype=torch.long))
        return (torch.cat([g.values for g in self.groups]),
                torch.cat([g.index for g in self.groups]))
