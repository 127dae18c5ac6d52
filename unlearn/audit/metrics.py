"""How well did a removal work? Accuracy, per-sample outputs, model-to-model comparisons.

Every function takes a classifier (logits ``[B, C]``, or log-probabilities: softmax is
shift-invariant, so both give the same probabilities) and a ``DataLoader`` of ``(x, y)`` or
``(ids, x, y)`` batches. Models are evaluated in eval mode under ``torch.no_grad()`` and their
train/eval mode is restored afterwards. Accuracies and rates are fractions in ``[0, 1]``;
:func:`average_gap` reports percentage points.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from unlearn.influence.grads import to_model
from unlearn.tasks import ClassificationTask, Task

__all__ = [
    "SampleOutputs",
    "predict",
    "per_sample_outputs",
    "accuracy",
    "kl_divergence",
    "prediction_agreement",
    "parameter_distance",
    "average_gap",
    "GAP_KEYS",
]

#: the metrics :func:`average_gap` averages by default (fractions in [0, 1])
GAP_KEYS = ("forget_acc", "retain_acc", "test_acc", "mia_efficacy")

_TASK = ClassificationTask()


@dataclass
class SampleOutputs:
    """Per-sample outputs of a classifier on a loader (all tensors of length N, CPU)."""

    ids: Tensor | None  # sample ids when the loader yields (ids, x, y)
    labels: Tensor  # int64
    predictions: Tensor  # int64 argmax
    loss: Tensor  # cross-entropy of the true label, float64
    confidence: Tensor  # predicted probability of the true label
    max_prob: Tensor  # largest predicted probability
    entropy: Tensor  # entropy of the predictive distribution (nats)

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def correct(self) -> Tensor:
        return self.predictions == self.labels


def _check_loader(loader: object, what: str = "loader") -> DataLoader:
    if not isinstance(loader, DataLoader):
        raise TypeError(f"{what} must be a torch DataLoader, got {type(loader).__name__}")
    return loader


def _batches(model: nn.Module, loader: DataLoader, task: Task
             ) -> Iterator[tuple[Tensor | None, Tensor, Tensor]]:
    """Yield ``(ids, logits, labels)`` per batch with the model in eval mode (restored)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                ids = task.batch_ids(batch)
                inputs, targets = task.split_batch(to_model(batch, model))
                logits = task.forward(model, inputs)
                if logits.dim() != 2:
                    raise ValueError(f"expected logits of shape [B, C], got "
                                     f"{tuple(logits.shape)}")
                if targets.shape != logits.shape[:1]:
                    raise ValueError(f"labels of shape {tuple(targets.shape)} do not match "
                                     f"logits of shape {tuple(logits.shape)}")
                yield ids, logits.detach().double().cpu(), targets.detach().long().cpu()
    finally:
        model.train(was_training)


def predict(model: nn.Module, loader: DataLoader, task: Task | None = None
            ) -> tuple[Tensor, Tensor]:
    """``(logits [N, C] float64, labels [N])`` of ``model`` on ``loader`` (CPU)."""
    _check_loader(loader)
    logits, labels = [], []
    for _, out, y in _batches(model, loader, task or _TASK):
        logits.append(out)
        labels.append(y)
    if not logits:
        raise ValueError("the loader is empty: no samples to evaluate")
    return torch.cat(logits), torch.cat(labels)


def per_sample_outputs(model: nn.Module, loader: DataLoader,
                       task: Task | None = None) -> SampleOutputs:
    """Loss, true-label confidence, top probability and entropy of every sample."""
    _check_loader(loader)
    task = task or _TASK
    ids: list[Tensor] = []
    logits_l, labels_l = [], []
    have_ids = True
    for b_ids, out, y in _batches(model, loader, task):
        logits_l.append(out)
        labels_l.append(y)
        if b_ids is None:
            have_ids = False
        else:
            ids.append(torch.as_tensor(b_ids).reshape(-1).long().cpu())
    if not logits_l:
        raise ValueError("the loader is empty: no samples to evaluate")
    logits, labels = torch.cat(logits_l), torch.cat(labels_l)
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}), got "
                         f"{int(labels.min())}..{int(labels.max())}")
    logp = F.log_softmax(logits, dim=1)
    p = logp.exp()
    true_logp = logp.gather(1, labels[:, None])[:, 0]
    return SampleOutputs(
        ids=torch.cat(ids) if have_ids and ids else None,
        labels=labels,
        predictions=logits.argmax(dim=1),
        loss=-true_logp,
        confidence=true_logp.exp(),
        max_prob=p.max(dim=1).values,
        entropy=-(p * logp).sum(dim=1),
    )


