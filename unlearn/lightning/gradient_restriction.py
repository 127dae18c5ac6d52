"""GradientRestrictionCallback: IAU's gradient-restriction loss on an unchanged LightningModule.

The module's ``training_step`` returns its loss as usual; for the duration of ``fit`` the
callback wraps it (an instance attribute shadowing the class's method, installed in
``on_fit_start`` and removed in ``teardown`` / ``on_exception``; see
:mod:`unlearn.lightning._common`) so that Lightning back-propagates

    loss + α · penalty(∇_θ loss)

with the gradient taken with ``create_graph=True`` (double backprop). The penalty is the one of
:class:`unlearn.removal.GradientRestrictionLoss` (``"norm"`` ‖g‖₂ by default, the paper's;
``"squared"`` ‖g‖₂²; ``"layer_norms"``), computed by the same function. ``on_before_backward``
cannot be used instead: it cannot change the loss, and a second backward there would bypass
AMP's loss scaling and trip DDP's one-reduction-per-step rule.

Needs automatic optimization (with manual optimization the module calls ``manual_backward``
itself and the returned loss is ignored). With fp16 AMP the inner gradient is unscaled and
may underflow: prefer 32-bit or bf16.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from unlearn.lightning._common import unwrap_training_step, wrap_training_step
from unlearn.removal.gradient_restriction import GradientRestrictionLoss, _penalty
from unlearn.tasks import Task

__all__ = ["GradientRestrictionCallback"]


class GradientRestrictionCallback(pl.Callback):
    """Add ``alpha · penalty(∇_θ loss)`` to the loss the module's ``training_step`` returns.

    Args:
        alpha: the penalty's weight, ``>= 0`` (validated as by ``GradientRestrictionLoss``).
        penalty: ``"norm"`` (default), ``"squared"`` or ``"layer_norms"``.
        params: names of the parameters whose gradient is penalised (default: every trainable
            parameter).
        log_name: the penalty is logged under this name with ``pl_module.log`` each step
            (None: not logged). ``mean_penalty`` holds the running mean either way.
    """

    def __init__(self, alpha: float, *, penalty: str = "norm",
                 params: Sequence[str] | None = None, log_name: str | None = "gr_penalty"
                 ) -> None:
        GradientRestrictionLoss(Task(), alpha, penalty=penalty)  # same validation, same errors
        self.alpha, self.penalty = float(alpha), penalty
        self.params = None if params is None else list(params)
        self.log_name = log_name
        self.n_steps = 0
        self.penalty_sum = 0.0
        self.last_penalty: float | None = None
        self._wrapper: Any = None
        self._module: pl.LightningModule | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(alpha=self.alpha, penalty=self.penalty)

    @property
    def mean_penalty(self) -> float | None:
        """Mean penalty (before the α factor) over the steps taken so far."""
        return None if self.n_steps == 0 else self.penalty_sum / self.n_steps

    # ------------------------------------------------------------------ hooks

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError(
                "GradientRestrictionCallback needs automatic optimization: with "
                "automatic_optimization=False the module calls manual_backward itself, so the "
                "penalised loss would be ignored; add GradientRestrictionLoss in your step instead")
        self._named(pl_module)  # unknown parameter names fail here, before training
        self._module = pl_module
        self._wrapper = wrap_training_step(pl_module, self._step)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore(pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._restore(pl_module)

    def _restore(self, pl_module: pl.LightningModule) -> None:
        unwrap_training_step(pl_module, self._wrapper)
        self._wrapper, self._module = None, None

    # ------------------------------------------------------------------ the loss

    def _named(self, pl_module: pl.LightningModule) -> list[Tensor]:
        named = dict(pl_module.named_parameters())
        if self.params is None:
            chosen = [p for p in named.values() if p.requires_grad]
        else:
            unknown = [n for n in self.params if n not in named]
            if unknown:
                raise ValueError(f"params names unknown parameters {unknown}; the module has "
                                 f"{list(named)[:10]}...")
            chosen = [named[n] for n in self.params]
        if not chosen:
            raise ValueError("no trainable parameters to restrict the gradient of")
        return chosen

    def _step(self, inner: Any, *args: Any, **kwargs: Any) -> Any:
        out = inner(*args, **kwargs)
        loss = out if isinstance(out, Tensor) else (
            out.get("loss") if isinstance(out, Mapping) else None)
        if loss is None or not torch.is_grad_enabled() or not loss.requires_grad:
            return out
        module = self._module
        assert module is not None
        penalised = self.penalised_loss(module, loss)
        return penalised if isinstance(out, Tensor) else {**out, "loss": penalised}

    def penalised_loss(self, pl_module: pl.LightningModule, loss: Tensor) -> Tensor:
        """``loss + α · penalty(∇_θ loss)``, differentiable (records the penalty)."""
        params = self._named(pl_module)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        used = [g for g in grads if g is not None]
        if not used:
            return loss
        pen = _penalty(used, self.penalty)
        value = float(pen.detach())
        self.n_steps += 1
        self.penalty_sum += value
        self.last_penalty = value
        if self.log_name:
            pl_module.log(self.log_name, pen.detach(), on_step=True, on_epoch=True,
                          prog_bar=False, logger=True)
        return loss + self.alpha * pen

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "penalty": self.penalty, "n_steps": self.n_steps,
                "penalty_sum": self.penalty_sum, "last_penalty": self.last_penalty}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if (state_dict.get("alpha") != self.alpha
                or state_dict.get("penalty") != self.penalty):
            raise ValueError(
                f"checkpoint was trained with alpha={state_dict.get('alpha')!r}, "
                f"penalty={state_dict.get('penalty')!r}; this callback has alpha={self.alpha!r}, "
                f"penalty={self.penalty!r}")
        self.n_steps = int(state_dict["n_steps"])
        self.penalty_sum = float(state_dict["penalty_sum"])
        self.last_penalty = state_dict.get("last_penalty")
