"""Arnoldi influence (Schioppa et al., 2022): the top eigenpairs of the curvature, found by a
Krylov iteration, then a low-rank inverse.

``n_iter`` Arnoldi steps from a random start (one curvature-vector product, i.e. one pass over
the training data, per step) with full re-orthogonalisation build an orthonormal basis Q and
the small projected matrix ``T = Qᵀ C Q`` (tridiagonal for a symmetric C: this is Lanczos).
The ``rank`` Ritz pairs of T with the largest |eigenvalue| are kept as factors
(``eigenvalues [r]``, ``eigenvectors [P, r]``), so the fitted estimator saves and loads
without the training data.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from unlearn.influence.base import InfluenceEstimator
from unlearn.influence.cg import (
    check_curvature,
    check_positive_int,
    curvature_operator,
)
from unlearn.tasks import Task

#: a Krylov residual below this many machine epsilons (times ||C||) is a breakdown
_BREAKDOWN_EPS = 1e3


class ArnoldiInfluence(InfluenceEstimator):
    """Low-rank eigendecomposition of the curvature, ``(C + λI)⁻¹ ≈ U diag(1/(σ + λ)) Uᵀ``.

    Args:
        curvature: ``"hessian"`` (default) or ``"ggn"``.
        rank: number of eigenpairs kept (largest |eigenvalue| first).
        n_iter: Krylov steps, at least ``rank`` (default ``max(2 * rank, rank + 20)``, capped
            at the number of parameters). More steps give more accurate top eigenpairs.
        complement: what to do with the part of a vector outside the kept eigenvectors:
            ``"ignore"`` drops it (Schioppa et al.), ``"damping"`` adds ``(I − UUᵀ)g / λ``
            (treats the rest of the spectrum as zero curvature; needs damping > 0).
        clip_negative: set negative eigenvalues to zero before damping (for Hessians of
            non-convex models).
        curvature_batches: compute the curvature on the first N batches of the training loader
            only (a fixed subsample); ``None`` uses all of it.
        seed: seed of the random start vector.

    After fitting, ``ritz_residuals`` (also saved) bounds each kept eigenpair's error:
    ``||C u − σ u||`` for the Ritz pair (σ, u), from the Krylov residual.
    """

    name = "arnoldi"

    def __init__(self, model: nn.Module, task: Task, damping: float = 1e-3, *,
                 curvature: str = "hessian", rank: int = 20, n_iter: int | None = None,
                 complement: str = "ignore", clip_negative: bool = False,
                 curvature_batches: int | None = None, seed: int = 0, **kw: Any) -> None:
        super().__init__(model, task, damping, **kw)
        self.curvature = check_curvature(curvature)
        check_positive_int(rank, "rank")
        check_positive_int(n_iter, "n_iter", allow_none=True)
        check_positive_int(curvature_batches, "curvature_batches", allow_none=True)
        P = self.space.numel
        if rank > P:
            raise ValueError(f"rank={rank} exceeds the number of parameters ({P})")
        if n_iter is not None and n_iter < rank:
            raise ValueError(f"n_iter={n_iter} must be at least rank={rank}")
        if complement not in ("ignore", "damping"):
            raise ValueError(f"complement must be 'ignore' or 'damping', got {complement!r}")
        if complement == "damping" and self.damping <= 0:
            raise ValueError("complement='damping' divides by the damping; it needs damping > 0")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.rank, self.n_iter = rank, n_iter
        self.complement, self.clip_negative = complement, bool(clip_negative)
        self.curvature_batches, self.seed = curvature_batches, seed

    def config(self) -> dict[str, Any]:
        return {**super().config(), "curvature": self.curvature, "rank": self.rank,
                "n_iter": self.n_iter, "complement": self.complement,
                "clip_negative": self.clip_negative,
                "curvature_batches": self.curvature_batches, "seed": self.seed}

    @property
    def krylov_steps(self) -> int:
        """Krylov steps actually taken: ``n_iter`` (or its default) capped at P."""
        n = self.n_iter if self.n_iter is not None else max(2 * self.rank, self.rank + 20)
        return min(n, self.space.numel)

    @property
    def ritz_residuals(self) -> Tensor:
        return self.factors["residuals"]

    # ----------------------------------------------------------------- fitting
    def _fit(self, train_loader: DataLoader) -> None:
        product = curvature_operator(self.model, self.task, train_loader, self.space,
                                     self.curvature, self.curvature_batches)
        Q, T, beta = self._arnoldi(product)
        evals, Y = torch.linalg.eigh(T)
        keep = evals.abs().argsort(descending=True)[: self.rank]
        evals, Y = evals[keep], Y[:, keep]
        U = Q.T.double() @ Y  # Ritz vectors [P, r]
        dtype = Q.dtype
        self.factors = {
            "eigenvalues": evals.to(dtype),
            "eigenvectors": U.to(dtype).contiguous(),
            "residuals": (beta * Y[-1].abs()).to(dtype),
        }

    def _arnoldi(self, product: Any) -> tuple[Tensor, Tensor, float]:
        """``m`` steps with twice-repeated Gram-Schmidt; on breakdown (an invariant subspace
        found) restart from a fresh random vector orthogonal to the basis. Returns the basis
        ``Q [m, P]``, the symmetrised projection ``T [m, m]`` (float64) and the last residual
        norm."""
        p = next(self.model.parameters())
        dtype, device = p.dtype, p.device
        P, m = self.space.numel, self.krylov_steps
        gen = torch.Generator().manual_seed(self.seed)
        Q = torch.zeros(m, P, dtype=dtype, device=device)
        H = torch.zeros(m, m, dtype=torch.float64)
        Q[0] = self._random_unit(gen, Q[:0])
        beta, scale = 0.0, 0.0
        eps = torch.finfo(dtype).eps
        for j in self._bar(range(m), "Krylov steps", total=m):
            w = product(Q[j : j + 1])[0]
            if not torch.isfinite(w).all():
                raise FloatingPointError("a curvature-vector product is NaN or inf")
            w, coeffs = _orthogonalise(w, Q[: j + 1])
            H[: j + 1, j] = coeffs.double().cpu()
            beta = float(w.norm())
            scale = max(scale, float(coeffs.abs().max()), beta)
            if j + 1 == m:
                break
            if beta <= _BREAKDOWN_EPS * eps * max(scale, 1e-300):
                Q[j + 1] = self._random_unit(gen, Q[: j + 1])
            else:
                H[j + 1, j] = beta
                Q[j + 1] = w / beta
        T = 0.5 * (H + H.T)
        return Q, T.to(device), beta

    def _random_unit(self, gen: torch.Generator, basis: Tensor) -> Tensor:
        v = torch.randn(self.space.numel, generator=gen, dtype=torch.float64)
        v = v.to(dtype=basis.dtype, device=basis.device)
        if basis.shape[0]:
            v, _ = _orthogonalise(v, basis)
        return v / v.norm()

    def _after_load(self) -> None:
        U = self.factors.get("eigenvectors")
        ok = U is not None and U.dim() == 2 and U.shape[0] == self.space.numel
        if not ok or "eigenvalues" not in self.factors:
            raise ValueError(
                f"saved Arnoldi factors do not fit this model's {self.space.numel} parameters "
                f"(eigenvectors of shape {None if U is None else tuple(U.shape)})"
            )
        if "residuals" not in self.factors:
            self.factors["residuals"] = torch.full_like(self.factors["eigenvalues"], float("nan"))

    # ----------------------------------------------------------------- solving
    def _projects(self) -> bool:
        """Score in the r kept coordinates ``Uᵀg`` (the complement is dropped, and r < P):
        ``gᵢᵀ U D Uᵀ g_q`` needs r, not P, products per score."""
        return (self.complement == "ignore" and self.query_rank is None
                and self.factors["eigenvectors"].shape[1] < self.space.numel)

    def _transform(self, G: Tensor) -> Tensor:
        # scoring and self-influence only (inverse_hvp takes vectors of P entries)
        return G @ self.factors["eigenvectors"].to(G.dtype) if self._projects() else G

    def _denominator(self, dtype: torch.dtype) -> Tensor:
        sigma = self.factors["eigenvalues"].to(dtype)
        if self.clip_negative:
            sigma = sigma.clamp_min(0)
        denom = sigma + self.damping
        if (denom.abs() <= 1e-12 * max(float(sigma.abs().max()), 1.0)).any():
            raise FloatingPointError(
                "an eigenvalue plus damping is zero, so C + λI is singular on the kept "
                "subspace; increase damping or use clip_negative=True")
        return denom

    def _precondition(self, G: Tensor) -> Tensor:
        denom = self._denominator(G.dtype)
        if G.shape[1] != self.space.numel:  # already projected by _transform
            return G / denom
        U = self.factors["eigenvectors"].to(G.dtype)
        coeffs = G @ U  # [k, r]
        out = (coeffs / denom) @ U.T
        if self.complement == "damping":
            out = out + (G - coeffs @ U.T) / self.damping
        return out


def _orthogonalise(w: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
    """Remove ``w``'s components along the orthonormal rows of ``Q`` (Gram-Schmidt, twice)."""
    c1 = Q @ w
    w = w - Q.T @ c1
    c2 = Q @ w
    return w - Q.T @ c2, c1 + c2
