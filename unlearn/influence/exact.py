"""Exact influence: the dense curvature matrix, factorised once.

For small models (up to a few thousand parameters): builds the full ``P × P`` Hessian or
Gauss-Newton matrix ``H`` of the mean training loss and applies ``(H + λI)⁻¹``.

Building ``H``: in general column block by column block from curvature-vector products. For
the Gauss-Newton matrix of a model whose parameters all sit in Linear / Conv2d / Embedding
layers used once per example at one position (logistic regression, MLPs) it is assembled
directly from layer hooks instead: with ``L_b`` a square root of example b's output Hessian,
each column k of ``L_b`` back-propagated gives ``g_bk`` at every layer, and the block between
layers l and m is ``(1/n) Σ_b (Σ_k g_bkl g_bkmᵀ) ⊗ (a_bl a_bmᵀ)``: a few large GEMMs, no
per-parameter passes over the data.

Solving: a float64 Cholesky factorisation of ``H + λI`` (``cholesky_solve`` per batch of
vectors), since only inverse-HVPs are needed. The eigendecomposition is used where the
eigenvalues matter: ``clip_negative=True``, ``damping=0`` (to detect a singular system), and
when ``H + λI`` is not positive definite (an indefinite Hessian). ``factors["eigenvalues"]``
and ``factors["eigenvectors"]`` stay available: computed on first access.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from unlearn.influence.base import InfluenceEstimator
from unlearn.influence.grads import (
    _CLONE,
    check_finite_batch,
    curvature_product,
    space_layers,
    to_model,
)

_GEMM_ELEMENTS = 1 << 23  # [B, d_out·d_in] right-hand sides of one block GEMM


class _Factors(dict):
    """The saved factors; ``eigenvalues`` / ``eigenvectors`` are computed on first access
    from the stored curvature (the Cholesky path does not need them)."""

    def __init__(self, data: dict[str, Tensor], eigen: Callable[[], tuple[Tensor, Tensor]]):
        super().__init__(data)
        self._eigen = eigen

    def __missing__(self, key: str) -> Tensor:
        if key not in ("eigenvalues", "eigenvectors") or "curvature" not in self:
            raise KeyError(key)
        self["eigenvalues"], self["eigenvectors"] = self._eigen()
        return self[key]


class ExactInfluence(InfluenceEstimator):
    """Dense Hessian (``curvature="hessian"``) or Gauss-Newton (``"ggn"``) inverse.

    A non-convex model's Hessian can have negative eigenvalues; with ``clip_negative=True``
    they are set to zero before damping (so the inverse exists and is positive definite).

    ``build_dtype=torch.float32`` computes the products of the layer-wise Gauss-Newton build
    in float32 (sums and the solve stay float64): about twice as fast for a float64 model,
    with float32 rounding (relative ~1e-7) in the curvature.
    """

    name = "exact"
    max_params = 20_000

    def __init__(self, model, task, damping: float = 1e-3, *, curvature: str = "hessian",
                 clip_negative: bool = False, block_size: int = 256, max_outputs: int = 256,
                 build_dtype: torch.dtype | None = None, **kw: Any) -> None:
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
        self.max_outputs = max_outputs
        if build_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"build_dtype must be None, torch.float32 or torch.float64, got "
                             f"{build_dtype!r}")
        self.build_dtype = build_dtype
        self.solver: str | None = None  # "cholesky" or "eigh", set when fitted or loaded
        self.build: str | None = None  # "layers" or "products": how H was built

    def config(self) -> dict[str, Any]:
        return {**super().config(), "curvature": self.curvature,
                "clip_negative": self.clip_negative}

    # ----------------------------------------------------------------- fitting
    def _fit(self, train_loader: DataLoader) -> None:
        dtype = next(self.model.parameters()).dtype
        H = None
        if self.curvature == "ggn":
            H = _layer_ggn(self, train_loader)
        if H is not None:
            self.build = "layers"
        else:
            self.build = "products"
            product = curvature_product(self.model, self.task, train_loader, self.space,
                                        self.curvature)
            P = self.space.numel
            eye = torch.eye(P, dtype=dtype)
            cols = [product(eye[s : s + self.block_size])
                    for s in self._bar(range(0, P, self.block_size), "curvature",
                                       total=-(-P // self.block_size))]
            H = torch.cat(cols).detach().double()
        H = self._reduce_curvature(H, len(train_loader.dataset))  # type: ignore[arg-type]
        H = 0.5 * (H + H.T)
        self.factors = {"curvature": H.to(dtype)}
        self._after_load()

    def _reduce_curvature(self, H: Tensor, n: int) -> Tensor:
        """Hook for fitting across processes (:mod:`unlearn.influence.distributed` replaces it
        on the instance): ``H`` is the mean curvature over this process's ``n`` examples;
        return the mean over all processes' examples. Here: the identity."""
        return H

    # ----------------------------------------------------------------- solving
    def _after_load(self) -> None:
        """Factorise ``H + λI`` (Cholesky), or eigendecompose where eigenvalues are needed;
        files saved before the Cholesky path (eigenvalues and eigenvectors only) load too."""
        f = dict(self.factors)
        dtype = next(iter(f.values())).dtype if f else torch.float64
        self._chol: Tensor | None = None
        if "curvature" not in f:
            if not {"eigenvalues", "eigenvectors"} <= f.keys():
                raise ValueError("saved ExactInfluence factors need 'curvature' (or "
                                 "'eigenvalues' and 'eigenvectors')")
            self.factors, self.solver = f, "eigh"
            return
        H = f["curvature"]
        P = self.space.numel
        if tuple(H.shape) != (P, P):
            raise ValueError(f"factor 'curvature' has shape {tuple(H.shape)}, the parameter "
                             f"space needs ({P}, {P}); was it fitted for another model?")

        def eigen() -> tuple[Tensor, Tensor]:
            evals, evecs = torch.linalg.eigh(H.double())
            return evals.to(dtype), evecs.to(dtype)

        self.factors = _Factors(f, eigen)
        if self.damping > 0 and not self.clip_negative:
            A = H.double()
            A = A + self.damping * torch.eye(P, dtype=A.dtype, device=A.device)
            L, info = torch.linalg.cholesky_ex(A)
            if int(info) == 0 and bool(torch.isfinite(L).all()):
                self._chol, self.solver = L, "cholesky"
                return
        self.solver = "eigh"
        self.factors["eigenvalues"]  # noqa: B018 -- decompose now, not on the first query

    def _precondition(self, G: Tensor) -> Tensor:
        if self._chol is not None:
            X = torch.cholesky_solve(G.double().T, self._chol)
            return X.T.to(G.dtype)
        evals = self.factors["eigenvalues"]
        if self.clip_negative:
            evals = evals.clamp_min(0)
        denom = evals + self.damping
        if (denom.abs() < 1e-12).any():
            raise FloatingPointError(
                "H + λI is singular; increase damping or use clip_negative=True")
        V = self.factors["eigenvectors"]
        return ((G @ V) / denom) @ V.T


