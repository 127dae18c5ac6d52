"""Data cleansing for GANs (Terashita et al., 2021; TNNLS 2025): remove the training instances
predicted to harm a GAN evaluation metric, then retrain without them.

    >>> traj = train_gan(g, d, train_set, epochs=30, batch_size=100, lr_d=0.01, lr_g=0.01)
    >>> metric = AverageLogLikelihood(validation)                    # higher is better
    >>> scores = GANInfluence(traj, metric).scores()                 # predicted Δmetric if removed
    >>> result = GANCleansing(fraction=0.1).cleanse(traj, scores=scores, metric=metric)
    >>> result.generator, result.discriminator, result.seconds
    >>> result.details["removed_ids"], result.details["metric_change"]

Selection. ``cleanse`` takes exactly one of:

* ``scores``: per-instance influence in the library's convention (``scores[i]`` predicts
  ``metric(without i) - metric(with i)``), aligned with ``trajectory.train_ids`` (or with
  ``ids=``); the direction comes from ``higher_is_better`` or the metric's attribute of that
  name. FID is lower-is-better, so its harmful instances have negative scores.
* ``harm``: any per-instance harm vector (higher = more harmful), e.g. from the baselines of
  :mod:`unlearn.removal.gan_selection` (random, Isolation Forest);
* ``remove_ids``: the ids to remove, chosen elsewhere.

:func:`selection_harm` builds the harm vector of each selection method of the paper's
comparison: ``"influence"`` (on a metric), ``"discriminator_loss"`` (influence on D's loss on
held-out real and generated samples, lower is better), ``"random"``, ``"isolation_forest"``.

Retraining (``mode``):

* ``"replay"`` (default): the recorded run again with the same batches, latents and learning
  rates, minus the removed instances. By default (``renormalize=True``, as the reference
  code's retraining) each real batch is averaged over the instances it keeps; with
  ``renormalize=False`` the original batch size stays the divisor
  (``unlearn.generative.training.replay``), the exact counterfactual the influence estimate
  linearises, which at large removal rates also shrinks D's real-data term by the removal
  rate. Removing nothing gives back the trained weights exactly either way.
  ``last_steps=k`` replays only the last ``k`` steps from the recorded state
  before them (the paper's cheaper "one-epoch retraining"; pair it with
  ``GANInfluence(last_steps=k)``, which predicts exactly that counterfactual).
* ``"retrain"``: a fresh run of ``train_gan`` on the retained data from the same initial
  weights with the same hyper-parameters (epochs, batch size, learning rates, schedule, loss,
  seed); the batches and latents differ from the original run, so this also measures whether
  the selection helps beyond the exact counterfactual. ``retrain_fn(retained_dataset) ->
  GANTrajectory`` replaces the built-in retraining.

Before/after metric: ``metric(G(z_eval))`` on fixed evaluation latents, by default the 1,000
latents that :class:`~unlearn.influence.GANInfluence` uses (seed 0), so ``metric_before``
equals ``GANInfluence.value()``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from unlearn.data import IndexedDataset
from unlearn.generative.training import UPDATE_D, GANTrajectory, replay, train_gan
from unlearn.removal.gan_selection import (
    check_scores,
    harm_from_influence,
    isolation_forest_harm,
    random_harm,
    removal_count,
    select_top,
)

__all__ = ["GANCleansing", "CleansingResult", "selection_harm", "SELECTIONS", "MODES",
           "eval_latents_for", "metric_of", "tail_of", "retrain_like", "drop_from_batches"]

MODES = ("replay", "retrain")
SELECTIONS = ("influence", "discriminator_loss", "random", "isolation_forest")

MetricFn = Callable[[Tensor], Tensor]


@dataclass
class CleansingResult:
    """The cleansed GAN: new ``generator`` / ``discriminator`` modules (the trajectory's are
    untouched), the cleansed run's ``trajectory``, wall-clock ``seconds`` (selection excluded,
    retraining and evaluation included) and ``details`` (removed ids, metric before/after)."""

    generator: nn.Module
    discriminator: nn.Module
    trajectory: GANTrajectory
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


def eval_latents_for(trajectory: GANTrajectory, n: int = 1000, seed: int = 0) -> Tensor:
    """``n`` standard-normal latents from ``seed``, drawn as GANInfluence draws its defaults."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn((n, *trajectory.latent_shape), generator=gen, dtype=torch.float64)
    return z.to(device=trajectory.device, dtype=trajectory.dtype)


