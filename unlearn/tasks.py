"""How a model's per-sample loss is computed.

A :class:`Task` tells the estimators and removal modules three things about a model:

* how to split a batch into inputs and targets (``(x, y)`` and ``(ids, x, y)`` are built in);
* the per-sample training loss, ``per_sample_loss(outputs, targets) -> Tensor[B]``;
* how to draw targets from the model's own predictive distribution
  (``sample_targets``), which gives the *true* Fisher that K-FAC / EK-FAC need.

A custom task subclasses :class:`Task` and overrides ``per_sample_loss`` (and, for the true
Fisher, ``sample_targets``)::

    class HingeTask(Task):
        def per_sample_loss(self, outputs, targets):
            margin = outputs.squeeze(-1) * (2 * targets.float() - 1)
            return torch.nn.functional.softplus(1 - margin)

Override ``split_batch`` for batches of another shape (dicts, extra fields) and ``forward``
for models whose call is not ``model(inputs)``. ``query_loss`` defaults to the training loss;
override it to ask influence questions about another measurement (a margin, say).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Task", "ClassificationTask", "RegressionTask"]


class Task:
    """Base task. Subclasses must implement :meth:`per_sample_loss`."""

    def split_batch(self, batch: Any) -> tuple[Any, Tensor]:
        """Return ``(inputs, targets)`` from a batch of ``(x, y)`` or ``(ids, x, y)``."""
        if isinstance(batch, (tuple, list)):
            if len(batch) == 2:
                return batch[0], batch[1]
            if len(batch) == 3:
                return batch[1], batch[2]
        raise ValueError(
            f"{type(self).__name__} understands batches of (x, y) or (ids, x, y); got "
            f"{type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            + ". Override Task.split_batch for other batch shapes."
        )

    def batch_ids(self, batch: Any) -> Tensor | None:
        """Sample ids of a batch of ``(ids, x, y)``, or ``None`` for ``(x, y)``."""
        if isinstance(batch, (tuple, list)) and len(batch) == 3:
            return torch.as_tensor(batch[0])
        return None

    def forward(self, model: nn.Module, inputs: Any) -> Tensor:
        return model(inputs)

    def per_sample_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        raise NotImplementedError

    def query_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The measurement whose change the scores predict; the training loss by default."""
        return self.per_sample_loss(outputs, targets)

    def sample_targets(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Targets drawn from the model's predictive distribution (for the true Fisher)."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot sample targets from the model; use the empirical "
            "Fisher or implement Task.sample_targets"
        )

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        """Per-sample training loss of a batch, shape ``[B]``."""
        inputs, targets = self.split_batch(batch)
        return self.per_sample_loss(self.forward(model, inputs), targets)


class ClassificationTask(Task):
    """Cross-entropy on logits ``[B, C]`` (or ``[B, C, ...]`` with targets ``[B, ...]``,
    summed over the extra positions so a sequence counts as one sample)."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def per_sample_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        if outputs.dim() < 2:
            raise ValueError(
                f"ClassificationTask needs logits of shape [B, C]; got {tuple(outputs.shape)}"
            )
        loss = F.cross_entropy(
            outputs, targets.long(), reduction="none", label_smoothing=self.label_smoothing
        )
        return loss.reshape(loss.shape[0], -1).sum(dim=1)

    def sample_targets(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        probs = torch.softmax(outputs.detach().float(), dim=1)
        probs = probs.movedim(1, -1).reshape(-1, probs.shape[1])
        draws = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        shape = (outputs.shape[0],) + tuple(outputs.shape[2:])
        return draws.reshape(shape).to(outputs.device)


class RegressionTask(Task):
    """Half squared error ``0.5 * ||f(x) - y||²`` per sample (a Gaussian likelihood with unit
    variance, so the true Fisher samples ``y ~ N(f(x), I)``)."""

    def per_sample_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        targets = targets.to(outputs.dtype).reshape(outputs.shape)
        diff = (outputs - targets).reshape(outputs.shape[0], -1)
        return 0.5 * (diff**2).sum(dim=1)

    def sample_targets(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(
            outputs.shape, generator=generator, dtype=outputs.dtype, device=outputs.device
        )
        return outputs.detach() + noise
