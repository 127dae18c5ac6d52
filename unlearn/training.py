"""Small, dependable trainers used by the verification utilities, experiments and demo.

``train_lbfgs`` solves an L2-regularised objective to convergence (the convex reference);
``train_sgd`` is ordinary minibatch training for small networks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from unlearn.influence.grads import to_model
from unlearn.tasks import Task


def _all_batches(loader: DataLoader, model: nn.Module) -> list[Any]:
    return [to_model(b, model) for b in loader]


def train_lbfgs(
    model: nn.Module,
    task: Task,
    loader: DataLoader,
    l2: float,
    *,
    normalizer: int | None = None,
    max_iter: int = 500,
    tol: float = 1e-10,
) -> nn.Module:
    """Minimise ``(1/N) Σ ℓ_i + (l2/2)||θ||²`` with full-batch L-BFGS, in place.

    ``N`` is the number of examples in ``loader`` unless ``normalizer`` is given: leave-one-out
    retraining keeps the full set's N so that removing a point is exactly the ε = −1/N
    perturbation that influence functions linearise.
    """
    batches = _all_batches(loader, model)
    n = normalizer or sum(task.split_batch(b)[1].shape[0] for b in batches)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.LBFGS(params, lr=1, max_iter=max_iter, tolerance_grad=tol,
                            tolerance_change=tol * 1e-2, history_size=50,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = sum(task.loss(model, b).sum() for b in batches) / n
        loss = loss + 0.5 * l2 * sum((p**2).sum() for p in params)
        loss.backward()
        return loss

    model.train()
    for _ in range(5):  # L-BFGS may stop early on a line-search stall; restart a few times
        opt.step(closure)
        grad_norm = torch.sqrt(sum((p.grad**2).sum() for p in params))
        if grad_norm < tol * 10:
            break
    model.eval()
    return model


def train_sgd(
    model: nn.Module,
    task: Task,
    loader: DataLoader,
    *,
    epochs: int,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    seed: int | None = None,
) -> nn.Module:
    """Minibatch SGD on the mean loss for ``epochs``, in place. ``loader`` should shuffle."""
    if seed is not None:
        torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                          weight_decay=weight_decay)
    model.train()
    for _ in range(epochs):
        for batch in loader:
            opt.zero_grad()
            task.loss(model, to_model(batch, model)).mean().backward()
            opt.step()
    model.eval()
    return model
