"""Run dattri 0.3.0 attributors (explicit, CG, LiSSA, Arnoldi, TracIn, TRAK) on our model,
task and data.

dattri's influence attributors return ``g_trainᵀ (H + λI)⁻¹ g_test`` as ``[n_train,
n_query]`` with H the Hessian of the loss function it is given, here our MEAN training loss
over one full-data batch; ours are those transposed and divided by n. (dattri sums the
inverse-Hessian products over the batches of the full-data loader, so the curvature loader
must be one batch.) CG and LiSSA run under ``torch.no_grad()``: ``torch.func`` still
differentiates inside, but no autograd graph is kept across iterations (19 GB otherwise).
TracIn and TRAK are reported in their own scale (a sum over checkpoints of learning-rate ×
projected gradient products; TRAK's projected-feature regression); LDS ignores the scale.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset, TensorDataset

from baselines.peers import PeerResult
from unlearn.tasks import Task

__all__ = ["METHODS", "as_xy", "dattri_scores"]

METHODS = ("explicit", "cg", "lissa", "arnoldi", "tracin", "trak")


def as_xy(dataset: Dataset) -> TensorDataset:
    """Our ``(ids, x, y)`` data set as dattri's ``(x, y)`` tensors."""
    if hasattr(dataset, "tensors") and callable(dataset.tensors):
        x, y = dataset.tensors()
        return TensorDataset(x, y)
    xs, ys = zip(*[(b[-2], b[-1]) for b in (dataset[i] for i in range(len(dataset)))])  # type: ignore[arg-type]
    return TensorDataset(torch.stack(xs), torch.as_tensor(ys))


def _loss_fn(model: nn.Module, task: Task, feat_ndim: int, query: bool = False) -> Callable:
    """``f(params, (x, y))`` = mean loss over the examples, for one example or a batch."""

    def f(params: dict[str, Tensor], data: tuple[Tensor, Tensor]) -> Tensor:
        x, y = data
        if x.dim() == feat_ndim:  # one example without a batch dimension
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        out = functional_call(model, params, (x,))
        loss = task.query_loss(out, y) if query else task.per_sample_loss(out, y)
        return loss.mean()

    return f


def _prob_fn(model: nn.Module, task: Task, feat_ndim: int) -> Callable:
    """TRAK's ``p(correct)`` = exp(−loss) of one example."""
    loss = _loss_fn(model, task, feat_ndim)

    def p(params: dict[str, Tensor], data: tuple[Tensor, Tensor]) -> Tensor:
        return torch.exp(-loss(params, data))

    return p


def dattri_scores(
    model: nn.Module,
    task: Task,
    train: Dataset,
    query: Dataset,
    damping: float,
    method: str = "explicit",
    *,
    max_iter: int = 100,
    tol: float = 0.0,
    lissa_batch: int = 500,
    lissa_depth: int = 100,
    lissa_scaling: float = 50.0,
    arnoldi_rank: int = 100,
    proj_dim: int = 512,
    checkpoints: list[dict[str, Tensor]] | None = None,
    learning_rates: list[float] | None = None,
    train_batch: int | None = None,
    float32: bool = False,
) -> PeerResult:
    """Cache (fit) and attribute (score) with dattri's ``method`` on ``train``/``query``.

    ``checkpoints``/``learning_rates`` are TracIn's (default: the model alone, weight 1:
    gradient dot). ``train_batch`` is the scoring batch of training examples (default all:
    dattri recomputes the query transformation once per training batch). ``float32`` runs
    on float32 copies of the model and data (dattri's Arnoldi and LiSSA fail on float64).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not damping >= 0:
        raise ValueError(f"damping must be >= 0, got {damping!r}")
    from dattri.task import AttributionTask

    tr, qu = as_xy(train), as_xy(query)
    if float32:
        model = copy.deepcopy(model).float()
        tr, qu = (TensorDataset(d.tensors[0].float(), d.tensors[1]) for d in (tr, qu))
    n = len(tr)
    feat_ndim = tr.tensors[0].dim() - 1
    model = model.eval()
    ckpts = checkpoints or [{k: v.detach().clone() for k, v in model.state_dict().items()}]
    atask = AttributionTask(loss_func=_loss_fn(model, task, feat_ndim), model=model,
                            checkpoints=ckpts if len(ckpts) > 1 else ckpts[0])
    full = DataLoader(tr, batch_size=n, shuffle=False)
    train_loader = DataLoader(tr, batch_size=train_batch or n, shuffle=False)
    query_loader = DataLoader(qu, batch_size=len(qu), shuffle=False)
    attributor, info = _build(method, atask, model, task, feat_ndim, damping, max_iter, tol,
                              lissa_batch, lissa_depth, lissa_scaling, arnoldi_rank, proj_dim,
                              len(ckpts), learning_rates)
    quiet = torch.no_grad() if method in ("cg", "lissa") else contextlib.nullcontext()
    with quiet:
        t0 = time.perf_counter()
        if method == "tracin":
            attributor.cache()
        else:
            attributor.cache(full)
        t1 = time.perf_counter()
        if method == "trak":
            raw = attributor.attribute(query_loader)  # the cached training loader
        else:
            raw = attributor.attribute(train_loader, query_loader)
        t2 = time.perf_counter()
    scores = raw.detach().double().cpu().T
    if method in ("explicit", "cg", "lissa", "arnoldi"):
        scores = scores / n
    return PeerResult(t1 - t0, t2 - t1, scores.contiguous(), info)


def _build(method: str, atask: Any, model: nn.Module, task: Task, feat_ndim: int,
           damping: float, max_iter: int, tol: float, lissa_batch: int, lissa_depth: int,
           lissa_scaling: float, rank: int, proj_dim: int, n_ckpt: int,
           lrs: list[float] | None) -> tuple[Any, dict[str, Any]]:
    from dattri.algorithm.influence_function import (
        IFAttributorArnoldi,
        IFAttributorCG,
        IFAttributorExplicit,
        IFAttributorLiSSA,
    )
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.algorithm.trak import TRAKAttributor

    proj = {"proj_dim": proj_dim, "device": "cpu"}
    if method == "explicit":
        return IFAttributorExplicit(atask, regularization=damping), {"regularization": damping}
    if method == "cg":
        return (IFAttributorCG(atask, max_iter=max_iter, tol=tol, regularization=damping),
                {"max_iter": max_iter, "tol": tol, "regularization": damping})
    if method == "lissa":
        return (IFAttributorLiSSA(atask, batch_size=lissa_batch, recursion_depth=lissa_depth,
                                  damping=damping, scaling=lissa_scaling),
                {"batch_size": lissa_batch, "depth": lissa_depth, "scaling": lissa_scaling,
                 "damping": damping})
    if method == "arnoldi":
        return (IFAttributorArnoldi(atask, proj_dim=rank, max_iter=max(rank, max_iter),
                                    regularization=damping),
                {"proj_dim": rank, "max_iter": max(rank, max_iter), "regularization": damping})
    if method == "tracin":
        weights = torch.tensor(lrs if lrs is not None else [1.0] * n_ckpt)
        return (TracInAttributor(atask, weight_list=weights, normalized_grad=False,
                                 projector_kwargs=proj),
                {"checkpoints": n_ckpt, "proj_dim": proj_dim})
    return (TRAKAttributor(atask, correct_probability_func=_prob_fn(model, task, feat_ndim),
                           projector_kwargs=proj),
            {"proj_dim": proj_dim, "checkpoints": n_ckpt})
