"""Exact retraining on the retained data: the gold reference every removal is judged against.

This module also holds the small training toolkit the other baselines share: a
:class:`Recipe` (epochs, learning rate, batch size, optimiser, weight decay), a seeded RNG
context (:func:`seeded`) that leaves the caller's random state untouched, seeded shuffling of
a loader's data set (:func:`shuffled`) and the minibatch loop (:func:`fit`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from unlearn.influence.grads import model_dtype_device, to_model
from unlearn.removal.base import RemovalMethod
from unlearn.tasks import Task

__all__ = ["Recipe", "Retrain", "fit", "seeded", "shuffled", "derive_seed"]

_OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class Recipe:
    """How to train: ``epochs`` passes of minibatch ``optimizer`` ("sgd" with ``momentum``, or
    "adam") at ``lr`` with ``weight_decay``, shuffling ``batch_size`` examples per step."""

    epochs: int = 20
    lr: float = 0.05
    batch_size: int = 64
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(f"epochs must be a non-negative int, got {self.epochs!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {self.optimizer!r}")
        if self.momentum < 0 or self.weight_decay < 0:
            raise ValueError(f"momentum and weight_decay must be >= 0, got {self.momentum!r}, "
                             f"{self.weight_decay!r}")

    def make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum,
                               weight_decay=self.weight_decay)


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (e.g. ``(seed, shard, slice)``)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@contextlib.contextmanager
def seeded(seed: int, model: nn.Module | None = None) -> Iterator[torch.Generator]:
    """Seed torch's global RNG (CPU, and the model's CUDA device) inside the block, restoring the
    caller's state afterwards; yields a CPU generator seeded alike, for data shuffling."""
    devices: list[int] = []
    if model is not None:
        device = model_dtype_device(model)[1] if any(True for _ in model.parameters()) else None
        if device is not None and device.type == "cuda":
            devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed)


def shuffled(loader: DataLoader, batch_size: int | None, generator: torch.Generator) -> DataLoader:
    """A loader over ``loader``'s data set that reshuffles each epoch with ``generator``.

    Iterable data sets cannot be reshuffled; their loader is returned unchanged.
    """
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        return loader
    return DataLoader(dataset, batch_size=batch_size or loader.batch_size or 1, shuffle=True,
                      generator=generator, collate_fn=loader.collate_fn)


def batch_size_of(batch: Any, task: Task) -> int:
    return int(task.split_batch(batch)[1].shape[0])


def fit(model: nn.Module, task: Task, loader: DataLoader, recipe: Recipe,
        generator: torch.Generator,
        after_backward: Callable[[nn.Module], None] | None = None) -> int:
    """Train ``model`` in place on the mean loss of ``loader``'s data following ``recipe``,
    shuffling with ``generator``; ``after_backward(model)`` may edit gradients before each step.
    Returns the number of examples processed (examples × epochs)."""
    data = shuffled(loader, recipe.batch_size, generator)
    opt = recipe.make_optimizer([p for p in model.parameters() if p.requires_grad])
    seen = 0
    model.train()
    for _ in range(recipe.epochs):
        for batch in data:
            batch = to_model(batch, model)
            opt.zero_grad(set_to_none=True)
            task.loss(model, batch).mean().backward()
            if after_backward is not None:
                after_backward(model)
            opt.step()
            seen += batch_size_of(batch, task)
    model.eval()
    return seen


def check_same_architecture(reference: nn.Module, fresh: nn.Module, who: str) -> None:
    """Raise if ``fresh`` (from a model factory) cannot hold ``reference``'s state."""
    ref, new = reference.state_dict(), fresh.state_dict()
    if ref.keys() != new.keys():
        extra, missing = sorted(new.keys() - ref.keys()), sorted(ref.keys() - new.keys())
        raise ValueError(f"{who}: model_factory() builds a different architecture from the "
                         f"model given: extra keys {extra[:5]}, missing keys {missing[:5]}")
    for key, t in ref.items():
        if isinstance(t, Tensor) and t.shape != new[key].shape:
            raise ValueError(f"{who}: model_factory() gives {key!r} the shape "
                             f"{tuple(new[key].shape)}, the model given has {tuple(t.shape)}")


def fresh_like(model_factory: Callable[[], nn.Module], model: nn.Module, who: str) -> nn.Module:
    """A new model from ``model_factory`` on ``model``'s device and dtype, checked to match."""
    fresh = model_factory()
    if not isinstance(fresh, nn.Module):
        raise TypeError(f"{who}: model_factory() must return an nn.Module, got {type(fresh)}")
    dtype, device = model_dtype_device(model)
    fresh = fresh.to(device=device, dtype=dtype)
    check_same_architecture(model, fresh, who)
    return fresh


TrainFn = Callable[[nn.Module, DataLoader], "nn.Module | None"]


class Retrain(RemovalMethod):
    """Exact unlearning: train a fresh model from scratch on the retained data only.

    ``model_factory()`` returns a freshly initialised model of the same architecture as the one
    being unlearned (the input model serves only to check the architecture, device and dtype).
    Training follows ``recipe`` (seeded shuffling), or ``train_fn(model, retain_loader)`` which
    trains in place (or returns the trained model). Deterministic given ``seed``: both the
    initialisation and the training run under it.
    """

    name = "retrain"

    def __init__(self, task: Task, model_factory: Callable[[], nn.Module], *,
                 recipe: Recipe | None = None, train_fn: TrainFn | None = None,
                 seed: int = 0) -> None:
        super().__init__(task)
        if not callable(model_factory):
            raise TypeError(f"model_factory must be callable, got {type(model_factory)}")
        if recipe is not None and train_fn is not None:
            raise ValueError("pass either recipe or train_fn, not both")
        if train_fn is not None and not callable(train_fn):
            raise TypeError(f"train_fn must be callable, got {type(train_fn)}")
        self.model_factory = model_factory
        self.recipe = recipe if recipe is not None or train_fn is not None else Recipe()
        self.train_fn = train_fn
        self.seed = int(seed)

    def _unlearn(self, model: nn.Module, forget: DataLoader,
                 retain: DataLoader | None) -> dict[str, Any]:
        assert retain is not None
        with seeded(self.seed, model) as gen:
            fresh = fresh_like(self.model_factory, model, type(self).__name__)
            if self.train_fn is not None:
                out = self.train_fn(fresh, retain)
                fresh = out if isinstance(out, nn.Module) else fresh
                seen = None
            else:
                assert self.recipe is not None
                seen = fit(fresh, self.task, retain, self.recipe, gen)
        model.load_state_dict(fresh.state_dict())
        return {"seed": self.seed, "examples_processed": seen,
                "recipe": None if self.recipe is None else asdict(self.recipe)}
