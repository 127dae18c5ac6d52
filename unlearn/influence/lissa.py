"""LiSSA (Agarwal et al., 2017): the inverse curvature as a stochastic Neumann series.

The recursion ``h_0 = v``, ``h_{t+1} = v + (I − (C_t + λI)/s) h_t`` with ``C_t`` the
curvature of one minibatch converges to ``s (C + λI)⁻¹ v`` when every eigenvalue of
``(C_t + λI)/s`` lies in (0, 2); the estimate is ``h_T / s``. With a full-batch loader it is
plain Richardson iteration. Its error shrinks by ``1 − (μ_min + λ)/s`` per step (μ_min the
smallest curvature eigenvalue the vector sees), so it needs about
``s / (μ_min + λ) · ln(1/ε)`` steps for relative error ε: small damping is slow.

With minibatches smaller than the training set the recursion is SGD on the quadratic
``½ xᵀ(C + λI)x − vᵀx`` (``x = h/s``, step ``1/s``); its iterates settle into noise around the
answer rather than converging, so by default the second half of them is averaged.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, RandomSampler

from unlearn.influence.cg import (
    MatrixFreeInfluence,
    batches_product,
    check_positive_float,
    check_positive_int,
)
from unlearn.tasks import Task

#: steps before the convergence check may stop the recursion
_MIN_STEPS = 10
#: growth of the per-step change that counts as divergence
_DIVERGED = 1e4


class LiSSAInfluence(MatrixFreeInfluence):
    """Stochastic Neumann-series inverse, batched over the rows of ``G[k, P]``.

    Args:
        curvature: ``"hessian"`` (default) or ``"ggn"``.
        depth: maximum number of recursion steps (minibatches) per repeat.
        repeat: independent recursions, with differently seeded minibatch draws, averaged.
            They only differ when a batch is smaller than the training set.
        scale: ``s``; ``"auto"`` estimates the largest eigenvalue of ``C + λI`` by power
            iteration on the full curvature at fit time and uses 1.1 times it.
        tol: stop when the estimated relative error of every row is below ``tol``. The error
            is estimated from the relative change of ``h`` per step times ``ρ/(1 − ρ)``, ρ the
            observed contraction per step (at most ``1 − λ/s``); minibatch noise keeps ρ near
            1, so a stochastic recursion runs to ``depth``.
        batch_size: minibatch size (default: the training loader's). Each step draws an
            independent seeded minibatch (with replacement) from the loader's dataset; a batch
            as large as the dataset makes the recursion deterministic (Richardson iteration).
        average: return, for a row that runs to ``depth``, the mean of its iterates over the
            second half of the steps (Polyak-Ruppert averaging: the recursion is SGD on a
            quadratic, and averaging removes most of the minibatch noise). ``None`` (default)
            averages exactly when batches are smaller than the training set.
        seed: seed of the minibatch draws (repeat r uses ``seed + r``) and of the power iteration.
        power_iter: maximum power-iteration steps for ``scale="auto"``.

    After each solve ``last_depth`` holds the number of steps the longest repeat used and
    ``last_converged`` whether the tolerance was met.
    """

    name = "lissa"

    def __init__(self, model: nn.Module, task: Task, damping: float = 1e-3, *,
                 curvature: str = "hessian", depth: int = 5000, repeat: int = 1,
                 scale: float | str = "auto", tol: float = 1e-4,
                 batch_size: int | None = None, average: bool | None = None, seed: int = 0,
                 power_iter: int = 100, **kw: Any) -> None:
        super().__init__(model, task, damping, curvature=curvature, **kw)
        check_positive_int(depth, "depth")
        check_positive_int(repeat, "repeat")
        check_positive_int(batch_size, "batch_size", allow_none=True)
        check_positive_int(power_iter, "power_iter")
        check_positive_float(tol, "tol")
        if scale != "auto":
            check_positive_float(scale, "scale (a number or 'auto')")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if average not in (None, True, False):
            raise ValueError(f"average must be None, True or False, got {average!r}")
        self.average = average
        self.depth, self.repeat, self.tol = depth, repeat, float(tol)
        self.scale, self.batch_size, self.seed = scale, batch_size, seed
        self.power_iter = power_iter
        self.scale_value: float | None = None if scale == "auto" else float(scale)
        self.last_depth = 0
        self.last_converged = False

    def config(self) -> dict[str, Any]:
        return {**super().config(), "depth": self.depth, "repeat": self.repeat,
                "scale": self.scale, "tol": self.tol, "batch_size": self.batch_size,
                "average": self.average, "seed": self.seed, "power_iter": self.power_iter}

    # ----------------------------------------------------------------- fitting
    def _fit(self, train_loader: DataLoader) -> None:
        self._attach(train_loader)
        if self.scale == "auto":
            self.scale_value = 1.1 * self._top_eigenvalue()
        self.factors = {"scale": torch.tensor([self.scale_value], dtype=torch.float64)}

    def _after_load(self) -> None:
        if "scale" in self.factors:
            self.scale_value = float(self.factors["scale"][0])

    def _top_eigenvalue(self) -> float:
        """Largest |eigenvalue| of ``C + λI`` by power iteration (``||A v||`` for unit v)."""
        A = self._damped()
        gen = torch.Generator().manual_seed(self.seed)
        p = next(self.model.parameters())
        v = torch.randn(self.space.numel, generator=gen, dtype=torch.float64)
        v = (v / v.norm()).to(dtype=p.dtype, device=p.device)
        est = 0.0
        for _ in self._bar(range(self.power_iter), "scale (power iteration)"):
            w = A(v.unsqueeze(0))[0]
            new = float(w.norm())
            if not new > 0 or new == float("inf"):
                raise FloatingPointError(f"power iteration for LiSSA's scale gave {new}: the "
                                         "curvature is zero or not finite; pass scale=...")
            v = w / new
            if abs(new - est) <= 1e-3 * new:
                return new
            est = new
        return est

    # ----------------------------------------------------------------- solving
    def _precondition(self, G: Tensor) -> Tensor:
        self._damped()  # clear error when no training data is attached
        total = torch.zeros_like(G)
        depth_used, converged = 0, True
        for r in range(self.repeat):
            batches, full = self._batch_stream(self.seed + r)
            average = (not full) if self.average is None else self.average
            h, steps, ok = self._recursion(G, batches, average)
            total += h
            depth_used, converged = max(depth_used, steps), converged and ok
        self.last_depth, self.last_converged = depth_used, converged
        return total / (self.repeat * self.scale_value)

    def _recursion(
        self, V: Tensor, batches: Iterator[Any], average: bool
    ) -> tuple[Tensor, int, bool]:
        """Run ``h ← v + h − (C_t h + λ h)/s`` until converged; return ``(h, steps, ok)``.

        With ``average``, a row that runs to ``depth`` returns the mean of its iterates over
        the second half of the steps instead of the last one."""
        s, lam = self.scale_value, self.damping
        rho_cap = 1.0 - lam / s
        h = V.clone()
        active = V.norm(dim=1) > 0
        prev_change = torch.full((V.shape[0],), float("nan"), dtype=V.dtype, device=V.device)
        first_change = prev_change.clone()
        tail_sum, tail_start, tail_n = torch.zeros_like(V), self.depth // 2, 0
        rho = torch.zeros_like(prev_change)  # per-row running max of the contraction
        steps = 0
        bar = self._bar(zip(range(self.depth), batches, strict=False), "LiSSA", self.depth)
        for _, batch in bar:
            if not active.any():
                break
            steps += 1
            idx = active.nonzero().squeeze(1)
            H = h[idx]
            CH = batches_product(self.model, self.task, [batch], self.space, self.curvature)(H)
            delta = V[idx] - (CH + lam * H) / s
            h[idx] = H + delta
            change = delta.norm(dim=1)
            self._check_divergence(change, first_change[idx], steps)
            if steps == 1:
                first_change[idx] = change
            ratio = change / prev_change[idx]
            prev_change[idx] = change
            if steps > 2:
                rho[idx] = torch.fmax(rho[idx], ratio)
            if average and steps > tail_start:
                tail_sum[idx] += h[idx]
                tail_n += 1
            if steps >= _MIN_STEPS:
                r = rho[idx].clamp_max(rho_cap)
                err = change / h[idx].norm(dim=1) * r / (1 - r)
                active[idx] = ~(err < self.tol)  # r = 1 gives inf or nan: not converged
        if average and tail_n and active.any():
            h[active] = tail_sum[active] / tail_n
        return h, steps, not bool(active.any())

    def _check_divergence(self, change: Tensor, first: Tensor, step: int) -> None:
        blown = ~torch.isfinite(change)
        if step > 1:
            blown |= change > _DIVERGED * first
        if blown.any():
            raise FloatingPointError(
                f"LiSSA diverged at step {step} (scale={self.scale_value:.4g}, "
                f"damping={self.damping:g}): every eigenvalue of (C_batch + λI)/scale must lie "
                "in (0, 2). Use a larger scale or batch_size, more damping, or curvature='ggn' "
                "if the Hessian is indefinite"
            )

    def _batch_stream(self, seed: int) -> tuple[Iterator[Any], bool]:
        """``depth`` minibatches, and whether each one is the whole training set: seeded
        independent draws (with replacement) from the loader's dataset, or the loader itself,
        cycled, when its dataset cannot be indexed."""
        loader = self._loader
        dataset = loader.dataset
        size = self.batch_size or loader.batch_size
        if isinstance(dataset, IterableDataset) or size is None:
            return itertools.chain.from_iterable(itertools.repeat(loader)), len(loader) == 1
        n = len(dataset)  # type: ignore[arg-type]
        if size >= n:  # full batch: collate once, reuse every step
            batch = next(iter(DataLoader(dataset, batch_size=n, collate_fn=loader.collate_fn)))
            return itertools.repeat(batch), True
        # independent draws with replacement: reshuffled epochs correlate a batch with the
        # iterate it multiplies, which biases the averaged estimate (measured: 5% vs 1.7%
        # relative error after 4000 steps on the breast-cancer check)
        gen = torch.Generator().manual_seed(seed)
        sampler = RandomSampler(dataset, replacement=True, num_samples=size * self.depth,
                                generator=gen)
        return iter(DataLoader(dataset, batch_size=size, collate_fn=loader.collate_fn,
                               sampler=sampler)), False
