"""The influence-estimator protocol and the shared streaming score computation.

Score convention (see docs/design.md): ``scores[q, i]`` predicts
``loss_q(θ without i) − loss_q(θ)``, i.e. ``(1/n) ∇ℓ_qᵀ (H + λI)⁻¹ ∇ℓ_i`` with H the
curvature of the *mean* training loss, n the number of training examples and λ the damping.
Positive: example i helped query q.

A subclass implements two things: ``_fit(train_loader)`` (build whatever curvature model it
uses) and ``_precondition(G)`` (apply ``(H + λI)⁻¹`` to the rows of ``G[k, P]``). Scores,
self-influence, query batching, top-k streaming, progress and saving live here, once.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from unlearn.influence.grads import (
    ParamSpace,
    all_finite,
    check_loader,
    iter_grads,
    model_dtype_device,
)
from unlearn.tasks import Task

FORMAT_VERSION = 1


class NotFittedError(RuntimeError):
    pass


class InfluenceEstimator:
    """Base class of every estimator. See the module docstring for the contract.

    Args:
        model: a ``torch.nn.Module`` (a LightningModule works too), in its trained state.
        task: how the per-sample loss is computed.
        damping: λ added to the curvature; equal to the L2 strength of a convex model's
            objective ``mean loss + λ/2 ||θ||²`` this reproduces leave-one-out retraining.
        params: names of the parameters to compute influence over (default: all trainable).
        query_rank: if set, each query's preconditioned gradient is stored as a rank-r
            approximation per weight matrix (query batching, as in the EK-FAC-for-LLMs paper),
            which cuts the memory held for many queries.
        progress: show progress bars on long loops.
    """

    #: names of tensors in ``self.factors`` that ``save``/``load`` keep
    name: ClassVar[str] = "base"
    #: whether ``inverse_hvp`` applies an approximation of ``(H + λI)⁻¹`` (False for the
    #: first-order and trajectory estimators): what Newton removal and IAU's preconditioned
    #: step need
    inverts_curvature: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        damping: float = 1e-3,
        *,
        params: Sequence[str] | None = None,
        query_rank: int | None = None,
        progress: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model)}")
        if not isinstance(task, Task):
            raise TypeError(f"task must be an unlearn.tasks.Task, got {type(task)}")
        if not (isinstance(damping, (int, float)) and damping >= 0 and np.isfinite(damping)):
            raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
        if query_rank is not None and query_rank < 1:
            raise ValueError(f"query_rank must be a positive integer, got {query_rank}")
        self.model = model
        self.task = task
        self.damping = float(damping)
        self.space = ParamSpace.of(model, params)
        self.query_rank = query_rank
        self.progress = progress
        self.n_train: int | None = None
        self.factors: dict[str, Tensor] = {}
        _check_finite_weights(model, self.space)

    # ----------------------------------------------------------------- to implement
    def _fit(self, train_loader: DataLoader) -> None:
        """Build the curvature model from the training data (may be a no-op)."""

    def _precondition(self, G: Tensor) -> Tensor:
        """Apply ``(H + λI)⁻¹`` to each row of ``G[k, P]``."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Constructor arguments (besides model and task) that ``load`` needs."""
        return {"damping": self.damping, "params": list(self.space.names)}

    def _transform(self, G: Tensor) -> Tensor:
        """Map raw per-sample gradients ``G[B, P]`` (query and train alike) before scoring;
        the identity by default (the cosine estimator normalises rows here)."""
        return G

    def _score_scale(self) -> float:
        """Factor applied to every score; ``1/n`` by default (the leave-one-out scale)."""
        return 1.0 / self.n_train

    # ----------------------------------------------------------------- public protocol
    def fit(self, train_loader: DataLoader) -> InfluenceEstimator:
        """Fit on the data the model was trained on; records ``n_train`` for the 1/n scale."""
        check_loader(train_loader, "train_loader", ordered=False)
        n_train = len(train_loader.dataset)  # type: ignore[arg-type]
        self.n_train = None  # a failed fit must not leave the estimator looking fitted
        self.model.eval()
        self._fit(train_loader)
        self.n_train = n_train
        return self

    def inverse_hvp(self, vector: Tensor | dict[str, Tensor]) -> Tensor | dict[str, Tensor]:
        """``(H + λI)⁻¹ v`` for a flat vector ``[P]``, a batch ``[k, P]`` or a dict of
        parameter-shaped tensors (returned in the same form)."""
        self._require_fitted()
        if isinstance(vector, dict):
            flat = self.space.flatten(self._check_param_dict(vector))
            return self.space.unflatten(self.inverse_hvp(flat))
        if not isinstance(vector, Tensor):
            raise TypeError(f"inverse_hvp expects a Tensor or a dict of them, got {type(vector)}")
        dtype, device = model_dtype_device(self.model)
        v = vector.to(device=device, dtype=dtype)
        if v.dim() not in (1, 2) or v.shape[-1] != self.space.numel:
            raise ValueError(
                f"inverse_hvp expects a vector of {self.space.numel} entries (or [k, "
                f"{self.space.numel}]), got shape {tuple(vector.shape)}"
            )
        if not all_finite(v):
            raise ValueError("inverse_hvp got a vector with NaN or inf entries")
        return self._precondition(v.unsqueeze(0))[0] if v.dim() == 1 else self._precondition(v)

    def scores(
        self,
        query_loader: DataLoader,
        train_loader: DataLoader,
        *,
        top_k: int | None = None,
        out: str | os.PathLike | None = None,
    ) -> Tensor | tuple[Tensor, Tensor] | np.memmap:
        """Influence of every training example on every query, ``[n_query, n_train]``.

        Columns follow ``train_loader``'s order. Train gradients are streamed in batches.
        ``top_k=k`` keeps only the k largest (most helpful) scores per query and returns
        ``(values, column_indices)``; ``out=path.npy`` streams the full matrix to a
        memory-mapped ``.npy`` file instead of holding it in memory, and returns the memmap.
        """
        self._check_scores_call(query_loader, train_loader, top_k, out)
        queries = self._preconditioned_queries(query_loader)
        n_query = queries.n
        n_cols = len(train_loader.dataset)  # type: ignore[arg-type]
        sink = _ScoreSink(n_query, n_cols, top_k, out, queries.dtype)
        col, scale = 0, self._score_scale()
        try:
            for G in self._train_grads(train_loader, "scoring"):
                _check_count("train_loader", col + G.shape[0], n_cols, at_most=True)
                sink.add(col, queries.dot(self._transform(G)) * scale)
                col += G.shape[0]
            _check_count("train_loader", col, n_cols)
        except BaseException:
            sink.abort()
            raise
        return sink.result()

    def self_influence(self, train_loader: DataLoader) -> Tensor:
        """``(1/n) ∇ℓ_iᵀ (H + λI)⁻¹ ∇ℓ_i`` for every example: how much its own loss would
        rise if it were removed. High values flag mislabeled or atypical examples."""
        self._require_fitted()
        check_loader(train_loader, "train_loader")
        out, scale = [], self._score_scale()
        for G in self._train_grads(train_loader, "self-influence"):
            T = self._transform(G)
            out.append((self._precondition(T) * T).sum(dim=1) * scale)
        result = torch.cat(out)
        n = len(train_loader.dataset)  # type: ignore[arg-type]
        _check_count("train_loader", result.shape[0], n)
        return result

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write factors (safetensors) and config (JSON) to directory ``path`` atomically."""
        self._require_fitted()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            tensors = {k: v.detach().contiguous().cpu() for k, v in self.factors.items()}
            save_file(tensors, str(tmp / "factors.safetensors"))
            meta = {
                "format_version": FORMAT_VERSION,
                "estimator": type(self).__name__,
                "n_train": self.n_train,
                "config": self.config(),
            }
            (tmp / "config.json").write_text(json.dumps(meta, indent=2))
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module, task: Task | None = None, **kw):
        """Rebuild a fitted estimator from ``save``'s directory for ``model``."""
        from unlearn.tasks import ClassificationTask

        path = Path(path)
        cfg_file, fac_file = path / "config.json", path / "factors.safetensors"
        if not cfg_file.exists() or not fac_file.exists():
            raise FileNotFoundError(f"{path} is not a saved estimator (needs {cfg_file.name} and "
                                    f"{fac_file.name})")
        try:
            meta = json.loads(cfg_file.read_text())
            factors = load_file(str(fac_file))
        except Exception as err:  # corrupt JSON or safetensors
            raise ValueError(f"cannot read saved estimator at {path}: {err}") from err
        if not isinstance(meta, dict) or not {"estimator", "n_train", "config"} <= meta.keys():
            raise ValueError(f"{cfg_file} is not an estimator config (needs estimator, n_train "
                             "and config)")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{path} was written by a newer unlearn (format "
                             f"{meta['format_version']} > {FORMAT_VERSION})")
        if meta.get("estimator") != cls.__name__:
            raise ValueError(f"{path} holds a {meta.get('estimator')}, not a {cls.__name__}")
        dtype, device = model_dtype_device(model)
        factors = {k: v.to(device) for k, v in factors.items()}
        est = cls._from_config(model, task or ClassificationTask(), {**meta["config"], **kw},
                               factors)
        est.factors = factors
        est.n_train = int(meta["n_train"])
        est._after_load()
        return est

    @classmethod
    def _from_config(cls, model: nn.Module, task: Task, config: dict[str, Any],
                     factors: dict[str, Tensor]) -> InfluenceEstimator:
        """Construct for ``load``; subclasses whose constructor needs saved tensors override."""
        return cls(model, task, **config)

    def _after_load(self) -> None:
        """Hook for subclasses that derive state from ``self.factors``."""

    # ----------------------------------------------------------------- helpers
    def _check_scores_call(self, query_loader: DataLoader, train_loader: DataLoader,
                           top_k: int | None, out: Any) -> None:
        """What every ``scores`` checks first: fitted, ordered loaders, one output mode."""
        self._require_fitted()
        check_loader(query_loader, "query_loader")
        check_loader(train_loader, "train_loader")
        if top_k is not None and out is not None:
            raise ValueError("choose one of top_k and out, not both")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")

    def _require_fitted(self) -> None:
        if self.n_train is None:
            raise NotFittedError(f"{type(self).__name__} is not fitted: call fit(train_loader)")

    def _bar(self, it: Iterator, desc: str, total: int | None = None) -> Iterator:
        if not self.progress:
            return it
        return tqdm(it, desc=f"{type(self).__name__}: {desc}", total=total, leave=False)

    def _train_grads(self, loader: DataLoader, desc: str) -> Iterator[Tensor]:
        total = len(loader) if hasattr(loader, "__len__") else None
        return iter_grads(
            self.model,
            self.task,
            loader,
            self.space,
            progress=lambda it: self._bar(it, desc, total),
        )

    def _preconditioned_queries(self, query_loader: DataLoader) -> _QueryStore:
        store = _QueryStore(self.space, self.query_rank)
        grads = iter_grads(
            self.model,
            self.task,
            query_loader,
            self.space,
            query=True,
            progress=lambda it: self._bar(it, "queries", len(query_loader)),
        )
        # query batches are preconditioned together up to _QUERY_GROUP_ELEMENTS: solvers
        # with many right-hand sides at once (Exact's triangular solves) run faster
        pending: list[Tensor] = []
        held = 0
        for G in grads:
            pending.append(self._transform(G))
            held += pending[-1].numel()
            if held >= _QUERY_GROUP_ELEMENTS:
                store.add(self._precondition(torch.cat(pending)))
                pending, held = [], 0
        if pending:
            store.add(self._precondition(torch.cat(pending)))
        return store

    def _check_param_dict(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Parameter-shaped tensors for every name in the space, with clear errors."""
        missing = [n for n in self.space.names if n not in tensors]
        if missing:
            raise ValueError(f"inverse_hvp dict lacks parameters {missing[:5]}")
        for n, shape in zip(self.space.names, self.space.shapes, strict=True):
            if tuple(tensors[n].shape) != tuple(shape):
                raise ValueError(f"inverse_hvp dict entry {n!r} has shape "
                                 f"{tuple(tensors[n].shape)}, the parameter has {tuple(shape)}")
        dtype, device = model_dtype_device(self.model)
        return {n: tensors[n].to(device=device, dtype=dtype) for n in self.space.names}


def check_inverts_curvature(estimator: InfluenceEstimator) -> None:
    """Refuse an estimator whose ``inverse_hvp`` is no inverse curvature (a Newton step or a
    preconditioned forget step with it would be meaningless)."""
    if not estimator.inverts_curvature:
        raise ValueError(
            f"{type(estimator).__name__} has no inverse curvature (its inverse_hvp is not "
            "(H + λI)⁻¹); use one of Exact, CG, LiSSA, Arnoldi, K-FAC or EK-FAC")


def _check_count(what: str, got: int, expected: int, at_most: bool = False) -> None:
    """The loader must yield each example of its dataset exactly once (no drop_last, no
    sampler that skips or repeats examples): score columns are dataset positions."""
    if got > expected or (not at_most and got != expected):
        raise ValueError(
            f"{what} yielded {'more than ' if got > expected else ''}"
            f"{expected if got > expected else got} examples but its dataset has {expected}; "
            "score columns follow the dataset, so use drop_last=False and a sampler that "
            "visits every example once"
        )


def _check_finite_weights(model: nn.Module, space: ParamSpace) -> None:
    for n, p in space.params(model).items():
        if not torch.isfinite(p).all():
            raise ValueError(f"model parameter {n!r} contains NaN or inf")


#: query gradients (entries) preconditioned in one call
_QUERY_GROUP_ELEMENTS = 1 << 22


class _QueryStore:
    """Preconditioned query gradients, dense or as per-matrix rank-r factors."""

    def __init__(self, space: ParamSpace, rank: int | None) -> None:
        self.space, self.rank = space, rank
        self.dense: list[Tensor] = []
        self.lowrank: list[dict[str, tuple[Tensor, Tensor] | Tensor]] = []
        self.n = 0
        self.dtype = torch.float32

    def add(self, Q: Tensor) -> None:
        self.n += Q.shape[0]
        self.dtype = Q.dtype
        if self.rank is None:
            self.dense.append(Q)
            return
        parts: dict[str, tuple[Tensor, Tensor] | Tensor] = {}
        for name, t in self.space.unflatten(Q).items():
            mat = t.reshape(t.shape[0], t.shape[1], -1) if t.dim() >= 3 else None
            if mat is None or min(mat.shape[1:]) <= self.rank:
                parts[name] = t.reshape(t.shape[0], -1)
                continue
            U, S, Vh = torch.linalg.svd(mat, full_matrices=False)
            r = self.rank
            parts[name] = (U[:, :, :r] * S[:, None, :r], Vh[:, :r, :])
        self.lowrank.append(parts)

    def dot(self, G: Tensor) -> Tensor:
        """Scores block ``[n_query, B]`` = queries · G[B, P]ᵀ."""
        if self.rank is None:
            return torch.cat([Q @ G.T for Q in self.dense])
        train = self.space.unflatten(G)
        blocks = []
        for parts in self.lowrank:
            total = 0
            for name, part in parts.items():
                g = train[name]
                if isinstance(part, Tensor):
                    total = total + part @ g.reshape(g.shape[0], -1).T
                else:
                    US, Vh = part  # [q, m, r], [q, r, d]
                    gm = g.reshape(g.shape[0], g.shape[1], -1)  # [B, m, d]
                    # sum_ij (US Vh)_ij g_ij = sum_r US[:, :, r] · (g Vh[r]ᵀ)
                    proj = torch.einsum("bmd,qrd->qbmr", gm, Vh)
                    total = total + torch.einsum("qbmr,qmr->qb", proj, US)
            blocks.append(total)
        return torch.cat(blocks)


class _ScoreSink:
    """Collects score blocks into a dense tensor, a running top-k, or a .npy memmap."""

    def __init__(self, rows: int, cols: int, top_k: int | None, out: Any, dtype: torch.dtype):
        self.top_k, self.out = top_k, out
        if top_k is not None:
            if top_k < 1:
                raise ValueError(f"top_k must be >= 1, got {top_k}")
            self.values = torch.full((rows, 0), float("-inf"), dtype=dtype)
            self.index = torch.zeros((rows, 0), dtype=torch.long)
        elif out is not None:
            self.path = Path(out)
            self.tmp = self.path.with_name(self.path.name + ".partial.npy")
            np_dtype = np.float64 if dtype == torch.float64 else np.float32
            self.mm = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np_dtype,
                                                shape=(rows, cols))
        else:
            self.dense = torch.empty((rows, cols), dtype=dtype)

    def add(self, col: int, block: Tensor) -> None:
        block = block.detach().cpu()
        if self.top_k is not None:
            idx = torch.arange(col, col + block.shape[1]).expand(block.shape[0], -1)
            vals = torch.cat([self.values, block], dim=1)
            ids = torch.cat([self.index, idx], dim=1)
            k = min(self.top_k, vals.shape[1])
            self.values, pos = vals.topk(k, dim=1)
            self.index = ids.gather(1, pos)
        elif self.out is not None:
            self.mm[:, col : col + block.shape[1]] = block.numpy()
        else:
            self.dense[:, col : col + block.shape[1]] = block

    def abort(self) -> None:
        """Drop a half-written ``.npy`` so that nothing partial is left on disk."""
        if self.top_k is None and self.out is not None:
            del self.mm
            self.tmp.unlink(missing_ok=True)

    def result(self):
        if self.top_k is not None:
            return self.values, self.index
        if self.out is not None:
            self.mm.flush()
            del self.mm
            os.replace(self.tmp, self.path)
            return np.load(self.path, mmap_mode="r")
        return self.dense
