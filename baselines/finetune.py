"""Fine-tuning on the retained data only: forgetting by catastrophic interference."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from baselines.retrain import Recipe, fit, seeded
from unlearn.removal.base import RemovalMethod
from unlearn.tasks import Task

__all__ = ["FineTune"]


class FineTune(RemovalMethod):
    """A few epochs of SGD on the retained data, starting from the trained model.

    Defaults (5 epochs, lr 0.01, momentum 0.9, weight decay 5e-4, batch 64) follow the small
    fine-tuning budgets of the unlearning benchmarks (a fraction of the training budget).
    """

    name = "finetune"

    def __init__(self, task: Task, *, epochs: int = 5, lr: float = 0.01, batch_size: int = 64,
                 momentum: float = 0.9, weight_decay: float = 5e-4, optimizer: str = "sgd",
                 seed: int = 0) -> None:
        super().__init__(task)
        self.recipe = Recipe(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer,
                             momentum=momentum, weight_decay=weight_decay)
        self.seed = int(seed)

    def _unlearn(self, model: nn.Module, forget: DataLoader,
                 retain: DataLoader | None) -> dict[str, Any]:
        assert retain is not None
        with seeded(self.seed, model) as gen:
            seen = fit(model, self.task, retain, self.recipe, gen)
        return {"seed": self.seed, "examples_processed": seen, "recipe": asdict(self.recipe)}
