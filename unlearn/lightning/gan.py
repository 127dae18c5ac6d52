"""A GAN LightningModule whose run can be cleansed: manual optimisation, two plain SGD
optimisers, and latents drawn from a deterministic per-batch seed.

>>> module = GANModule(generator, discriminator, lr_d=0.01, lr_g=0.01, latent_seed=0)
>>> log = TrainingLogCallback(every_n_steps=None)           # ids and learning rates per batch
>>> log = TrainingLogCallback(every_n_steps=10**9, get_ids=gan_batch_ids)   # (ids, x) batches
>>> Trainer(max_epochs=30, callbacks=[log]).fit(module, DataLoader(train_set, batch_size=100))
>>> traj = trajectory_from_log(log, module, train_set)      # a GANTrajectory
>>> scores = GANInfluence(traj, metric).scores()
>>> GANCleansing(fraction=0.1).cleanse(traj, scores=scores, metric=metric)

From the log to the cleansing module. Every training batch is one D step on the real batch
(latents ``z_D``) followed by one G step (latents ``z_G``), the loss and update rule of
:mod:`unlearn.generative.training` (``L_D = mean softplus(-D(x)) + mean softplus(D(G(z_D)))``,
non-saturating or minimax ``L_G``, weight decay and momentum as the SGD optimisers'). The
latents are a pure function of ``(latent_seed, epoch, batch_idx)``: :func:`latent_seed_for`
gives the seed, and ``torch.randn`` on a CPU generator seeded with it draws them exactly as
``GANTrajectory.latents`` does. The :class:`~unlearn.lightning.TrainingLogCallback` records the
ids, epoch, batch index and both optimisers' learning rates of every batch, and its step-0
checkpoint holds the initial weights (``every_n_steps`` not None; or pass ``initial_state``).
:func:`trajectory_from_log` turns these into a :class:`~unlearn.generative.GANTrajectory`
(two steps per batch, D then G) and recomputes the parameters along the run by exact replay;
it checks the replayed end point against the module's trained weights and raises if they differ
by more than ``atol`` (e.g. a different optimiser, or a module changed after fit).

Batches: ``(ids, x, y)`` (what :mod:`unlearn.data` yields; labels are ignored) or ``(ids, x)``
(give the callback ``get_ids=gan_batch_ids``, which reads both layouts).
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from unlearn.data import IndexedDataset
from unlearn.generative.training import (
    LOSSES,
    UPDATE_D,
    UPDATE_G,
    GANTrajectory,
    RealData,
    replay,
)
from unlearn.influence.grads import ParamSpace
from unlearn.lightning.training_log import TrainingLogCallback

__all__ = ["GANModule", "gan_batch_ids", "latent_seed_for", "trajectory_from_log"]


def latent_seed_for(base_seed: int, epoch: int, batch_idx: int, which: str) -> int:
    """The seed of the latents of batch ``batch_idx`` of ``epoch`` for D's (``"d"``) or G's
    (``"g"``) update: a hash, so seeds of different batches and runs do not collide."""
    if which not in ("d", "g"):
        raise ValueError(f"which must be 'd' or 'g', got {which!r}")
    digest = hashlib.sha256(f"{int(base_seed)}:{int(epoch)}:{int(batch_idx)}:{which}".encode())
    return int.from_bytes(digest.digest()[:8], "big") >> 2  # < 2**62, like train_gan's seeds


def gan_batch_ids(batch: Any) -> Tensor | None:
    """Sample ids of an ``(ids, x)`` or ``(ids, x, y)`` batch (for ``TrainingLogCallback``)."""
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        ids = batch[0]
        if isinstance(ids, Tensor) and ids.dim() == 1 and not ids.is_floating_point() \
                and ids.dtype != torch.bool:
            return ids
    return None


def _latents(seed: int, count: int, latent_shape: tuple[int, ...], like: Tensor) -> Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn((count, *latent_shape), generator=gen, dtype=torch.float64)
    return z.to(device=like.device, dtype=like.dtype)


class GANModule(pl.LightningModule):
    """Unconditional GAN trained with two SGD optimisers (D first, then G) under manual
    optimisation. ``n_fake``: latents per update (default: the real batch's size);
    ``momentum``: heavy-ball momentum of both optimisers (PyTorch's convention, as
    ``train_gan``)."""

    def __init__(self, generator: nn.Module, discriminator: nn.Module, *, lr_d: float = 0.01,
                 lr_g: float = 0.01, loss: str = "nonsaturating", weight_decay_d: float = 0.0,
                 weight_decay_g: float = 0.0, momentum: float = 0.0, latent_seed: int = 0,
                 n_fake: int | None = None) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        for name, v in (("lr_d", lr_d), ("lr_g", lr_g), ("weight_decay_d", weight_decay_d),
                        ("weight_decay_g", weight_decay_g)):
            if not (isinstance(v, (int, float)) and v >= 0 and v < float("inf")):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
            raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
        if n_fake is not None and (not isinstance(n_fake, int) or n_fake < 1):
            raise ValueError(f"n_fake must be a positive integer, got {n_fake!r}")
        shape = getattr(generator, "latent_shape", None)
        if shape is None:
            if getattr(generator, "latent_dim", None) is None:
                raise ValueError("the generator needs a latent_shape or latent_dim attribute")
            shape = (int(generator.latent_dim),)
        self.generator = generator
        self.discriminator = discriminator
        self.latent_shape = tuple(int(s) for s in shape)
        self.lr_d, self.lr_g = float(lr_d), float(lr_g)
        self.loss_kind = loss
        self.weight_decay_d, self.weight_decay_g = float(weight_decay_d), float(weight_decay_g)
        self.momentum = float(momentum)
        self.latent_seed = int(latent_seed)
        self.n_fake = n_fake
        self.automatic_optimization = False

    def forward(self, z: Tensor) -> Tensor:
        return self.generator(z)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.SGD(self.discriminator.parameters(), lr=self.lr_d,
                            momentum=self.momentum, weight_decay=self.weight_decay_d),
            torch.optim.SGD(self.generator.parameters(), lr=self.lr_g,
                            momentum=self.momentum, weight_decay=self.weight_decay_g),
        ]

    def latents(self, batch_idx: int, which: str, count: int, like: Tensor) -> Tensor:
        seed = latent_seed_for(self.latent_seed, self.current_epoch, batch_idx, which)
        return _latents(seed, count, self.latent_shape, like)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x = _real_samples(batch)
        like = next(self.generator.parameters())
        n_fake = self.n_fake or len(x)
        opt_d, opt_g = self.optimizers()  # type: ignore[misc]
        # D step: the generator's output is detached, only D moves
        z_d = self.latents(batch_idx, "d", n_fake, like)
        fake = self.generator(z_d).detach()
        loss_d = F.softplus(-self.discriminator(x)).mean() \
            + F.softplus(self.discriminator(fake)).mean()
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()
        # G step, against the updated D (D's gradients from this pass are discarded)
        z_g = self.latents(batch_idx, "g", n_fake, like)
        logits = self.discriminator(self.generator(z_g))
        loss_g = F.softplus(-logits).mean() if self.loss_kind == "nonsaturating" \
            else -F.softplus(logits).mean()
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        self.discriminator.zero_grad(set_to_none=True)
        self.log_dict({"loss_d": loss_d.detach(), "loss_g": loss_g.detach()},
                      prog_bar=False, on_step=True, on_epoch=False, batch_size=len(x))


def _real_samples(batch: Any) -> Tensor:
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3) and gan_batch_ids(batch) \
            is not None:
        return batch[1]
    raise ValueError("GANModule expects batches of (ids, x, y) or (ids, x) (an "
                     "unlearn.data.IndexedDataset in the loader); got a "
                     f"{type(batch).__name__}")


# ---------------------------------------------------------------------------- log → trajectory


def _theta(module: GANModule, state: dict[str, Tensor]) -> tuple[Tensor, ParamSpace, ParamSpace]:
    g_space, d_space = ParamSpace.of(module.generator), ParamSpace.of(module.discriminator)
    parts = []
    for prefix, space in (("generator.", g_space), ("discriminator.", d_space)):
        for name in space.names:
            key = prefix + name
            if key not in state:
                raise ValueError(f"the initial state has no {key!r}: is it the state of this "
                                 "GANModule?")
            parts.append(state[key].reshape(-1))
    like = next(module.generator.parameters())
    return torch.cat(parts).to(device=like.device, dtype=like.dtype), g_space, d_space


def trajectory_from_log(log: TrainingLogCallback, module: GANModule, dataset: IndexedDataset, *,
                        initial_state: dict[str, Tensor] | None = None,
                        checkpoint_every: int = 1, atol: float | None = None) -> GANTrajectory:
    """The :class:`GANTrajectory` of a :class:`GANModule` fit recorded by ``log`` on
    ``dataset`` (the loader's data set, with its ids). See the module docstring."""
    if not isinstance(module, GANModule):
        raise TypeError(f"module must be a GANModule, got {type(module)}")
    if not isinstance(log, TrainingLogCallback):
        raise TypeError(f"log must be a TrainingLogCallback, got {type(log)}")
    if not log.steps:
        raise ValueError("the training log is empty: fit the module with the callback first")
    if any(r.ids is None for r in log.steps):
        raise ValueError("the log has batches without ids; use batches of (ids, x[, y]) and "
                         "TrainingLogCallback(get_ids=gan_batch_ids)")
    classes = [o.get("class") for o in log.optimizers]
    if classes and classes != ["SGD", "SGD"]:
        raise ValueError(f"the run used optimisers {classes}; only GANModule's two plain SGD "
                         "optimisers can be replayed")
    for o in log.optimizers:
        d = o.get("defaults", {})
        if float(d.get("momentum", 0)) != module.momentum or d.get("nesterov") \
                or d.get("dampening", 0):
            raise ValueError(f"the run's SGD settings {d} differ from the module's (momentum "
                             f"{module.momentum}, no dampening, no Nesterov)")
    if initial_state is None:
        try:
            initial_state = log.load_checkpoint(0)
        except KeyError:
            raise ValueError("the log has no step-0 checkpoint (initial weights): use "
                             "TrainingLogCallback(every_n_steps=<int>) or pass "
                             "initial_state=...") from None
    theta0, g_space, d_space = _theta(module, initial_state)
    data = RealData(dataset, theta0.dtype, theta0.device)
    data.rows(sorted({i for r in log.steps for i in (r.ids or ())}))  # unknown ids → error

    kinds, lr_d, lr_g, batches, seeds_d, seeds_g, n_fake_d, n_fake_g = ([] for _ in range(8))
    for r in log.steps:
        if len(r.lrs) != 2:
            raise ValueError(f"expected 2 optimisers (D, G) in the log, got {len(r.lrs)}")
        n_fake = module.n_fake or len(r.ids or ())
        kinds += [UPDATE_D, UPDATE_G]
        lr_d += [r.lrs[0][0], 0.0]
        lr_g += [0.0, r.lrs[1][0]]
        batches += [list(r.ids or ()), []]
        seeds_d += [latent_seed_for(module.latent_seed, r.epoch, r.batch_idx, "d"), 0]
        seeds_g += [0, latent_seed_for(module.latent_seed, r.epoch, r.batch_idx, "g")]
        n_fake_d += [n_fake, 0]
        n_fake_g += [0, n_fake]
    offsets = torch.tensor([0] + [len(b) for b in batches], dtype=torch.int64).cumsum(0)
    traj = GANTrajectory(
        generator=copy.deepcopy(module.generator),
        discriminator=copy.deepcopy(module.discriminator),
        g_space=g_space, d_space=d_space, latent_shape=module.latent_shape,
        loss=module.loss_kind, schedule="alternating", n_disc=1,
        weight_decay_d=module.weight_decay_d, weight_decay_g=module.weight_decay_g,
        batch_size=max(len(b) for b in batches), seed=module.latent_seed,
        train_ids=data.ids.clone(), data_fingerprint=data.fingerprint,
        kinds=torch.tensor(kinds, dtype=torch.int64),
        lr_d=torch.tensor(lr_d, dtype=torch.float64), lr_g=torch.tensor(lr_g, dtype=torch.float64),
        batch_offsets=offsets,
        batch_ids=torch.tensor([i for b in batches for i in b], dtype=torch.int64),
        seeds_d=torch.tensor(seeds_d, dtype=torch.int64),
        seeds_g=torch.tensor(seeds_g, dtype=torch.int64),
        n_fake_d=torch.tensor(n_fake_d, dtype=torch.int64),
        n_fake_g=torch.tensor(n_fake_g, dtype=torch.int64),
        checkpoint_every=checkpoint_every, dataset=dataset, _data=data,
        checkpoints={0: torch.cat([theta0, torch.zeros_like(theta0)]) if module.momentum
                     else theta0},
        momentum=module.momentum,
    )
    traj = replay(traj, [], checkpoint_every=checkpoint_every)  # fill in the parameters
    trained, _, _ = _theta(module, {k: v.detach() for k, v in module.state_dict().items()})
    gap = float((traj.final_params() - trained).abs().max())
    tol = atol if atol is not None else (1e-4 if theta0.dtype == torch.float32 else 1e-8)
    if gap > tol:
        raise ValueError(f"replaying the log does not reproduce the module's trained weights "
                         f"(max |difference| {gap:.3g} > {tol:.3g}); was the module trained "
                         "further, or with another optimiser, after this log?")
    return traj
