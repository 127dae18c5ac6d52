"""Shared leave-one-out reference for influence tests: L2-regularised logistic regression on
scikit-learn's breast-cancer set, and the true loss changes from retraining without a point.

Import from a test module as ``from loo_fixtures import breast_cancer_lr, loo_truth`` (pytest
puts ``tests/`` on ``sys.path``). Everything is float64 so that retraining differences of
order 1e-4 are far above the optimiser's tolerance.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from unlearn.data import from_tensors
from unlearn.tasks import ClassificationTask, Task
from unlearn.training import train_lbfgs


def breast_cancer_lr(
    l2: float, n_train: int = 400, seed: int = 0
) -> tuple[nn.Module, Task, Dataset, Dataset]:
    """Train a float64 2-logit logistic regression on the first ``n_train`` standardised rows
    with objective ``mean CE + l2/2 ||θ||²``; the remaining rows are the query set.

    Returns ``(model, task, train_dataset, query_dataset)``; both data sets yield
    ``(id, x, y)``.
    """
    bunch = load_breast_cancer()
    x = np.asarray(bunch.data, dtype=np.float64)
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    X = torch.tensor(x, dtype=torch.float64)
    y = torch.tensor(bunch.target, dtype=torch.long)
    train = from_tensors(X[:n_train], y[:n_train])
    query = from_tensors(X[n_train:], y[n_train:], ids=range(n_train, len(X)))
    torch.manual_seed(seed)
    model = nn.Linear(X.shape[1], 2).double()
    task = ClassificationTask()
    train_lbfgs(model, task, full_batch(train), l2)
    return model, task, train, query


def full_batch(dataset: Dataset) -> DataLoader:
    """One ordered batch holding the whole data set."""
    return DataLoader(dataset, batch_size=len(dataset), shuffle=False)  # type: ignore[arg-type]


def query_losses(model: nn.Module, task: Task, dataset: Dataset) -> Tensor:
    """Per-sample query loss of every example, ``[n]``."""
    with torch.no_grad():
        return torch.cat([task.loss(model, batch) for batch in full_batch(dataset)])


def loo_truth(
    model: nn.Module,
    task: Task,
    train_dataset: Dataset,
    query_dataset: Dataset,
    l2: float,
    removed_indices: Sequence[int],
) -> Tensor:
    """True ``loss_q(θ without i) − loss_q(θ)``, ``[n_query, len(removed_indices)]``.

    ``removed_indices`` are positions in ``train_dataset``. Each retrain starts from the
    trained model and keeps the full set's normaliser N, as the score convention assumes.
    """
    n = len(train_dataset)  # type: ignore[arg-type]
    base = query_losses(model, task, query_dataset)
    cols = []
    for i in removed_indices:
        if not 0 <= int(i) < n:
            raise IndexError(f"removed index {i} out of range for {n} training examples")
        keep = [j for j in range(n) if j != int(i)]
        retrained = copy.deepcopy(model)
        train_lbfgs(retrained, task, full_batch(Subset(train_dataset, keep)), l2, normalizer=n)
        cols.append(query_losses(retrained, task, query_dataset) - base)
    return torch.stack(cols, dim=1)


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two tensors, flattened."""
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))
