"""Run kronfluence 1.0.1 (EK-FAC, K-FAC, diagonal, identity) on our model, task and data.

kronfluence sums the per-sample losses but its factors (covariances, eigenvalues) describe
the MEAN Fisher, so its ``damping_factor`` equals our λ (not λ·n) and its scores are
``∇ℓ_qᵀ (F̄ + λI)⁻¹ ∇ℓ_i``: ours are those divided by n. It wraps the model's modules in
place, so the adapter works on a deep copy.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from typing import Any

import torch
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task as KronTask
from torch import Tensor, nn
from torch.utils.data import Dataset

from baselines.peers import PeerResult
from unlearn.tasks import Task

__all__ = ["STRATEGIES", "KronfluenceTask", "kronfluence_scores"]

STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")


class KronfluenceTask(KronTask):
    """Our :class:`~unlearn.tasks.Task` seen through kronfluence's interface: summed training
    loss (with targets drawn from the model when ``sample``), summed query loss."""

    def __init__(self, task: Task) -> None:
        self.task = task

    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Tensor:
        inputs, targets = self.task.split_batch(batch)
        outputs = self.task.forward(model, inputs)
        if sample:
            with torch.no_grad():
                targets = self.task.sample_targets(outputs)
        return self.task.per_sample_loss(outputs, targets).sum()

    def compute_measurement(self, batch: Any, model: nn.Module) -> Tensor:
        inputs, targets = self.task.split_batch(batch)
        return self.task.query_loss(self.task.forward(model, inputs), targets).sum()


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def kronfluence_scores(
    model: nn.Module,
    task: Task,
    train: Dataset,
    query: Dataset,
    damping: float,
    strategy: str = "ekfac",
    *,
    train_batch: int = 500,
    query_batch: int = 100,
    empirical_fisher: bool = False,
) -> PeerResult:
    """Fit kronfluence's factors for ``strategy`` on ``train`` and score ``query`` against it.

    Returns wall times (fit = covariances + eigendecomposition + eigenvalue correction;
    score = pairwise scores) and ``scores[n_query, n_train]`` in our convention.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not damping > 0:
        raise ValueError(f"damping must be > 0, got {damping!r}")
    n = len(train)  # type: ignore[arg-type]
    dtype = _dtype(model)
    # kronfluence replaces supported submodules by wrappers; a bare nn.Linear root has none,
    # so the copy goes inside a container (same function, same parameters).
    wrapped = prepare_model(nn.Sequential(copy.deepcopy(model)), KronfluenceTask(task))
    fargs = FactorArguments(
        strategy=strategy, use_empirical_fisher=empirical_fisher,
        activation_covariance_dtype=dtype, gradient_covariance_dtype=dtype,
        per_sample_gradient_dtype=dtype, lambda_dtype=dtype)
    sargs = ScoreArguments(
        damping_factor=damping, per_sample_gradient_dtype=dtype, precondition_dtype=dtype,
        score_dtype=dtype, query_gradient_svd_dtype=torch.float64)
    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="kronfluence-") as out:
        analyzer = Analyzer("bench", wrapped, KronfluenceTask(task), cpu=True,
                            disable_tqdm=True, output_dir=out)
        t0 = time.perf_counter()
        analyzer.fit_all_factors("factors", train, per_device_batch_size=train_batch,
                                 factor_args=fargs, overwrite_output_dir=True)
        t1 = time.perf_counter()
        analyzer.compute_pairwise_scores(
            "scores", "factors", query, train, per_device_query_batch_size=query_batch,
            per_device_train_batch_size=train_batch, score_args=sargs,
            overwrite_output_dir=True)
        scores = analyzer.load_pairwise_scores("scores")["all_modules"]
        t2 = time.perf_counter()
    return PeerResult(t1 - t0, t2 - t1, scores.detach().double().cpu() / n,
                      {"strategy": strategy, "damping_factor": damping})
