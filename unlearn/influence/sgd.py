"""SGD-influence (Hara, Nitanda & Maehara, "Data Cleansing for Models Trained with SGD",
NeurIPS 2019): the effect of removing a training example on the model that *this* SGD run
produced, estimated by running the recorded trajectory backwards.

Removing example i from the run perturbs every step whose batch held it by
``−w_i ∇ℓ_i(θ_t)`` (``w_i = 1/|S_t|`` for a mean loss; the batch keeps its normaliser, as in
the paper's counterfactual). To first order the perturbation travels to the end of training
through the linearised SGD map ``θ ↦ θ − η_t (∇L_{S_t}(θ) + λθ)``. With ``u_T = ∇ loss_q(θ_T)``
and going back ``t = T−1 … 0``::

    score_i += (η_t w_i) u_{t+1}ᵀ ∇ℓ_i(θ_t)              for i in S_t
    u_t      = u_{t+1} − η_t (H_{S_t}(θ_t) + λ I) u_{t+1}

(plain SGD; with momentum the backward state also carries the adjoint of the momentum buffer,
see :meth:`SGDInfluence._backward`). ``score_i`` predicts ``loss_q(θ without i) − loss_q(θ)``,
the library's sign convention: positive means i helped q. Unlike the Hessian-inverse
estimators it needs no convexity or convergence, only the run's own trajectory; it is the
derivative of the counterfactual run (:func:`replay_without`) and so matches it closely while
one example moves the trajectory little (linear models; less so deep nets and long runs).

Supported: ``torch.optim.SGD`` with any learning-rate schedule (recorded per step), weight
decay, momentum, dampening and Nesterov; gradient accumulation in Lightning logs. Not
supported (raise or fail the replay check): other optimizers (Adam, ...), per-group
hyper-parameters, dropout or batch-norm in training mode, gradient clipping.

Cost: one backward pass replays the run once more forward (segment by segment from
checkpoints) and, per step, takes the batch's per-sample gradients and one Hessian-vector
product per query vector. Memory: the checkpoints plus ``segment_steps`` parameter copies.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad
from torch.utils.data import DataLoader

from unlearn.data import IndexedDataset
from unlearn.influence.base import InfluenceEstimator
from unlearn.influence.grads import check_finite_batch, check_loader, iter_grads, to_model
from unlearn.influence.sgd_trajectory import (
    ReplayMismatchError,
    SGDConfig,
    SGDReplay,
    Trajectory,
    TrajectoryRecorder,
    TrajectoryStep,
    UnsupportedOptimizerError,
    relative_gap,
    segment_bounds,
    train_sgd_recorded,
)
from unlearn.tasks import Task

__all__ = [
    "SGDInfluence",
    "replay_without",
    "loo_loss_changes",
    "Trajectory",
    "TrajectoryStep",
    "TrajectoryRecorder",
    "SGDConfig",
    "train_sgd_recorded",
    "UnsupportedOptimizerError",
    "ReplayMismatchError",
]

Anchor = tuple[Any, Any]  # (weights source or flat tensor, momentum buffer or None)


class SGDInfluence(InfluenceEstimator):
    """SGD-influence of every training example of a recorded SGD run.

    Args:
        model: the trained model (its weights are θ_T, the end of the trajectory); a
            LightningModule works.
        task: how the per-sample loss is computed (the run must have minimised the weighted
            mean of ``task.per_sample_loss`` over each batch).
        trajectory: a :class:`Trajectory` or a ``TrainingLogCallback`` (read with
            :meth:`Trajectory.from_training_log`).
        dataset: the :class:`~unlearn.data.IndexedDataset` the run drew its batches from;
            the trajectory's ids are looked up in it.
        segment_steps: longest stretch of steps replayed and held in memory at once (default
            ``ceil(sqrt(T))``); extra anchors are made by a forward replay where checkpoints
            are sparser than this (or where momentum buffers are unknown).
        query_chunk: propagate at most this many query vectors per backward pass (default
            256; each pass replays the run, so bigger chunks are cheaper per query but hold
            ``[chunk, P]`` adjoints and vmap that many Hessian-vector products).
        replay_rtol: largest relative difference allowed between replayed weights and the
            weights the run recorded (checkpoints, final model); ``None`` skips the check.
        hessian: ``False`` drops the Hessian-vector products (H_t taken as 0; weight decay
            and momentum kept): the paper's first-order ablation, cheaper and less accurate.
        progress: show progress bars.

    ``fit()`` prepares the replay anchors (and checks the replay); then
    :meth:`influence` gives the influence on one measurement, ``scores`` and
    ``self_influence`` follow the estimator protocol, and :meth:`propagate` takes any
    gradient(s) at θ_T. ``inverse_hvp``, ``save`` and ``load`` do not apply (no curvature
    model; the state is the trajectory itself).
    """

    name = "sgd"
    inverts_curvature = False

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        trajectory: Trajectory | Any,
        dataset: IndexedDataset,
        *,
        segment_steps: int | None = None,
        query_chunk: int | None = 256,
        replay_rtol: float | None = 1e-3,
        hessian: bool = True,
        progress: bool = True,
    ) -> None:
        super().__init__(model, task, 0.0, progress=progress)
        if not isinstance(trajectory, Trajectory):
            if hasattr(trajectory, "steps") and hasattr(trajectory, "checkpoints"):
                trajectory = Trajectory.from_training_log(trajectory)
            else:
                raise TypeError("trajectory must be an unlearn Trajectory or a "
                                f"TrainingLogCallback, got {type(trajectory).__name__}")
        for name, value in (("segment_steps", segment_steps), ("query_chunk", query_chunk)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if replay_rtol is not None and not (math.isfinite(replay_rtol) and replay_rtol > 0):
            raise ValueError(f"replay_rtol must be a finite number > 0 or None, got "
                             f"{replay_rtol!r}")
        self.trajectory, self.dataset = trajectory, dataset
        self.segment_steps, self.query_chunk = segment_steps, query_chunk
        self.replay_rtol = replay_rtol
        self.hessian = bool(hessian)
        self.replay = SGDReplay(model, task, dataset, trajectory)
        self.replay_gap = 0.0  # largest relative replay difference seen by fit
        self._anchors: dict[int, Anchor] | None = None

    # ----------------------------------------------------------------- fitting
    def fit(self, train_loader: DataLoader | None = None) -> SGDInfluence:
        """Prepare the replay anchors and check that replaying the trajectory reproduces the
        recorded weights. ``train_loader`` is optional: if given, its ids must be known."""
        if train_loader is not None:
            check_loader(train_loader, "train_loader", ordered=False)
            self._columns(train_loader)
        self.n_train = None
        was_training = self.model.training
        self.model.eval()
        try:
            self._anchors = self._build_anchors()
        finally:
            self.model.train(was_training)
        self.n_train = len(self.dataset)
        return self

    def _segment(self) -> int:
        T = self.trajectory.num_steps
        return self.segment_steps or max(1, math.isqrt(T - 1) + 1)

    def _build_anchors(self) -> dict[int, Anchor]:
        traj, rp = self.trajectory, self.replay
        T, seg = traj.num_steps, self._segment()
        ckpts = {int(k): v for k, v in traj.checkpoints.items()}
        if 0 not in ckpts:
            raise ValueError("the trajectory has no weights before its first step (checkpoint "
                             "0): record the initial weights (TrainingLogCallback keeps them "
                             "unless save_initial=False)")
        need_buffer = traj.optimizer.momentum > 0
        buffers = traj.momentum_buffers
        final = rp.current()
        starts = sorted(k for k in ckpts if k < T)
        dense = all(b - a <= seg for a, b in zip(starts, starts[1:] + [T], strict=True))
        complete = all(t == 0 or not need_buffer or t in buffers for t in starts)
        if dense and complete:  # the checkpoints themselves are the anchors
            anchors = {t: (ckpts[t], buffers.get(t)) for t in starts}
            theta, buf = self._anchor_state(anchors[starts[-1]], starts[-1])
            for t in range(starts[-1], T):
                theta, buf = rp.step(theta, buf, t)
        else:  # one forward pass from step 0, anchoring every `seg` steps and at checkpoints
            anchors, last = {}, None
            theta, buf = rp.flat(ckpts[0], "checkpoint 0"), None
            for t in self._bar(iter(range(T)), "replaying for anchors", T):
                if t > 0 and t in ckpts:
                    logged = rp.flat(ckpts[t], f"checkpoint {t}")
                    self._check(theta, logged, f"the checkpoint at step {t}")
                    theta = logged
                    if need_buffer and t in buffers:
                        buf = rp.buffer(buffers[t], f"momentum buffer at step {t}")
                # anchor every `seg` steps; a checkpoint is a free anchor unless its momentum
                # buffer must be copied (then only every `seg` steps, to bound memory)
                if last is None or t - last >= seg or (t in ckpts and not need_buffer):
                    anchors[t] = (ckpts[t] if t in ckpts else theta.clone(),
                                  None if buf is None else buf.clone())
                    last = t
                theta, buf = rp.step(theta, buf, t)
        if T in ckpts:
            self._check(theta, rp.flat(ckpts[T], f"checkpoint {T}"), f"the checkpoint at step {T}")
        self._check(theta, final, f"the model's weights after the last step ({T})")
        return anchors

    def _anchor_state(self, anchor: Anchor, t: int) -> tuple[Tensor, Tensor | None]:
        source, buf = anchor
        return (self.replay.flat(source, f"checkpoint {t}"),
                self.replay.buffer(buf, f"momentum buffer at step {t}"))

    def _check(self, replayed: Tensor, recorded: Tensor, what: str) -> None:
        gap = relative_gap(replayed, recorded)
        self.replay_gap = max(self.replay_gap, gap)
        if self.replay_rtol is not None and not gap <= self.replay_rtol:
            raise ReplayMismatchError(
                f"replaying the recorded SGD steps does not reproduce {what}: relative "
                f"difference {gap:.3g} > replay_rtol={self.replay_rtol}. The run must take plain "
                "torch.optim.SGD steps on the batch mean of task.per_sample_loss with the "
                "recorded optimizer settings (no dropout, batch-norm statistics, gradient "
                "clipping or extra loss terms), and the model must hold its final weights")

    # ----------------------------------------------------------------- backward pass
    def propagate(self, vectors: Tensor) -> Tensor:
        """Scores of every example of ``dataset`` for measurements whose gradients at θ_T
        are the rows of ``vectors[k, P]`` (or one ``[P]``): ``[k, n]`` (or ``[n]``), in
        ``dataset`` order (ids ``dataset.ids``). Examples in no batch score 0."""
        self._require_fitted()
        if not isinstance(vectors, Tensor):
            raise TypeError(f"vectors must be a Tensor, got {type(vectors).__name__}")
        squeeze = vectors.dim() == 1
        V = vectors.unsqueeze(0) if squeeze else vectors
        P = self.space.numel
        if V.dim() != 2 or V.shape[1] != P or V.shape[0] == 0:
            raise ValueError(f"vectors must have shape [{P}] or [k>0, {P}], got "
                             f"{tuple(vectors.shape)}")
        if not torch.isfinite(V).all():
            raise ValueError("vectors contain NaN or inf")
        V = V.to(device=self.replay.device, dtype=self.replay.dtype)
        chunk = self.query_chunk or V.shape[0]
        was_training = self.model.training
        self.model.eval()
        try:
            out = torch.cat([self._backward(part) for part in V.split(chunk)])
        finally:
            self.model.train(was_training)
        return out[0] if squeeze else out

    def _backward(self, A: Tensor) -> Tensor:
        """Run the adjoint of the SGD recursion from ``A = u_T`` back to step 0.

        Perturbing step t's gradient by δg (with δθ_t fixed) changes the final measurement by
        ``vᵀ δg``; removing i sets ``δg = −w_i ∇ℓ_i(θ_t)``. With ``a`` the adjoint of θ and
        ``c`` that of the momentum buffer (PyTorch's form: b_t = μ b_{t−1} + ρ g_t, ρ = 1 −
        dampening, and b_0 = g_0), per step backwards::

            plain:     v = −η a
            momentum:  d = c − η a,      v = ρ d,          c ← μ d
            nesterov:  d = c − η μ a,    v = ρ d − η a,    c ← μ d
            then       a ← a + (H_t + λ I) v
        """
        traj, rp, cfg = self.trajectory, self.replay, self.trajectory.optimizer
        assert self._anchors is not None
        scores = torch.zeros(A.shape[0], rp.n, dtype=A.dtype, device=A.device)
        a = A.clone()
        c = torch.zeros_like(a) if cfg.momentum > 0 else None
        bounds = segment_bounds(sorted(self._anchors), traj.num_steps)
        for start, end in self._bar(iter(reversed(bounds)), "backward over segments",
                                    len(bounds)):
            theta, buf = self._anchor_state(self._anchors[start], start)
            thetas = [theta]
            for t in range(start, end - 1):
                theta, buf = rp.step(theta, buf, t)
                thetas.append(theta)
            for t in range(end - 1, start - 1, -1):
                theta = thetas.pop()
                step = traj.steps[t]
                lr = step.lr
                if c is None:
                    v = -lr * a
                else:
                    rho = 1.0 if t == 0 else 1.0 - cfg.dampening
                    if cfg.nesterov:
                        d = c - lr * cfg.momentum * a
                        v = rho * d - lr * a
                    else:
                        d = c - lr * a
                        v = rho * d
                    c = cfg.momentum * d
                G = rp.per_sample_grads(theta, t)
                w = step.weights.to(device=A.device, dtype=A.dtype)
                scores.index_add_(1, rp.positions[t].to(A.device), -(v @ G.T) * w)
                if self.hessian:
                    a = a + rp.hvp(theta, t, v)
                if cfg.weight_decay:
                    a = a + cfg.weight_decay * v
        return scores

    # ----------------------------------------------------------------- measurements
    def influence(self, query_loader: DataLoader) -> Tensor:
        """Influence of every example of ``dataset`` on the *mean* query loss over
        ``query_loader`` (``task.query_loss``): ``Tensor[n]`` in ``dataset`` order."""
        self._require_fitted()
        check_loader(query_loader, "query_loader", ordered=False)
        return self.propagate(self._mean_query_gradient(query_loader))

    def _mean_query_gradient(self, loader: DataLoader) -> Tensor:
        rp = self.replay
        theta = rp.current()
        total, count = torch.zeros_like(theta), 0
        for raw in loader:
            batch = to_model(raw, self.model)
            check_finite_batch(batch)
            inputs, targets = self.task.split_batch(batch)

            def loss(th: Tensor, inputs: Any = inputs, targets: Tensor = targets) -> Tensor:
                out = functional_call(self.model, rp.space.unflatten(th), (inputs,))
                return self.task.query_loss(out, targets).sum()

            total += grad(loss)(theta)
            count += int(targets.shape[0])
        if count == 0:
            raise ValueError("query_loader yielded no examples")
        if not torch.isfinite(total).all():
            raise FloatingPointError("the query loss gradient contains NaN or inf")
        return total / count

    def scores(
        self,
        query_loader: DataLoader,
        train_loader: DataLoader,
        *,
        top_k: int | None = None,
        out: str | os.PathLike | None = None,
    ) -> Tensor | tuple[Tensor, Tensor] | np.memmap:
        """``[n_query, n_train]``: the influence of every example of ``train_loader`` (its
        ids, in its order) on every query's loss. All query gradients go back together (in
        chunks of ``query_chunk``). ``top_k`` / ``out`` as in the base class."""
        self._check_scores_call(query_loader, train_loader, top_k, out)
        cols = self._columns(train_loader)
        blocks = [self.propagate(Q)[:, cols].cpu()
                  for Q in self._gradient_chunks(query_loader, query=True)]
        S = torch.cat(blocks)
        if top_k is not None:
            return S.topk(min(top_k, S.shape[1]), dim=1)
        if out is not None:
            return _save_npy(S, Path(out))
        return S

    def self_influence(self, train_loader: DataLoader) -> Tensor:
        """How much each example's own loss would rise without it, ``[n_train]`` in
        ``train_loader`` order (one backward pass per ``query_chunk`` examples)."""
        self._require_fitted()
        check_loader(train_loader, "train_loader")
        cols = self._columns(train_loader)
        out, row = [], 0
        for G in self._gradient_chunks(train_loader, query=False):
            S = self.propagate(G)
            own = cols[row:row + G.shape[0]].to(S.device)
            out.append(S[torch.arange(G.shape[0], device=S.device), own].cpu())
            row += G.shape[0]
        return torch.cat(out)

    def _gradient_chunks(self, loader: DataLoader, query: bool) -> Iterator[Tensor]:
        """Per-sample gradients at θ_T in blocks of at most ``query_chunk`` rows, so that
        only one block of ``[chunk, P]`` gradients is held at a time."""
        chunk = self.query_chunk or 256
        pending: list[Tensor] = []
        held = 0
        for G in iter_grads(self.model, self.task, loader, self.space, query=query):
            pending.append(G)
            held += G.shape[0]
            while held >= chunk:
                block = torch.cat(pending)
                yield block[:chunk]
                pending, held = [block[chunk:]], block.shape[0] - chunk
        if held:
            yield torch.cat(pending)

    def _columns(self, loader: DataLoader) -> Tensor:
        """Positions in ``dataset`` of the loader's examples, in its order."""
        ds = loader.dataset
        if isinstance(ds, IndexedDataset):
            ids = ds.ids
        else:
            parts = []
            for batch in loader:
                ids = self.task.batch_ids(batch)
                if ids is None:
                    raise ValueError("train_loader must yield (ids, x, y) batches (or wrap an "
                                     "IndexedDataset) so its examples can be found in the "
                                     "trajectory")
                parts.append(ids)
            ids = torch.cat(parts)
        return torch.tensor(self.dataset.index_of(ids), dtype=torch.long)

    # ----------------------------------------------------------------- not applicable
    def inverse_hvp(self, vector: Any) -> Any:
        raise NotImplementedError("SGDInfluence has no curvature to invert: it differentiates "
                                  "the recorded SGD run instead; use a Hessian-based estimator "
                                  "(Exact, CG, EKFAC, ...) for inverse-Hessian products")

    def _fit(self, train_loader: DataLoader) -> None:  # pragma: no cover - fit is overridden
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> None:
        raise NotImplementedError("SGDInfluence keeps no factors: its state is the trajectory "
                                  "(keep the TrainingLogCallback's checkpoints or the "
                                  "Trajectory) and is rebuilt with fit()")

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module, task: Task | None = None, **kw):
        raise NotImplementedError("SGDInfluence cannot be loaded from disk; rebuild it from "
                                  "the trajectory and call fit()")


