"""Exact influence: the dense curvature matrix, eigendecomposed once.

For small models (up to a few thousand parameters): builds the full ``P × P`` Hessian or
Gauss-Newton matrix of the mean training loss column block by column block from
curvature-vector products, then applies ``(H + λI)⁻¹`` through its eigendecomposition.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from unlearn.influence.base import InfluenceEstimator
from unlearn.influence.grads import curvature_product


class ExactInfluence(InfluenceEstimator):
    """Dense Hessian (``curvature="hessian"``) or Gauss-Newton (``"ggn"``) inverse.

    A non-convex model's Hessian can have negative eigenvalues; with ``clip_negative=True``
    they are set to zero before damping (so the inverse exists and is positive definite).
    """

    name = "exact"
    max_params = 20_000

    def __init__(self, model, task, damping: float = 1e-3, *, curvature: str = "hessian",
                 clip_negative: bool = False, block_size: int = 256, **kw: Any) -> None:
        super().__init__(model, task, damping, **kw)
        if curvature not in ("hessian", "ggn"):
            raise ValueError(f"curvature must be 'hessian' or 'ggn', got {curvature!r}")
        if self.space.numel > self.max_params:
            raise ValueError(
                f"ExactInfluence builds a dense {self.space.numel}×{self.space.numel} matrix; "
                f"use it for models up to {self.max_params} parameters (or select params=...), "
                "and CG, Arnoldi or EK-FAC for larger ones"
            )
        self.curvature = curvature
        self.clip_negative = clip_negative
        self.block_size = block_size

    def config(self) -> dict[str, Any]:
        return {**super().config(), "curvature": self.curvature,
                "clip_negative": self.clip_negative}

    def _fit(self, train_loader: DataLoader) -> None:
        product = curvature_product(self.model, self.task, train_loader, self.space,
                                    self.curvature)
        P = self.space.numel
        dtype = next(self.model.parameters()).dtype
        eye = torch.eye(P, dtype=dtype)
        cols = [product(eye[s : s + self.block_size])
                for s in self._bar(range(0, P, self.block_size), "curvature",
                                   total=-(-P // self.block_size))]
        H = self._reduce_curvature(torch.cat(cols).detach().double(), len(train_loader.dataset))
        H = 0.5 * (H + H.T)
        evals, evecs = torch.linalg.eigh(H)
        self.factors = {"eigenvalues": evals.to(dtype), "eigenvectors": evecs.to(dtype)}

    def _reduce_curvature(self, H: Tensor, n: int) -> Tensor:
        """Hook for fitting across processes (:mod:`unlearn.influence.distributed` replaces it
        on the instance): ``H`` is the mean curvature over this process's ``n`` examples;
        return the mean over all processes' examples. Here: the identity."""
        return H

    def _precondition(self, G: Tensor) -> Tensor:
        evals = self.factors["eigenvalues"]
        if self.clip_negative:
            evals = evals.clamp_min(0)
        denom = evals + self.damping
        if (denom.abs() < 1e-12).any():
            raise FloatingPointError(
                "H + λI is singular; increase damping or use clip_negative=True")
        V = self.factors["eigenvectors"]
        return ((G @ V) / denom) @ V.T
