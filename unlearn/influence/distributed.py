"""Fitting and scoring across processes with ``torch.distributed``.

The training data is split into contiguous shards, one per rank (rank r holds positions
``[r·n // W, (r+1)·n // W)``, sizes differing by at most one, like a non-shuffling
``DistributedSampler`` but without padding or repeats). Then

* :func:`fit_distributed` lets each rank accumulate its share of the curvature statistics and
  all-reduces them, so every rank ends with the factors a single process would have fitted on
  all the data: EK-FAC / K-FAC sum the covariances (then eigendecompose identically on every
  rank) and, in a second pass, the eigenvalue corrections; Exact sums the dense curvature.
  Estimators without a curvature model (gradient dot / cosine, TracIn) just record ``n``.
  CG, LiSSA and Arnoldi keep the training loader for curvature products at query time, which
  this module does not shard: they raise ``NotImplementedError`` (the documented fallback is
  ``estimator.fit(full_loader)`` on every rank, after which :func:`scores_distributed` works).
* :func:`scores_distributed` lets each rank score the queries against its shard's columns and
  all-gathers the blocks into the full ``[n_query, n_train]`` matrix in the original column
  order (or merges the per-rank top-k lists).

Only an initialised default process group is needed, so this works under ``torchrun``,
Lightning Fabric and ``Trainer(strategy="ddp")`` alike; without one (or with one rank) both
functions run in a single process. Every rank must call them with the same arguments, and
the estimator must wrap the plain model, not its ``DistributedDataParallel`` wrapper.
See ``docs/distributed.md``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from unlearn.influence.base import InfluenceEstimator
from unlearn.influence.ekfac import KFACInfluence
from unlearn.influence.exact import ExactInfluence

__all__ = ["fit_distributed", "scores_distributed", "shard_bounds", "world"]


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """The contiguous ``[start, stop)`` positions of ``rank``'s shard of ``n`` examples."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    return n * rank // world_size, n * (rank + 1) // world_size


def fit_distributed(estimator: InfluenceEstimator, train_dataset: Dataset, batch_size: int,
                    **loader_kw: Any) -> InfluenceEstimator:
    """Fit ``estimator`` on ``train_dataset`` with the work split across the ranks of the
    default process group; every rank ends with the same factors. ``loader_kw`` go to each
    shard's ``DataLoader`` (``num_workers``, ``collate_fn``, ...; no shuffling)."""
    n = _check_args(estimator, train_dataset, batch_size, loader_kw)
    rank, size = world()
    if size == 1:
        return estimator.fit(_loader(train_dataset, batch_size, loader_kw))
    _check_same_everywhere(estimator, n)
    if isinstance(estimator, KFACInfluence):
        with _kfac_reduction(estimator, rank):
            _fit_shard(estimator, train_dataset, batch_size, loader_kw, n)
    elif isinstance(estimator, ExactInfluence):
        with _patched(estimator, "_reduce_curvature", _exact_reducer(n)):
            _fit_shard(estimator, train_dataset, batch_size, loader_kw, n)
    elif type(estimator)._fit is InfluenceEstimator._fit:  # no curvature model to fit
        estimator.fit(_loader(train_dataset, batch_size, loader_kw))
    else:
        raise NotImplementedError(
            f"{type(estimator).__name__} keeps the training loader for curvature products at "
            "query time, which fit_distributed does not shard; call "
            "estimator.fit(full_train_loader) on every rank instead (scores_distributed then "
            "still splits the scoring), or use EKFACInfluence / KFACInfluence / ExactInfluence")
    return estimator


def scores_distributed(estimator: InfluenceEstimator, query_loader: DataLoader,
                       train_dataset: Dataset, batch_size: int, *, top_k: int | None = None,
                       **loader_kw: Any) -> Tensor | tuple[Tensor, Tensor]:
    """``estimator.scores(query_loader, train_loader)`` with the training columns split across
    ranks; every rank returns the full ``[n_query, n_train]`` matrix (columns in
    ``train_dataset``'s order), or with ``top_k`` the merged ``(values, indices)`` of the k
    largest scores per query. Every rank needs the whole ``query_loader``."""
    n = _check_args(estimator, train_dataset, batch_size, loader_kw)
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    rank, size = world()
    if size == 1:
        return estimator.scores(query_loader, _loader(train_dataset, batch_size, loader_kw),
                                top_k=top_k)
    _check_same_everywhere(estimator, n)
    start, stop = shard_bounds(n, size, rank)
    shard = _loader(Subset(train_dataset, range(start, stop)), batch_size, loader_kw)
    if top_k is None:
        block = estimator.scores(query_loader, shard)
        return _gather_columns(block, n, size)
    values, index = estimator.scores(query_loader, shard, top_k=top_k)
    return _merge_top_k(values, index + start, min(top_k, n))


# --------------------------------------------------------------------------- fitting


def _fit_shard(estimator: InfluenceEstimator, dataset: Dataset, batch_size: int,
               loader_kw: dict[str, Any], n: int) -> None:
    rank, size = world()
    start, stop = shard_bounds(n, size, rank)
    estimator.fit(_loader(Subset(dataset, range(start, stop)), batch_size, loader_kw))
    estimator.n_train = n  # the shard's fit recorded its own size; scores scale by 1/n


@contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Shadow a method on one instance for the duration of the block."""
    setattr(obj, name, value)
    try:
        yield
    finally:
        delattr(obj, name)


@contextmanager
def _kfac_reduction(est: KFACInfluence, rank: int) -> Iterator[None]:
    """All-reduce K-FAC's partial sums after each pass; rank-offset target sampling seed so
    that ranks draw independent targets for ``fisher="true"``."""
    passes = iter([("A", "G", "positions", "calls"), ("L",)])
    seed = est.seed

    def reduce(stats: dict[str, Any], n: int) -> int:
        fields = next(passes)
        for layer in est.layers:
            st = stats[layer.name]
            for f in fields:
                value = getattr(st, f)
                if isinstance(value, int):
                    setattr(st, f, _all_reduce_int(value))
                else:
                    setattr(st, f, _all_reduce(value))
        return _all_reduce_int(n)

    est.seed = seed + rank
    try:
        with _patched(est, "_reduce_stats", reduce):
            yield
    finally:
        est.seed = seed


def _exact_reducer(n_total: int) -> Any:
    def reduce(H: Tensor, n_local: int) -> Tensor:
        return _all_reduce(H * n_local) / n_total

    return reduce


# --------------------------------------------------------------------------- collectives


def _comm_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo (and others) get CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(t: Tensor) -> Tensor:
    buf = t.detach().to(_comm_device()).contiguous().clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def _all_reduce_int(value: int) -> int:
    t = torch.tensor([value], dtype=torch.long)
    return int(_all_reduce(t).item())


def _all_gather(t: Tensor) -> list[Tensor]:
    buf = t.to(_comm_device()).contiguous()
    out = [torch.empty_like(buf) for _ in range(dist.get_world_size())]
    dist.all_gather(out, buf)
    return [o.to(t.device) for o in out]


def _gather_columns(block: Tensor, n: int, size: int) -> Tensor:
    """Concatenate each rank's column block (padded to the widest shard for the gather)."""
    width = max(stop - start for start, stop in (shard_bounds(n, size, r) for r in range(size)))
    padded = block.new_zeros(block.shape[0], width)
    padded[:, : block.shape[1]] = block
    parts = _all_gather(padded)
    widths = [stop - start for start, stop in (shard_bounds(n, size, r) for r in range(size))]
    return torch.cat([p[:, :w] for p, w in zip(parts, widths, strict=True)], dim=1)


def _merge_top_k(values: Tensor, index: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Merge each rank's top-k ``(values, global column indices)`` into the global top-k."""
    pad = k - values.shape[1]  # a shard narrower than k returns fewer columns
    if pad > 0:
        values = torch.cat([values, values.new_full((values.shape[0], pad), float("-inf"))], 1)
        index = torch.cat([index, index.new_full((index.shape[0], pad), -1)], 1)
    all_values = torch.cat(_all_gather(values), dim=1)
    all_index = torch.cat(_all_gather(index), dim=1)
    top, pos = all_values.topk(k, dim=1)
    return top, all_index.gather(1, pos)


# --------------------------------------------------------------------------- checks


def _loader(dataset: Dataset, batch_size: int, loader_kw: dict[str, Any]) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, **loader_kw)


def _check_args(estimator: InfluenceEstimator, dataset: Dataset, batch_size: int,
                loader_kw: dict[str, Any]) -> int:
    if not isinstance(estimator, InfluenceEstimator):
        raise TypeError(f"estimator must be an InfluenceEstimator, got {type(estimator)}")
    if isinstance(estimator.model, torch.nn.parallel.DistributedDataParallel):
        raise ValueError("the estimator wraps a DistributedDataParallel model; build it on the "
                         "plain module (ddp_model.module) instead")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    bad = {"shuffle", "sampler", "batch_sampler", "drop_last"} & loader_kw.keys()
    if bad:
        raise ValueError(f"loader options {sorted(bad)} would reorder or drop examples; the "
                         "shards are contiguous and complete by construction")
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError as err:
        raise TypeError("train_dataset must be a map-style Dataset with a length") from err
    _, size = world()
    if n < size:
        raise ValueError(f"train_dataset has {n} examples, fewer than the {size} ranks; every "
                         "rank needs at least one")
    return n


def _check_same_everywhere(estimator: InfluenceEstimator, n: int) -> None:
    """Every rank must see the same data size and the same weights (a rank that loaded other
    weights would silently mix two models' statistics)."""
    params = [p.detach().double() for p in estimator.space.params(estimator.model).values()]
    sig = torch.tensor([float(n), float(sum(p.sum() for p in params)),
                        float(sum((p * p).sum() for p in params))], dtype=torch.float64)
    sigs = _all_gather(sig)
    ref = sigs[0]
    for r, s in enumerate(sigs):
        if s[0] != ref[0]:
            raise ValueError(f"rank {r} has a training set of {int(s[0])} examples, rank 0 has "
                             f"{int(ref[0])}; every rank must pass the same train_dataset")
        if not torch.allclose(s[1:], ref[1:], rtol=1e-9, atol=1e-12):
            raise ValueError(f"rank {r}'s model weights differ from rank 0's; load or "
                             "broadcast the same weights on every rank first")