def metric_of(generator: nn.Module, metric: MetricFn, latents: Tensor) -> float:
    """``metric(generator(latents))`` as a float, without gradients."""
    with torch.no_grad():
        value = metric(generator(latents))
    value = float(torch.as_tensor(value).reshape(()))
    if not math.isfinite(value):
        raise FloatingPointError(f"the metric is {value} on this generator's samples")
    return value


class GANCleansing:
    """Remove the top-k harmful instances (``k`` a count, or ``fraction`` of the training set;
    neither when the ids are given to :meth:`cleanse` as ``remove_ids``) and retrain
    (``mode="replay"`` or ``"retrain"``; see the module docstring)."""

    def __init__(self, *, k: int | None = None, fraction: float | None = None,
                 mode: str = "replay",
                 retrain_fn: Callable[[IndexedDataset], GANTrajectory] | None = None,
                 last_steps: int | None = None, renormalize: bool = True,
                 progress: bool = False) -> None:
        if k is not None and fraction is not None:
            raise ValueError("give at most one of k (a count) and fraction (of the training set)")
        if k is not None or fraction is not None:  # type and range checks
            removal_count(k if k is not None else 0, k=k, fraction=fraction)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if retrain_fn is not None and not callable(retrain_fn):
            raise TypeError(f"retrain_fn must be callable(dataset) -> GANTrajectory, got "
                            f"{retrain_fn!r}")
        if last_steps is not None:
            if isinstance(last_steps, bool) or not isinstance(last_steps, int) or last_steps < 1:
                raise ValueError(f"last_steps must be a positive integer, got {last_steps!r}")
            if mode != "replay":
                raise ValueError("last_steps replays the end of the recorded run: it needs "
                                 "mode='replay'")
        self.last_steps = last_steps
        self.renormalize = bool(renormalize)
        self.k = k
        self.fraction = fraction
        self.mode = mode
        self.retrain_fn = retrain_fn
        self.progress = progress

    # ------------------------------------------------------------------ selection
    def select(self, trajectory: GANTrajectory, *, scores: Any = None, harm: Any = None,
               remove_ids: Any = None, ids: Any = None,
               higher_is_better: bool | None = None) -> list[int]:
        """The ids this cleansing removes, most harmful first (see the module docstring)."""
        given = [v is not None for v in (scores, harm, remove_ids)]
        if sum(given) != 1:
            raise ValueError("give exactly one of scores= (influence), harm= or remove_ids=")
        n = len(trajectory.train_ids)
        if remove_ids is not None:
            chosen = trajectory.check_ids(remove_ids, "remove_ids")
            if self.k is not None or self.fraction is not None:
                count = removal_count(n, k=self.k, fraction=self.fraction)
                if len(chosen) != count:
                    raise ValueError(f"remove_ids has {len(chosen)} ids but this cleansing "
                                     f"removes {count} (k={self.k}, fraction={self.fraction})")
            return chosen
        if self.k is None and self.fraction is None:
            raise ValueError("how many to remove? construct GANCleansing with k= or fraction=")
        id_t = trajectory.train_ids if ids is None else torch.as_tensor(ids, dtype=torch.long)
        if ids is not None:
            trajectory.check_ids(id_t, "ids")
        values = scores if scores is not None else harm
        what = "scores" if scores is not None else "harm"
        vec = check_scores(values, len(id_t), what)
        if scores is not None:
            if higher_is_better is None:
                raise ValueError("influence scores need a direction: pass higher_is_better= "
                                 "(True for ALL / IS, False for FID) or a metric that has it")
            vec = harm_from_influence(vec, higher_is_better=higher_is_better)
        count = removal_count(len(id_t), k=self.k, fraction=self.fraction)
        return select_top(vec, id_t, count).tolist()

    # ------------------------------------------------------------------ cleansing
    def cleanse(self, trajectory: GANTrajectory, *, scores: Any = None, harm: Any = None,
                remove_ids: Any = None, ids: Any = None, metric: MetricFn | None = None,
                higher_is_better: bool | None = None, eval_latents: Tensor | None = None,
                dataset: IndexedDataset | None = None) -> CleansingResult:
        """Select (one of ``scores`` / ``harm`` / ``remove_ids``), retrain without the selected
        instances, and measure ``metric`` before and after (when a metric is given)."""
        if not isinstance(trajectory, GANTrajectory):
            raise TypeError(f"trajectory must be a GANTrajectory, got {type(trajectory)}")
        if len(trajectory) == 0:
            raise ValueError("the trajectory is empty: there is no training run to cleanse")
        if higher_is_better is None and metric is not None:
            higher_is_better = getattr(metric, "higher_is_better", None)
        removed = self.select(trajectory, scores=scores, harm=harm, remove_ids=remove_ids,
                              ids=ids, higher_is_better=higher_is_better)
        start = time.perf_counter()
        if self.mode == "replay":
            base = trajectory if self.last_steps is None else \
                tail_of(trajectory, self.last_steps, dataset=dataset)
            if self.renormalize:
                base = drop_from_batches(base, removed)
                new_traj = replay(base, [], dataset=dataset, progress=self.progress)
            else:
                new_traj = replay(base, removed, dataset=dataset, progress=self.progress)
        else:
            new_traj = self._retrain(trajectory, removed, dataset)
        g, d = new_traj.models()
        details: dict[str, Any] = {
            "method": "gan_cleansing", "mode": self.mode, "n_train": len(trajectory.train_ids),
            "replayed_steps": len(new_traj), "last_steps": self.last_steps,
            "n_removed": len(removed), "removed_ids": removed,
            "selection": "scores" if scores is not None else
            "harm" if harm is not None else "remove_ids",
        }
        if self.mode == "replay":
            details["divisor"] = "retained" if self.renormalize else "batch"
        if metric is not None:
            z = eval_latents_for(trajectory) if eval_latents is None else eval_latents
            before = metric_of(trajectory.models()[0], metric, z)
            after = metric_of(g, metric, z)
            details.update(metric_before=before, metric_after=after,
                           metric_change=after - before, higher_is_better=higher_is_better)
            if higher_is_better is not None:
                details["improved"] = (after > before) if higher_is_better else (after < before)
        seconds = time.perf_counter() - start
        return CleansingResult(g, d, new_traj, seconds, details)

    def _retrain(self, trajectory: GANTrajectory, removed: list[int],
                 dataset: IndexedDataset | None) -> GANTrajectory:
        full = dataset if dataset is not None else trajectory.dataset
        if full is None:
            raise ValueError("retraining needs the training data: pass dataset=... (the "
                             "trajectory has none attached)")
        trajectory.real_data(full)  # same data as recorded (fingerprint check)
        retained = full.without(removed) if removed else full
        if self.retrain_fn is not None:
            out = self.retrain_fn(retained)
            if not isinstance(out, GANTrajectory):
                raise TypeError(f"retrain_fn must return a GANTrajectory, got {type(out)}")
            return out
        return retrain_like(trajectory, retained, progress=self.progress)


