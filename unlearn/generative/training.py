"""Recorded GAN training with plain SGD, and exact replay with instances left out.

Everything a step did is kept, so the run can be replayed exactly: the real-batch ids, the
per-step seeds that regenerate the latent vectors of D's and G's updates, both learning rates,
the loss type, the update schedule and the parameters (every step, or every k-th step with the
steps between recomputed by an exact forward replay).

The update rule. Let θ = (θ_G, θ_D) and let step t use real batch S_t (|S_t| = B_t samples,
ids recorded), fake latents z^D_t (for D) and z^G_t (for G)::

    L_D(θ) = (1/B_t) Σ_{i ∈ S_t} softplus(-D(x_i)) + mean_k softplus(D(G(z^D_k))) + λ_D/2 ‖θ_D‖²
    L_G(θ) = mean_k softplus(-D(G(z^G_k))) + λ_G/2 ‖θ_G‖²          (non-saturating, default)
    L_G(θ) = -mean_k softplus(D(G(z^G_k))) + λ_G/2 ‖θ_G‖²          (``loss="minimax"``)
    θ_D ← θ_D - η^D_t ∇_D L_D(θ),   θ_G ← θ_G - η^G_t ∇_G L_G(θ)

With ``momentum=μ > 0`` each player keeps a velocity (PyTorch's SGD convention, one optimiser
per player, so a player's velocity changes only on its own steps)::

    v_D ← μ v_D + ∇_D L_D(θ),   θ_D ← θ_D - η^D_t v_D        (likewise for G)

The training *state* is then (θ_G, θ_D, v_G, v_D); without momentum it is θ alone.

A step updates D only, G only, or both from the same θ (``schedule="simultaneous"``). With
``schedule="alternating"`` (default) every real batch gives one D step and every ``n_disc``-th D
step is followed by one G step.

Leaving instances out (``replay(trajectory, exclude_ids=...)``) reruns the *same* steps with the
same latents and learning rates and drops the excluded instances' terms from the real-data sum
while keeping the divisor B_t of the original batch; this is the counterfactual of SGD-influence
(Hara et al., 2019) and of its GAN generalisation (Terashita et al., 2021), so it is both the
"replay" option of data cleansing and the brute-force truth the influence estimate is checked
against. Replaying with nothing excluded reproduces the recorded weights bit for bit (same
device and same number of torch threads).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from unlearn.data import IndexedDataset, UnknownIdError, _to_id_list
from unlearn.generative.models import build_model
from unlearn.influence.grads import ParamSpace

__all__ = [
    "GANTrajectory",
    "RealData",
    "train_gan",
    "replay",
    "LOSSES",
    "SCHEDULES",
    "UPDATE_D",
    "UPDATE_G",
]

LOSSES = ("nonsaturating", "minimax")
SCHEDULES = ("alternating", "simultaneous")
UPDATE_D = 1  # bit flags in GANTrajectory.kinds
UPDATE_G = 2
FORMAT_VERSION = 1

LrLike = float | Callable[[int], float]


# ---------------------------------------------------------------------------- real data


class RealData:
    """The real training samples as one tensor, addressable by sample id.

    Built from an :class:`~unlearn.data.IndexedDataset` whose items are ``(id, x, ...)``; only
    the first field ``x`` is used (labels are ignored by an unconditional GAN).
    """

    def __init__(self, dataset: IndexedDataset, dtype: torch.dtype, device: torch.device):
        if not isinstance(dataset, IndexedDataset):
            raise TypeError(
                f"dataset must be an unlearn.data.IndexedDataset (stable ids), got {type(dataset)}"
            )
        if len(dataset) == 0:
            raise ValueError("the training data set is empty")
        x = dataset.tensors()[0]
        if not torch.is_floating_point(x):
            x = x.float()
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).reshape(len(x), -1).any(1).nonzero()[0])
            raise ValueError(
                f"training sample with id {int(dataset.ids[bad])} has NaN or infinite values"
            )
        self.ids = dataset.ids.clone()
        self.x = x.to(device=device, dtype=dtype)
        self._row = {int(i): r for r, i in enumerate(self.ids.tolist())}
        self.fingerprint = _fingerprint(self.ids, x)

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, ids: Sequence[int]) -> list[int]:
        unknown = [i for i in ids if i not in self._row]
        if unknown:
            raise UnknownIdError(unknown)
        return [self._row[i] for i in ids]


def _fingerprint(ids: Tensor, x: Tensor) -> str:
    """sha256 of the ids and of the samples as float64, to catch a replay on other data."""
    h = hashlib.sha256()
    h.update(ids.to(torch.int64).numpy().tobytes())
    h.update(x.detach().to(torch.float64).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------- trajectory


@dataclass
class GANTrajectory:
    """A recorded GAN training run (see the module docstring for the update rule).

    Per step ``t`` (``T = len(self)`` steps): ``kinds[t]`` (bit 1: D updated, bit 2: G
    updated), ``lr_d[t]``, ``lr_g[t]``, the real batch ids
    ``batch_ids[batch_offsets[t]:batch_offsets[t+1]]`` (empty for a G-only step; the divisor of
    the real-data mean is that batch's full size even after exclusion), the seeds that
    regenerate D's and G's latents (``latents(t, "d")``) and their counts ``n_fake_d/g[t]``.

    ``checkpoints[t]`` is the flat training state *before* step t: θ_t = (θ_G, θ_D), followed
    by the velocities (v_G, v_D) when ``momentum > 0``; ``checkpoints[T]`` is the trained
    result. Step 0 and T are always kept, and every ``checkpoint_every``-th step;
    :meth:`state_at` / :meth:`params_at` recompute the others by exact replay.

    ``generator`` / ``discriminator`` are template modules (architecture only; their own
    weights are never used) and ``dataset`` the real data; neither is written by :meth:`save`.
    Models from :mod:`unlearn.generative.models` are rebuilt from their specs on :meth:`load`.
    """

    generator: nn.Module
    discriminator: nn.Module
    g_space: ParamSpace
    d_space: ParamSpace
    latent_shape: tuple[int, ...]
    loss: str
    schedule: str
    n_disc: int
    weight_decay_d: float
    weight_decay_g: float
    batch_size: int
    seed: int
    train_ids: Tensor
    data_fingerprint: str
    kinds: Tensor
    lr_d: Tensor
    lr_g: Tensor
    batch_offsets: Tensor
    batch_ids: Tensor
    seeds_d: Tensor
    seeds_g: Tensor
    n_fake_d: Tensor
    n_fake_g: Tensor
    checkpoint_every: int
    checkpoints: dict[int, Tensor]
    excluded_ids: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    weight_ids: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    weight_values: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    momentum: float = 0.0
    dataset: IndexedDataset | None = None
    _data: RealData | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ basic views
    def __len__(self) -> int:
        return int(self.kinds.numel())

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.checkpoints.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.checkpoints.values())).device

    @property
    def n_g(self) -> int:
        """Number of generator parameters (the first ``n_g`` entries of θ)."""
        return self.g_space.numel

    @property
    def n_params(self) -> int:
        """Number of parameters P = |θ_G| + |θ_D| (the state has 2P entries with momentum)."""
        return self.g_space.numel + self.d_space.numel

    @property
    def state_size(self) -> int:
        return 2 * self.n_params if self.momentum else self.n_params

    def split(self, theta: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Named G and D parameter views of a flat θ = (θ_G, θ_D)."""
        ng, P = self.n_g, self.n_params
        return self.g_space.unflatten(theta[:ng]), self.d_space.unflatten(theta[ng:P])

    def batch(self, t: int) -> list[int]:
        """The real-batch ids of step ``t`` (empty for a G-only step)."""
        lo, hi = int(self.batch_offsets[t]), int(self.batch_offsets[t + 1])
        return self.batch_ids[lo:hi].tolist()

    def latents(self, t: int, which: str) -> Tensor:
        """The latent vectors of step ``t`` for D's (``"d"``) or G's (``"g"``) update."""
        if which not in ("d", "g"):
            raise ValueError(f"which must be 'd' or 'g', got {which!r}")
        seeds, counts = (
            (self.seeds_d, self.n_fake_d) if which == "d" else (self.seeds_g, self.n_fake_g)
        )
        gen = torch.Generator(device="cpu").manual_seed(int(seeds[t]))
        z = torch.randn((int(counts[t]), *self.latent_shape), generator=gen, dtype=torch.float64)
        return z.to(device=self.device, dtype=self.dtype)

    def final_params(self) -> Tensor:
        """The trained θ = (θ_G, θ_D)."""
        return self.checkpoints[len(self)][: self.n_params]

    def models(self, step: int | None = None) -> tuple[nn.Module, nn.Module]:
        """Fresh ``(generator, discriminator)`` copies holding θ at ``step`` (default: the end)."""
        theta = self.params_at(len(self) if step is None else step)
        pg, pd = self.split(theta)
        g, d = copy.deepcopy(self.generator), copy.deepcopy(self.discriminator)
        with torch.no_grad():
            for name, p in g.named_parameters():
                p.copy_(pg[name])
            for name, p in d.named_parameters():
                p.copy_(pd[name])
        return g, d

    def real_data(self, dataset: IndexedDataset | None = None) -> RealData:
        """The real data this run used; checks a given ``dataset`` against the fingerprint."""
        if dataset is not None and dataset is self.dataset and self._data is not None:
            return self._data  # already checked
        if dataset is not None:
            data = RealData(dataset, self.dtype, self.device)
            if data.fingerprint != self.data_fingerprint:
                raise ValueError(
                    "this data set is not the one the trajectory was recorded on "
                    "(ids or sample values differ)"
                )
            return data
        if self._data is None:
            if self.dataset is None:
                raise ValueError(
                    "the trajectory has no data set attached (it is not saved with it): "
                    "pass dataset=..., or set trajectory.dataset"
                )
            self._data = self.real_data(self.dataset)
        return self._data

    def check_ids(self, ids: Any, what: str = "exclude_ids") -> list[int]:
        """``ids`` as a list of ints, all training ids, no duplicates; clear errors otherwise."""
        id_list = _to_id_list(ids, what)
        known = set(self.train_ids.tolist())
        unknown = [i for i in id_list if i not in known]
        if unknown:
            raise UnknownIdError(unknown)
        seen: set[int] = set()
        for i in id_list:
            if i in seen:
                raise ValueError(f"{what} contains the duplicate id {i}")
            seen.add(i)
        return id_list

    # ------------------------------------------------------------------ parameters
    def params_at(self, step: int, dataset: IndexedDataset | None = None) -> Tensor:
        """θ before step ``step`` (``step = len(self)``: the trained result)."""
        return self.state_at(step, dataset)[: self.n_params]

    def state_at(self, step: int, dataset: IndexedDataset | None = None) -> Tensor:
        """The training state (θ, and velocities with momentum) before step ``step``."""
        T = len(self)
        if not 0 <= step <= T:
            raise IndexError(f"step {step} out of range 0..{T}")
        if step in self.checkpoints:
            return self.checkpoints[step]
        start = max(c for c in self.checkpoints if c <= step)
        state = self.checkpoints[start]
        data = self.real_data(dataset)
        for t in range(start, step):
            state = sgd_step(self, state, t, data)
        return state

    def iter_states_backward(
        self, stop: int = 0, dataset: IndexedDataset | None = None
    ) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(t, state_t)`` for ``t = T-1, ..., stop``, recomputing each stretch between
        checkpoints once by forward replay (memory: one stretch of states)."""
        T = len(self)
        marks = sorted(c for c in self.checkpoints if c < T)
        seg_end = T
        for c in reversed(marks):
            if seg_end <= stop:
                break
            states = [self.checkpoints[c]]
            if seg_end - c > 1:
                data = self.real_data(dataset)
                for t in range(c, seg_end - 1):
                    states.append(sgd_step(self, states[-1], t, data))
            for t in range(seg_end - 1, c - 1, -1):
                if t < stop:
                    break
                yield t, states[t - c]
            seg_end = c

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write to a safetensors file atomically (temporary file, then rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {
            "train_ids": self.train_ids,
            "kinds": self.kinds,
            "lr_d": self.lr_d,
            "lr_g": self.lr_g,
            "batch_offsets": self.batch_offsets,
            "batch_ids": self.batch_ids,
            "seeds_d": self.seeds_d,
            "seeds_g": self.seeds_g,
            "n_fake_d": self.n_fake_d,
            "n_fake_g": self.n_fake_g,
            "excluded_ids": self.excluded_ids,
            "weight_ids": self.weight_ids,
            "weight_values": self.weight_values,
        }
        for t, theta in self.checkpoints.items():
            tensors[f"checkpoint.{t}"] = theta
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {
            "format": "unlearn.GANTrajectory",
            "version": FORMAT_VERSION,
            "generator_spec": getattr(self.generator, "spec", None),
            "discriminator_spec": getattr(self.discriminator, "spec", None),
            "g_space": [list(self.g_space.names), [list(s) for s in self.g_space.shapes]],
            "d_space": [list(self.d_space.names), [list(s) for s in self.d_space.shapes]],
            "latent_shape": list(self.latent_shape),
            "loss": self.loss,
            "schedule": self.schedule,
            "n_disc": self.n_disc,
            "weight_decay_d": self.weight_decay_d,
            "weight_decay_g": self.weight_decay_g,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "data_fingerprint": self.data_fingerprint,
            "checkpoint_every": self.checkpoint_every,
            "momentum": self.momentum,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"unlearn": json.dumps(meta)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        generator: nn.Module | None = None,
        discriminator: nn.Module | None = None,
        dataset: IndexedDataset | None = None,
    ) -> GANTrajectory:
        """Read a file written by :meth:`save`. Models from :mod:`unlearn.generative.models`
        are rebuilt from their stored specs; other architectures need ``generator`` and
        ``discriminator`` templates. ``dataset`` (checked against the fingerprint) is needed
        for replay and influence."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no trajectory file at {path}")
        try:
            tensors = load_file(path)
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                raw_meta = (f.metadata() or {}).get("unlearn")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path}: corrupt or unreadable trajectory file ({e})") from e
        if raw_meta is None:
            raise ValueError(f"{path}: not a GAN trajectory file (no 'unlearn' metadata)")
        try:
            meta = json.loads(raw_meta)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: corrupt trajectory metadata ({e})") from e
        if meta.get("format") != "unlearn.GANTrajectory":
            raise ValueError(f"{path}: not a GAN trajectory file (format {meta.get('format')!r})")
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported trajectory version {meta.get('version')}")
        required = [
            "train_ids", "kinds", "lr_d", "lr_g", "batch_offsets", "batch_ids", "seeds_d",
            "seeds_g", "n_fake_d", "n_fake_g", "excluded_ids",
        ]  # fmt: skip
        missing = [k for k in required if k not in tensors]
        if missing:
            raise ValueError(f"{path}: trajectory file lacks {missing}")
        checkpoints = {
            int(k.split(".", 1)[1]): v for k, v in tensors.items() if k.startswith("checkpoint.")
        }
        if not checkpoints:
            raise ValueError(f"{path}: trajectory file holds no parameters")
        dtype = next(iter(checkpoints.values())).dtype
        g_space = ParamSpace(
            tuple(meta["g_space"][0]), tuple(torch.Size(s) for s in meta["g_space"][1])
        )
        d_space = ParamSpace(
            tuple(meta["d_space"][0]), tuple(torch.Size(s) for s in meta["d_space"][1])
        )
        generator = _template(generator, meta["generator_spec"], g_space, dtype, "generator", path)
        discriminator = _template(
            discriminator, meta["discriminator_spec"], d_space, dtype, "discriminator", path
        )
        traj = cls(
            generator=generator,
            discriminator=discriminator,
            g_space=g_space,
            d_space=d_space,
            latent_shape=tuple(meta["latent_shape"]),
            loss=meta["loss"],
            schedule=meta["schedule"],
            n_disc=int(meta["n_disc"]),
            weight_decay_d=float(meta["weight_decay_d"]),
            weight_decay_g=float(meta["weight_decay_g"]),
            batch_size=int(meta["batch_size"]),
            seed=int(meta["seed"]),
            train_ids=tensors["train_ids"],
            data_fingerprint=meta["data_fingerprint"],
            kinds=tensors["kinds"],
            lr_d=tensors["lr_d"],
            lr_g=tensors["lr_g"],
            batch_offsets=tensors["batch_offsets"],
            batch_ids=tensors["batch_ids"],
            seeds_d=tensors["seeds_d"],
            seeds_g=tensors["seeds_g"],
            n_fake_d=tensors["n_fake_d"],
            n_fake_g=tensors["n_fake_g"],
            checkpoint_every=int(meta["checkpoint_every"]),
            checkpoints=checkpoints,
            excluded_ids=tensors["excluded_ids"],
            weight_ids=tensors.get("weight_ids", torch.zeros(0, dtype=torch.long)),
            weight_values=tensors.get("weight_values", torch.zeros(0, dtype=torch.float64)),
            momentum=float(meta.get("momentum", 0.0)),
        )
        traj.validate(str(path))
        if dataset is not None:
            traj._data = traj.real_data(dataset)
            traj.dataset = dataset
        return traj

    def validate(self, where: str = "trajectory") -> None:
        """Check the recorded arrays agree with each other; raise ValueError naming the fault."""
        T = len(self)
        P = self.state_size
        for name in ("lr_d", "lr_g", "seeds_d", "seeds_g", "n_fake_d", "n_fake_g"):
            if getattr(self, name).shape != (T,):
                raise ValueError(
                    f"{where}: {name} has shape {tuple(getattr(self, name).shape)}, expected ({T},)"
                )
        if self.batch_offsets.shape != (T + 1,) or int(self.batch_offsets[-1]) != len(
            self.batch_ids
        ):
            raise ValueError(f"{where}: batch_offsets do not match batch_ids")
        if (self.batch_offsets[1:] < self.batch_offsets[:-1]).any():
            raise ValueError(f"{where}: batch_offsets are not non-decreasing")
        if 0 not in self.checkpoints or T not in self.checkpoints:
            raise ValueError(f"{where}: checkpoints must include step 0 and the final step {T}")
        for t, theta in self.checkpoints.items():
            if not 0 <= t <= T or theta.shape != (P,):
                raise ValueError(
                    f"{where}: checkpoint {t} has shape {tuple(theta.shape)} "
                    f"(expected ({P},), step within 0..{T})"
                )
            if not torch.isfinite(theta).all():
                raise ValueError(f"{where}: checkpoint {t} holds NaN or infinite values")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            raise ValueError(f"{where}: momentum must be in [0, 1), got {self.momentum}")
        if not (torch.isfinite(self.lr_d).all() and torch.isfinite(self.lr_g).all()):
            raise ValueError(f"{where}: learning rates hold NaN or infinite values")
        if self.loss not in LOSSES or self.schedule not in SCHEDULES:
            raise ValueError(f"{where}: unknown loss {self.loss!r} or schedule {self.schedule!r}")
        bad_kinds = set(self.kinds.tolist()) - {UPDATE_D, UPDATE_G, UPDATE_D | UPDATE_G}
        if bad_kinds:
            raise ValueError(f"{where}: unknown step kinds {sorted(bad_kinds)}")
        known = set(self.train_ids.tolist())
        if self.weight_ids.shape != self.weight_values.shape or self.weight_ids.dim() != 1:
            raise ValueError(f"{where}: weight_ids and weight_values do not match")
        if not (torch.isfinite(self.weight_values).all() and (self.weight_values >= 0).all()):
            raise ValueError(f"{where}: instance weights must be finite and >= 0")
        for name in ("batch_ids", "excluded_ids", "weight_ids"):
            stray = [i for i in set(getattr(self, name).tolist()) if i not in known]
            if stray:
                raise ValueError(f"{where}: {name} holds ids not in train_ids, e.g. {stray[:5]}")


