"""IAU: influence-approximation unlearning (Liu et al., arXiv 2507.23257).

Influence functions say that removing the forget set F from n training examples moves the
optimum by ``Δθ ≈ (1/n) (H + λI)⁻¹ Σ_{z∈F} ∇ℓ(z)``. IAU reads this as *incremental learning*:
removing z has the same first-order effect as adding a point whose gradient is ``−∇ℓ(z)``,
and adding a point is learned with a gradient step, not an inverse Hessian. So the update
ascends the forget loss; a *gradient correction* on the retained data stops the model from
over-forgetting; and models trained with the *gradient restriction* loss
(:mod:`unlearn.removal.gradient_restriction`) have small per-example gradients, which keeps
the one-step approximation accurate.

Two modes:

``mode="scaled"`` (default): the influence update with an explicit preconditioner P,

    θ ← θ + (1/n) · P⁻¹ Σ_{z∈F} ∇ℓ(z)            (= (|F|/n) · P⁻¹ · mean forget gradient)

then ``retain_steps`` gradient-descent steps on the retained loss (the correction).
n is ``|forget| + |retain|`` unless ``n_train`` is given. Two safeguards keep a step size
that suits one model from destroying another (measured on MNIST: with fixed steps, the
defaults that are best on an SGD-trained MLP drove an Adam-trained LeNet to chance accuracy
in every setting and seed; the forget step alone left it at 55% retained accuracy, it was
the correction at lr 0.2 that diverged, the retained loss going 2.6 → 28 in one step):

* each correction step is shortened until the retained objective on its own batches falls by
  at least ``armijo · lr · ‖g‖²`` (Armijo backtracking; one extra forward pass per try; the
  first step starts at ``retain_lr``, each later one at twice the previous accepted size; a
  failed try is followed by 0.9 times the minimiser of the quadratic through the objective,
  its slope at 0 and the failed try, kept within [1/10, 1/2] of the failed step, which
  needs fewer tries than halving where ``retain_lr`` is far too long). With
  ``armijo = 0.5`` the accepted step along g is at most the exact line-search step of the
  local quadratic model, so a step cannot diverge;
* the forget step is halved while the mean retained loss on the first retain batches rises by
  more than ``max_forget_rise`` (forward passes on batches already in memory).

``details`` records both: ``forget_guard`` (halvings, step factor, retained loss before and
after the step) and ``retain_step_lrs`` / ``retain_halvings``. P is one of:

* a fitted ``estimator`` (EK-FAC, CG, Exact, ...): ``P⁻¹ = (H + λI)⁻¹`` through its
  ``inverse_hvp``, a Newton influence update;
* ``lr=η``: ``P⁻¹ = η · I``, a plain gradient step (η is an inverse curvature, model-specific);
* by default, ``P⁻¹ = (step_scale / r) · I`` with ``r = bᵀ G b / bᵀ b`` the Gauss-Newton
  curvature of the retained loss along the forget direction ``b`` (measured on
  ``curvature_batches`` retain batches with forward-mode products, about the cost of a forward
  pass over them; they are the batches the correction then uses). ``1/r`` is the exact
  line-search step along ``b`` on the local quadratic model; the Newton step lives mostly in
  flatter directions, so the step is ``step_scale`` times longer and the correction undoes the
  overshoot along the steep directions. Normalising by r makes ``step_scale`` transfer across
  models where a raw ``lr`` does not (measured: the best raw lr differed 5x between two MLPs,
  the best ``step_scale`` did not; ``experiments/iau_check.py``).

``mode="faithful"``: what the reference code does: the gradient of
``mean_R ℓ − mean_F ℓ`` (forget and retain weighted equally, each the mean over its whole
set), applied by one step of a freshly created Adam. Adam's first step is
``lr · g / (|g| + eps)``, about ``lr · sign(g)``: every coordinate moves by ``lr`` whatever
the size of the gradient.

Gradients are taken in eval mode (dropout off, batch-norm running statistics), so the update
is deterministic given the loaders.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp
from torch.utils._pytree import tree_map
from torch.utils.data import DataLoader

from unlearn.data import iter_batches
from unlearn.influence.base import InfluenceEstimator, check_inverts_curvature
from unlearn.influence.grads import ParamSpace, all_finite, to_model
from unlearn.removal.base import RemovalMethod, loss_grad_sum
from unlearn.tasks import Task

__all__ = ["IAU"]

MODES = ("scaled", "faithful")
FAITHFUL_LR = 1e-3  # the reference code's default


class IAU(RemovalMethod):
    """Influence-approximation unlearning; see the module docstring for the update.

    Args:
        task: how the per-sample loss is computed.
        mode: ``"scaled"`` (default) or ``"faithful"`` (the reference code's Adam step).
        lr: scaled mode: a fixed preconditioner ``P⁻¹ = lr · I`` (an inverse curvature; by
            default it is measured, see ``step_scale``); faithful mode: Adam's step size, i.e.
            how far every parameter moves (default 1e-3, the reference's).
        step_scale: scaled mode without ``lr`` or ``estimator``: the forget step is this many
            times the exact line-search step along the forget gradient (``P⁻¹ = step_scale/r``).
            The default, 70, was chosen on a validation split (MNIST, two SGD-trained MLPs,
            10% random forgetting; ``experiments/iau_check.py --tune``); 200 over-forgets.
        estimator: scaled mode only: a fitted :class:`InfluenceEstimator` on *this* model
            whose ``inverse_hvp`` preconditions the forget step (Newton-like). Only the
            parameters in its space are moved by the forget step. A function returning one
            is called at each removal: ``estimator=lambda: influence_cb.estimator`` uses the
            EK-FAC an :class:`~unlearn.lightning.InfluenceCallback` fits when training ends
            (curvature fitted once per trained model, reused by every removal).
        n_train: the training-set size n of the 1/n influence scale (scaled mode); default
            ``|forget| + |retain|``.
        retain_steps: scaled mode: number of gradient-descent steps on the retained loss
            after the forget step (the gradient correction); 0 turns it off. Each step reads
            ``retain_batches`` batches of the retain loader, so the correction's cost is
            ``retain_steps × retain_batches × batch size`` retained examples.
        retain_lr: scaled mode: initial step size of the first of those steps (SGD, no
            momentum), shortened until the Armijo test passes (see ``armijo``); each later step
            starts at twice the previous accepted size, at most ``retain_lr``.
        armijo: scaled mode: sufficient-decrease constant c of the correction's backtracking
            (a step of size lr along −g is accepted when the objective on its batches falls by
            ``c · lr · ‖g‖²``). 0.5 caps the step at the quadratic model's exact line search;
            values near 0 only require a decrease.
        max_halvings: scaled mode: at most this many shortenings per correction step (a step
            that still fails is not taken; its lr is reported as 0) and for the forget step.
        max_forget_rise: scaled mode: largest accepted rise of the mean retained loss over
            the first ``guard_batches`` retain batches caused by the forget step, in the task's
            loss units (nats for classification: 2.0 lets the retained examples' true-class
            probability fall by a factor e² ≈ 7.4 on average before the step is halved;
            measured rises at the default step: 0.98 on an SGD-trained MLP, 2.5 on an
            Adam-trained LeNet). ``None`` turns the guard off.
        guard_batches: scaled mode: retain batches that guard measures the rise on (forward
            passes before and after the step; the correction's first batches, already read).
        retain_batches: scaled mode: retain minibatches averaged per correction step (the
            loader's batches, cycled; pass a shuffled loader for a random subsample).
            Faithful mode: how many retain minibatches form the retain gradient (default
            ``None``: all of them, as the reference does).
        curvature_batches: scaled mode with the measured step: retain batches the curvature
            r is averaged over (the correction's first batches, so no extra data is read
            when ``retain_steps × retain_batches`` is at least this).
        weight_decay: scaled mode: L2 strength added to the retained loss in the correction
            (use the training recipe's value).
        forget_weight, retain_weight: faithful mode: weights of the two terms (both 1 in the
            reference).
        betas, eps: faithful mode: the fresh Adam's hyper-parameters (torch defaults, as in
            the reference).
        check_estimator: refuse an estimator whose model's weights differ from the model being
            unlearned (a likely mistake). Set False to reuse curvature fitted on an earlier
            version of the model, e.g. across a sequence of removals; shapes are still checked.
    """

    name: ClassVar[str] = "iau"

    def __init__(
        self,
        task: Task,
        mode: str = "scaled",
        *,
        lr: float | None = None,
        step_scale: float = 70.0,
        estimator: InfluenceEstimator | Callable[[], InfluenceEstimator] | None = None,
        n_train: int | None = None,
        retain_steps: int = 5,
        retain_lr: float = 0.2,
        armijo: float = 0.5,
        max_forget_rise: float | None = 2.0,
        max_halvings: int = 12,
        guard_batches: int = 1,
        retain_batches: int | None = None,
        curvature_batches: int = 5,
        weight_decay: float = 0.0,
        forget_weight: float = 1.0,
        retain_weight: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        check_estimator: bool = True,
    ) -> None:
        super().__init__(task)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        if lr is None and mode == "faithful":
            lr = FAITHFUL_LR
        self.lr = None if lr is None else _positive("lr", lr)
        self.step_scale = _positive("step_scale", step_scale)
        if estimator is not None:
            if mode != "scaled":
                raise ValueError("estimator= preconditions the scaled mode's step; the faithful "
                                 "mode uses Adam, as the reference code does")
            if not (isinstance(estimator, InfluenceEstimator) or callable(estimator)):
                raise TypeError(f"estimator must be a fitted InfluenceEstimator or a function "
                                f"returning one, got {type(estimator)}")
            if isinstance(estimator, InfluenceEstimator):
                check_inverts_curvature(estimator)
        if estimator is not None and lr is not None:
            raise ValueError("pass lr= or estimator=, not both: each sets the preconditioner")
        self.estimator = estimator
        self.check_estimator = bool(check_estimator)
        if n_train is not None and (not isinstance(n_train, int) or n_train < 2):
            raise ValueError(f"n_train must be an integer >= 2, got {n_train!r}")
        self.n_train = n_train
        if not isinstance(retain_steps, int) or retain_steps < 0:
            raise ValueError(f"retain_steps must be an integer >= 0, got {retain_steps!r}")
        self.retain_steps = retain_steps
        self.retain_lr = _positive("retain_lr", retain_lr)
        if not (isinstance(armijo, (int, float)) and 0 <= armijo < 1):
            raise ValueError(f"armijo must be in [0, 1), got {armijo!r}")
        self.armijo = float(armijo)
        if not isinstance(max_halvings, int) or max_halvings < 0:
            raise ValueError(f"max_halvings must be an integer >= 0, got {max_halvings!r}")
        self.max_halvings = max_halvings
        self.max_forget_rise = (None if max_forget_rise is None else
                                _positive("max_forget_rise", max_forget_rise))
        if retain_batches is not None and (not isinstance(retain_batches, int)
                                           or retain_batches < 1):
            raise ValueError(f"retain_batches must be a positive integer or None, got "
                             f"{retain_batches!r}")
        self.retain_batches = retain_batches
        if not isinstance(curvature_batches, int) or curvature_batches < 1:
            raise ValueError(f"curvature_batches must be a positive integer, got "
                             f"{curvature_batches!r}")
        self.curvature_batches = curvature_batches
        if not isinstance(guard_batches, int) or guard_batches < 1:
            raise ValueError(f"guard_batches must be a positive integer, got {guard_batches!r}")
        self.guard_batches = guard_batches
        self.weight_decay = _positive("weight_decay", weight_decay, allow_zero=True)
        self.forget_weight = _positive("forget_weight", forget_weight, allow_zero=True)
        self.retain_weight = _positive("retain_weight", retain_weight, allow_zero=True)
        self.betas, self.eps = betas, _positive("eps", eps, allow_zero=True)

    # ----------------------------------------------------------------- protocol
    def _unlearn(self, model: nn.Module, forget: DataLoader,
                 retain: DataLoader | None) -> dict[str, Any]:
        assert retain is not None  # needs_retain
        model.eval()
        if self.mode == "faithful":
            return self._faithful(model, forget, retain)
        return self._scaled(model, forget, retain)

    # ----------------------------------------------------------------- scaled mode
    def _scaled(self, model: nn.Module, forget: DataLoader, retain: DataLoader) -> dict[str, Any]:
        est = self._fitted_estimator()
        space = self._space(model, est)
        theta0 = _flat_params(model, space)
        forget_sum, n_forget = loss_grad_sum(model, self.task, forget, space, "forget")
        n_retain = _count(retain)
        n = self.n_train if self.n_train is not None else n_forget + n_retain
        if n <= n_forget:
            raise ValueError(f"n_train={n} must exceed the forget-set size {n_forget}")
        info: dict[str, Any] = {}
        adaptive = est is None and self.lr is None
        n_corr = self.retain_steps * (self.retain_batches or 1)
        batches = _take(retain, max(n_corr, self.curvature_batches if adaptive else 0,
                                    self.guard_batches if self.max_forget_rise else 0))
        if est is not None:
            step = est.inverse_hvp(forget_sum) / n
            info["preconditioner"] = f"{type(est).__name__}.inverse_hvp"
        else:
            lr = self.lr
            if lr is None:
                r = _ggn_rayleigh(model, self.task, batches[: self.curvature_batches], space,
                                  forget_sum)
                lr = self.step_scale / r
                info.update(curvature=r, step_scale=self.step_scale)
            step = forget_sum * (lr / n)
            info.update(preconditioner="lr*I", lr=lr)
        if not all_finite(step):
            raise FloatingPointError("the forget step has NaN/inf entries; check the estimator's "
                                     "damping or pass lr=")
        first_loss = None
        if self.max_forget_rise is not None:
            # the guard's last forward pass is on the correction's first batches at the
            # current weights when it reads as many batches as a step: with its graph kept,
            # it is that step's objective
            reuse = self.retain_steps > 0 and self.guard_batches == (self.retain_batches or 1)
            step, info["forget_guard"], guard_loss = self._guarded_step(
                model, space, theta0, step, batches[: self.guard_batches], keep_graph=reuse)
            first_loss = guard_loss if reuse else None
        else:
            _add_(model, space, step)
        corr = self._correct(model, batches[:n_corr], first_loss)
        theta1 = _flat_params(model, space)
        return {
            "mode": "scaled",
            **info,
            "n_train": n,
            "n_forget": n_forget,
            "forget_scale": n_forget / n,
            "forget_grad_norm": float(forget_sum.norm()) / n_forget,
            "forget_step_norm": float(step.norm()),
            "correction_norm": float((theta1 - theta0 - step).norm()),
            "update_norm": float((theta1 - theta0).norm()),
            "retain_steps": self.retain_steps,
            "retain_lr": self.retain_lr,
            **corr,
        }

    def _guarded_step(self, model: nn.Module, space: ParamSpace, theta0: Tensor, step: Tensor,
                      guard: list[Any], keep_graph: bool = False
                      ) -> tuple[Tensor, dict[str, Any], Tensor]:
        """Take the forget step, halved until the mean retained loss on ``guard`` (batches
        already in memory; forward passes only) rises by at most ``max_forget_rise``, at most
        ``max_halvings`` times (the last, smallest step is kept even if it still rises more).
        Returns the step taken, what the guard saw and the last mean loss as a tensor (with its
        autograd graph if ``keep_graph``, for the correction's first step)."""
        before = self._mean_loss(model, guard)
        if not math.isfinite(before):
            raise FloatingPointError(f"the retained loss is {before} before the forget step; "
                                     "check the retain data for NaN/inf values")
        factor, after = 1.0, before
        for k in range(self.max_halvings + 1):
            _set_(model, space, theta0 + factor * step)
            with torch.set_grad_enabled(keep_graph):
                loss = _batches_mean_loss(self.task, model, guard)
            after = float(loss.detach())
            if (math.isfinite(after) and after - before <= self.max_forget_rise) or (
                    k == self.max_halvings):
                break
            factor /= 2
        return factor * step, {"halvings": k, "step_factor": factor, "batches": len(guard),
                               "examples": _examples(self.task, guard),
                               "retain_loss_before": before,
                               "retain_loss_after": after,
                               "rise_ok": math.isfinite(after)
                               and after - before <= self.max_forget_rise}, loss

    def _mean_loss(self, model: nn.Module, batches: list[Any]) -> float:
        with torch.no_grad():
            return float(_batches_mean_loss(self.task, model, batches))

    def _correct(self, model: nn.Module, batches: list[Any],
                 first_loss: Tensor | None = None) -> dict[str, Any]:
        """``retain_steps`` gradient-descent steps on the retained objective (mean loss plus
        ``weight_decay/2 ‖θ‖²``), each on ``retain_batches`` of ``batches``, with Armijo
        backtracking (see :meth:`_armijo_step`); ``first_loss`` is the first step's mean loss
        at the current weights if already computed (with its graph). Returns what the steps
        did."""
        params = [p for p in model.parameters() if p.requires_grad]
        per_step = self.retain_batches or 1
        lrs: list[float] = []
        halvings = 0
        start = self.retain_lr
        for step in range(self.retain_steps):
            chunk = batches[step * per_step:(step + 1) * per_step]
            lr, k = self._armijo_step(model, params, chunk, start,
                                      first_loss if step == 0 else None)
            lrs.append(lr)
            halvings += k
            # warm start: the next step tries twice the accepted size (capped at retain_lr)
            # instead of halving down from retain_lr again (each try costs a forward pass)
            if lr > 0:
                start = min(self.retain_lr, 2 * lr)
        return {"retain_batches_used": self.retain_steps * per_step,
                "retain_examples_used": _examples(self.task, batches[:self.retain_steps
                                                                    * per_step]),
                "first_objective_reused": first_loss is not None,
                "retain_step_lrs": lrs,
                "retain_halvings": halvings,
                "retain_steps_rejected": sum(lr == 0.0 for lr in lrs)}

    def _objective(self, model: nn.Module, params: list[Tensor], chunk: list[Any],
                   mean_loss: Tensor | None = None) -> Tensor:
        if mean_loss is None:
            mean_loss = _batches_mean_loss(self.task, model, chunk)
        reg = 0.5 * self.weight_decay * sum((p * p).sum() for p in params)
        return mean_loss + reg

    def _armijo_step(self, model: nn.Module, params: list[Tensor],
                     chunk: list[Any], lr: float,
                     mean_loss: Tensor | None = None) -> tuple[float, int]:
        """One correction step from ``lr``, shortened (:func:`_backtrack`) until the objective
        on the same batches decreases by at least ``armijo · lr · ‖g‖²`` (at most
        ``max_halvings`` times;
        if none passes, the step is not taken and its lr is reported as 0). Plain SGD at a
        fixed lr diverges where the retained loss is sharper than 2/lr (measured: on an
        Adam-trained LeNet, lr 0.2 raised the retained loss from 2.6 to 28 in one step and
        ended at chance accuracy); the test makes each step a descent step on its batches.
        Returns ``(accepted lr, number of shortenings)``."""
        loss = self._objective(model, params, chunk, mean_loss)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the retained loss became {loss.detach().item()} during the correction; "
                "check the retain data for NaN/inf values")
        grads = torch.autograd.grad(loss, params)
        sq = float(sum((g * g).sum() for g in grads))
        start = [p.detach().clone() for p in params]
        with torch.no_grad():
            for k in range(self.max_halvings + 1):
                for p, p0, g in zip(params, start, grads, strict=True):
                    p.copy_(p0 - lr * g)
                trial = float(self._objective(model, params, chunk))
                if math.isfinite(trial) and trial <= float(loss) - self.armijo * lr * sq:
                    return lr, k
                lr = _backtrack(lr, trial, float(loss), sq)
            for p, p0 in zip(params, start, strict=True):
                p.copy_(p0)
        return 0.0, self.max_halvings + 1

    def _fitted_estimator(self) -> InfluenceEstimator | None:
        """The estimator, calling the provider function if one was given (e.g.
        ``lambda: influence_callback.estimator``, fitted when training ends)."""
        est = self.estimator
        if est is None or isinstance(est, InfluenceEstimator):
            return est
        got = est()
        if not isinstance(got, InfluenceEstimator):
            raise TypeError(f"the estimator provider returned {type(got).__name__}, not a fitted "
                            "InfluenceEstimator (was the estimator fitted before this removal?)")
        check_inverts_curvature(got)
        return got

    def _space(self, model: nn.Module, est: InfluenceEstimator | None) -> ParamSpace:
        if est is None:
            return ParamSpace.of(model)
        space = ParamSpace.of(model, est.space.names)
        ours, theirs = space.params(model), est.space.params(est.model)
        for name in space.names:
            if ours[name].shape != theirs[name].shape:
                raise ValueError(
                    f"the estimator's parameter {name!r} has shape {tuple(theirs[name].shape)}, "
                    f"the model's has {tuple(ours[name].shape)}: it was fitted on another model")
            mine = ours[name].to(theirs[name])
            # torch.equal first: the usual case (fitted on this very model) is bit-equal, and
            # it costs a fraction of allclose, which runs on every removal
            if self.check_estimator and not (torch.equal(mine, theirs[name])
                                             or torch.allclose(mine, theirs[name])):
                raise ValueError(
                    f"the estimator was fitted on a model whose parameter {name!r} differs from "
                    "the model being unlearned; fit it on this model, or pass "
                    "check_estimator=False to reuse curvature from an earlier version of it")
        return space

    # ----------------------------------------------------------------- faithful mode
    def _faithful(self, model: nn.Module, forget: DataLoader,
                  retain: DataLoader) -> dict[str, Any]:
        space = ParamSpace.of(model)
        theta0 = _flat_params(model, space)
        f_sum, n_forget = loss_grad_sum(model, self.task, forget, space, "forget")
        r_sum, n_retain = loss_grad_sum(model, self.task, retain, space, "retain",
                                     max_batches=self.retain_batches)
        g = self.retain_weight * r_sum / n_retain - self.forget_weight * f_sum / n_forget
        params = [dict(model.named_parameters())[n] for n in space.names]
        opt = torch.optim.Adam(params, lr=self.lr, betas=self.betas, eps=self.eps)
        for p, gp in zip(params, space.unflatten(g).values(), strict=True):
            p.grad = gp.clone()
        opt.step()
        for p in params:
            p.grad = None
        delta = _flat_params(model, space) - theta0
        return {
            "mode": "faithful",
            "lr": self.lr,
            "n_forget": n_forget,
            "forget_weight": self.forget_weight,
            "retain_weight": self.retain_weight,
            "grad_norm": float(g.norm()),
            "update_norm": float(delta.norm()),
            "update_max_abs": float(delta.abs().max()),
            "retain_batches_used": _batches_used(retain, self.retain_batches),
        }


# --------------------------------------------------------------------- helpers
def _positive(what: str, value: float, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{what} must be a finite number {'>=' if allow_zero else '>'} 0, "
                         f"got {value!r}")
    return float(value)


def _backtrack(lr: float, trial: float, f0: float, sq: float) -> float:
    """The next step size after ``lr`` failed the Armijo test along −g (``f0`` the objective at
    0, ``trial`` at ``lr``, ``sq = ‖g‖²`` minus its slope): 0.9 times the minimiser of the
    quadratic through f(0), f'(0) = −sq and f(lr) (interpolating backtracking, Nocedal & Wright
    §3.5; 0.9 so that an exactly quadratic objective passes the c = 1/2 test), kept within
    [lr/10, lr/2]; lr/2 after a non-finite trial."""
    if not math.isfinite(trial):
        return lr / 2
    curvature = (trial - f0 + sq * lr) / lr**2  # > 0: the trial failed the test
    return min(max(0.9 * sq / (2 * curvature), lr / 10), lr / 2)


def _examples(task: Task, batches: list[Any]) -> int:
    return sum(int(task.split_batch(raw)[1].shape[0]) for raw in batches)


def _batches_mean_loss(task: Task, model: nn.Module, batches: list[Any]) -> Tensor:
    """Mean over ``batches`` of each batch's mean loss (a 0-d tensor)."""
    return sum(task.loss(model, to_model(raw, model)).mean()  # type: ignore[return-value]
               for raw in batches) / len(batches)


def _flat_params(model: nn.Module, space: ParamSpace) -> Tensor:
    return space.flatten(space.params(model)).clone()


def _set_(model: nn.Module, space: ParamSpace, flat: Tensor) -> None:
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in space.unflatten(flat).items():
            named[name].copy_(value.to(named[name]))


def _add_(model: nn.Module, space: ParamSpace, step: Tensor) -> None:
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, d in space.unflatten(step).items():
            named[name].add_(d.to(named[name]))


def _ggn_rayleigh(model: nn.Module, task: Task, raws: list[Any], space: ParamSpace,
                  v: Tensor) -> float:
    """``vᵀ G v / vᵀ v`` with G the Gauss-Newton matrix of the mean loss over ``raws`` (a list
    of batches): a forward-mode product ``J v`` and the loss's Hessian in output space per
    batch, no backward pass through the model."""
    params = space.params(model)
    tangent = space.unflatten(v.to(_dtype(params)))
    total, count = 0.0, 0
    for raw in _concat(raws):
        inputs, targets = task.split_batch(to_model(raw, model))

        def outputs(p: dict[str, Tensor], inputs: Any = inputs) -> Tensor:
            return task.forward(lambda *a: functional_call(model, p, a), inputs)  # type: ignore

        def loss_of(o: Tensor, targets: Tensor = targets) -> Tensor:
            return task.per_sample_loss(o, targets).sum()

        out, jv = jvp(outputs, (params,), (tangent,))
        hjv = jvp(grad(loss_of), (out.detach(),), (jv,))[1]
        total += float((jv * hjv).sum())
        count += out.shape[0]
    r = total / max(count, 1) / float(v @ v)
    if not (math.isfinite(r) and r > 0):
        raise FloatingPointError(
            f"the Gauss-Newton curvature along the forget gradient, measured on the retain "
            f"data, is {r}; the step size cannot be set from it (NaN/inf in the retain data?); "
            "pass lr= (or an estimator=) instead")
    return r


def _concat(batches: list[Any]) -> list[Any]:
    """The batches joined into one (fewer, larger products), or unchanged if their leaves are
    not all tensors of matching structure."""
    if len(batches) < 2:
        return batches
    try:
        return [tree_map(lambda *xs: torch.cat(xs), batches[0], *batches[1:])]
    except (TypeError, ValueError, RuntimeError):
        return batches


def _dtype(params: dict[str, Tensor]) -> torch.dtype:
    return next(iter(params.values())).dtype


def _count(loader: DataLoader) -> int:
    try:
        return len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        return sum(1 for b in loader for _ in b[-1])


def _take(loader: DataLoader, k: int) -> list[Any]:
    """The next ``k`` batches of ``loader``, cycling through it if it has fewer."""
    out: list[Any] = []
    while len(out) < k:
        before = len(out)
        for batch in iter_batches(loader):
            out.append(batch)
            if len(out) == k:
                break
        if len(out) == before:
            raise ValueError("the retain loader yielded no batches")
    return out


def _batches_used(loader: DataLoader, limit: int | None) -> int:
    try:
        total = len(loader)
    except TypeError:
        return -1
    return total if limit is None else min(total, limit)