def _save_npy(S: Tensor, path: Path) -> np.memmap:
    tmp = path.with_name(path.name + ".partial.npy")
    np.save(tmp, S.numpy())
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


# ---------------------------------------------------------------------------- counterfactual


def _counterfactual_final(replay: SGDReplay, trajectory: Trajectory,
                          remove: Tensor) -> Tensor:
    """Final flat weights of the run with ``remove`` dropped from every batch, replayed from
    the latest checkpoint (with known momentum buffer) before their first batch."""
    ckpts, buffers = trajectory.checkpoints, trajectory.momentum_buffers
    first = trajectory.first_step_with(remove.tolist())
    T = trajectory.num_steps
    if first is None:
        first = T
    need_buffer = trajectory.optimizer.momentum > 0
    usable = [s for s in ckpts if s <= first and (s == 0 or not need_buffer or s in buffers)]
    if not usable:
        raise ValueError("the trajectory has no weights before its first step (checkpoint 0)")
    start = max(usable)
    theta = replay.flat(ckpts[start], f"checkpoint {start}")
    buf = replay.buffer(buffers.get(start), f"momentum buffer at step {start}")
    for t in range(start, T):
        theta, buf = replay.step(theta, buf, t, drop=remove)
    return theta


def replay_without(model: nn.Module, task: Task, dataset: IndexedDataset,
                   trajectory: Trajectory, remove_ids: Iterable[int] | Tensor) -> nn.Module:
    """A copy of ``model`` with the weights of the recorded run replayed with ``remove_ids``
    dropped from every batch: same batches, order and learning rates, each remaining
    sample's loss keeps its weight (``1/|S_t|``), the removed ones get 0. This is the
    counterfactual SGD run that SGD-influence linearises; ``model`` is not changed."""
    remove = torch.as_tensor(list(remove_ids) if not isinstance(remove_ids, Tensor)
                             else remove_ids, dtype=torch.long).reshape(-1)
    if remove.numel() == 0:
        raise ValueError("remove_ids is empty: nothing to remove")
    dataset.index_of(remove)  # unknown ids raise UnknownIdError
    replay = SGDReplay(model, task, dataset, trajectory)
    theta = _counterfactual_final(replay, trajectory, remove)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, value in replay.space.unflatten(theta).items():
            out.get_parameter(name).copy_(value)
    return out