def _template(
    module: nn.Module | None,
    spec: dict | None,
    space: ParamSpace,
    dtype: torch.dtype,
    what: str,
    path: Path,
) -> nn.Module:
    if module is None:
        if spec is None:
            raise ValueError(
                f"{path}: the {what} is not one of unlearn.generative.models; pass {what}=... "
                "(a module of the same architecture) to load"
            )
        module = build_model(spec, dtype)
    have = ParamSpace.of(module)
    if have.names != space.names or have.shapes != space.shapes:
        raise ValueError(f"{path}: the {what} template's parameters do not match the file's")
    return module


# ---------------------------------------------------------------------------- losses, step


def discriminator_loss(
    traj: GANTrajectory,
    pg: dict[str, Tensor],
    pd: dict[str, Tensor],
    x_real: Tensor,
    z: Tensor,
    denom: int,
    weights: Tensor | None = None,
) -> Tensor:
    """L_D at parameters ``(pg, pd)``: real-data sum over ``x_real`` divided by ``denom`` (the
    original batch size), optionally weighted per instance (weights are what influence
    differentiates), plus the fake-data mean and D's weight decay."""
    d_real = functional_call(traj.discriminator, pd, (x_real,))
    per_real = F.softplus(-d_real)
    if weights is not None:
        per_real = per_real * weights
    real_term = per_real.sum() / denom if denom > 0 else d_real.sum() * 0.0
    fake = functional_call(traj.generator, pg, (z,))
    fake_term = F.softplus(functional_call(traj.discriminator, pd, (fake,))).mean()
    loss = real_term + fake_term
    if traj.weight_decay_d:
        loss = loss + 0.5 * traj.weight_decay_d * sum((p * p).sum() for p in pd.values())
    return loss


