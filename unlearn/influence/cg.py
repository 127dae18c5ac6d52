"""Conjugate-gradient influence: solve ``(C + λI) X = G`` matrix-free, row by row in a batch.

No curvature matrix is ever formed: each CG iteration is one pass over the training data
computing curvature-vector products for every unconverged row at once. Exact up to ``tol``
when ``C + λI`` is positive definite (the Gauss-Newton curvature always is for λ > 0; the
Hessian of a non-convex model may not be).

This module also holds the small pieces the other matrix-free estimators (LiSSA, Arnoldi)
share: curvature validation, products over a fixed list of batches, and a base class whose
``load`` can re-attach the training data.
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from unlearn.influence.base import InfluenceEstimator, NotFittedError
from unlearn.influence.grads import check_loader, curvature_product
from unlearn.tasks import Task

CURVATURES = ("hessian", "ggn")

Product = Callable[[Tensor], Tensor]


class IndefiniteCurvatureError(FloatingPointError):
    """``C + λI`` has a direction of non-positive curvature, so CG cannot solve with it."""


# --------------------------------------------------------------------------- shared helpers


def check_curvature(curvature: str) -> str:
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be 'hessian' or 'ggn', got {curvature!r}")
    return curvature


def check_positive_int(value: Any, what: str, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")


def check_positive_float(value: Any, what: str) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not value > 0 or value == float("inf"):
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")


def count_samples(task: Task, batch: Any) -> int:
    """Number of examples in a collated batch (the length of its targets)."""
    return int(task.split_batch(batch)[1].shape[0])


class _Batches(Dataset):
    """A dataset whose items are already-collated batches (iterate with ``batch_size=None``)."""

    def __init__(self, batches: Sequence[Any]) -> None:
        self.batches = list(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Any:
        return self.batches[i]


def batches_product(
    model: nn.Module, task: Task, batches: Sequence[Any], space: Any, mode: str
) -> Product:
    """``V -> C V`` with C the curvature of the mean loss over the examples of ``batches``."""
    n = sum(count_samples(task, b) for b in batches)
    if n == 0:
        raise ValueError("cannot compute curvature over zero examples")
    # curvature_product averages over len(loader.dataset), here the number of batches
    loader = DataLoader(_Batches(batches), batch_size=None)
    product = curvature_product(model, task, loader, space, mode)
    factor = len(batches) / n
    return lambda V: product(V) * factor


def curvature_operator(
    model: nn.Module,
    task: Task,
    loader: DataLoader,
    space: Any,
    mode: str,
    batches: int | None = None,
) -> Product:
    """Curvature products over the whole loader, or over its first ``batches`` batches
    (drawn once and kept, so the operator is the same on every call)."""
    if batches is None:
        return curvature_product(model, task, loader, space, mode)
    chosen = list(itertools.islice(iter(loader), batches))
    return batches_product(model, task, chosen, space, mode)


class MatrixFreeInfluence(InfluenceEstimator):
    """Base of estimators that need curvature products at query time (CG, LiSSA).

    They keep the training loader rather than factors, so a saved one is reloaded with
    ``load(path, model, task, train_loader=loader)`` (or ``fit`` again).
    """

    def __init__(self, model: nn.Module, task: Task, damping: float = 1e-3, *,
                 curvature: str = "hessian", **kw: Any) -> None:
        super().__init__(model, task, damping, **kw)
        self.curvature = check_curvature(curvature)
        self._loader: DataLoader | None = None
        self._product: Product | None = None

    def config(self) -> dict[str, Any]:
        return {**super().config(), "curvature": self.curvature}

    def _fit(self, train_loader: DataLoader) -> None:
        self._attach(train_loader)

    def _attach(self, train_loader: DataLoader) -> None:
        """Keep the loader and build the curvature-product operator over it."""
        self._loader = train_loader
        self._product = curvature_operator(self.model, self.task, train_loader, self.space,
                                           self.curvature)

    def _damped(self) -> Product:
        """``V -> (C + λI) V``; a clear error when no training data is attached."""
        if self._product is None:
            raise NotFittedError(
                f"{type(self).__name__} is matrix-free and keeps no curvature on disk: call "
                "fit(train_loader), or load(path, model, task, train_loader=loader)"
            )
        product, lam = self._product, self.damping
        return lambda V: product(V) + lam * V

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module, task: Task | None = None, *,
             train_loader: DataLoader | None = None, **kw: Any):
        """Rebuild from ``save``'s directory; ``train_loader`` re-attaches the training data
        (it must hold the same number of examples as when saved)."""
        est = super().load(path, model, task, **kw)
        if train_loader is not None:
            check_loader(train_loader, "train_loader", ordered=False)
            n = len(train_loader.dataset)  # type: ignore[arg-type]
            if n != est.n_train:
                raise ValueError(f"train_loader has {n} examples but the estimator was fitted "
                                 f"on {est.n_train}")
            est._attach(train_loader)
        return est


# --------------------------------------------------------------------------- CG


class CGInfluence(MatrixFreeInfluence):
    """Batched conjugate gradient on ``(C + λI) x = g`` for every row g of a batch.

    Each row keeps its own CG scalars; rows whose relative residual ``||r|| / ||g||`` falls
    below ``tol`` stop updating. One iteration costs one pass over the training data (or over
    its first ``curvature_batches`` batches) for all unconverged rows together.

    Args:
        curvature: ``"hessian"`` (default) or ``"ggn"`` (positive semi-definite; use it for
            non-convex models).
        max_iter: iteration cap per solve; a solve that stops short warns.
        tol: relative residual at which a row counts as solved.
        curvature_batches: use only the first N batches of the training loader for curvature
            products (a fixed subsample, drawn once at fit time); ``None`` uses all.
        on_indefinite: what to do when a search direction has ``pᵀ(C + λI)p <= 0`` (the system
            is not positive definite): ``"raise"`` an :class:`IndefiniteCurvatureError`, or
            ``"warn"`` and stop that row at its current iterate.
        preconditioner: a fitted estimator on the same model and parameters (e.g. EK-FAC)
            whose ``inverse_hvp`` approximates ``(C + λI)⁻¹``: preconditioned CG, which
            converges to the same solution in fewer passes over the data when the
            approximation is good. Its damping need not equal ``damping``. It is not part of
            ``save``; pass it again to ``load``.

    After each solve ``last_iterations`` holds the number of iterations (passes over the
    data) and ``last_residuals`` each row's final relative residual.
    """

    name = "cg"

    def __init__(self, model: nn.Module, task: Task, damping: float = 1e-3, *,
                 curvature: str = "hessian", max_iter: int = 100, tol: float = 1e-6,
                 curvature_batches: int | None = None, on_indefinite: str = "raise",
                 preconditioner: InfluenceEstimator | None = None, **kw: Any) -> None:
        super().__init__(model, task, damping, curvature=curvature, **kw)
        if preconditioner is not None:
            if not isinstance(preconditioner, InfluenceEstimator):
                raise TypeError(f"preconditioner must be a fitted InfluenceEstimator, got "
                                f"{type(preconditioner).__name__}")
            if preconditioner.space.names != self.space.names:
                raise ValueError("the preconditioner covers other parameters "
                                 f"({list(preconditioner.space.names)[:3]}...) than this "
                                 f"estimator ({list(self.space.names)[:3]}...)")
        self.preconditioner = preconditioner
        check_positive_int(max_iter, "max_iter")
        check_positive_float(tol, "tol")
        check_positive_int(curvature_batches, "curvature_batches", allow_none=True)
        if on_indefinite not in ("raise", "warn"):
            raise ValueError(f"on_indefinite must be 'raise' or 'warn', got {on_indefinite!r}")
        self.max_iter, self.tol = max_iter, float(tol)
        self.curvature_batches = curvature_batches
        self.on_indefinite = on_indefinite
        self.last_iterations = 0
        self.last_residuals: Tensor | None = None

    def config(self) -> dict[str, Any]:
        return {**super().config(), "max_iter": self.max_iter, "tol": self.tol,
                "curvature_batches": self.curvature_batches,
                "on_indefinite": self.on_indefinite}

    def _attach(self, train_loader: DataLoader) -> None:
        self._loader = train_loader
        self._product = curvature_operator(self.model, self.task, train_loader, self.space,
                                           self.curvature, self.curvature_batches)

    def _precondition(self, G: Tensor) -> Tensor:
        A = self._damped()
        M = self._inverse_preconditioner()
        X = torch.zeros_like(G)
        R = G.clone()
        Z = M(R)
        D = Z.clone()
        rs = (R * R).sum(dim=1)  # squared residual norms: the stopping test
        rz = (R * Z).sum(dim=1)  # rᵀ M⁻¹ r: the CG scalars (= rs without a preconditioner)
        target = (self.tol * G.norm(dim=1)) ** 2
        active = rs > target  # zero rows are solved by x = 0
        it = 0
        for _ in self._bar(range(self.max_iter), "CG", total=self.max_iter):
            if not active.any():
                break
            it += 1
            idx = active.nonzero().squeeze(1)
            AD = A(D[idx])
            curv = (D[idx] * AD).sum(dim=1)
            bad = curv <= 0
            if bad.any():
                self._indefinite(idx[bad], curv[bad], it)
                active[idx[bad]] = False
                idx, AD, curv = idx[~bad], AD[~bad], curv[~bad]
            alpha = (rz[idx] / curv).unsqueeze(1)
            X[idx] += alpha * D[idx]
            R[idx] -= alpha * AD
            Z_idx = M(R[idx])
            rz_new = (R[idx] * Z_idx).sum(dim=1)
            D[idx] = Z_idx + (rz_new / rz[idx]).unsqueeze(1) * D[idx]
            rz[idx] = rz_new
            rs[idx] = (R[idx] ** 2).sum(dim=1)
            active[idx] = rs[idx] > target[idx]
        self.last_iterations = it
        norms = G.norm(dim=1)
        self.last_residuals = torch.where(norms > 0, rs.sqrt() / norms, torch.zeros_like(norms))
        if active.any():
            warnings.warn(
                f"CG stopped at max_iter={self.max_iter} with {int(active.sum())} of "
                f"{G.shape[0]} rows above tol={self.tol:g} (worst relative residual "
                f"{float(self.last_residuals.max()):.3g}); raise max_iter or damping",
                RuntimeWarning, stacklevel=3,
            )
        return X

    def _inverse_preconditioner(self) -> Product:
        """``R -> M⁻¹ R`` row by row: the preconditioner's inverse-HVP, or the identity."""
        pre = self.preconditioner
        if pre is None:
            return lambda R: R
        return lambda R: pre.inverse_hvp(R).to(R)  # type: ignore[union-attr]

    def _indefinite(self, rows: Tensor, curv: Tensor, it: int) -> None:
        msg = (
            f"CG met non-positive curvature pᵀ(C + λI)p = {float(curv.min()):.3g} at iteration "
            f"{it} (rows {rows.tolist()[:5]}): C + λI is not positive definite with "
            f"curvature={self.curvature!r} and damping={self.damping:g}. Increase damping or "
            "use curvature='ggn'"
        )
        if self.on_indefinite == "raise":
            raise IndefiniteCurvatureError(msg)
        warnings.warn(msg + "; those rows keep their current iterate", RuntimeWarning,
                      stacklevel=4)