def _layer_ggn(est: ExactInfluence, loader: DataLoader) -> Tensor | None:
    """The Gauss-Newton matrix (sum over ``loader``, divided by its size) in the flat
    parameter order, assembled from layer hooks; ``None`` where that does not apply
    (a parameter outside Linear / Conv2d layers, a layer called more than once or at
    several positions, an embedding, outputs above ``max_outputs``)."""
    from unlearn.influence.layer_ggn import layer_ggn_factors

    model, task, space = est.model, est.task, est.space
    layers = space_layers(model, space)
    if layers is None or any(layer.diagonal_a for layer in layers):
        return None
    clone = _CLONE.setdefault(model, set())
    sizes = [layer.d_out * layer.d_in for layer in layers]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    P = sum(sizes)
    H: Tensor | None = None
    n = 0
    total = len(loader) if hasattr(loader, "__len__") else None
    for raw in est._bar(iter(loader), "curvature (layers)", total):
        batch = to_model(raw, model)
        check_finite_batch(batch)
        inputs, targets = task.split_batch(batch)
        f = layer_ggn_factors(model, task, layers, inputs, targets, clone, est.max_outputs)
        # the Kronecker blocks below need one call per layer at one position
        if f is None or any(a.shape[1] != 1 for a in f.a):
            return None
        a = {layer.name: x[:, 0] for layer, x in zip(layers, f.a, strict=True)}
        g = f.g  # [B, K, d_out]
        if H is None:
            H = torch.zeros(P, P, dtype=torch.float64, device=f.g[0].device)
        for i, li in enumerate(layers):
            for j in range(i, len(layers)):
                lj = layers[j]
                block = H[offsets[i] : offsets[i] + sizes[i], offsets[j] : offsets[j] + sizes[j]]
                _add_kron_block(block.view(li.d_out, li.d_in, lj.d_out, lj.d_in),
                                g[i], a[li.name], g[j], a[lj.name], same=i == j,
                                dtype=est.build_dtype)
        n += f.g[0].shape[0]
    if H is None or n == 0:
        return None
    for i, li in enumerate(layers):  # the mirrored halves: lower blocks, lower diagonal rows
        rows = slice(offsets[i], offsets[i] + sizes[i])
        diag = H[rows, rows].view(li.d_out, li.d_in, li.d_out, li.d_in)
        for o in range(li.d_out):
            for o2 in range(o + 1, li.d_out):
                diag[o2, :, o, :] = diag[o, :, o2, :].T
        for j in range(i + 1, len(layers)):
            cols = slice(offsets[j], offsets[j] + sizes[j])
            H[cols, rows] = H[rows, cols].T
    H /= n
    # matrix coordinates (layer, row o, column i of [W | b]) -> flat parameter positions
    flat = torch.arange(P, device=H.device).unsqueeze(0).to(torch.float64)
    parts = space.unflatten(flat)
    pos = torch.cat([layer.to_matrix(parts)[0].reshape(-1) for layer in layers]).long()
    inv = torch.empty_like(pos)
    inv[pos] = torch.arange(P, device=pos.device)
    return H[inv][:, inv]