def generator_loss(
    traj: GANTrajectory, pg: dict[str, Tensor], pd: dict[str, Tensor], z: Tensor
) -> Tensor:
    """L_G at parameters ``(pg, pd)`` for latents ``z`` (non-saturating or minimax)."""
    logits = functional_call(traj.discriminator, pd, (functional_call(traj.generator, pg, (z,)),))
    loss = (
        F.softplus(-logits).mean() if traj.loss == "nonsaturating" else -F.softplus(logits).mean()
    )
    if traj.weight_decay_g:
        loss = loss + 0.5 * traj.weight_decay_g * sum((p * p).sum() for p in pg.values())
    return loss


def kept_batch(traj: GANTrajectory, t: int, data: RealData) -> tuple[list[int], Tensor, int]:
    """Step ``t``'s retained ids, their samples and the divisor (full original batch size)."""
    ids = traj.batch(t)
    if traj.excluded_ids.numel():
        excluded = set(traj.excluded_ids.tolist())
        kept = [i for i in ids if i not in excluded]
    else:
        kept = ids
    return kept, data.x[data.rows(kept)], len(ids)


def instance_weights(traj: GANTrajectory, kept: list[int]) -> Tensor | None:
    """Weights of ``kept`` ids' real-data terms (None: all 1, the common case); set by
    ``replay(..., weights=...)``, e.g. for finite-difference checks of the influence."""
    if not traj.weight_ids.numel():
        return None
    table = dict(zip(traj.weight_ids.tolist(), traj.weight_values.tolist(), strict=True))
    if not any(i in table for i in kept):
        return None
    values = [table.get(i, 1.0) for i in kept]
    return torch.tensor(values, dtype=traj.dtype, device=traj.device)