def accuracy(model: nn.Module, loader: DataLoader, task: Task | None = None) -> float:
    """Fraction of samples whose argmax prediction equals the label."""
    logits, labels = predict(model, loader, task)
    return float((logits.argmax(dim=1) == labels).double().mean())


def _paired(a: nn.Module, b: nn.Module, loader: DataLoader, task: Task | None
            ) -> tuple[Tensor, Tensor]:
    la, ya = predict(a, loader, task)
    lb, _ = predict(b, loader, task)
    if la.shape != lb.shape:
        raise ValueError(f"the two models give outputs of different shapes: {tuple(la.shape)} "
                         f"vs {tuple(lb.shape)}")
    return la, lb


def kl_divergence(p_model: nn.Module, q_model: nn.Module, loader: DataLoader,
                  task: Task | None = None) -> float:
    """Mean over samples of ``KL(p(·|x) || q(·|x))`` in nats (p: ``p_model``, often the
    retrained reference; q: the unlearned model)."""
    lp, lq = _paired(p_model, q_model, loader, task)
    logp, logq = F.log_softmax(lp, dim=1), F.log_softmax(lq, dim=1)
    return float((logp.exp() * (logp - logq)).sum(dim=1).mean())


def prediction_agreement(a: nn.Module, b: nn.Module, loader: DataLoader,
                         task: Task | None = None) -> float:
    """Fraction of samples on which the two models predict the same class."""
    la, lb = _paired(a, b, loader, task)
    return float((la.argmax(dim=1) == lb.argmax(dim=1)).double().mean())


def parameter_distance(a: nn.Module, b: nn.Module) -> float:
    """``||θ_a − θ_b||₂`` over all parameters (same names and shapes required)."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    if pa.keys() != pb.keys():
        missing, extra = sorted(pa.keys() - pb.keys()), sorted(pb.keys() - pa.keys())
        raise ValueError(f"the models have different parameters: only in the first "
                         f"{missing[:5]}, only in the second {extra[:5]}")
    total = torch.zeros((), dtype=torch.float64)
    for name, t in pa.items():
        u = pb[name]
        if t.shape != u.shape:
            raise ValueError(f"parameter {name!r} has shape {tuple(t.shape)} in the first model "
                             f"and {tuple(u.shape)} in the second")
        total += ((t.detach().double().cpu() - u.detach().double().cpu()) ** 2).sum()
    return float(total.sqrt())


def average_gap(metrics: Mapping[str, float], reference: Mapping[str, float],
                keys: tuple[str, ...] = GAP_KEYS) -> float:
    """Mean absolute difference over ``keys`` between two metric dicts of fractions, in
    percentage points (the "Avg. Gap" of SalUn/SCRUB tables, reference = retraining)."""
    if not keys:
        raise ValueError("keys is empty: nothing to average")
    missing = [k for k in keys if k not in metrics or k not in reference]
    if missing:
        raise KeyError(f"metric(s) {missing} missing from metrics {sorted(metrics)} or "
                       f"reference {sorted(reference)}")
    for name, d in (("metrics", metrics), ("reference", reference)):
        bad = {k: d[k] for k in keys if not 0.0 <= float(d[k]) <= 1.0}
        if bad:
            raise ValueError(f"{name} must hold fractions in [0, 1], got {bad}")
    return 100.0 * sum(abs(float(metrics[k]) - float(reference[k])) for k in keys) / len(keys)
