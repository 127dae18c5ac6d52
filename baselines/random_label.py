"""Random-label unlearning: fine-tune on the forget set relabelled with wrong classes, together
with the retained data (the "RL" baseline of the unlearning benchmarks, e.g. Fan et al. 2024).
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from baselines.retrain import Recipe, seeded, shuffled
from baselines.scrub import require_classification
from unlearn.influence.grads import to_model
from unlearn.removal.base import RemovalMethod
from unlearn.tasks import Task

__all__ = ["RandomLabel", "wrong_labels"]


def wrong_labels(targets: Tensor, num_classes: int, generator: torch.Generator) -> Tensor:
    """A uniformly drawn class different from each target."""
    shift = torch.randint(1, num_classes, targets.shape, generator=generator)
    return (targets.long() + shift.to(targets.device)) % num_classes


class RandomLabel(RemovalMethod):
    """Fine-tune on forget (with random wrong labels) ∪ retain (true labels).

    Each epoch visits every forget and retain batch once, in a seeded random order; the forget
    labels are redrawn for every visit (uniform over the classes other than the true one), which
    pushes the forget predictions away from their labels rather than onto one fixed wrong class.
    Defaults: 5 epochs, SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 64.
    """

    name = "random_label"

    def __init__(self, task: Task, *, epochs: int = 5, lr: float = 0.01, batch_size: int = 64,
                 momentum: float = 0.9, weight_decay: float = 5e-4, optimizer: str = "sgd",
                 seed: int = 0) -> None:
        super().__init__(task)
        require_classification(task, type(self).__name__)
        self.recipe = Recipe(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer,
                             momentum=momentum, weight_decay=weight_decay)
        self.seed = int(seed)

    def _prepare(self, model: nn.Module, forget: DataLoader,
                 gen: torch.Generator) -> dict[str, Any]:
        """Hook run before training (SalUn computes its saliency mask here)."""
        return {}

    def _edit_grads(self, model: nn.Module) -> None:
        """Hook run after each backward pass (SalUn masks the gradients here)."""

    def _num_classes(self, model: nn.Module, forget: DataLoader) -> int:
        inputs, _ = self.task.split_batch(to_model(next(iter(forget)), model))
        model.eval()  # a probe must not move batch-norm statistics
        with torch.no_grad():
            return int(self.task.forward(model, inputs).shape[1])

    def _unlearn(self, model: nn.Module, forget: DataLoader,
                 retain: DataLoader | None) -> dict[str, Any]:
        assert retain is not None
        num_classes = self._num_classes(model, forget)
        if num_classes < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 classes, the model "
                             f"outputs {num_classes}")
        with seeded(self.seed, model) as gen:
            details = self._prepare(model, forget, gen)
            f_data = shuffled(forget, self.recipe.batch_size, gen)
            r_data = shuffled(retain, self.recipe.batch_size, gen)
            order = random.Random(self.seed)
            opt = self.recipe.make_optimizer([p for p in model.parameters() if p.requires_grad])
            model.train()
            steps = 0
            for _ in range(self.recipe.epochs):
                tags = [True] * len(f_data) + [False] * len(r_data)
                order.shuffle(tags)
                f_iter, r_iter = iter(f_data), iter(r_data)
                for is_forget in tags:
                    batch = next(f_iter) if is_forget else next(r_iter)
                    inputs, targets = self.task.split_batch(to_model(batch, model))
                    if is_forget:
                        targets = wrong_labels(targets, num_classes, gen)
                    loss = self.task.per_sample_loss(self.task.forward(model, inputs), targets)
                    opt.zero_grad(set_to_none=True)
                    loss.mean().backward()
                    self._edit_grads(model)
                    opt.step()
                    steps += 1
        return {"seed": self.seed, "steps": steps, "num_classes": num_classes, **details}
