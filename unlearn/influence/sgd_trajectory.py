"""Recorded SGD trajectories and their exact replay: what SGD-influence and counterfactual
retraining need from a training run.

A :class:`Trajectory` holds, for every optimizer step ``t = 0 .. T-1``, the ids of the samples
in the step's batch, the weight each sample's loss had in the step's gradient (``1/|S_t|`` for
the mean loss of the batch) and the learning rate; the optimizer's hyper-parameters
(:class:`SGDConfig`); and model weights at some steps ("checkpoints": the parameters *before*
step t, with SGD's momentum buffer where it is known). Weights between checkpoints are
recomputed by replaying the recorded steps forward (:class:`SGDReplay`), so a run needs to keep
only every k-th copy of its weights.

Three ways to get one:

* :func:`train_sgd_recorded` trains a model with ``torch.optim.SGD`` and records as it goes;
* :class:`TrajectoryRecorder` records your own loop (call ``record(ids)`` before each
  ``optimizer.step()``);
* :meth:`Trajectory.from_training_log` reads a ``unlearn.lightning.TrainingLogCallback``.

What replay assumes: each step minimises ``Σ_i w_i ℓ_i`` (``task.per_sample_loss``; the mean
over the batch by default) with ``torch.optim.SGD`` (momentum, dampening, Nesterov and weight
decay supported, one set of hyper-parameters for all parameters); no dropout, batch-norm
statistics, gradient clipping or other change to the gradient. The replay is checked against
the weights it can see (checkpoints and the final model) and raises
:class:`ReplayMismatchError` when they differ, which is how a violated assumption shows up.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap
from torch.utils._pytree import tree_map
from torch.utils.data import TensorDataset
from torch.utils.data._utils.collate import default_collate

from unlearn.checkpoints import read_weights_file
from unlearn.data import IndexedDataset
from unlearn.influence.grads import (
    ParamSpace,
    all_finite,
    check_finite_batch,
    model_dtype_device,
    to_model,
)
from unlearn.tasks import Task

__all__ = [
    "SGDConfig",
    "TrajectoryStep",
    "Trajectory",
    "TrajectoryRecorder",
    "train_sgd_recorded",
    "SGDReplay",
    "UnsupportedOptimizerError",
    "ReplayMismatchError",
]

#: a checkpoint: a state_dict (extra keys such as buffers are ignored) or a weights file
WeightsSource = Mapping[str, Tensor] | str | os.PathLike


class UnsupportedOptimizerError(ValueError):
    """The run used an optimizer whose steps SGD-influence cannot replay."""


class ReplayMismatchError(ValueError):
    """Replaying the recorded steps does not reproduce the recorded weights."""


# ---------------------------------------------------------------------------- optimizer


@dataclass(frozen=True)
class SGDConfig:
    """The hyper-parameters of ``torch.optim.SGD`` that shape its update (the learning rate is
    recorded per step). The update, as PyTorch computes it::

        g = ∇L_S(θ) + weight_decay · θ
        b = g at the first step, else momentum · b + (1 − dampening) · g
        d = g + momentum · b  (nesterov)  or  b  (momentum > 0)  or  g  (momentum = 0)
        θ ← θ − lr · d
    """

    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        for name in ("momentum", "dampening", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0:
                raise ValueError(f"SGDConfig.{name} must be a finite number >= 0, got {value!r}")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("Nesterov momentum needs momentum > 0 and dampening = 0 "
                             f"(got momentum={self.momentum}, dampening={self.dampening})")

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer) -> SGDConfig:
        """The configuration of a ``torch.optim.SGD``; other optimizers raise
        :class:`UnsupportedOptimizerError`, as do param groups with different settings."""
        if type(optimizer) is not torch.optim.SGD:
            raise UnsupportedOptimizerError(_unsupported(type(optimizer).__name__))
        configs = set()
        for group in optimizer.param_groups:
            if group.get("maximize", False):
                raise UnsupportedOptimizerError("SGD with maximize=True is not supported")
            configs.add(cls(float(group["momentum"]), float(group["dampening"]),
                            bool(group["nesterov"]), float(group["weight_decay"])))
        if len(configs) != 1:
            raise UnsupportedOptimizerError(
                f"the optimizer's param groups use different settings {sorted(map(str, configs))};"
                " SGD-influence needs one momentum/dampening/nesterov/weight_decay for all")
        return configs.pop()

    @classmethod
    def from_description(cls, description: Mapping[str, Any]) -> SGDConfig:
        """From ``TrainingLogCallback.optimizers[i]``: ``{"class": ..., "defaults": {...}}``."""
        name = description.get("class")
        if name != "SGD":
            raise UnsupportedOptimizerError(_unsupported(str(name)))
        d = description.get("defaults", {})
        if d.get("maximize", False):
            raise UnsupportedOptimizerError("SGD with maximize=True is not supported")
        return cls(float(d.get("momentum", 0.0)), float(d.get("dampening", 0.0)),
                   bool(d.get("nesterov", False)), float(d.get("weight_decay", 0.0)))


def _unsupported(name: str) -> str:
    return (f"SGD-influence replays torch.optim.SGD steps (with momentum, dampening, Nesterov "
            f"and weight decay); the run used {name}, whose update it cannot replay")


# ---------------------------------------------------------------------------- trajectory


@dataclass(frozen=True)
class TrajectoryStep:
    """One optimizer step: the step's gradient is ``Σ_j weights[j] ∇ℓ_{ids[j]}``."""

    ids: Tensor  # long [m]
    weights: Tensor  # float64 [m]
    lr: float


