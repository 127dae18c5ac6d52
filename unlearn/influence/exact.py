"""Exact influence: the dense curvature matrix, factorised once.

For small models (up to a few thousand parameters): builds the full ``P × P`` Hessian or
Gauss-Newton matrix ``H`` of the mean training loss and applies ``(H + λI)⁻¹``.

Building ``H``: in general column block by column block from curvature-vector products. For
the Gauss-Newton matrix of a model whose parameters all sit in Linear / Conv2d layers used
once per example at one position (logistic regression, MLPs) it is assembled directly from
layer hooks instead: with ``L_b`` a square root of example b's output Hessian, each column k
of ``L_b`` back-propagated gives ``g_bk`` at every layer, and the block between layers l and
m is ``(1/n) Σ_b (Σ_k g_bkl g_bkmᵀ) ⊗ (a_bl a_bmᵀ)``: a few large GEMMs, no per-parameter
passes over the data.

Solving: a float64 Cholesky factorisation of ``H + λI`` (two triangular solves per group of
vectors), since only inverse-HVPs are needed; after a layer-wise build, of its block without
the all-zero rows and null output directions (``1/λ`` there). The eigendecomposition is used
where the eigenvalues matter: ``clip_negative=True``, ``damping=0`` (to detect a singular
system), and when ``H + λI`` is not positive definite (an indefinite Hessian).
``factors["eigenvalues"]`` and ``factors["eigenvectors"]`` stay available: computed on first
access.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from unlearn.influence.base import InfluenceEstimator
from unlearn.influence.ekfac import _stable_eigh
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
    from the stored curvature (the Cholesky path does not need them), and so is the dense
    ``curvature`` itself after a layer-wise build (which keeps only its non-zero block)."""

    def __init__(self, data: dict[str, Tensor], eigen: Callable[[], tuple[Tensor, Tensor]],
                 dense: Callable[[], Tensor] | None = None):
        super().__init__(data)
        self._eigen, self._dense = eigen, dense

    def items(self):  # type: ignore[override]
        # what is iterated (save) includes the dense curvature
        if self._dense is not None:
            self["curvature"]  # noqa: B018
        return super().items()

    def __missing__(self, key: str) -> Tensor:
        if key == "curvature" and self._dense is not None:
            self["curvature"] = self._dense()
            return self["curvature"]
        if key not in ("eigenvalues", "eigenvectors") or (
                "curvature" not in self and self._dense is None):
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
            # across processes the dense matrices are summed: no output rotation there
            local = "_reduce_curvature" not in vars(self)
            built = _layer_ggn(self, train_loader, rotate=local)
            if built is not None and local:
                # keep the built block (rows ``order`` of the flat matrix, or rotated output
                # directions of them) and factorise it directly; the dense matrix is made
                # only when asked for (save, eigh)
                block, order, basis = built
                self.build = "layers"
                P = self.space.numel
                self._set_block(block, order.to(block.device), P, dtype, basis)
                return
            H = None if built is None else _dense(built[0], built[1], self.space.numel)
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
        if self.build == "products":  # the layer build is symmetric by construction
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
        self._chol: Tensor | None = None
        if "curvature" not in f:
            if not {"eigenvalues", "eigenvectors"} <= f.keys():
                raise ValueError("saved ExactInfluence factors need 'curvature' (or "
                                 "'eigenvalues' and 'eigenvectors')")
            self.factors, self.solver = f, "eigh"
            return
        H = f["curvature"]
        dtype = H.dtype
        P = self.space.numel
        if tuple(H.shape) != (P, P):
            raise ValueError(f"factor 'curvature' has shape {tuple(H.shape)}, the parameter "
                             f"space needs ({P}, {P}); was it fitted for another model?")

        def eigen() -> tuple[Tensor, Tensor]:
            evals, evecs = torch.linalg.eigh(H.double())
            return evals.to(dtype), evecs.to(dtype)

        self.factors = _Factors(f, eigen)
        self._rows: Tensor | None = None
        self._basis: _OutputBasis | None = None
        if self.damping > 0 and not self.clip_negative:
            A = H.double()
            order = f.get("order")
            if order is not None:  # the rows the layer build kept, in its order
                rows = order.long().to(A.device)
                A = A[rows.unsqueeze(1), rows]
            else:
                rows = torch.arange(P, device=A.device)
                A = A.clone()
            A, rows = _drop_zero_rows(A, rows)
            if self._factorise(A, rows, P):
                return
        self.solver = "eigh"
        self.factors["eigenvalues"]  # noqa: B018 -- decompose now, not on the first query

    def _set_block(self, block: Tensor, order: Tensor, P: int, dtype: torch.dtype,
                   basis: _OutputBasis | None = None) -> None:
        """After a layer-wise build: ``block`` is the float64 curvature on the flat rows
        ``order`` (every other row and column is zero), or with ``basis`` on the rotated
        output directions of those rows (the directions left out are null)."""
        def dense() -> Tensor:
            if basis is not None:
                return basis.dense(block, P).to(dtype)
            return _dense(block, order, P).to(dtype)

        def eigen() -> tuple[Tensor, Tensor]:
            evals, evecs = torch.linalg.eigh(self.factors["curvature"].double())
            return evals.to(dtype), evecs.to(dtype)

        self._chol, self._rows, self._basis = None, None, None
        self.factors = _Factors({"order": order.cpu()}, eigen, dense)
        if self.damping > 0 and not self.clip_negative:
            if basis is not None:
                rows = torch.arange(block.shape[0], device=block.device)
                A, rows = _drop_zero_rows(block.to(dtype).double(), rows)
                if self._factorise(A, rows, block.shape[0]):
                    self._basis = basis
                    return
            else:
                A, rows = _drop_zero_rows(block.to(dtype).double(), order)
                if self._factorise(A, rows, P):
                    return
        self.solver = "eigh"
        self.factors["eigenvalues"]  # noqa: B018 -- decompose now, not on the first query

    def _factorise(self, A: Tensor, rows: Tensor, P: int) -> bool:
        """Cholesky of ``A + λI`` (``A`` the curvature on the flat ``rows``; its diagonal is
        shifted in place and restored); False where ``A + λI`` is not positive definite."""
        diag = A.diagonal().clone()
        A.diagonal().add_(self.damping)
        L, info = torch.linalg.cholesky_ex(A)
        A.diagonal().copy_(diag)
        # a NaN or inf anywhere in L reaches the diagonal entries of its row
        if int(info) != 0 or not bool(torch.isfinite(L.diagonal()).all()):
            return False
        self._chol, self.solver = L, "cholesky"
        self._rows = None if torch.equal(rows, torch.arange(P, device=rows.device)) else rows
        return True

    def _chol_solve(self, G: Tensor) -> Tensor:
        """Rows of ``G`` times ``(L Lᵀ)⁻¹``: two triangular solves (faster on this CPU than
        ``cholesky_solve``, which copies into column-major order first)."""
        L = self._chol
        assert L is not None
        Y = torch.linalg.solve_triangular(L, G.T, upper=False)
        return torch.linalg.solve_triangular(L.T, Y, upper=True).T

    def _precondition(self, G: Tensor) -> Tensor:
        if self._chol is not None and self._basis is not None:
            # (H + λI)⁻¹ = I/λ + E[(A + λI)⁻¹ − I/λ]Eᵀ, E the block's orthonormal coordinates
            Gd = G.double()
            Z = self._basis.to_block(Gd)
            if self._rows is None:  # no zero row was dropped from the block
                W = self._chol_solve(Z) - Z / self.damping
            else:
                W = torch.zeros_like(Z)
                W[:, self._rows] = (self._chol_solve(Z[:, self._rows])
                                    - Z[:, self._rows] / self.damping)
            return (Gd / self.damping + self._basis.from_block(W, G.shape[1])).to(G.dtype)
        if self._chol is not None:
            if self._rows is None:
                return self._chol_solve(G.double()).to(G.dtype)
            Gd = G.double()
            X = Gd / self.damping
            X[:, self._rows] = self._chol_solve(Gd[:, self._rows])
            return X.to(G.dtype)
        evals = self.factors["eigenvalues"]
        if self.clip_negative:
            evals = evals.clamp_min(0)
        denom = evals + self.damping
        if (denom.abs() < 1e-12).any():
            raise FloatingPointError(
                "H + λI is singular; increase damping or use clip_negative=True")
        V = self.factors["eigenvectors"]
        return ((G @ V) / denom) @ V.T


