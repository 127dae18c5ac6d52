"""The removal protocol shared by every unlearning method, ours and the baselines.

``method.unlearn(model, forget=forget_loader, retain=retain_loader)`` returns a
:class:`RemovalResult` with a *new* model (the input model is never modified), the wall-clock
seconds spent, and method-specific details. Subclasses implement ``_unlearn(model, forget,
retain) -> details`` working in place on a private copy.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from unlearn.data import IndexedDataset, iter_batches, split_by_ids
from unlearn.influence.grads import ParamSpace, all_finite, to_model
from unlearn.tasks import Task


@dataclass
class RemovalResult:
    model: nn.Module
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


class RemovalMethod:
    """Base class. ``needs_retain`` says whether the method reads the retained data."""

    name: ClassVar[str] = "removal"
    needs_retain: ClassVar[bool] = True

    def __init__(self, task: Task) -> None:
        if not isinstance(task, Task):
            raise TypeError(f"task must be an unlearn.tasks.Task, got {type(task)}")
        self.task = task

    def _unlearn(self, model: nn.Module, forget: DataLoader,
                 retain: DataLoader | None) -> dict[str, Any]:
        raise NotImplementedError

    def unlearn(self, model: nn.Module, *, forget: DataLoader,
                retain: DataLoader | None = None) -> RemovalResult:
        """Forget the examples of ``forget``; ``retain`` holds the rest of the training data."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model)}")
        _check_nonempty(forget, "forget")
        if retain is None and self.needs_retain:
            raise ValueError(f"{type(self).__name__} needs the retained data: pass retain=...")
        if retain is not None:
            if _size(retain) == 0:
                raise ValueError(
                    "the retain set is empty: the forget set is the whole training set, so "
                    "there is nothing to keep; start from a fresh model instead"
                )
            _check_disjoint(self.task, forget, retain)
        _check_task_matches(self.task, model, forget)
        new = copy.deepcopy(model)
        start = time.perf_counter()
        details = self._unlearn(new, forget, retain) or {}
        seconds = time.perf_counter() - start
        new.eval()
        for name, p in new.named_parameters():
            if not torch.isfinite(p).all():
                raise FloatingPointError(
                    f"{type(self).__name__} produced NaN/inf in parameter {name!r}; lower the "
                    "step size or raise the damping"
                )
        return RemovalResult(new, seconds, {"method": self.name, **details})


def split_loaders(
    train: IndexedDataset, forget_ids: Any, batch_size: int = 256, **loader_kw: Any
) -> tuple[DataLoader, DataLoader]:
    """``(forget_loader, retain_loader)`` from a training set and the ids to forget
    (unknown, duplicate or empty ids raise clear errors from :func:`split_by_ids`)."""
    forget, retain = split_by_ids(train, forget_ids)
    return (DataLoader(forget, batch_size=batch_size, **loader_kw),
            DataLoader(retain, batch_size=batch_size, **loader_kw))


def _size(loader: DataLoader) -> int:
    try:
        return len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        return -1


def _check_nonempty(loader: Any, what: str) -> None:
    if not isinstance(loader, DataLoader):
        raise TypeError(f"{what} must be a DataLoader, got {type(loader)}")
    if _size(loader) == 0:
        raise ValueError(f"the {what} set is empty: nothing to {what}")


def _ids_of(task: Task, loader: DataLoader) -> set[int] | None:
    visits_all = isinstance(loader.sampler, (SequentialSampler, RandomSampler))
    if visits_all and isinstance(loader.dataset, IndexedDataset):  # no pass over the data
        return set(loader.dataset.ids.tolist())
    ids: set[int] = set()
    for batch in loader:
        b = task.batch_ids(batch)
        if b is None:
            return None
        ids.update(int(i) for i in b)
    return ids


def _check_disjoint(task: Task, forget: DataLoader, retain: DataLoader) -> None:
    f = _ids_of(task, forget)
    if f is None:
        return
    r = _ids_of(task, retain)
    if r is None:
        return
    both = sorted(f & r)
    if both:
        raise ValueError(f"{len(both)} ids are in both the forget and the retain set, e.g. "
                         f"{both[:10]}")


def _check_task_matches(task: Task, model: nn.Module, loader: DataLoader) -> None:
    """One forward pass on a forget batch: a model/task mismatch fails here, clearly."""
    batch = to_model(next(iter(iter_batches(loader))), model)
    was_training = model.training
    model.eval()  # train mode would update BatchNorm statistics of the caller's model
    try:
        with torch.no_grad():
            losses: Tensor = task.loss(model, batch)
    except Exception as err:
        raise ValueError(
            f"{type(task).__name__} cannot compute a loss for this model's outputs on the forget "
            f"data ({type(err).__name__}: {err}); is it the task the model was trained with?"
        ) from err
    finally:
        model.train(was_training)
    if losses.dim() != 1 or not torch.isfinite(losses).all():
        raise ValueError(f"{type(task).__name__} gave per-sample losses of shape "
                         f"{tuple(losses.shape)} with non-finite values on the forget data")


def loss_grad_sum(model: nn.Module, task: Task, loader: DataLoader, space: ParamSpace,
                  what: str, max_batches: int | None = None) -> tuple[Tensor, int]:
    """``(Σ_i ∇ℓ_i over the loader (flat, in space's order), number of examples)``: one
    backward pass of the summed loss per batch (no per-sample gradients), in the model's
    current mode; ``max_batches`` stops early. ``what`` names the data in errors."""
    named = dict(model.named_parameters())
    params = [named[n] for n in space.names]
    total = [torch.zeros_like(p) for p in params]
    count = 0
    for k, raw in enumerate(iter_batches(loader)):
        if max_batches is not None and k >= max_batches:
            break
        losses = task.loss(model, to_model(raw, model))
        count += losses.shape[0]
        for t, d in zip(total, torch.autograd.grad(losses.sum(), params), strict=True):
            t += d
    flat = space.flatten(dict(zip(space.names, total, strict=True)))
    if count == 0:
        raise ValueError(f"the {what} loader yielded no examples")
    if not all_finite(flat):
        raise FloatingPointError(f"the {what} data give a NaN/inf loss gradient; check the {what} "
                                 "data for NaN/inf values and the model weights")
    return flat, count