def mean_step(ids: Iterable[int] | Tensor, lr: float) -> TrajectoryStep:
    """A step on the mean loss of the batch ``ids`` (weights ``1/|S|``)."""
    ids_t = torch.as_tensor(list(ids) if not isinstance(ids, Tensor) else ids, dtype=torch.long)
    ids_t = ids_t.reshape(-1)
    weights = torch.full((len(ids_t),), 1.0 / max(len(ids_t), 1), dtype=torch.float64)
    return TrajectoryStep(ids_t, weights, float(lr))


@dataclass
class Trajectory:
    """A recorded SGD run. ``checkpoints[t]`` are the weights before step t (``t = T`` is the
    final model) and ``momentum_buffers[t]`` SGD's momentum buffer before step t, by parameter
    name (needed only with momentum; the buffer before step 0 is empty by definition)."""

    steps: list[TrajectoryStep]
    optimizer: SGDConfig
    checkpoints: dict[int, WeightsSource]
    momentum_buffers: dict[int, Mapping[str, Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError("the trajectory has no steps")
        if not isinstance(self.optimizer, SGDConfig):
            raise TypeError(f"optimizer must be an SGDConfig, got {type(self.optimizer)}")
        for t, step in enumerate(self.steps):
            if step.ids.dim() != 1 or step.ids.dtype != torch.long or len(step.ids) == 0:
                raise ValueError(f"step {t}: ids must be a non-empty 1-D LongTensor")
            if step.weights.shape != step.ids.shape or not torch.isfinite(step.weights).all():
                raise ValueError(f"step {t}: weights must be finite, one per id")
            if not (math.isfinite(step.lr) and step.lr >= 0):
                raise ValueError(f"step {t}: learning rate must be finite and >= 0, got {step.lr}")
        bad = [s for s in list(self.checkpoints) + list(self.momentum_buffers)
               if not 0 <= int(s) <= len(self.steps)]
        if bad:
            raise ValueError(f"checkpoint steps {bad[:5]} lie outside 0..{len(self.steps)}")

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def ids(self) -> Tensor:
        """Every id that appears in some step, sorted."""
        return torch.unique(torch.cat([s.ids for s in self.steps]))

    def first_step_with(self, ids: Iterable[int]) -> int | None:
        """The first step whose batch holds one of ``ids`` (None if none does)."""
        wanted = torch.as_tensor(list(ids), dtype=torch.long)
        for t, step in enumerate(self.steps):
            if torch.isin(step.ids, wanted).any():
                return t
        return None

    @classmethod
    def from_training_log(cls, log: Any, *, optimizer: SGDConfig | None = None) -> Trajectory:
        """Read a ``TrainingLogCallback`` (or anything with its ``steps``, ``checkpoints`` and
        ``optimizers``). Batches that share an optimizer step (gradient accumulation) form
        one step; as Lightning does, each batch's mean loss is divided by the accumulation
        count (read as the largest number of batches sharing a step), also in a shorter last
        group of an epoch. ``optimizer`` overrides the log's description of the optimizer."""
        records = list(getattr(log, "steps", []))
        if not records:
            raise ValueError("the training log has no steps: was it attached to a fit?")
        if optimizer is None:
            described = list(getattr(log, "optimizers", []))
            if not described:
                raise ValueError("the training log does not describe its optimizer; pass "
                                 "optimizer=SGDConfig(...)")
            if len(described) != 1:
                raise UnsupportedOptimizerError(
                    f"the run used {len(described)} optimizers; SGD-influence supports one")
            optimizer = SGDConfig.from_description(described[0])
        groups: dict[int, list[Any]] = {}
        for r in records:
            if r.ids is None:
                raise ValueError(
                    f"the training log has batches without ids (step {r.step}, batch "
                    f"{r.batch_idx}): record it with batches of (ids, x, y) and require_ids=True")
            groups.setdefault(int(r.step), []).append(r)
        if sorted(groups) != list(range(len(groups))):
            missing = sorted(set(range(max(groups) + 1)) - set(groups))
            raise ValueError(f"the training log's steps are not 0..T-1 without gaps (missing "
                             f"{missing[:5]}); it must cover the run from its first step")
        # Lightning divides every batch's loss by accumulate_grad_batches, also in a shorter
        # last group of an epoch; the log does not record it, the largest group shows it
        accumulate = max(len(g) for g in groups.values())
        steps = [_log_step(t, groups[t], accumulate) for t in range(len(groups))]
        checkpoints = {int(s): w for s, w in getattr(log, "checkpoints", [])}
        return cls(steps, optimizer, checkpoints)


def _log_step(t: int, records: list[Any], accumulate: int) -> TrajectoryStep:
    lrs = records[0].lrs
    if len(lrs) != 1:
        raise UnsupportedOptimizerError(
            f"step {t} recorded {len(lrs)} optimizers; SGD-influence supports one")
    if len(set(lrs[0])) != 1:
        raise UnsupportedOptimizerError(
            f"step {t}: param groups use different learning rates {list(lrs[0])}; "
            "SGD-influence needs one learning rate for all parameters")
    ids, weights = [], []
    for r in records:  # accumulated micro-batches: each mean loss divided by `accumulate`
        if not r.ids:
            raise ValueError(f"step {t}: batch {r.batch_idx} has no ids")
        ids.extend(r.ids)
        weights.extend([1.0 / (accumulate * len(r.ids))] * len(r.ids))
    return TrajectoryStep(torch.tensor(ids, dtype=torch.long),
                          torch.tensor(weights, dtype=torch.float64), float(lrs[0][0]))


# ---------------------------------------------------------------------------- recording


class TrajectoryRecorder:
    """Records a plain PyTorch loop trained with ``torch.optim.SGD``.

    Call ``record(ids)`` right before every ``optimizer.step()`` (after the learning rate for
    that step is set), then ``trajectory()`` when training is done::

        rec = TrajectoryRecorder(model, opt, checkpoint_every=10)
        for ids, x, y in loader:
            opt.zero_grad(); task.loss(model, (ids, x, y)).mean().backward()
            rec.record(ids); opt.step()
        traj = rec.trajectory()

    Every ``checkpoint_every``-th step keeps a CPU copy of the weights and momentum buffers
    (``1``: every step, nothing to replay; larger: less memory, replayed on demand).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 checkpoint_every: int = 1) -> None:
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) \
                or checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be a positive integer, got "
                             f"{checkpoint_every!r}")
        self.model, self.optimizer = model, optimizer
        self.config = SGDConfig.from_optimizer(optimizer)
        self.checkpoint_every = checkpoint_every
        self.steps: list[TrajectoryStep] = []
        self.checkpoints: dict[int, dict[str, Tensor]] = {}
        self.buffers: dict[int, dict[str, Tensor]] = {}
        self._names = {id(p): n for n, p in model.named_parameters()}

    def record(self, ids: Iterable[int] | Tensor, weights: Tensor | None = None) -> None:
        """Record the step about to be taken on the batch ``ids`` (mean loss by default)."""
        lrs = {float(g["lr"]) for g in self.optimizer.param_groups}
        if len(lrs) != 1:
            raise UnsupportedOptimizerError(f"param groups use different learning rates "
                                            f"{sorted(lrs)}; SGD-influence needs one")
        step = mean_step(ids, lrs.pop())
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
            step = TrajectoryStep(step.ids, weights, step.lr)
        t = len(self.steps)
        if t % self.checkpoint_every == 0:
            self._snapshot(t)
        self.steps.append(step)

    def _snapshot(self, t: int) -> None:
        self.checkpoints[t] = {n: p.detach().to("cpu", copy=True)
                               for n, p in self.model.named_parameters() if p.requires_grad}
        if self.config.momentum > 0 and t > 0:
            buf = {}
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    b = self.optimizer.state.get(p, {}).get("momentum_buffer")
                    if b is not None:
                        buf[self._names[id(p)]] = b.detach().to("cpu", copy=True)
            self.buffers[t] = buf

    def trajectory(self) -> Trajectory:
        """The recorded run, with the current weights as the final checkpoint."""
        self._snapshot(len(self.steps))
        return Trajectory(list(self.steps), self.config, dict(self.checkpoints),
                          dict(self.buffers))


def train_sgd_recorded(
    model: nn.Module,
    task: Task,
    dataset: IndexedDataset,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    lr_schedule: Callable[[int], float] | None = None,
    checkpoint_every: int = 1,
) -> Trajectory:
    """Train ``model`` in place with minibatch ``torch.optim.SGD`` on the mean loss and
    return its :class:`Trajectory`.

    Each epoch visits ``dataset`` in a fresh order drawn from ``seed``; the last batch of an
    epoch may be smaller. ``lr_schedule(t)`` (optional) gives the learning rate of step t.
    """
    if not isinstance(dataset, IndexedDataset):
        raise TypeError(f"dataset must be an unlearn.data.IndexedDataset, got {type(dataset)}")
    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, dampening=dampening,
                          nesterov=nesterov, weight_decay=weight_decay)
    recorder = TrajectoryRecorder(model, opt, checkpoint_every)
    fetch = BatchFetcher(dataset, model)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t = 0
    for _ in range(epochs):
        order = dataset.ids[torch.randperm(len(dataset), generator=gen)]
        for ids in order.split(batch_size):
            if lr_schedule is not None:
                for g in opt.param_groups:
                    g["lr"] = float(lr_schedule(t))
            opt.zero_grad()
            task.loss(model, fetch(ids)).mean().backward()
            recorder.record(ids)
            opt.step()
            t += 1
    model.eval()
    return recorder.trajectory()


# ---------------------------------------------------------------------------- replay


class BatchFetcher:
    """``(ids, x, y)`` batches of an :class:`IndexedDataset` by sample id, on the model's
    device and dtype (a TensorDataset is indexed directly, others are collated)."""

    def __init__(self, dataset: IndexedDataset, model: nn.Module) -> None:
        if not isinstance(dataset, IndexedDataset):
            raise TypeError(f"dataset must be an unlearn.data.IndexedDataset (the ids the "
                            f"trajectory records), got {type(dataset).__name__}")
        self.dataset, self.model = dataset, model
        self._tensors = dataset.tensors() if isinstance(dataset.dataset, TensorDataset) else None

    def positions(self, ids: Tensor) -> Tensor:
        return torch.tensor(self.dataset.index_of(ids), dtype=torch.long)

    def __call__(self, ids: Tensor, positions: Tensor | None = None) -> tuple:
        pos = self.positions(ids) if positions is None else positions
        if self._tensors is not None:
            batch = (ids, *(t[pos] for t in self._tensors))
        else:
            batch = default_collate([self.dataset[int(p)] for p in pos])
        return to_model(batch, self.model)


class SGDReplay:
    """The recorded SGD steps of ``trajectory`` as functions of flat parameter vectors.

    ``step`` takes one SGD update (optionally with some samples' weights set to zero: the
    counterfactual run without them); ``per_sample_grads`` and ``hvp`` give what the backward
    pass of SGD-influence needs at a step. Parameters are all trainable ones of ``model``.
    """

    def __init__(self, model: nn.Module, task: Task, dataset: IndexedDataset,
                 trajectory: Trajectory) -> None:
        self.model, self.task, self.trajectory = model, task, trajectory
        self.config = trajectory.optimizer
        self.space = ParamSpace.of(model)
        self.dtype, self.device = model_dtype_device(model)
        self.fetch = BatchFetcher(dataset, model)
        dataset.index_of(trajectory.ids())  # ids the dataset lacks raise UnknownIdError
        self.positions = [self.fetch.positions(s.ids) for s in trajectory.steps]
        self.n = len(dataset)
        if self.fetch._tensors is not None:  # cheap up-front check; others fail at their step
            check_finite_batch(self.fetch._tensors)

    # ---------------------------------------------------------------- weights
    def flat(self, source: WeightsSource | Tensor, what: str) -> Tensor:
        """A checkpoint as a flat vector in this space (validated)."""
        if isinstance(source, Tensor):
            return source.to(device=self.device, dtype=self.dtype)
        state = read_weights_file(source) if isinstance(source, (str, os.PathLike)) else source
        if not isinstance(state, Mapping):
            raise ValueError(f"{what} is a {type(state).__name__}, not a state_dict")
        missing = [n for n in self.space.names if n not in state]
        if missing:
            raise ValueError(f"{what} lacks the model's parameters {missing[:5]} (its keys: "
                             f"{list(state)[:5]}); pass the module the log was recorded from")
        parts = {}
        for n, shape in zip(self.space.names, self.space.shapes, strict=True):
            v = state[n]
            if not isinstance(v, Tensor) or v.shape != shape:
                got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(f"{what}: {n!r} is {got}, the model's is {tuple(shape)}")
            if not torch.isfinite(v).all():
                raise ValueError(f"{what}: parameter {n!r} contains NaN or inf")
            parts[n] = v.to(device=self.device, dtype=self.dtype)
        return self.space.flatten(parts)

    def buffer(self, source: Mapping[str, Tensor] | Tensor | None, what: str) -> Tensor | None:
        """A momentum buffer as a flat vector (missing parameters count as zero)."""
        if source is None or isinstance(source, Tensor):
            return source
        parts = {n: torch.as_tensor(source[n]).to(device=self.device, dtype=self.dtype)
                 if n in source else torch.zeros(s, dtype=self.dtype, device=self.device)
                 for n, s in zip(self.space.names, self.space.shapes, strict=True)}
        flat = self.space.flatten(parts)
        if not torch.isfinite(flat).all():
            raise ValueError(f"{what} contains NaN or inf")
        return flat

    def current(self) -> Tensor:
        return self.space.flatten(self.space.params(self.model)).clone()

    # ---------------------------------------------------------------- one step
    def batch(self, t: int, drop: Tensor | None = None) -> tuple[Any, Tensor, Tensor]:
        """``(inputs, targets, weights)`` of step t; samples whose id is in ``drop`` get
        weight zero (the batch normaliser stays |S_t|, as in Hara et al.'s counterfactual)."""
        step = self.trajectory.steps[t]
        batch = self.fetch(step.ids, self.positions[t])
        check_finite_batch(batch)
        inputs, targets = self.task.split_batch(batch)
        w = step.weights.to(device=self.device, dtype=self.dtype)
        if drop is not None:
            w = torch.where(torch.isin(step.ids, drop).to(self.device), torch.zeros_like(w), w)
        return inputs, targets, w

    def _loss_fn(self, inputs: Any, targets: Tensor, weights: Tensor) -> Callable:
        def loss(theta: Tensor) -> Tensor:
            out = functional_call(self.model, self.space.unflatten(theta), (inputs,))
            return (self.task.per_sample_loss(out, targets) * weights).sum()
        return loss

    def step(self, theta: Tensor, buf: Tensor | None, t: int,
             drop: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``(θ_{t+1}, b_t)`` from ``(θ_t, b_{t-1})``, exactly as ``torch.optim.SGD``."""
        cfg, lr = self.config, self.trajectory.steps[t].lr
        g = grad(self._loss_fn(*self.batch(t, drop)))(theta)
        if not torch.isfinite(g).all():
            raise FloatingPointError(f"the gradient of step {t} contains NaN or inf")
        if cfg.weight_decay:
            g = g + cfg.weight_decay * theta
        if cfg.momentum > 0:
            buf = g.clone() if buf is None else cfg.momentum * buf + (1 - cfg.dampening) * g
            g = g + cfg.momentum * buf if cfg.nesterov else buf
        return theta - lr * g, buf

    def per_sample_grads(self, theta: Tensor, t: int) -> Tensor:
        """``∇ℓ_i(θ)`` for the samples of step t, ``[m, P]``."""
        inputs, targets, _ = self.batch(t)

        def one(theta: Tensor, x: Any, y: Tensor) -> Tensor:
            out = functional_call(self.model, self.space.unflatten(theta), (_single(x),))
            return self.task.per_sample_loss(out, _single(y)).sum()

        G = vmap(grad(one), in_dims=(None, 0, 0))(theta, inputs, targets)
        if not all_finite(G):
            raise FloatingPointError(f"per-sample gradients of step {t} contain NaN or inf")
        return G

    def hvp(self, theta: Tensor, t: int, V: Tensor) -> Tensor:
        """``H_t V`` for the rows of ``V[k, P]``, H_t the Hessian of step t's weighted loss."""
        f = grad(self._loss_fn(*self.batch(t)))
        return vmap(lambda v: jvp(f, (theta,), (v,))[1])(V)


def _single(x: Any) -> Any:
    return tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, x)


def relative_gap(a: Tensor, b: Tensor) -> float:
    """``||a − b|| / ||b||`` (absolute when b is zero)."""
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def segment_bounds(anchor_steps: Sequence[int], num_steps: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` covering ``0..T-1`` from sorted anchor steps (first is 0)."""
    starts = [s for s in anchor_steps if s < num_steps]
    return [(s, e) for s, e in zip(starts, starts[1:] + [num_steps], strict=True)]
