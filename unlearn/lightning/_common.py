"""Helpers shared by the callbacks: wrapping ``training_step``, batch ids, rank-zero work.

Wrapping ``training_step``: Lightning 2.x calls ``strategy.training_step``, which looks the
method up on the LightningModule *at call time* (``self.lightning_module.training_step(...)``,
or ``getattr(module, "training_step")`` inside the DDP forward redirection). A function stored
as an instance attribute therefore shadows the class's method for the duration of a fit,
without touching the user's class; Lightning patches ``forward`` the same way for DDP.
:func:`wrap_training_step` installs such a function and :func:`unwrap_training_step` removes
it again, in any order when several callbacks wrap the same module.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["wrap_training_step", "unwrap_training_step", "batch_ids", "detached_copy",
           "atomic_torch_save", "cpu_state"]

_MISSING = object()
_ATTR = "training_step"

StepFn = Callable[..., Any]


def wrap_training_step(module: nn.Module, around: Callable[..., Any]) -> StepFn:
    """Make ``module.training_step(*a, **kw)`` call ``around(inner, *a, **kw)``, where
    ``inner`` is the step that was in place (the class's method or an earlier wrapper)."""
    prev = module.__dict__.get(_ATTR, _MISSING)
    inner = getattr(module, _ATTR)

    def training_step(*args: Any, **kwargs: Any) -> Any:
        if not training_step._unlearn_active:  # type: ignore[attr-defined]
            return inner(*args, **kwargs)
        return around(inner, *args, **kwargs)

    training_step._unlearn_active = True  # type: ignore[attr-defined]
    training_step._unlearn_prev = prev  # type: ignore[attr-defined]
    object.__setattr__(module, _ATTR, training_step)
    return training_step


def unwrap_training_step(module: nn.Module, wrapper: StepFn | None) -> None:
    """Deactivate ``wrapper`` and pop every inactive wrapper off the top of the module, so the
    module ends as it was once all wrappers are removed (whatever the order)."""
    if wrapper is None:
        return
    wrapper._unlearn_active = False  # type: ignore[attr-defined]
    while True:
        cur = module.__dict__.get(_ATTR, _MISSING)
        if cur is _MISSING or getattr(cur, "_unlearn_active", True):
            return
        prev = cur._unlearn_prev
        if prev is _MISSING:
            del module.__dict__[_ATTR]
        else:
            module.__dict__[_ATTR] = prev


def batch_ids(batch: Any) -> Tensor | None:
    """The sample ids of an ``(ids, x, y)`` batch (a 1-D integer tensor first), else None."""
    if isinstance(batch, (tuple, list)) and len(batch) == 3:
        ids = batch[0]
        if isinstance(ids, Tensor) and ids.dim() == 1 and not ids.is_floating_point() \
                and ids.dtype != torch.bool:
            return ids
    return None


def detached_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` without its Lightning trainer (a LightningModule holds a
    reference to the trainer, which a plain ``deepcopy`` would copy with all its loaders)."""
    trainer = module.__dict__.get("_trainer")
    memo: dict[int, Any] = {} if trainer is None else {id(trainer): None}
    return copy.deepcopy(module, memo)


def cpu_state(module: nn.Module) -> dict[str, Tensor]:
    """``module.state_dict()`` detached and cloned to the CPU."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