def sgd_step(traj: GANTrajectory, state: Tensor, t: int, data: RealData) -> Tensor:
    """state_{t+1} from state_t: the one update function training, replay and influence share."""
    kind = int(traj.kinds[t])
    ng, P = traj.n_g, traj.n_params
    theta_g = state[:ng].detach().requires_grad_(bool(kind & UPDATE_G))
    theta_d = state[ng:P].detach().requires_grad_(True)
    pg = traj.g_space.unflatten(theta_g)
    pd = traj.d_space.unflatten(theta_d)
    mu = traj.momentum
    new = [theta_g.detach(), theta_d.detach()]
    vel = [state[P : P + ng], state[P + ng :]] if mu else []
    if kind & UPDATE_D:
        kept, x_real, denom = kept_batch(traj, t, data)
        pg_fixed = traj.g_space.unflatten(theta_g.detach())
        z = traj.latents(t, "d")
        w = instance_weights(traj, kept)
        loss_d = discriminator_loss(traj, pg_fixed, pd, x_real, z, denom, w)
        (step_d,) = torch.autograd.grad(loss_d, theta_d)
        if mu:
            step_d = vel[1] = mu * vel[1] + step_d
        new[1] = theta_d.detach() - float(traj.lr_d[t]) * step_d
    if kind & UPDATE_G:
        pd_fixed = traj.d_space.unflatten(theta_d.detach())
        loss_g = generator_loss(traj, pg, pd_fixed, traj.latents(t, "g"))
        (step_g,) = torch.autograd.grad(loss_g, theta_g)
        if mu:
            step_g = vel[0] = mu * vel[0] + step_g
        new[0] = theta_g.detach() - float(traj.lr_g[t]) * step_g
    out = torch.cat(new + vel)
    if not torch.isfinite(out).all():
        raise FloatingPointError(
            f"GAN training diverged at step {t}: parameters became NaN or infinite "
            "(lower the learning rates)"
        )
    return out


