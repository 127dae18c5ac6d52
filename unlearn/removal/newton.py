"""Newton-step influence removal: one (quasi-)Newton step toward the retrained model.

Sign and scale. A model trained to the optimum of ``(1/n) Σ_i ℓ_i + (l2/2)||θ||²`` has zero
gradient. Dropping the forget set F (m examples) from the sum changes the gradient at θ to
``-(1/n) Σ_{z∈F} ∇ℓ(z)``, so one Newton step moves the parameters by

    θ_new = θ + (1/n) (H + λI)⁻¹ Σ_{z∈F} ∇ℓ(z)                      (target="loo")

with a **plus** sign: the step follows the forgotten examples' gradients, uphill on their
loss. It is the influence-function prediction of the scores (``scores[q, i]`` =
``(1/n) ∇ℓ_qᵀ (H + λI)⁻¹ ∇ℓ_i`` is ``∇ℓ_qᵀ`` times this step for F = {i}). Two objectives
can be targeted:

* ``target="loo"``: ``(1/n) Σ_{retain} ℓ + (l2/2)||θ||²``, the retained sum still divided by
  the full n. This is the ε = -1/n perturbation that influence functions linearise, and what
  ``train_lbfgs(model, task, retain_loader, l2, normalizer=n)`` retrains to.
* ``target="retrain"``: ``(1/n_r) Σ_{retain} ℓ + (l2/2)||θ||²``, the ordinary objective of a
  model trained on the retained data only (``train_lbfgs(model, task, retain_loader, l2)``).
  Its gradient at θ is ``-(1/n_r)(Σ_F ∇ℓ + m·l2·θ)``, hence
  ``θ_new = θ + (1/n_r) (H + λI)⁻¹ (Σ_F ∇ℓ + m·l2·θ)``.

Curvature: ``curvature="full"`` reuses an estimator fitted on the full training set (cheap:
no pass over the data beyond the forget set); ``curvature="retain"`` fits a new estimator on
the retained data at θ, which makes the step the exact Newton step of the target objective
(for ``"loo"`` the target's Hessian is ``(n_r/n) H_r + λI``, applied as
``(n/n_r) (H_r + (n/n_r) λ I)⁻¹`` by fitting with damping ``λ n / n_r``).

Only the estimator's parameter space moves: an EK-FAC estimator covers only its supported
layers, and every other parameter keeps its value. A ``"full"`` estimator describes the model
it was fitted on; used again after earlier removals, the step is quasi-Newton, and
``details["curvature_drift"]`` reports how far the parameters have moved since (relative).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from unlearn.influence.base import InfluenceEstimator, check_inverts_curvature
from unlearn.influence.grads import ParamSpace
from unlearn.removal.base import RemovalMethod, loss_grad_sum
from unlearn.tasks import Task

__all__ = ["NewtonRemoval", "EstimatorFactory"]

#: ``factory(model, task, damping) -> unfitted estimator`` used for ``curvature="retain"``
EstimatorFactory = Callable[[nn.Module, Task, float], InfluenceEstimator]

CURVATURES = ("full", "retain")
TARGETS = ("loo", "retrain")


class NewtonRemoval(RemovalMethod):
    """Remove the forget set with one Newton step ``θ + (1/n)(H + λI)⁻¹ Σ_F ∇ℓ``.

    Args:
        task: the model's task.
        estimator: a fitted influence estimator (any of ``unlearn.influence``), fitted on the
            full training set for the model being edited. Its damping is λ. Required for
            ``curvature="full"``; for ``"retain"`` it supplies the default factory and damping.
        curvature: ``"full"`` (reuse ``estimator``) or ``"retain"`` (fit a fresh estimator on
            the retained data; needs ``retain=`` in ``unlearn``).
        target: ``"loo"`` (full-n normaliser, the influence-function perturbation) or
            ``"retrain"`` (mean over the retained data); see the module docstring.
        damping: λ for estimators built by the factory (default: ``estimator.damping``).
        l2: the training objective's L2 strength, used by ``target="retrain"`` (default: the
            damping, which is right for a convex model trained with ``l2 = damping``).
        estimator_factory: ``factory(model, task, damping)`` returning an unfitted estimator
            for ``curvature="retain"`` (default: ``estimator``'s class and configuration).
    """

    name = "newton"
    needs_retain = False

    def __init__(
        self,
        task: Task,
        estimator: InfluenceEstimator | None = None,
        *,
        curvature: str = "full",
        target: str = "loo",
        damping: float | None = None,
        l2: float | None = None,
        estimator_factory: EstimatorFactory | None = None,
    ) -> None:
        super().__init__(task)
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if estimator is not None and not isinstance(estimator, InfluenceEstimator):
            raise TypeError(f"estimator must be an InfluenceEstimator, got {type(estimator)}")
        if estimator is not None:
            check_inverts_curvature(estimator)
        if curvature == "full":
            if estimator is None:
                raise ValueError("curvature='full' needs a fitted estimator; pass estimator=..., "
                                 "or use curvature='retain' with estimator_factory=...")
            if estimator.n_train is None:
                raise ValueError(f"the {type(estimator).__name__} is not fitted: call "
                                 "estimator.fit(train_loader) on the full training set first")
        elif estimator is None and estimator_factory is None:
            raise ValueError("curvature='retain' needs estimator_factory=... (or an estimator "
                             "whose class and configuration to reuse)")
        if damping is None:
            if estimator is None:
                raise ValueError("pass damping=... (the λ of (H + λI)), or an estimator")
            damping = estimator.damping
        _check_nonnegative(damping, "damping")
        if l2 is not None:
            _check_nonnegative(l2, "l2")
        self.estimator = estimator
        self.curvature = curvature
        self.target = target
        self.damping = float(damping)
        self.l2 = float(damping if l2 is None else l2)
        self.estimator_factory = estimator_factory or _same_as(estimator)
        self.needs_retain = curvature == "retain"

    def _unlearn(self, model: nn.Module, forget: DataLoader,
                 retain: DataLoader | None) -> dict[str, Any]:
        n_forget = _dataset_size(forget, "forget")
        n_train = self._training_size(n_forget, retain)
        n_retain = n_train - n_forget
        if n_retain <= 0:
            raise ValueError(f"the forget set ({n_forget} examples) is the whole training set "
                             f"({n_train}); there is nothing left to keep")
        fit_seconds, drift = 0.0, 0.0
        if self.curvature == "full":
            est = self.estimator
            assert est is not None
            drift = _relative_distance(est.space, model, est.model)
        else:
            damping = self.damping * n_train / n_retain if self.target == "loo" else self.damping
            start = time.perf_counter()
            est = self.estimator_factory(model, self.task, damping)
            if not isinstance(est, InfluenceEstimator):
                raise TypeError(f"estimator_factory returned {type(est)}, not an estimator")
            check_inverts_curvature(est)
            assert retain is not None
            est.fit(retain)
            fit_seconds = time.perf_counter() - start
        space = est.space
        model.eval()  # like the estimator's gradients: dropout off, batch-norm statistics
        grad_sum, _ = loss_grad_sum(model, self.task, forget, space, "forget")
        if self.target == "retrain":
            theta = space.flatten(space.params(model)).to(grad_sum.dtype)
            rhs, scale = grad_sum + n_forget * self.l2 * theta, 1.0 / n_retain
        else:
            rhs, scale = grad_sum, 1.0 / int(est.n_train)  # type: ignore[arg-type]
        step = est.inverse_hvp(rhs)
        assert isinstance(step, Tensor)
        step = step.detach() * scale
        _apply_step(model, space, step)
        return {
            "estimator": type(est).__name__,
            "curvature": self.curvature,
            "target": self.target,
            "step_norm": float(step.norm()),
            "n_train": n_train,
            "n_forget": n_forget,
            "damping": est.damping,
            "l2": self.l2,
            "params_updated": space.numel,
            "fit_seconds": fit_seconds,
            "curvature_drift": drift,
        }

    def _training_size(self, n_forget: int, retain: DataLoader | None) -> int:
        """n = |forget| + |retain| when retain is given, else the estimator's n_train (they
        must agree when both are known)."""
        fitted = self.estimator.n_train if self.estimator is not None else None
        if retain is None:
            assert fitted is not None
            return int(fitted)
        n = n_forget + _dataset_size(retain, "retain")
        if self.curvature == "full" and fitted is not None and fitted != n:
            raise ValueError(
                f"the estimator was fitted on {fitted} examples but forget + retain hold {n}; "
                "fit it on the full training set the forget and retain sets come from"
            )
        return n


def _same_as(estimator: InfluenceEstimator | None) -> EstimatorFactory:
    """A factory building ``estimator``'s class with its configuration and a new damping."""

    def factory(model: nn.Module, task: Task, damping: float) -> InfluenceEstimator:
        if estimator is None:
            raise ValueError("no estimator_factory and no estimator to copy")
        config = {**estimator.config(), "damping": damping}
        return type(estimator)(model, task, progress=estimator.progress, **config)

    return factory


def _relative_distance(space: ParamSpace, model: nn.Module, reference: nn.Module) -> float:
    """``||θ − θ_ref|| / ||θ_ref||`` over ``space``: how far the model has moved from the one
    the curvature was fitted at (non-zero after earlier removals: the step is then
    quasi-Newton)."""
    theta = space.flatten(space.params(model))
    ref = space.flatten(space.params(reference)).to(theta)
    return float((theta - ref).norm() / ref.norm().clamp_min(1e-30))


def _apply_step(model: nn.Module, space: ParamSpace, step: Tensor) -> None:
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, delta in space.unflatten(step).items():
            p = named[name]
            p.add_(delta.to(device=p.device, dtype=p.dtype))


def _dataset_size(loader: DataLoader, what: str) -> int:
    try:
        return len(loader.dataset)  # type: ignore[arg-type]
    except TypeError as err:
        raise ValueError(f"NewtonRemoval needs the size of the {what} set: its loader's "
                         "dataset must define __len__") from err


def _check_nonnegative(value: Any, what: str) -> None:
    if not (isinstance(value, (int, float)) and value >= 0 and value == value
            and value != float("inf")):
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