def _drop_zero_rows(A: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Leave out the all-zero rows and columns of ``A`` (the curvature on the flat ``rows``):
    they decouple, ``(H + λI)⁻¹`` is ``1/λ`` there. Only a zero diagonal entry can start
    an all-zero row."""
    cand = (A.diagonal() == 0).nonzero().squeeze(1)
    zero = cand[(A[cand] == 0).all(dim=1)]
    if not len(zero):
        return A, rows
    keep = torch.ones(A.shape[0], dtype=torch.bool, device=A.device)
    keep[zero] = False
    idx = keep.nonzero().squeeze(1)
    return A[idx.unsqueeze(1), idx], rows[idx]


def _dense(block: Tensor, order: Tensor, P: int) -> Tensor:
    """The ``P × P`` matrix that is ``block`` on rows and columns ``order``, zero elsewhere."""
    out = torch.zeros(P, P, dtype=block.dtype, device=block.device)
    out[order.unsqueeze(1), order.unsqueeze(0)] = block
    return out


def _layer_ggn(est: ExactInfluence, loader: DataLoader, rotate: bool = True
               ) -> tuple[Tensor, Tensor, _OutputBasis | None] | None:
    """The Gauss-Newton matrix (sum over ``loader``, divided by its size), assembled from
    layer hooks, as ``(block, order, basis)``: with ``basis`` None, the matrix on the flat
    parameter rows ``order`` (the others are zero; see :func:`_dense`), else on the rotated
    output directions of those rows (see :class:`_OutputBasis`); ``None`` where that does
    not apply (a parameter outside Linear / Conv2d layers, a layer called more than once or
    at several positions, an embedding, outputs above ``max_outputs``).

    While the batches' factors fit in ``layer_ggn.CACHE_BYTES`` they are all kept and the
    matrix is built once from them, for the layer inputs that are non-zero in some example
    only: a weight whose input is zero for every training example (a border pixel of MNIST)
    has an all-zero row and column, which are left zero without computing them. Likewise
    (with ``rotate``) for the output directions ``u`` of a layer that no example's
    output-gradient factors reach (``Σ_bk (uᵀg_bk)² = 0`` to the factors' precision): every
    ``u ⊗ v`` is then a null direction of the whole matrix. Softmax cross-entropy has one at
    the last layer, the all-ones direction (each example's output Hessian
    ``diag(p) − ppᵀ`` annihilates it): the layer's outputs are rotated onto the others
    (9 of 10 for MNIST), and the rest of ``(H + λI)⁻¹`` is ``1/λ`` there."""
    from unlearn.influence.layer_ggn import CACHE_BYTES, layer_ggn_factors, merge_factors

    model, task, space = est.model, est.task, est.space
    layers = space_layers(model, space)
    if layers is None or any(layer.diagonal_a for layer in layers):
        return None
    clone = _CLONE.setdefault(model, set())
    build = _KronBuild(layers, est.build_dtype, rotate)
    pending: list[Any] | None = []  # every batch's factors, while they fit
    held, n = 0, 0
    total = len(loader) if hasattr(loader, "__len__") else None
    for raw in est._bar(iter(loader), "curvature (layers)", total):
        batch = to_model(raw, model)
        check_finite_batch(batch)
        inputs, targets = task.split_batch(batch)
        f = layer_ggn_factors(model, task, layers, inputs, targets, clone, est.max_outputs)
        # the Kronecker blocks below need one call per layer at one position
        if f is None or any(a.shape[1] != 1 for a in f.a):
            return None
        n += f.g[0].shape[0]
        if pending is not None:
            pending.append(f)
            held += f.nbytes
            if held <= CACHE_BYTES:
                continue
            for p in pending:  # too much to hold: stream, with every input column
                build.add(p, None)
            pending = None
        else:
            build.add(f, None)
    if pending:
        (f,) = merge_factors(pending)  # one batch: fewer, larger GEMMs
        build.add(f, [(a[:, 0] != 0).any(dim=0) for a in f.a])
    if build.H is None or n == 0:
        return None
    return build.finish(space, n)


class _OutputBasis:
    """Coordinates of a layer-wise build with rotated outputs: layer l's rows of the block
    are its ``r_l`` output directions ``rot[l]`` (``[d_out, r_l]``, orthonormal columns;
    ``None``: all outputs, unrotated) times its kept inputs, whose flat parameter positions
    are ``pos[l]`` (``[d_out, d_in_l]``). The map from block to flat coordinates ``E`` has
    orthonormal columns."""

    def __init__(self, pos: list[Tensor], rot: list[Tensor | None]) -> None:
        self.pos, self.rot = pos, rot

    def to_block(self, G: Tensor) -> Tensor:
        """Rows of ``G`` ``[q, P]`` in block coordinates ``[q, m]`` (``G E``)."""
        parts = []
        for pos, rot in zip(self.pos, self.rot, strict=True):
            x = G[:, pos]  # [q, d_out, d_in_l]
            if rot is not None:
                x = torch.einsum("qoi,or->qri", x, rot.to(G.dtype))
            parts.append(x.reshape(G.shape[0], -1))
        return torch.cat(parts, dim=1)

    def from_block(self, Z: Tensor, P: int) -> Tensor:
        """Rows of ``Z`` ``[q, m]`` in flat coordinates ``[q, P]`` (zero off the block)."""
        out = Z.new_zeros(Z.shape[0], P)
        s = 0
        for pos, rot in zip(self.pos, self.rot, strict=True):
            r = pos.shape[0] if rot is None else rot.shape[1]
            x = Z[:, s : s + r * pos.shape[1]].reshape(Z.shape[0], r, pos.shape[1])
            s += r * pos.shape[1]
            if rot is not None:
                x = torch.einsum("qri,or->qoi", x, rot.to(Z.dtype))
            out[:, pos] = x
        return out

    def dense(self, block: Tensor, P: int) -> Tensor:
        """The ``P × P`` matrix ``E · block · Eᵀ``."""
        half = self.from_block(block, P)  # block is symmetric: rows E·block
        return self.from_block(half.T.contiguous(), P)


class _KronBuild:
    """Upper Kronecker blocks ``Σ_b (Σ_k g_bk g_bkᵀ) ⊗ a_b a_bᵀ`` of the layer-wise
    Gauss-Newton sum, over the kept input columns of each layer (all, or the non-zero ones,
    fixed by the first ``add``) and, with ``rotate`` and a first ``add`` over all the data
    (``keep`` given), over the output directions its ``g`` reach (see :func:`_layer_ggn`)."""

    def __init__(self, layers: list[Any], dtype: torch.dtype | None, rotate: bool) -> None:
        self.layers, self.dtype, self.rotate = layers, dtype, rotate
        self.H: Tensor | None = None
        self.cols: list[Tensor] = []  # kept input columns per layer
        self.rot: list[Tensor | None] = [None] * len(layers)  # kept output directions
        self.dout: list[int] = [layer.d_out for layer in layers]

    def add(self, f: Any, keep: list[Tensor] | None) -> None:
        layers = self.layers
        if self.H is None:
            self.cols = [torch.arange(layer.d_in, device=a.device) if keep is None
                         else k.nonzero().squeeze(1)
                         for layer, a, k in zip(layers, f.a, keep or [None] * len(layers),
                                                strict=True)]
            if keep is not None and self.rotate:
                self.rot = [_reached_outputs(g) for g in f.g]
                self.dout = [d if u is None else u.shape[1]
                             for d, u in zip(self.dout, self.rot, strict=True)]
            size = sum(d * len(c) for d, c in zip(self.dout, self.cols, strict=True))
            self.H = torch.zeros(size, size, dtype=torch.float64, device=f.g[0].device)
        a = [x[:, 0, c] for x, c in zip(f.a, self.cols, strict=True)]
        g = [x if u is None else x @ u.to(x.dtype) for x, u in zip(f.g, self.rot, strict=True)]
        din, dout = [len(c) for c in self.cols], self.dout
        sizes = [do * d for do, d in zip(dout, din, strict=True)]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        for i in range(len(layers)):
            for j in range(i, len(layers)):
                block = self.H[offsets[i] : offsets[i] + sizes[i],
                               offsets[j] : offsets[j] + sizes[j]]
                _add_kron_block(block.view(dout[i], din[i], dout[j], din[j]),
                                g[i], a[i], g[j], a[j], same=i == j, dtype=self.dtype)

    def finish(self, space: Any, n: int) -> tuple[Tensor, Tensor, _OutputBasis | None]:
        """Mirror the lower halves and divide by ``n``; return the block with the flat
        parameter positions of its (unrotated) rows and, where outputs were rotated, the
        block's coordinates."""
        H, layers = self.H, self.layers
        assert H is not None
        din, dout = [len(c) for c in self.cols], self.dout
        sizes = [do * d for do, d in zip(dout, din, strict=True)]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        for i in range(len(layers)):  # lower blocks, lower diagonal rows
            rows = slice(offsets[i], offsets[i] + sizes[i])
            diag = H[rows, rows].view(dout[i], din[i], dout[i], din[i])
            for o in range(dout[i]):
                for o2 in range(o + 1, dout[i]):
                    diag[o2, :, o, :] = diag[o, :, o2, :].T
            for j in range(i + 1, len(layers)):
                cols = slice(offsets[j], offsets[j] + sizes[j])
                H[cols, rows] = H[rows, cols].T
        H /= n
        # kept matrix coordinates (layer, row o, kept column i of [W | b]) -> flat positions
        P = space.numel
        flat = torch.arange(P, device=H.device).unsqueeze(0).to(torch.float64)
        parts = space.unflatten(flat)
        pos = [layer.to_matrix(parts)[0][:, c].long()
               for layer, c in zip(layers, self.cols, strict=True)]
        order = torch.cat([p.reshape(-1) for p in pos])
        if all(u is None for u in self.rot):
            return H, order, None
        return H, order, _OutputBasis(pos, self.rot)


def _reached_outputs(g: Tensor) -> Tensor | None:
    """Orthonormal columns spanning the output directions that the factors ``g``
    ``[B, K, d_out]`` of all examples reach, or ``None`` where that is all of them: an
    eigenvalue of ``Σ_bk g_bk g_bkᵀ`` at or below ``max · d_out · eps`` (the precision
    ``g`` was computed in) counts as zero."""
    gd = g.reshape(-1, g.shape[-1]).double()
    S = gd.T @ gd
    evals, evecs = _stable_eigh(S, "output-gradient")
    keep = evals > float(evals.max()) * S.shape[0] * torch.finfo(g.dtype).eps
    if bool(keep.all()) or not bool(keep.any()):
        return None
    return evecs[:, keep]


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
