"""SalUn (Fan et al., "SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency
in Both Image Classification and Generation", ICLR 2024).

1. Weight saliency: ``|∇_θ mean forget loss|`` at the trained model; the salient weights are the
   top ``saliency`` fraction of all trainable entries (one global ranking, as in the paper), or,
   with ``threshold``, those whose magnitude is at least ``threshold``.
2. Random-label fine-tuning on forget ∪ retain (:class:`~baselines.random_label.RandomLabel`)
   in which only the salient weights are updated: the gradients are multiplied by the mask
   before each step, and weight decay is applied to salient weights only, so every other weight
   keeps its trained value exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from baselines.random_label import RandomLabel
from unlearn.influence.grads import to_model
from unlearn.tasks import Task

__all__ = ["SalUn", "saliency_mask"]


def forget_gradient(model: nn.Module, task: Task, forget: DataLoader) -> dict[str, Tensor]:
    """``∇_θ`` of the mean forget loss, per trainable parameter."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    model.eval()
    for batch in forget:
        losses = task.loss(model, to_model(batch, model))
        grads = torch.autograd.grad(losses.sum(), list(params.values()), allow_unused=True)
        for n, g in zip(params, grads, strict=True):
            if g is not None:
                total[n] += g
        count += losses.shape[0]
    return {n: g / max(count, 1) for n, g in total.items()}


def saliency_mask(grads: dict[str, Tensor], fraction: float | None = None,
                  threshold: float | None = None) -> dict[str, Tensor]:
    """Boolean masks selecting the top ``fraction`` of ``|grad|`` entries across all parameters
    (exactly ``round(fraction · P)`` of them), or the entries with ``|grad| ≥ threshold``."""
    if (fraction is None) == (threshold is None):
        raise ValueError("give exactly one of fraction and threshold")
    if threshold is not None:
        return {n: g.abs() >= threshold for n, g in grads.items()}
    assert fraction is not None
    flat = torch.cat([g.abs().reshape(-1) for g in grads.values()])
    k = int(round(fraction * flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        keep[torch.topk(flat, k).indices] = True
    out, start = {}, 0
    for n, g in grads.items():
        out[n] = keep[start:start + g.numel()].reshape(g.shape)
        start += g.numel()
    return out


class SalUn(RandomLabel):
    """Random-label unlearning restricted to the weights most salient for the forget loss.

    Defaults: ``saliency=0.5`` (the paper's usual sparsity), 5 epochs, SGD lr 0.01, momentum 0.9,
    weight decay 5e-4, batch 64.
    """

    name = "salun"

    def __init__(self, task: Task, *, saliency: float | None = 0.5,
                 threshold: float | None = None, epochs: int = 5, lr: float = 0.01,
                 batch_size: int = 64, momentum: float = 0.9, weight_decay: float = 5e-4,
                 optimizer: str = "sgd", seed: int = 0) -> None:
        super().__init__(task, epochs=epochs, lr=lr, batch_size=batch_size, momentum=momentum,
                         weight_decay=0.0, optimizer=optimizer, seed=seed)
        if threshold is not None:
            saliency = None
            if not threshold >= 0:
                raise ValueError(f"threshold must be >= 0, got {threshold!r}")
        elif saliency is None or not 0 < saliency <= 1:
            raise ValueError(f"saliency must be a fraction in (0, 1], got {saliency!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        self.saliency, self.threshold = saliency, threshold
        self.mask_weight_decay = float(weight_decay)
        self.mask_: dict[str, Tensor] | None = None

    def _prepare(self, model: nn.Module, forget: DataLoader,
                 gen: torch.Generator) -> dict[str, Any]:
        grads = forget_gradient(model, self.task, forget)
        self.mask_ = saliency_mask(grads, self.saliency, self.threshold)
        chosen = sum(int(m.sum()) for m in self.mask_.values())
        total = sum(m.numel() for m in self.mask_.values())
        return {"salient_fraction": chosen / total, "salient_weights": chosen}

    def _edit_grads(self, model: nn.Module) -> None:
        assert self.mask_ is not None
        for n, p in model.named_parameters():
            if p.grad is None or n not in self.mask_:
                continue
            mask = self.mask_[n].to(p.grad.dtype)
            if self.mask_weight_decay:
                p.grad.add_(p.detach(), alpha=self.mask_weight_decay)
            p.grad.mul_(mask)
