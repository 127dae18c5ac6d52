"""TracIn: influence traced along the training trajectory (Pruthi et al. 2020, TracInCP).

``scores[q, i] = Σ_c η_c ∇ℓ_q(θ_c) · ∇ℓ_i(θ_c)`` over saved checkpoints θ_c with the learning
rate η_c in effect around them. Each term is the first-order drop of q's loss caused by a
gradient step of size η_c on example i at θ_c, so positive scores mark proponents (training
on i lowered q's loss; removing i would raise it), as in the library's sign convention.

Scale: the paper's, with no ``1/n`` factor, and so *not* the leave-one-out scale of the
curvature estimators. It is the loss reduction attributed to stepping on i once per
checkpoint with step η_c; under minibatch SGD with batch size b and one checkpoint per epoch,
divide by b for the loss change that example i's own updates caused. ``self_influence`` uses
the same scale, ``Σ_c η_c ||∇ℓ_i(θ_c)||²`` (the diagonal of ``scores(train, train)``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from unlearn.checkpoints import read_weights_file
from unlearn.influence.base import InfluenceEstimator, _check_count, _QueryStore
from unlearn.influence.grads import check_loader, iter_grads, model_dtype_device, per_sample_grads
from unlearn.tasks import Task

Checkpoint = dict[str, Tensor] | str | os.PathLike

_PREFIX = "checkpoint"


class TracInInfluence(InfluenceEstimator):
    """TracInCP over ``checkpoints`` (state_dicts of ``model``, or paths to files saved with
    ``torch.save(model.state_dict(), path)``) weighted by ``learning_rates``.

    Args:
        model: the network whose checkpoints these are; its own weights are only used as a
            template and are restored after every call, also when one fails.
        task: how the per-sample loss is computed.
        checkpoints: a non-empty list of state_dicts or file paths (loaded with
            ``torch.load(weights_only=True)``; a Lightning checkpoint's ``"state_dict"``
            entry is used if present). All are held in memory on the model's device.
        learning_rates: one per checkpoint, or one float for all (each finite and >= 0).
        damping: accepted so that every estimator builds alike; TracIn uses no curvature and
            ignores it.

    ``fit(train_loader)`` builds nothing (TracIn has no curvature) but is still required, as
    for every estimator. ``inverse_hvp(v)`` returns ``(Σ_c η_c) v``: TracIn's implicit
    preconditioner is the step-size-weighted identity (exact when all checkpoints coincide).
    ``save`` stores the checkpoints in the safetensors file (one key prefix per checkpoint) and
    the learning rates in the config.

    Memory: all checkpoints are held on the model's device, and each training batch's
    per-sample gradients are computed at every checkpoint (``[B, C·P]`` at once), so lower the
    train batch size for many checkpoints of a large model.
    """

    name = "tracin"
    inverts_curvature = False

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        checkpoints: Sequence[Checkpoint],
        learning_rates: float | Sequence[float] = 1.0,
        damping: float = 0.0,
        **kw: Any,
    ) -> None:
        super().__init__(model, task, damping, **kw)
        if isinstance(checkpoints, (dict, str, os.PathLike)) or len(checkpoints) == 0:
            raise ValueError("checkpoints must be a non-empty list of state_dicts or file paths")
        self.learning_rates = _learning_rates(learning_rates, len(checkpoints))
        _, device = model_dtype_device(model)
        template = model.state_dict()
        self.checkpoints = [
            _validated(_load_checkpoint(c), template, _describe(c, i), device)
            for i, c in enumerate(checkpoints)
        ]
        self._after_load()

    def config(self) -> dict[str, Any]:
        return {**super().config(), "learning_rates": list(self.learning_rates)}

    @classmethod
    def _from_config(cls, model: nn.Module, task: Task, config: dict[str, Any],
                     factors: dict[str, Tensor]) -> TracInInfluence:
        n = len(config.get("learning_rates", []))
        checkpoints: list[dict[str, Tensor]] = [{} for _ in range(n)]
        for key, value in factors.items():
            prefix, index, name = (key.split(".", 2) + ["", ""])[:3]
            if prefix != _PREFIX or not index.isdigit() or int(index) >= n or not name:
                raise ValueError(f"saved TracIn factor {key!r} names none of the {n} checkpoints")
            checkpoints[int(index)][name] = value
        return cls(model, task, checkpoints=checkpoints, **config)

    def _after_load(self) -> None:
        """``factors`` are the checkpoints themselves (shared, not copied), for ``save``."""
        self.factors = {
            f"{_PREFIX}.{i}.{k}": v for i, sd in enumerate(self.checkpoints) for k, v in sd.items()
        }

    # ----------------------------------------------------------------- protocol
    def _precondition(self, G: Tensor) -> Tensor:
        return G * sum(self.learning_rates)

    def _score_scale(self) -> float:
        return 1.0

    def scores(
        self,
        query_loader: DataLoader,
        train_loader: DataLoader,
        *,
        top_k: int | None = None,
        out: str | os.PathLike | None = None,
    ) -> Tensor | tuple[Tensor, Tensor] | np.memmap:
        """``Σ_c η_c ∇ℓ_q(θ_c)·∇ℓ_i(θ_c)``; streaming options as in the base class."""
        with self._restoring_weights():
            return super().scores(query_loader, train_loader, top_k=top_k, out=out)

    def self_influence(self, train_loader: DataLoader) -> Tensor:
        """``Σ_c η_c ||∇ℓ_i(θ_c)||²`` per training example (TracIn's own scale)."""
        self._require_fitted()
        check_loader(train_loader, "train_loader")
        with self._restoring_weights():
            out = []
            for G in self._train_grads(train_loader, "self-influence"):
                parts = G.reshape(G.shape[0], len(self.checkpoints), -1)
                lrs = torch.tensor(self.learning_rates, dtype=G.dtype, device=G.device)
                out.append(((parts**2).sum(dim=2) * lrs).sum(dim=1))
        result = torch.cat(out)
        _check_count("train_loader", result.shape[0], len(train_loader.dataset))  # type: ignore[arg-type]
        return result

    # ----------------------------------------------------------------- streaming hooks
    def _train_grads(self, loader: DataLoader, desc: str) -> Iterator[Tensor]:
        """Per batch, the gradients at every checkpoint side by side: ``[B, C·P]``."""
        total = len(loader) if hasattr(loader, "__len__") else None
        for batch in self._bar(iter(loader), desc, total):
            grads = []
            for sd in self.checkpoints:
                self.model.load_state_dict(sd)
                grads.append(per_sample_grads(self.model, self.task, batch, self.space))
            yield torch.cat(grads, dim=1)

    def _preconditioned_queries(self, query_loader: DataLoader) -> _CheckpointQueries:
        stores = []
        for c, (sd, lr) in enumerate(zip(self.checkpoints, self.learning_rates, strict=True)):
            self.model.load_state_dict(sd)
            store = _QueryStore(self.space, self.query_rank)
            grads = iter_grads(self.model, self.task, query_loader, self.space, query=True,
                               progress=lambda it, c=c: self._bar(
                                   it, f"queries @ checkpoint {c}", len(query_loader)))
            for G in grads:
                store.add(G * lr)
            stores.append(store)
        return _CheckpointQueries(stores, self.space.numel)

    @contextlib.contextmanager
    def _restoring_weights(self) -> Iterator[None]:
        saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        try:
            yield
        finally:
            self.model.load_state_dict(saved)


class _CheckpointQueries:
    """One query store per checkpoint; ``dot`` sums their scores over ``G[B, C·P]``."""

    def __init__(self, stores: list[_QueryStore], numel: int) -> None:
        self.stores, self.numel = stores, numel
        self.n = stores[0].n
        self.dtype = stores[0].dtype

    def dot(self, G: Tensor) -> Tensor:
        parts = G.split(self.numel, dim=1)
        return sum(store.dot(g) for store, g in zip(self.stores, parts, strict=True))


def _learning_rates(learning_rates: float | Sequence[float], n: int) -> list[float]:
    if isinstance(learning_rates, (int, float)):
        lrs = [float(learning_rates)] * n
    else:
        lrs = [float(x) for x in learning_rates]
        if len(lrs) != n:
            raise ValueError(
                f"got {len(lrs)} learning rates for {n} checkpoints; give one per checkpoint "
                "or a single float"
            )
    bad = [x for x in lrs if not (np.isfinite(x) and x >= 0)]
    if bad:
        raise ValueError(f"learning rates must be finite and >= 0, got {bad[:5]}")
    return lrs


def _describe(checkpoint: Checkpoint, index: int) -> str:
    if isinstance(checkpoint, (str, os.PathLike)):
        return f"checkpoint {index} ({os.fspath(checkpoint)})"
    return f"checkpoint {index}"


def _load_checkpoint(checkpoint: Checkpoint) -> Any:
    if isinstance(checkpoint, (str, os.PathLike)):
        try:
            return read_weights_file(checkpoint)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"TracIn checkpoint file not found: {err}") from err
        except ValueError as err:
            raise ValueError(f"cannot load TracIn checkpoint: {err}") from err
    return checkpoint


def _validated(state: Any, template: dict[str, Tensor], what: str,
               device: torch.device) -> dict[str, Tensor]:
    """Check a state_dict against the model's own: same keys, shapes, finite values."""
    if not isinstance(state, dict):
        raise ValueError(f"{what} is a {type(state).__name__}, not a state_dict")
    missing = [k for k in template if k not in state]
    unexpected = [k for k in state if k not in template]
    if missing or unexpected:
        raise ValueError(f"{what} does not match the model: missing keys {missing[:5]}, "
                         f"unexpected keys {unexpected[:5]}")
    out = {}
    for k, ref in template.items():
        v = state[k]
        if not isinstance(v, Tensor) or v.shape != ref.shape:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"{what} does not match the model: {k!r} is {shape}, the model's "
                             f"is {tuple(ref.shape)}")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"{what}: parameter {k!r} contains NaN or inf")
        out[k] = v.detach().to(device=device, dtype=ref.dtype).clone()
    return out
