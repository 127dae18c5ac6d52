"""Products with a symmetric sparse propagation matrix, with a cheap backward.

LightGCN's ``D^-1/2 A D^-1/2`` is symmetric, so the gradient of ``adj @ x`` with respect to
``x`` is ``adj @ grad``: one more product with the same CSR matrix. PyTorch's generic sparse
backward instead transposes ``adj`` and builds the product's gradient from scratch on every
call, several times the cost of the forward on a graph the size of ML-100K's. The
adjacency's values get no gradient: they are constants here.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

__all__ = ["as_symmetric_csr", "symmetric_matmul"]


class _SymmetricMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, adj: Tensor, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.adj = adj
        return adj @ x

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor]:  # type: ignore[override]
        # through apply, not a bare product: a double backward (Hessian-vector products with
        # create_graph=True) differentiates this step too
        return None, _SymmetricMatmul.apply(ctx.adj, grad)


def symmetric_matmul(adj: Tensor, x: Tensor) -> Tensor:
    """``adj @ x`` for a symmetric sparse ``adj`` (from :func:`as_symmetric_csr`, or one of
    the normalised adjacencies built by ``unlearn.recommend``), with the backward
    ``adj @ grad``; a non-symmetric ``adj`` would get a wrong gradient, which is why the
    builders check or guarantee symmetry. Without autograd it is the plain product."""
    if adj.requires_grad:
        raise ValueError("symmetric_matmul treats adj as a constant, but adj requires grad: "
                         "detach it, or use adj @ x for a gradient on its values")
    if not (x.requires_grad and torch.is_grad_enabled()):
        return adj @ x
    return _SymmetricMatmul.apply(adj, x)


def as_symmetric_csr(adj: Tensor, *, check: bool = True) -> Tensor:
    """``adj`` (sparse COO or CSR, square) as CSR, after checking it equals its transpose
    (``check=False`` skips the check for matrices symmetric by construction)."""
    if adj.layout not in (torch.sparse_coo, torch.sparse_csr):
        raise ValueError(f"adj must be a sparse COO or CSR matrix, got layout {adj.layout}")
    if adj.dim() != 2 or adj.shape[0] != adj.shape[1]:
        raise ValueError(f"adj must be a square matrix, got shape {tuple(adj.shape)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        coo = adj if adj.layout == torch.sparse_coo else adj.to_sparse_coo()
        coo = coo.coalesce()
        if check:
            diff = (coo - coo.t()).coalesce().values()
            scale = float(coo.values().abs().max()) if coo._nnz() else 0.0
            if diff.numel() and float(diff.abs().max()) > 1e-6 * max(scale, 1.0):
                raise ValueError("adj is not symmetric: its backward would be wrong")
        return coo.to_sparse_csr()
