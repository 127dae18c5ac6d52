"""Gradient ascent on the forget loss (NegGrad) and its retain-anchored variant NegGrad+
(Kurmanji et al., "Towards Unbounded Machine Unlearning", NeurIPS 2023)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from baselines.retrain import Recipe, batch_size_of, seeded, shuffled
from unlearn.influence.grads import to_model
from unlearn.removal.base import RemovalMethod
from unlearn.tasks import Task

__all__ = ["NegGrad", "NegGradPlus"]


def _clip(model: nn.Module, max_grad_norm: float | None) -> None:
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)


def _cycle(loader: DataLoader) -> Iterator[Any]:
    """Endless batches, a fresh shuffle per pass (``itertools.cycle`` would replay one)."""
    while True:
        yield from loader


class _Ascent(RemovalMethod):
    def __init__(self, task: Task, *, epochs: int, lr: float, batch_size: int, momentum: float,
                 weight_decay: float, optimizer: str, max_grad_norm: float | None,
                 seed: int) -> None:
        super().__init__(task)
        self.recipe = Recipe(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer,
                             momentum=momentum, weight_decay=weight_decay)
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm!r}")
        self.max_grad_norm = max_grad_norm
        self.seed = int(seed)

    def _mean_loss(self, model: nn.Module, batch: Any) -> Tensor:
        return self.task.loss(model, to_model(batch, model)).mean()


class NegGrad(_Ascent):
    """Gradient *ascent* on the mean forget loss for a few epochs (forget data only).

    Unbounded: the forget loss can be driven up without limit, and the rest of the model's
    knowledge degrades with it; keep ``epochs``/``lr`` small or set ``max_grad_norm``.
    """

    name = "neggrad"
    needs_retain = False

    def __init__(self, task: Task, *, epochs: int = 5, lr: float = 0.01, batch_size: int = 64,
                 momentum: float = 0.9, weight_decay: float = 0.0, optimizer: str = "sgd",
                 max_grad_norm: float | None = None, seed: int = 0) -> None:
        super().__init__(task, epochs=epochs, lr=lr, batch_size=batch_size, momentum=momentum,
                         weight_decay=weight_decay, optimizer=optimizer,
                         max_grad_norm=max_grad_norm, seed=seed)

    def _unlearn(self, model: nn.Module, forget: DataLoader,
                 retain: DataLoader | None) -> dict[str, Any]:
        steps = 0
        with seeded(self.seed, model) as gen:
            data = shuffled(forget, self.recipe.batch_size, gen)
            opt = self.recipe.make_optimizer([p for p in model.parameters() if p.requires_grad])
            model.train()
            for _ in range(self.recipe.epochs):
                for batch in data:
                    opt.zero_grad(set_to_none=True)
                    (-self._mean_loss(model, batch)).backward()
                    _clip(model, self.max_grad_norm)
                    opt.step()
                    steps += 1
        return {"seed": self.seed, "steps": steps}


class NegGradPlus(_Ascent):
    """Descent on ``mean retain loss − alpha · mean forget loss`` (NegGrad+).

    Each step pairs one retain batch with one forget batch; an epoch is one pass over the larger
    of the two sets (the smaller one cycles, reshuffled on each pass). The forget term is
    unbounded (cross-entropy ascent never saturates), so ``alpha`` must stay small: the default
    0.05 forgets a digits class in 5 epochs while keeping retain accuracy within ~5 points;
    0.2 loses ~15 points, and the cut-over is sharp. Tune it per model and request.
    """

    name = "neggrad+"

    def __init__(self, task: Task, *, alpha: float = 0.05, epochs: int = 5, lr: float = 0.01,
                 batch_size: int = 64, forget_batch_size: int | None = None,
                 momentum: float = 0.9, weight_decay: float = 5e-4, optimizer: str = "sgd",
                 max_grad_norm: float | None = None, seed: int = 0) -> None:
        super().__init__(task, epochs=epochs, lr=lr, batch_size=batch_size, momentum=momentum,
                         weight_decay=weight_decay, optimizer=optimizer,
                         max_grad_norm=max_grad_norm, seed=seed)
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha!r}")
        if forget_batch_size is not None and forget_batch_size < 1:
            raise ValueError(f"forget_batch_size must be positive, got {forget_batch_size!r}")
        self.alpha = float(alpha)
        self.forget_batch_size = forget_batch_size or batch_size

    def _unlearn(self, model: nn.Module, forget: DataLoader,
                 retain: DataLoader | None) -> dict[str, Any]:
        assert retain is not None
        steps, seen = 0, 0
        with seeded(self.seed, model) as gen:
            r_data = shuffled(retain, self.recipe.batch_size, gen)
            f_data = shuffled(forget, self.forget_batch_size, gen)
            per_epoch = max(len(r_data), len(f_data))
            r_iter, f_iter = _cycle(r_data), _cycle(f_data)
            opt = self.recipe.make_optimizer([p for p in model.parameters() if p.requires_grad])
            model.train()
            for r_batch, f_batch in itertools.islice(zip(r_iter, f_iter),
                                                     per_epoch * self.recipe.epochs):
                opt.zero_grad(set_to_none=True)
                loss = (self._mean_loss(model, r_batch)
                        - self.alpha * self._mean_loss(model, f_batch))
                loss.backward()
                _clip(model, self.max_grad_norm)
                opt.step()
                steps += 1
                seen += batch_size_of(r_batch, self.task)
        return {"seed": self.seed, "steps": steps, "alpha": self.alpha,
                "retain_examples_processed": seen}