# ---------------------------------------------------------------------------- training


def _lr_at(lr: LrLike, t: int, what: str) -> float:
    value = float(lr(t)) if callable(lr) else float(lr)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r} at step {t}")
    return value


def _check_module(module: Any, what: str) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{what} must be a torch.nn.Module, got {type(module)}")
    if not any(True for _ in module.parameters()):
        raise ValueError(f"the {what} has no parameters")
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"{what} uses batch normalisation ({name}); batch statistics couple the "
                "instances of a batch, so per-instance removal and influence are ill-defined"
            )


def train_gan(
    generator: nn.Module,
    discriminator: nn.Module,
    dataset: IndexedDataset,
    *,
    epochs: int = 1,
    batch_size: int = 64,
    lr_d: LrLike = 1e-3,
    lr_g: LrLike = 1e-3,
    n_disc: int = 1,
    schedule: str = "alternating",
    loss: str = "nonsaturating",
    weight_decay_d: float = 0.0,
    weight_decay_g: float = 0.0,
    momentum: float = 0.0,
    n_fake: int | None = None,
    seed: int = 0,
    checkpoint_every: int = 1,
    progress: bool = False,
) -> GANTrajectory:
    """Train a GAN with SGD, recording everything needed for exact replay and influence.

    Args:
        generator, discriminator: modules giving the architecture and the initial weights
            (they are copied, never modified; get the trained ones from
            ``trajectory.models()``). The generator's ``latent_shape`` attribute (or
            ``latent_dim``) sets the latent shape; latents are standard normal.
        dataset: real samples with stable ids; the first field of each item is the sample.
        epochs: passes over the data; each epoch visits the samples in a fresh seeded order,
            in batches of ``batch_size`` (the last batch may be smaller).
        lr_d, lr_g: learning rates, numbers or ``callable(step) -> float``.
        n_disc: D steps per G step (alternating schedule).
        schedule: ``"alternating"`` or ``"simultaneous"`` (both updated from the same θ with
            the same latents, one step per batch).
        loss: ``"nonsaturating"`` (default) or ``"minimax"`` generator loss.
        weight_decay_d, weight_decay_g: L2 coefficients added to the losses.
        momentum: heavy-ball momentum μ in [0, 1) for both players (0: plain SGD).
        n_fake: latent vectors per update (default: ``batch_size``).
        seed: seeds the batch order and every step's latent seed.
        checkpoint_every: keep θ every k steps (1: all; larger saves memory, the steps between
            are recomputed exactly when needed).

    Returns:
        the :class:`GANTrajectory`, with ``dataset`` attached.
    """
    _check_module(generator, "generator")
    _check_module(discriminator, "discriminator")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    for name, v in {"epochs": epochs, "batch_size": batch_size, "n_disc": n_disc,
                    "checkpoint_every": checkpoint_every}.items():  # fmt: skip
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    n_fake = batch_size if n_fake is None else n_fake
    if not isinstance(n_fake, int) or n_fake < 1:
        raise ValueError(f"n_fake must be a positive integer, got {n_fake!r}")
    for name, v in {"weight_decay_d": weight_decay_d, "weight_decay_g": weight_decay_g}.items():
        if not (math.isfinite(float(v)) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
        raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
    latent_shape = getattr(generator, "latent_shape", None)
    if latent_shape is None:
        latent_dim = getattr(generator, "latent_dim", None)
        if latent_dim is None:
            raise ValueError("the generator needs a latent_shape or latent_dim attribute")
        latent_shape = (int(latent_dim),)
    g_space, d_space = ParamSpace.of(generator), ParamSpace.of(discriminator)
    theta0 = (
        torch.cat(
            [
                g_space.flatten(g_space.params(generator)),
                d_space.flatten(d_space.params(discriminator)),
            ]
        )
        .detach()
        .clone()
    )
    if not torch.isfinite(theta0).all():
        raise ValueError("the initial generator/discriminator weights hold NaN or infinite values")
    dtype, device = theta0.dtype, theta0.device
    data = RealData(dataset, dtype, device)

    # The schedule: which steps update what, on which batch, with which latent seeds.
    master = torch.Generator().manual_seed(seed)
    n = len(data)
    kinds, batches, seeds_d, seeds_g = [], [], [], []
    d_since_g = 0
    for _ in range(epochs):
        order = data.ids[torch.randperm(n, generator=master)].tolist()
        for lo in range(0, n, batch_size):
            ids = order[lo : lo + batch_size]
            s = torch.randint(0, 2**62, (2,), generator=master).tolist()
            if schedule == "simultaneous":
                kinds.append(UPDATE_D | UPDATE_G)
                batches.append(ids)
                seeds_d.append(s[0])
                seeds_g.append(s[0])  # both players see the same latents in a joint step
                continue
            kinds.append(UPDATE_D)
            batches.append(ids)
            seeds_d.append(s[0])
            seeds_g.append(0)
            d_since_g += 1
            if d_since_g == n_disc:
                kinds.append(UPDATE_G)
                batches.append([])
                seeds_d.append(0)
                seeds_g.append(s[1])
                d_since_g = 0
    kinds_t = torch.tensor(kinds, dtype=torch.int64)
    offsets = torch.tensor(
        np.concatenate([[0], np.cumsum([len(b) for b in batches])]), dtype=torch.int64
    )
    traj = GANTrajectory(
        generator=copy.deepcopy(generator),
        discriminator=copy.deepcopy(discriminator),
        g_space=g_space,
        d_space=d_space,
        latent_shape=tuple(int(s) for s in latent_shape),
        loss=loss,
        schedule=schedule,
        n_disc=n_disc,
        weight_decay_d=float(weight_decay_d),
        weight_decay_g=float(weight_decay_g),
        batch_size=batch_size,
        seed=seed,
        train_ids=data.ids.clone(),
        data_fingerprint=data.fingerprint,
        kinds=kinds_t,
        lr_d=torch.tensor(
            [_lr_at(lr_d, t, "lr_d") if k & UPDATE_D else 0.0 for t, k in enumerate(kinds)],
            dtype=torch.float64,
        ),
        lr_g=torch.tensor(
            [_lr_at(lr_g, t, "lr_g") if k & UPDATE_G else 0.0 for t, k in enumerate(kinds)],
            dtype=torch.float64,
        ),
        batch_offsets=offsets,
        batch_ids=torch.tensor([i for b in batches for i in b], dtype=torch.int64),
        seeds_d=torch.tensor(seeds_d, dtype=torch.int64),
        seeds_g=torch.tensor(seeds_g, dtype=torch.int64),
        n_fake_d=torch.tensor([n_fake if k & UPDATE_D else 0 for k in kinds], dtype=torch.int64),
        n_fake_g=torch.tensor([n_fake if k & UPDATE_G else 0 for k in kinds], dtype=torch.int64),
        checkpoint_every=checkpoint_every,
        checkpoints={0: torch.cat([theta0, torch.zeros_like(theta0)]) if momentum else theta0},
        momentum=float(momentum),
        dataset=dataset,
        _data=data,
    )
    _run(traj, data, progress, "train GAN")
    return traj


def _run(traj: GANTrajectory, data: RealData, progress: bool, desc: str) -> None:
    """Execute every step from checkpoint 0, keeping checkpoints (and the final θ)."""
    T = len(traj)
    theta = traj.checkpoints[0]
    traj.checkpoints = {0: theta}
    steps: Any = range(T)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=desc)
    for t in steps:
        theta = sgd_step(traj, theta, t, data)
        if (t + 1) % traj.checkpoint_every == 0 or t + 1 == T:
            traj.checkpoints[t + 1] = theta


