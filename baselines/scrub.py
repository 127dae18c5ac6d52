"""SCRUB (Kurmanji et al., "Towards Unbounded Machine Unlearning", NeurIPS 2023).

The original model is a frozen teacher; a copy of it, the student, alternates

* max-steps on the forget set: *maximise* ``KL(teacher ‖ student)`` (descend on its negative);
* min-steps on the retain set: minimise ``gamma · CE(student, y) + alpha · KL(teacher ‖ student)``,

with temperature-``T`` distillation ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` averaged over the
batch. Each of the first ``msteps`` epochs does a max pass then a min pass; the remaining epochs
do min passes only (the paper's schedule, which lets the retain performance recover).
Defaults follow the authors' released settings (T = 4, gamma = 0.99, alpha = 0.001, msteps = 2,
SGD with momentum 0.9 and weight decay 5e-4); the learning rate is raised from their 5e-4 for
ResNets to 0.01, which small MLP/CNN models on digits/MNIST need to move within a few epochs.
"""

from __future__ import annotations

import copy
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from baselines.retrain import Recipe, seeded, shuffled
from unlearn.influence.grads import to_model
from unlearn.removal.base import RemovalMethod
from unlearn.tasks import ClassificationTask, Task

__all__ = ["SCRUB", "distill_kl"]


def distill_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T² · KL(softmax(t/T) ‖ softmax(s/T))``, summed over classes, averaged over the batch."""
    log_s = F.log_softmax(student_logits / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_s, log_t, reduction="sum", log_target=True)
    return kl * temperature**2 / student_logits.shape[0]


def require_classification(task: Task, who: str) -> None:
    if not isinstance(task, ClassificationTask):
        raise TypeError(f"{who} works on class probabilities and needs a ClassificationTask, "
                        f"got {type(task).__name__}")


class SCRUB(RemovalMethod):
    """Teacher–student unlearning: diverge from the teacher on forget, stay close on retain."""

    name = "scrub"

    def __init__(self, task: Task, *, epochs: int = 5, msteps: int = 2, lr: float = 0.01,
                 temperature: float = 4.0, gamma: float = 0.99, alpha: float = 0.001,
                 batch_size: int = 64, forget_batch_size: int | None = None,
                 momentum: float = 0.9, weight_decay: float = 5e-4, optimizer: str = "sgd",
                 seed: int = 0) -> None:
        super().__init__(task)
        require_classification(task, "SCRUB")
        if not 0 <= msteps <= epochs:
            raise ValueError(f"msteps must be in [0, epochs={epochs}], got {msteps!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        if gamma < 0 or alpha < 0:
            raise ValueError(f"gamma and alpha must be >= 0, got {gamma!r}, {alpha!r}")
        self.recipe = Recipe(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer,
                             momentum=momentum, weight_decay=weight_decay)
        self.msteps = int(msteps)
        self.temperature = float(temperature)
        self.gamma, self.alpha = float(gamma), float(alpha)
        self.forget_batch_size = forget_batch_size or batch_size
        self.seed = int(seed)

    def _pass(self, student: nn.Module, teacher: nn.Module, data: DataLoader, opt: Any,
              maximise: bool) -> float:
        total, count = 0.0, 0
        for batch in data:
            inputs, targets = self.task.split_batch(to_model(batch, student))
            s_out = self.task.forward(student, inputs)
            t_out = self.task.forward(teacher, inputs).detach()
            kl = distill_kl(s_out, t_out, self.temperature)
            if maximise:
                loss = -kl
            else:
                ce = self.task.per_sample_loss(s_out, targets).mean()
                loss = self.gamma * ce + self.alpha * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(kl.detach()) * s_out.shape[0]
            count += s_out.shape[0]
        return total / max(count, 1)

    def _unlearn(self, model: nn.Module, forget: DataLoader,
                 retain: DataLoader | None) -> dict[str, Any]:
        assert retain is not None
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        history: list[dict[str, float]] = []
        with seeded(self.seed, model) as gen:
            f_data = shuffled(forget, self.forget_batch_size, gen)
            r_data = shuffled(retain, self.recipe.batch_size, gen)
            opt = self.recipe.make_optimizer([p for p in model.parameters() if p.requires_grad])
            model.train()
            for epoch in range(self.recipe.epochs):
                row: dict[str, float] = {}
                if epoch < self.msteps:
                    row["forget_kl"] = self._pass(model, teacher, f_data, opt, maximise=True)
                row["retain_kl"] = self._pass(model, teacher, r_data, opt, maximise=False)
                history.append(row)
        return {"seed": self.seed, "msteps": self.msteps, "epochs": self.recipe.epochs,
                "history": history}
