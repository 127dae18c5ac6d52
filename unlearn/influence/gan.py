"""Influence of training instances on a GAN's generated samples (Terashita et al., ICLR 2021).

SGD-influence (Hara et al., 2019) follows one training trajectory backwards; for a GAN the
trajectory is that of the *joint* parameter vector θ = (θ_G, θ_D), and each step's Jacobian
has cross terms: D's update depends on θ_G through the fake samples, G's update depends on θ_D
through the discriminator's judgement. With the step map θ_{t+1} = θ_t − η_t ⊙ g_t(θ_t)
(g_t = (∇_G L_G, ∇_D L_D), either part zero when that player does not move), the adjoint
``u_t = ∂f(θ_T)/∂θ_t`` obeys::

    u_T = ∇f(θ_T),      u_t = u_{t+1} − ∇_θ ⟨η_t ⊙ u_{t+1}, g_t(θ)⟩ |_{θ=θ_t}

(one double-backward per step gives all four Jacobian blocks at once). Giving every real
instance of step t's batch a weight w_i in D's real-data sum (1 = present), the linearised
change of f from removing instance i (w_i: 1 → 0) in step t is
``+∂/∂w_i ⟨η^D_t u_{t+1,D}, ∇_D L_D(θ_t; w)⟩``; summing over the steps that used i gives its
score. All instances of a batch come out of the same backward pass.

Sign convention (same as the rest of the library): ``scores[i]`` predicts
``f(θ without i) − f(θ with i)``, the change of the target if instance i were left out and the
run replayed with the same batches and latents (``unlearn.generative.training.replay``).
For a higher-is-better metric (log-likelihood, Inception score) a *positive* score means
removing i would improve the generator, i.e. i is harmful; for FID (lower is better) a
negative score marks a harmful instance.

Targets: ``metric(G(z_eval))`` for any differentiable sample metric with fixed evaluation
latents (``target="metric"``), or the discriminator loss on held-out real samples and
generated ones (``target="discriminator_loss"``), a baseline of the data-cleansing paper.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call
from torch.nn import functional as F

from unlearn.data import IndexedDataset
from unlearn.generative.training import (
    UPDATE_D,
    UPDATE_G,
    GANTrajectory,
    RealData,
    discriminator_loss,
    generator_loss,
    instance_weights,
    kept_batch,
    replay,
)

__all__ = ["GANInfluence", "TARGETS"]

TARGETS = ("metric", "discriminator_loss")


class GANInfluence:
    """Per-instance influence of the real training data on a GAN's target quantity.

    Args:
        trajectory: a recorded run from :func:`unlearn.generative.training.train_gan`.
        metric: ``callable(samples) -> scalar tensor``, differentiable in the samples (e.g.
            :class:`unlearn.generative.metrics.AverageLogLikelihood`); required for
            ``target="metric"``.
        target: ``"metric"`` (default): f(θ) = metric(G(z_eval; θ_G)).
            ``"discriminator_loss"``: f(θ) = mean softplus(−D(x_val)) + mean softplus(D(G(z_eval))),
            D's loss on ``validation`` real samples and generated ones.
        eval_latents: the fixed latents ``[m, *latent_shape]`` the target is evaluated on, or
            an int m (drawn from ``eval_seed``); default 1000.
        validation: held-out real samples (needed for ``target="discriminator_loss"``).
        last_steps: follow only the last k steps back (the paper's cheaper approximation that
            ignores earlier steps); default: the whole run.
        dataset: the training data, if the trajectory has none attached (e.g. after load).
        progress: show a progress bar over the backward pass.

    ``scores()`` returns a float64 tensor aligned with ``ids`` (the trajectory's training ids):
    ``scores[k]`` predicts f(θ without ids[k]) − f(θ). Instances the trajectory already
    excludes score 0.
    """

    def __init__(
        self,
        trajectory: GANTrajectory,
        metric: Callable[[Tensor], Tensor] | None = None,
        *,
        target: str = "metric",
        eval_latents: Tensor | int | None = None,
        eval_seed: int = 0,
        validation: Tensor | None = None,
        last_steps: int | None = None,
        dataset: IndexedDataset | None = None,
        progress: bool = False,
    ) -> None:
        if not isinstance(trajectory, GANTrajectory):
            raise TypeError(f"trajectory must be a GANTrajectory, got {type(trajectory)}")
        if len(trajectory) == 0:
            raise ValueError("the trajectory is empty: there are no training steps to trace")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if target == "metric" and metric is None:
            raise ValueError("target='metric' needs a metric: callable(samples) -> scalar")
        if metric is not None and not callable(metric):
            raise TypeError(f"metric must be callable(samples) -> scalar tensor, got {metric!r}")
        if target == "discriminator_loss":
            if validation is None:
                raise ValueError("target='discriminator_loss' needs validation real samples")
            if not torch.isfinite(torch.as_tensor(validation)).all():
                raise ValueError("validation samples hold NaN or infinite values")
        if last_steps is not None and (not isinstance(last_steps, int) or last_steps < 1):
            raise ValueError(f"last_steps must be a positive integer, got {last_steps!r}")
        self.trajectory = trajectory
        self.metric = metric
        self.target = target
        self.last_steps = last_steps
        self.progress = progress
        self.eval_latents = self._eval_latents(eval_latents, eval_seed)
        self.validation = (
            None
            if validation is None
            else torch.as_tensor(validation).to(device=trajectory.device, dtype=trajectory.dtype)
        )
        self._data: RealData = trajectory.real_data(dataset)
        self._dataset = dataset
        self._scores: Tensor | None = None

    # ------------------------------------------------------------------ public
    @property
    def ids(self) -> Tensor:
        """Training ids, in the order of ``scores()``."""
        return self.trajectory.train_ids

    @property
    def higher_is_better(self) -> bool | None:
        """Direction of the target, when the metric declares it (None: unknown)."""
        if self.target == "discriminator_loss":
            return None
        return getattr(self.metric, "higher_is_better", None)

    def value(self, theta: Tensor | None = None) -> float:
        """The target f at θ (default: the trained parameters)."""
        theta = self.trajectory.final_params() if theta is None else theta
        with torch.no_grad():
            return float(self._target(theta))

    def scores(self) -> Tensor:
        """Predicted ``f(without i) − f(with i)`` for every training id (cached)."""
        if self._scores is None:
            self._scores = self._backward()
        return self._scores

    def scores_by_id(self) -> dict[int, float]:
        return dict(zip(self.ids.tolist(), self.scores().tolist(), strict=True))

    def replay_truth(self, ids: Any = None, *, progress: bool = False) -> Tensor:
        """Brute force: replay without each id and measure the real change of the target.

        Returns float64 ``[len(ids)]`` aligned with ``ids`` (default: all training ids).
        Costs one full replay per id; meant for checks on small runs.
        """
        traj = self.trajectory
        id_list = traj.train_ids.tolist() if ids is None else traj.check_ids(ids, "ids")
        base = self.value()
        out = torch.empty(len(id_list), dtype=torch.float64)
        it: Any = enumerate(id_list)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, total=len(id_list), desc="replay without each id")
        for k, i in it:
            retrained = replay(traj, [i], dataset=self._dataset)
            out[k] = self.value(retrained.final_params()) - base
        return out

    # ------------------------------------------------------------------ internals
    def _eval_latents(self, eval_latents: Tensor | int | None, seed: int) -> Tensor:
        traj = self.trajectory
        if eval_latents is None:
            eval_latents = 1000
        if isinstance(eval_latents, int) and not isinstance(eval_latents, bool):
            if eval_latents < 1:
                raise ValueError(f"eval_latents must be a positive count, got {eval_latents}")
            gen = torch.Generator().manual_seed(seed)
            z = torch.randn((eval_latents, *traj.latent_shape), generator=gen, dtype=torch.float64)
        elif isinstance(eval_latents, Tensor):
            z = eval_latents
            if tuple(z.shape[1:]) != traj.latent_shape or len(z) == 0:
                raise ValueError(
                    f"eval_latents must have shape [m, {', '.join(map(str, traj.latent_shape))}], "
                    f"got {tuple(z.shape)}"
                )
            if not torch.isfinite(z).all():
                raise ValueError("eval_latents hold NaN or infinite values")
        else:
            raise TypeError(f"eval_latents must be a tensor or a count, got {type(eval_latents)}")
        return z.to(device=traj.device, dtype=traj.dtype)

    def _target(self, theta: Tensor) -> Tensor:
        traj = self.trajectory
        pg, pd = traj.split(theta)
        samples = functional_call(traj.generator, pg, (self.eval_latents,))
        if self.target == "metric":
            assert self.metric is not None
            value = self.metric(samples)
        else:
            assert self.validation is not None
            real = functional_call(traj.discriminator, pd, (self.validation,))
            fake = functional_call(traj.discriminator, pd, (samples,))
            value = F.softplus(-real).mean() + F.softplus(fake).mean()
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ValueError(f"the target must be a scalar tensor, got {value!r}")
        return value.reshape(())

    def _backward(self) -> Tensor:
        traj = self.trajectory
        T = len(traj)
        stop = 0 if self.last_steps is None else max(0, T - self.last_steps)
        theta = traj.final_params().detach().requires_grad_(True)
        value = self._target(theta)
        if not torch.isfinite(value):
            raise FloatingPointError(f"the target is {value.item()} at the trained parameters")
        (u,) = torch.autograd.grad(value, theta, allow_unused=True, materialize_grads=True)
        if traj.momentum:  # the target does not read the velocities
            u = torch.cat([u, torch.zeros_like(u)])
        scores = torch.zeros(len(self._data), dtype=torch.float64)
        steps: Any = traj.iter_states_backward(stop, self._dataset)
        if self.progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, total=T - stop, desc="GAN influence (backward)")
        for t, state_t in steps:
            u, rows, contrib = self._step_back(t, state_t, u)
            if rows:
                scores.index_add_(0, torch.tensor(rows), contrib.detach().to("cpu", torch.float64))
        if not torch.isfinite(scores).all():
            raise FloatingPointError("influence scores hold NaN or infinite values")
        return scores

    def _step_back(self, t: int, state_t: Tensor, u: Tensor) -> tuple[Tensor, list[int], Tensor]:
        """One adjoint step: (u_t, batch rows, per-instance contributions of step t).

        ``u`` is the adjoint of the state after step t. For a moving player b the update's
        sensitivity is c_b = η_b u_θb − u_vb (u_vb = 0 without momentum); then
        u_θ ← u_θ − ∇_θ Σ_b ⟨c_b, g_b(θ)⟩, u_vb ← −μ c_b, and instance i contributes
        ∂/∂w_i ⟨c_D, g_D(θ; w)⟩.
        """
        traj = self.trajectory
        kind = int(traj.kinds[t])
        ng, P, mu = traj.n_g, traj.n_params, traj.momentum
        theta_g = state_t[:ng].detach().requires_grad_(True)
        theta_d = state_t[ng:P].detach().requires_grad_(True)
        pg, pd = traj.g_space.unflatten(theta_g), traj.d_space.unflatten(theta_d)
        inputs = [theta_g, theta_d]
        s = state_t.new_zeros(())
        rows: list[int] = []
        c_g = c_d = base_w = None
        if kind & UPDATE_D:
            c_d = float(traj.lr_d[t]) * u[ng:P] - (u[P + ng :] if mu else 0.0)
            kept, x_real, denom = kept_batch(traj, t, self._data)
            rows = self._data.rows(kept)
            base_w = instance_weights(traj, kept)
            if base_w is None:
                base_w = torch.ones(len(kept), dtype=state_t.dtype, device=state_t.device)
            weights = base_w.clone().requires_grad_(True)
            inputs.append(weights)
            loss_d = discriminator_loss(traj, pg, pd, x_real, traj.latents(t, "d"), denom, weights)
            (grad_d,) = torch.autograd.grad(loss_d, theta_d, create_graph=True)
            s = s + (c_d * grad_d).sum()
        if kind & UPDATE_G:
            c_g = float(traj.lr_g[t]) * u[:ng] - (u[P : P + ng] if mu else 0.0)
            loss_g = generator_loss(traj, pg, pd, traj.latents(t, "g"))
            (grad_g,) = torch.autograd.grad(loss_g, theta_g, create_graph=True)
            s = s + (c_g * grad_g).sum()
        grads = torch.autograd.grad(s, inputs, allow_unused=True, materialize_grads=True)
        parts = [u[:P] - torch.cat([grads[0], grads[1]])]
        if mu:
            v_g, v_d = u[P : P + ng], u[P + ng :]
            parts += [-mu * c_g if c_g is not None else v_g, -mu * c_d if c_d is not None else v_d]
        u_prev = torch.cat(parts)
        if not torch.isfinite(u_prev).all():
            raise FloatingPointError(f"the influence adjoint became NaN or infinite at step {t}")
        # removal moves w_i from its current value to 0: Δf ≈ −w_i ∂f/∂w_i = w_i ∂s/∂w_i
        contrib = grads[2] * base_w if base_w is not None else u.new_zeros(0)
        return u_prev.detach(), rows, contrib