def replay(
    trajectory: GANTrajectory,
    exclude_ids: Any = (),
    *,
    dataset: IndexedDataset | None = None,
    weights: dict[int, float] | None = None,
    checkpoint_every: int | None = None,
    progress: bool = False,
) -> GANTrajectory:
    """Retrain with exactly the same steps, latents and learning rates, minus ``exclude_ids``.

    The excluded instances' real-data terms are dropped from every batch they were in (the
    batch divisor stays the original batch size, the SGD-influence counterfactual). Returns a
    new :class:`GANTrajectory` whose ``excluded_ids`` lists the union of the old and new
    exclusions; with nothing excluded it reproduces ``trajectory`` bit for bit.

    ``weights={id: w}`` instead scales those instances' real-data terms by ``w >= 0`` (1: as
    recorded, 0: like exclusion); a small down-weighting ``1 - ε`` gives finite-difference
    checks of the influence derivative. Weights replace earlier weights of the same ids.
    """
    if not isinstance(trajectory, GANTrajectory):
        raise TypeError(f"replay expects a GANTrajectory, got {type(trajectory)}")
    if len(trajectory) == 0:
        raise ValueError("the trajectory is empty: no training steps to replay")
    new_ids = trajectory.check_ids(exclude_ids)
    data = trajectory.real_data(dataset)
    every = trajectory.checkpoint_every if checkpoint_every is None else checkpoint_every
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"checkpoint_every must be a positive integer, got {every!r}")
    excluded = sorted(set(trajectory.excluded_ids.tolist()) | set(new_ids))
    table = dict(
        zip(trajectory.weight_ids.tolist(), trajectory.weight_values.tolist(), strict=True)
    )
    if weights is not None:
        if not isinstance(weights, dict):
            raise TypeError(f"weights must be a dict {{id: weight}}, got {type(weights)}")
        trajectory.check_ids(list(weights), "weights")
        for i, w in weights.items():
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise ValueError(f"the weight of id {i} must be a finite number >= 0, got {w!r}")
            table[int(i)] = float(w)
    out = copy.copy(trajectory)
    out.excluded_ids = torch.tensor(excluded, dtype=torch.int64)
    out.weight_ids = torch.tensor(list(table), dtype=torch.int64)
    out.weight_values = torch.tensor(list(table.values()), dtype=torch.float64)
    out.checkpoint_every = every
    out.checkpoints = {0: trajectory.checkpoints[0]}
    out._data = data
    if dataset is not None:
        out.dataset = dataset
    _run(out, data, progress, "replay GAN")
    return out
