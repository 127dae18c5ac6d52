"""Check influence scores against the truth: leave-one-out retraining, the linear datamodeling
score (LDS) and mislabel detection.

These live beside the estimators they judge. Every function takes the same score convention
as the estimators (``scores[q, i]`` predicts ``loss_q(θ without i) − loss_q(θ)``; columns are
positions in the training data set) and measures it against models that were really
retrained.

* :func:`leave_one_out` retrains without each removed example with a user-supplied
  ``train_fn(dataset, init_model_or_None) -> model`` and returns the true loss changes;
  :func:`leave_one_out_lbfgs` does it for convex L2-regularised models with warm-started
  L-BFGS (the setting where influence functions should be exact).
* :func:`linear_datamodeling_score` (Park et al., TRAK, 2023) retrains on random subsets and
  asks, per query, whether the scores rank the subsets' losses correctly (Spearman). The
  retrained losses are the expensive part; :func:`subset_query_losses` computes them once,
  caches them to an ``.npz`` file (resumable) and every estimator reuses them through
  :func:`lds_from_losses`.
* :func:`mislabel_detection_curve` ranks training examples by self-influence and reports how
  many flipped labels are found after inspecting each fraction of the data.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from unlearn.data import IndexedDataset
from unlearn.influence.grads import to_model
from unlearn.tasks import Task

__all__ = [
    "TrainFn",
    "DetectionCurve",
    "query_losses",
    "subset_of",
    "leave_one_out",
    "leave_one_out_lbfgs",
    "lds_subsets",
    "subset_query_losses",
    "lds_from_losses",
    "linear_datamodeling_score",
    "mislabel_detection_curve",
    "found_at",
    "mislabel_auc",
]

#: ``train_fn(dataset, init_model_or_None) -> trained model``. It must not modify ``init``
#: (it receives a private copy anyway). If it accepts a ``seed`` keyword, the seed is passed.
TrainFn = Callable[..., nn.Module]

_BATCH = 1024


# ---------------------------------------------------------------------------- helpers


def _loader(dataset: Dataset, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def _length(dataset: Dataset, what: str) -> int:
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError as err:
        raise TypeError(f"{what} must be a map-style data set with a length") from err
    if n == 0:
        raise ValueError(f"{what} is empty")
    return n


def query_losses(
    model: nn.Module, task: Task, query_dataset: Dataset, batch_size: int = _BATCH
) -> Tensor:
    """``task.query_loss`` of every query example under ``model``, ``[n_query]`` float64."""
    _length(query_dataset, "query_dataset")
    model.eval()
    out = []
    with torch.no_grad():
        for batch in _loader(query_dataset, batch_size):
            inputs, targets = task.split_batch(to_model(batch, model))
            out.append(task.query_loss(task.forward(model, inputs), targets).double().cpu())
    losses = torch.cat(out)
    if not torch.isfinite(losses).all():
        raise FloatingPointError("query losses contain NaN or inf: the trained model diverged")
    return losses


def subset_of(dataset: Dataset, positions: Sequence[int] | np.ndarray | Tensor) -> Dataset:
    """The examples at ``positions`` (rows of ``dataset``, in the given order), keeping sample
    ids when ``dataset`` is an :class:`~unlearn.data.IndexedDataset`."""
    pos = [int(p) for p in np.asarray(positions).reshape(-1)]
    if isinstance(dataset, IndexedDataset):
        return dataset.subset(dataset.ids[pos])
    return Subset(dataset, pos)


def _positions(removed: Any, n: int, what: str = "removed") -> list[int]:
    arr = np.asarray(removed.cpu() if isinstance(removed, Tensor) else removed).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{what} is empty: give at least one training position")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} must be integer positions in the training set, got {arr.dtype}")
    bad = arr[(arr < 0) | (arr >= n)]
    if bad.size:
        raise ValueError(f"{what} holds position {int(bad[0])}, outside 0..{n - 1}")
    if len(set(arr.tolist())) != arr.size:
        raise ValueError(f"{what} contains duplicate positions")
    return [int(v) for v in arr]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _call_train(train_fn: TrainFn, dataset: Dataset, init: nn.Module | None,
                seed: int | None) -> nn.Module:
    """Call ``train_fn`` on a private copy of ``init``, seeding the global RNGs."""
    if seed is not None:
        _seed_everything(seed)
    init_copy = copy.deepcopy(init) if init is not None else None
    takes_seed = "seed" in inspect.signature(train_fn).parameters
    model = train_fn(dataset, init_copy, seed=seed) if takes_seed else train_fn(dataset, init_copy)
    if not isinstance(model, nn.Module):
        raise TypeError(f"train_fn must return a torch.nn.Module, got {type(model)}")
    return model


# ---------------------------------------------------------------------------- leave-one-out


def leave_one_out(
    train_fn: TrainFn,
    train_dataset: Dataset,
    query_dataset: Dataset,
    removed: Sequence[int] | Tensor | np.ndarray,
    *,
    task: Task,
    model: nn.Module | None = None,
    warm_start: bool = True,
    seed: int | None = None,
    batch_size: int = _BATCH,
    progress: bool = True,
) -> Tensor:
    """True effect of removing each training example: ``[n_query, len(removed)]`` with entry
    ``loss_q(θ without i) − loss_q(θ)``, the quantity ``scores[:, removed]`` predicts.

    ``removed`` are positions in ``train_dataset`` (score columns). ``model`` is the model
    trained on all of ``train_dataset``; if omitted it is trained with
    ``train_fn(train_dataset, None)``. Each retrain calls
    ``train_fn(train_dataset without i, model if warm_start else None)``.
    """
    n = _length(train_dataset, "train_dataset")
    pos = _positions(removed, n)
    if model is None:
        model = _call_train(train_fn, train_dataset, None, seed)
    base = query_losses(model, task, query_dataset, batch_size)
    out = torch.empty(base.shape[0], len(pos), dtype=torch.float64)
    bar = tqdm(pos, desc="leave-one-out", disable=not progress, leave=False)
    for j, p in enumerate(bar):
        keep = [k for k in range(n) if k != p]
        retrained = _call_train(train_fn, subset_of(train_dataset, keep),
                                model if warm_start else None, seed)
        out[:, j] = query_losses(retrained, task, query_dataset, batch_size) - base
    return out


def leave_one_out_lbfgs(
    model: nn.Module,
    task: Task,
    train_dataset: Dataset,
    query_dataset: Dataset,
    removed: Sequence[int] | Tensor | np.ndarray,
    l2: float,
    *,
    batch_size: int = _BATCH,
    max_iter: int = 500,
    tol: float = 1e-10,
    progress: bool = True,
) -> Tensor:
    """Leave-one-out for a convex model trained on ``mean loss + l2/2 ||θ||²``.

    First re-converges a copy of ``model`` on all of ``train_dataset`` (so the baseline is at
    the optimum to ``tol``), then retrains without each example with
    :func:`unlearn.training.train_lbfgs`, warm-started from that baseline and with
    ``normalizer = n`` (removal as the ε = −1/n perturbation influence functions linearise).
    Use float64 models: float32 cannot resolve the tiny loss changes of one removal.
    ``model`` itself is not modified.
    """
    from unlearn.training import train_lbfgs

    if not (l2 >= 0 and np.isfinite(l2)):
        raise ValueError(f"l2 must be a finite number >= 0, got {l2!r}")
    n = _length(train_dataset, "train_dataset")

    def train_fn(dataset: Dataset, init: nn.Module | None) -> nn.Module:
        start = init if init is not None else copy.deepcopy(model)
        return train_lbfgs(start, task, _loader(dataset, batch_size), l2, normalizer=n,
                           max_iter=max_iter, tol=tol)

    return leave_one_out(train_fn, train_dataset, query_dataset, removed, task=task,
                         batch_size=batch_size, progress=progress)


# ---------------------------------------------------------------------------- LDS


def lds_subsets(n_train: int, n_subsets: int = 50, fraction: float = 0.5, seed: int = 0) -> Tensor:
    """``[n_subsets, round(fraction·n_train)]`` sorted training positions, one row per subset,
    drawn without replacement from a fixed-seed generator."""
    if n_train < 2:
        raise ValueError(f"LDS needs at least 2 training examples, got {n_train}")
    if n_subsets < 3:
        raise ValueError(f"n_subsets must be at least 3 for a rank correlation, got {n_subsets}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie strictly between 0 and 1, got {fraction}")
    k = int(round(fraction * n_train))
    if not 0 < k < n_train:
        raise ValueError(f"fraction={fraction} of {n_train} examples leaves an empty subset "
                         "or its complement")
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(n_train, generator=g)[:k].sort().values for _ in range(n_subsets)]
    return torch.stack(rows)


class _LossCache:
    """The retrained query losses of each (seed, subset), in an ``.npz`` written atomically
    after every retrain so an interrupted run resumes where it stopped."""

    def __init__(self, path: str | os.PathLike | None, subsets: np.ndarray, n_query: int,
                 meta: dict[str, Any] | None) -> None:
        self.path = Path(path) if path is not None else None
        self.subsets, self.n_query = subsets, n_query
        self.meta = json.dumps(meta or {}, sort_keys=True)
        self.arrays: dict[str, np.ndarray] = {}
        if self.path is not None and self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            with np.load(self.path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except Exception as err:
            raise ValueError(f"cannot read the LDS cache {self.path}: {err}") from err
        cached = arrays.get("subsets")
        if cached is None or cached.shape != self.subsets.shape or not np.array_equal(
                cached, self.subsets):
            raise ValueError(
                f"the LDS cache {self.path} was made with other subsets (shape "
                f"{None if cached is None else cached.shape} vs {self.subsets.shape}, or other "
                "indices: n_train, n_subsets, fraction or subset_seed changed); delete it or "
                "pass another cache path")
        meta = str(arrays.get("meta", np.array("{}")))
        if meta != self.meta:
            raise ValueError(f"the LDS cache {self.path} was made with meta {meta}, not "
                             f"{self.meta}; delete it or pass another cache path")
        for k, v in arrays.items():
            if k.startswith("losses_") and v.shape[1] != self.n_query:
                raise ValueError(f"the LDS cache {self.path} holds {v.shape[1]} queries, "
                                 f"not {self.n_query}")
        self.arrays = arrays

    def losses(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        key = f"losses_{seed}"
        if key not in self.arrays:
            self.arrays[key] = np.full((len(self.subsets), self.n_query), np.nan)
            self.arrays[f"done_{seed}"] = np.zeros(len(self.subsets), dtype=bool)
        return self.arrays[key], self.arrays[f"done_{seed}"]

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".partial.npz")
        arrays = {**self.arrays, "subsets": self.subsets, "meta": np.array(self.meta)}
        np.savez(tmp, **arrays)
        os.replace(tmp, self.path)


def subset_query_losses(
    train_fn: TrainFn,
    train_dataset: Dataset,
    query_dataset: Dataset,
    task: Task,
    subsets: Tensor | np.ndarray,
    seeds: Sequence[int] = (0,),
    *,
    init_model: nn.Module | None = None,
    cache: str | os.PathLike | None = None,
    meta: dict[str, Any] | None = None,
    batch_size: int = _BATCH,
    progress: bool = True,
) -> Tensor:
    """Query losses of models retrained on each subset, averaged over ``seeds``:
    ``[n_subsets, n_query]`` float64.

    Each model is ``train_fn(subset, copy of init_model or None)`` with the global RNGs
    seeded (and ``seed=`` passed if ``train_fn`` accepts it). With ``cache=path.npz`` the
    per-seed losses are stored with the subset indices and ``meta`` (a JSON-able description
    of the training setup); a rerun reuses what is there, and refuses a cache made with other
    subsets or meta.
    """
    n = _length(train_dataset, "train_dataset")
    n_query = _length(query_dataset, "query_dataset")
    subs = np.asarray(subsets.cpu() if isinstance(subsets, Tensor) else subsets, dtype=np.int64)
    if subs.ndim != 2 or subs.shape[0] < 1:
        raise ValueError(f"subsets must be [n_subsets, k] positions, got shape {subs.shape}")
    _positions(subs[0], n, "subsets[0]")
    if subs.min() < 0 or subs.max() >= n:
        raise ValueError(f"subsets hold positions outside 0..{n - 1}")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct integers, got {seeds}")
    store = _LossCache(cache, subs, n_query, meta)
    todo = [(s, m) for s in seeds for m in range(len(subs)) if not store.losses(s)[1][m]]
    bar = tqdm(todo, desc="LDS retraining", disable=not progress or not todo, leave=False)
    for seed, m in bar:
        model = _call_train(train_fn, subset_of(train_dataset, subs[m]), init_model, seed)
        losses, done = store.losses(seed)
        losses[m] = query_losses(model, task, query_dataset, batch_size).numpy()
        done[m] = True
        store.save()
    return torch.from_numpy(np.mean([store.losses(s)[0] for s in seeds], axis=0))


def _check_scores(scores: Tensor | np.ndarray, n_query: int | None, n_train: int | None,
                  what: str = "scores") -> np.ndarray:
    s = np.asarray(scores.detach().cpu() if isinstance(scores, Tensor) else scores,
                   dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"{what} must be [n_query, n_train], got shape {s.shape}")
    if n_query is not None and s.shape[0] != n_query:
        raise ValueError(f"{what} has {s.shape[0]} query rows but there are {n_query} queries")
    if n_train is not None and s.shape[1] != n_train:
        raise ValueError(f"{what} has {s.shape[1]} columns but the training set has {n_train}")
    if not np.isfinite(s).all():
        bad = np.argwhere(~np.isfinite(s))[0]
        raise ValueError(f"{what} contains NaN or inf (first at [{bad[0]}, {bad[1]}])")
    return s


def _spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation between matching columns of ``a`` and ``b`` ([m, q] each);
    NaN where a column is constant."""
    ra = rankdata(a, axis=0)
    rb = rankdata(b, axis=0)
    ra -= ra.mean(axis=0)
    rb -= rb.mean(axis=0)
    denom = np.sqrt((ra**2).sum(axis=0) * (rb**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (ra * rb).sum(axis=0) / denom, np.nan)


def lds_from_losses(
    scores: Tensor | np.ndarray, subsets: Tensor | np.ndarray, losses: Tensor | np.ndarray
) -> dict[str, Any]:
    """LDS from precomputed retrained losses ``[n_subsets, n_query]``.

    The scores' linear datamodel predicts the loss of a model trained on subset S as
    ``const + Σ_{i∉S} scores[q, i]`` = ``const' − Σ_{i∈S} scores[q, i]``; the LDS of query
    q is the Spearman correlation of that prediction with the real losses over the subsets.
    Returns ``{"lds": mean over queries, "per_query": [n_query], "n_undefined": ...}``.
    """
    L = np.asarray(losses.cpu() if isinstance(losses, Tensor) else losses, dtype=np.float64)
    subs = np.asarray(subsets.cpu() if isinstance(subsets, Tensor) else subsets, dtype=np.int64)
    if L.ndim != 2 or subs.ndim != 2 or L.shape[0] != subs.shape[0]:
        raise ValueError(f"losses [n_subsets, n_query] {L.shape} and subsets [n_subsets, k] "
                         f"{subs.shape} do not match")
    if not np.isfinite(L).all():
        raise ValueError("the retrained losses contain NaN or inf (an unfinished cache?)")
    s = _check_scores(scores, L.shape[1], None)
    if subs.max() >= s.shape[1]:
        raise ValueError(f"subsets index position {subs.max()} but scores have only "
                         f"{s.shape[1]} training columns")
    mask = np.zeros((subs.shape[0], s.shape[1]))
    np.put_along_axis(mask, subs, 1.0, axis=1)
    predicted = -(mask @ s.T)  # [n_subsets, n_query]
    per_query = _spearman_columns(predicted, L)
    undefined = int(np.isnan(per_query).sum())
    if undefined == len(per_query):
        raise ValueError("LDS is undefined for every query: the scores or the losses do not "
                         "vary across subsets")
    return {"lds": float(np.nanmean(per_query)), "per_query": per_query,
            "n_undefined": undefined, "n_subsets": int(subs.shape[0])}


def linear_datamodeling_score(
    scores: Tensor | np.ndarray,
    train_fn: TrainFn,
    train_dataset: Dataset,
    query_dataset: Dataset,
    task: Task,
    n_subsets: int = 50,
    fraction: float = 0.5,
    seeds: Sequence[int] = (0,),
    *,
    subset_seed: int = 0,
    init_model: nn.Module | None = None,
    cache: str | os.PathLike | None = None,
    meta: dict[str, Any] | None = None,
    batch_size: int = _BATCH,
    progress: bool = True,
) -> dict[str, Any]:
    """Linear datamodeling score of ``scores`` (``[n_query, n_train]``).

    Draws ``n_subsets`` subsets of ``fraction·n_train`` examples (fixed ``subset_seed``),
    retrains on each with each seed (:func:`subset_query_losses`, cached at ``cache``),
    averages the query losses over seeds, and compares with the scores' prediction
    (:func:`lds_from_losses`). Returns a dict with ``lds`` (mean Spearman over queries),
    ``per_query``, ``n_undefined``, ``n_subsets``, ``fraction`` and ``seeds``.
    """
    n = _length(train_dataset, "train_dataset")
    n_query = _length(query_dataset, "query_dataset")
    _check_scores(scores, n_query, n)
    subsets = lds_subsets(n, n_subsets, fraction, subset_seed)
    losses = subset_query_losses(train_fn, train_dataset, query_dataset, task, subsets, seeds,
                                 init_model=init_model, cache=cache, meta=meta,
                                 batch_size=batch_size, progress=progress)
    out = lds_from_losses(scores, subsets, losses)
    return {**out, "fraction": fraction, "seeds": [int(s) for s in seeds]}


# ---------------------------------------------------------------------------- mislabels


@dataclass(frozen=True)
class DetectionCurve:
    """``found[k]``: fraction of the flipped labels among the ``k`` examples with the highest
    score, after inspecting ``inspected[k] = k / n`` of the data (k = 0..n)."""

    inspected: np.ndarray
    found: np.ndarray
    auc: float  # ROC AUC of the score as a detector of flipped labels (0.5 = chance)


def _check_mask(flipped_mask: Tensor | np.ndarray, n: int) -> np.ndarray:
    mask = np.asarray(flipped_mask.cpu() if isinstance(flipped_mask, Tensor) else flipped_mask)
    if mask.dtype != np.bool_:
        raise ValueError(f"flipped_mask must be a boolean mask of length {n}, got dtype "
                         f"{mask.dtype} (for ids or positions build the mask first)")
    if mask.shape != (n,):
        raise ValueError(f"flipped_mask has shape {mask.shape} but there are {n} scores")
    if not mask.any():
        raise ValueError("flipped_mask marks no flipped label: nothing to detect")
    if mask.all():
        raise ValueError("flipped_mask marks every label as flipped: nothing to compare with")
    return mask


def _check_vector(values: Tensor | np.ndarray, what: str) -> np.ndarray:
    v = np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values,
                   dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"{what} must be a non-empty 1-D vector, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError(f"{what} contains NaN or inf (first at {int(np.argmax(~np.isfinite(v)))})")
    return v


def mislabel_auc(self_influence: Tensor | np.ndarray, flipped_mask: Tensor | np.ndarray) -> float:
    """ROC AUC of ``self_influence`` as a score for "this label was flipped" (ties count ½)."""
    s = _check_vector(self_influence, "self_influence")
    mask = _check_mask(flipped_mask, len(s))
    ranks = rankdata(s)
    n_pos, n_neg = int(mask.sum()), int((~mask).sum())
    return float((ranks[mask].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def mislabel_detection_curve(
    self_influence: Tensor | np.ndarray, flipped_mask: Tensor | np.ndarray
) -> DetectionCurve:
    """Inspect training examples by decreasing self-influence (or any suspicion score) and
    count the flipped labels found; see :class:`DetectionCurve`."""
    s = _check_vector(self_influence, "self_influence")
    mask = _check_mask(flipped_mask, len(s))
    order = np.argsort(-s, kind="stable")
    found = np.concatenate([[0.0], np.cumsum(mask[order]) / mask.sum()])
    inspected = np.arange(len(s) + 1) / len(s)
    return DetectionCurve(inspected, found, mislabel_auc(s, mask))


def found_at(curve: DetectionCurve, fraction: float) -> float:
    """Fraction of flipped labels found after inspecting ``fraction`` of the data (rounded
    up to whole examples)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    n = len(curve.inspected) - 1
    k = int(np.ceil(fraction * n - 1e-9))
    return float(curve.found[k])