def drop_from_batches(trajectory: GANTrajectory, removed: Any) -> GANTrajectory:
    """The run with ``removed`` taken out of its recorded batches, so that replaying it averages
    each real batch over the instances it keeps (``replay`` alone keeps the original batch
    size as the divisor). Latents, learning rates and the order of everything else stay."""
    drop = set(trajectory.check_ids(removed, "removed ids"))
    if not drop:
        return trajectory
    keep = torch.tensor([i not in drop for i in trajectory.batch_ids.tolist()], dtype=torch.bool)
    counts = torch.zeros(len(trajectory), dtype=torch.int64)
    step_of = torch.repeat_interleave(torch.arange(len(trajectory)),
                                      trajectory.batch_offsets.diff())
    counts.index_add_(0, step_of[keep], torch.ones(int(keep.sum()), dtype=torch.int64))
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    excluded = sorted(set(trajectory.excluded_ids.tolist()) | drop)
    return dataclasses.replace(trajectory, batch_ids=trajectory.batch_ids[keep],
                               batch_offsets=offsets,
                               excluded_ids=torch.tensor(excluded, dtype=torch.int64))


def tail_of(trajectory: GANTrajectory, last_steps: int, *,
            dataset: IndexedDataset | None = None) -> GANTrajectory:
    """The last ``last_steps`` steps of a run as a run of their own, starting from the recorded
    state before them: replaying it without some ids is the paper's cheaper "one-epoch
    retraining" (the counterfactual that ``GANInfluence(last_steps=...)`` predicts)."""
    T = len(trajectory)
    if not 1 <= last_steps <= T:
        raise ValueError(f"last_steps must be in 1..{T} (the run's steps), got {last_steps}")
    start = T - last_steps
    state = trajectory.state_at(start, dataset)
    lo = int(trajectory.batch_offsets[start])
    return dataclasses.replace(
        trajectory,
        kinds=trajectory.kinds[start:], lr_d=trajectory.lr_d[start:],
        lr_g=trajectory.lr_g[start:], batch_offsets=trajectory.batch_offsets[start:] - lo,
        batch_ids=trajectory.batch_ids[lo:], seeds_d=trajectory.seeds_d[start:],
        seeds_g=trajectory.seeds_g[start:], n_fake_d=trajectory.n_fake_d[start:],
        n_fake_g=trajectory.n_fake_g[start:],
        checkpoints={0: state, last_steps: trajectory.state_at(T, dataset)},
    )


