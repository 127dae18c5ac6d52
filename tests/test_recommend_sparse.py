"""The symmetric sparse product: same values and gradients (first and second order) as the
dense product, and a clear error for a matrix it must not be used with."""

from __future__ import annotations

import pytest
import torch

from unlearn.recommend.sparse import as_symmetric_csr, symmetric_matmul
from unlearn.removal.recommend import normalized_adjacency


def _adjacency() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    users, items = torch.randint(6, (20,), generator=g), torch.randint(9, (20,), generator=g)
    pairs = torch.unique(torch.stack([users, items], 1), dim=0)
    return normalized_adjacency(pairs[:, 0], pairs[:, 1], 6, 15, torch.float64)


def test_values_and_gradients_match_the_dense_product():
    adj = _adjacency()
    dense = adj.to_dense()
    x = torch.randn(15, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(15, 4, dtype=torch.float64)

    def loss(mul):
        y = x
        for _ in range(3):
            y = mul(y)
        return (torch.tanh(y) * w).sum()

    mine = loss(lambda y: symmetric_matmul(adj, y))
    theirs = loss(lambda y: dense @ y)
    assert torch.allclose(mine, theirs)
    g_mine, = torch.autograd.grad(mine, x, create_graph=True)
    g_theirs, = torch.autograd.grad(theirs, x, create_graph=True)
    assert torch.allclose(g_mine, g_theirs)
    # second order (a Hessian-vector product, as the influence baseline takes)
    v = torch.randn(15, 4, dtype=torch.float64)
    h_mine, = torch.autograd.grad((g_mine * v).sum(), x)
    h_theirs, = torch.autograd.grad((g_theirs * v).sum(), x)
    assert torch.allclose(h_mine, h_theirs)


def test_without_autograd_it_is_the_plain_product():
    adj = _adjacency()
    x = torch.randn(15, 3, dtype=torch.float64)
    assert torch.allclose(symmetric_matmul(adj, x), adj.to_dense() @ x)


def test_a_matrix_that_is_not_symmetric_is_refused():
    m = torch.zeros(3, 3)
    m[0, 1] = 1.0
    with pytest.raises(ValueError, match="not symmetric"):
        as_symmetric_csr(m.to_sparse())
    with pytest.raises(ValueError, match="sparse"):
        as_symmetric_csr(m)
    with pytest.raises(ValueError, match="square"):
        as_symmetric_csr(torch.zeros(2, 3).to_sparse())
    sym = m + m.T
    assert torch.equal(as_symmetric_csr(sym.to_sparse()).to_dense(), sym)
    with pytest.raises(ValueError, match="requires grad"):
        symmetric_matmul(sym.to_sparse().requires_grad_(), torch.ones(3, 2))