def _add_kron_block(out: Tensor, gi: Tensor, ai: Tensor, gj: Tensor, aj: Tensor, same: bool,
                    dtype: torch.dtype | None) -> None:
    """Add ``Σ_b (Σ_k g_bki g_bkjᵀ) ⊗ (a_bi a_bjᵀ)`` to ``out`` viewed as
    ``[d_out_i, d_in_i, d_out_j, d_in_j]``. For a diagonal block (``same``) only rows
    ``o ≤ o'`` are filled (the caller mirrors them once at the end). ``dtype`` runs the
    GEMMs in another precision (float32: about twice as fast; sums stay float64)."""
    if dtype is not None:
        gi, ai, gj, aj = (t.to(dtype) for t in (gi, ai, gj, aj))
    C = torch.einsum("bko,bkp->bop", gi, gj)  # [B, d_out_i, d_out_j]
    B, do_i, do_j = C.shape
    dj = aj.shape[1]
    aiT = ai.T.contiguous()
    step = max(1, _GEMM_ELEMENTS // max(1, B * dj))
    for o in range(do_i):
        for s in range(o if same else 0, do_j, step):
            e = min(do_j, s + step)
            rhs = (C[:, o, s:e, None] * aj[:, None, :]).reshape(B, -1)  # [B, (e-s)·d_in_j]
            out[o, :, s:e, :] += (aiT @ rhs).reshape(-1, e - s, dj).to(out.dtype)