def retrain_like(trajectory: GANTrajectory, dataset: IndexedDataset, *,
                 progress: bool = False) -> GANTrajectory:
    """``train_gan`` on ``dataset`` from the trajectory's initial weights with its
    hyper-parameters (constant learning rates only: a per-step schedule does not carry over to
    a run with a different number of steps)."""
    d_steps = int(((trajectory.kinds & UPDATE_D) > 0).sum())
    n0 = len(trajectory.train_ids)
    per_epoch = math.ceil(n0 / trajectory.batch_size)
    if d_steps % per_epoch:
        raise ValueError("cannot infer the number of epochs of this run; pass retrain_fn=...")
    lrs = {}
    for name, lr, bit in (("lr_d", trajectory.lr_d, 1), ("lr_g", trajectory.lr_g, 2)):
        used = lr[(trajectory.kinds & bit) > 0]
        if len(used) and not torch.all(used == used[0]):
            raise ValueError(f"{name} changes during the run; retrain mode supports constant "
                             "learning rates only: pass retrain_fn=...")
        lrs[name] = float(used[0]) if len(used) else 0.0
    g0, d0 = trajectory.models(0)
    if len(dataset) == 0:
        raise ValueError("nothing is left to train on: every instance was removed")
    return train_gan(
        g0, d0, dataset, epochs=d_steps // per_epoch, batch_size=trajectory.batch_size,
        lr_d=lrs["lr_d"], lr_g=lrs["lr_g"], n_disc=trajectory.n_disc,
        schedule=trajectory.schedule, loss=trajectory.loss,
        weight_decay_d=trajectory.weight_decay_d, weight_decay_g=trajectory.weight_decay_g,
        momentum=getattr(trajectory, "momentum", 0.0),
        n_fake=int(max(trajectory.n_fake_d.max(), trajectory.n_fake_g.max())),
        seed=trajectory.seed, checkpoint_every=trajectory.checkpoint_every, progress=progress,
    )


# ---------------------------------------------------------------------------- selection methods


def selection_harm(method: str, trajectory: GANTrajectory, *, metric: MetricFn | None = None,
                   higher_is_better: bool | None = None, validation: Tensor | None = None,
                   features: Callable[[Tensor], Tensor] | Tensor | None = None,
                   eval_latents: Tensor | None = None, seed: int = 0,
                   dataset: IndexedDataset | None = None,
                   last_steps: int | None = None) -> Tensor:
    """Harm vector (aligned with ``trajectory.train_ids``, higher = more harmful) of one
    selection method:

    * ``"influence"``: GAN influence on ``metric`` (direction: ``higher_is_better`` or the
      metric's attribute);
    * ``"discriminator_loss"``: GAN influence on the discriminator loss on ``validation`` real
      samples and generated ones (treated as lower-is-better, as in the paper's baseline);
    * ``"random"``: a random ranking from ``seed``;
    * ``"isolation_forest"``: Isolation Forest on the training samples, or on
      ``features(samples)`` (e.g. classifier features of images) or on a given feature matrix.
    """
    from unlearn.influence.gan import GANInfluence

    if method not in SELECTIONS:
        raise ValueError(f"unknown selection method {method!r}; known: {SELECTIONS}")
    z = eval_latents_for(trajectory) if eval_latents is None else eval_latents
    if method == "influence":
        if metric is None:
            raise ValueError("selection 'influence' needs a metric")
        hib = getattr(metric, "higher_is_better", None) if higher_is_better is None \
            else higher_is_better
        if hib is None:
            raise ValueError("selection 'influence' needs higher_is_better= (the metric has no "
                             "higher_is_better attribute)")
        est = GANInfluence(trajectory, metric, eval_latents=z, dataset=dataset,
                           last_steps=last_steps)
        return harm_from_influence(est.scores(), higher_is_better=hib)
    if method == "discriminator_loss":
        if validation is None:
            raise ValueError("selection 'discriminator_loss' needs validation real samples")
        est = GANInfluence(trajectory, target="discriminator_loss", validation=validation,
                           eval_latents=z, dataset=dataset, last_steps=last_steps)
        return harm_from_influence(est.scores(), higher_is_better=False)
    n = len(trajectory.train_ids)
    if method == "random":
        return random_harm(n, seed)
    data = trajectory.real_data(dataset)
    if features is None:
        x = data.x
    elif isinstance(features, Tensor):
        x = features
    else:
        with torch.no_grad():
            x = features(data.x)
    if len(x) != n:
        raise ValueError(f"features have {len(x)} rows for {n} training instances")
    return isolation_forest_harm(x, seed=seed)