def loo_loss_changes(model: nn.Module, task: Task, dataset: IndexedDataset,
                     trajectory: Trajectory, query_loader: DataLoader,
                     ids: Iterable[int] | Tensor | None = None, *,
                     progress: bool = False) -> Tensor:
    """True SGD leave-one-out, by counterfactual replay: for each id, the mean query loss of
    the run without it minus that of the run with it (both replayed the same way), ``[len(ids)]``
    (default: every id of ``dataset``, in its order). Brute force: one replay per id."""
    from tqdm.auto import tqdm

    check_loader(query_loader, "query_loader", ordered=False)
    id_list = dataset.ids if ids is None else torch.as_tensor(
        list(ids) if not isinstance(ids, Tensor) else ids, dtype=torch.long).reshape(-1)
    dataset.index_of(id_list)
    replay = SGDReplay(model, task, dataset, trajectory)
    was_training = model.training
    model.eval()
    try:
        empty = torch.empty(0, dtype=torch.long)
        base = _mean_loss_at(replay, query_loader, _counterfactual_final(replay, trajectory,
                                                                         empty))
        it = tqdm(id_list.tolist(), desc="leave-one-out replays", leave=False) \
            if progress else id_list.tolist()
        out = [_mean_loss_at(replay, query_loader,
                             _counterfactual_final(replay, trajectory, torch.tensor([i])))
               - base for i in it]
    finally:
        model.train(was_training)
    return torch.tensor(out, dtype=torch.float64)


def _mean_loss_at(replay: SGDReplay, loader: DataLoader, theta: Tensor) -> float:
    params = replay.space.unflatten(theta)
    total, count = 0.0, 0
    with torch.no_grad():
        for raw in loader:
            batch = to_model(raw, replay.model)
            inputs, targets = replay.task.split_batch(batch)
            out = functional_call(replay.model, params, (inputs,))
            losses = replay.task.query_loss(out, targets)
            total += float(losses.sum())
            count += int(losses.shape[0])
    if count == 0:
        raise ValueError("query_loader yielded no examples")
    return total / count
