"""TrainingLogCallback: what replay-based removal, SGD-influence and TracIn need from a run.

For every training batch it records the sample ids, the learning rate of every optimizer's
param groups, the epoch, the batch index and the optimizer step the batch contributes to;
at a chosen interval it keeps the model's weights (in memory, or as files written atomically).

>>> log = TrainingLogCallback(every_n_steps=50, checkpoint_dir="run/ckpts")
>>> Trainer(callbacks=[log]).fit(module, loader)        # batches of (ids, x, y)
>>> log.steps[0].ids, log.steps[0].lrs                   # ids of the first batch, [[0.1]]
>>> log.batches_containing([3, 17])                      # every record that saw 3 or 17
>>> log.checkpoints                                       # [(0, path), (50, path), ...]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from torch import Tensor

from unlearn.lightning._common import atomic_torch_save, batch_ids, cpu_state

__all__ = ["TrainingLogCallback", "StepRecord"]


@dataclass(frozen=True)
class StepRecord:
    """One training batch. ``step`` is the number of optimizer steps completed before it, so
    the batches of one update (gradient accumulation) share it; ``lrs[o][g]`` is the learning
    rate of optimizer ``o``'s param group ``g`` used by that update; ``ids`` is None only for
    batches without ids (``require_ids=False``)."""

    step: int
    epoch: int
    batch_idx: int
    ids: tuple[int, ...] | None
    lrs: tuple[tuple[float, ...], ...]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ids"] = None if self.ids is None else list(self.ids)
        d["lrs"] = [list(g) for g in self.lrs]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepRecord:
        return cls(int(d["step"]), int(d["epoch"]), int(d["batch_idx"]),
                   None if d["ids"] is None else tuple(int(i) for i in d["ids"]),
                   tuple(tuple(float(x) for x in g) for g in d["lrs"]))


class TrainingLogCallback(pl.Callback):
    """Record per-batch sample ids and learning rates, and model checkpoints every
    ``every_n_steps`` optimizer steps (plus the initial weights, step 0, unless
    ``save_initial=False``; ``every_n_steps=None`` keeps no checkpoints).

    Checkpoints are kept in memory (CPU state dicts, and then also inside Lightning's
    checkpoints through :meth:`state_dict`) unless ``checkpoint_dir`` is given: then each is a
    file ``step_00000050.pt`` written atomically (temporary file, fsync, rename) by rank zero.

    Batches must be ``(ids, x, y)`` (what :mod:`unlearn.data` yields): other batches raise a
    ``ValueError`` naming the batch, unless ``require_ids=False``, which records ``ids=None``.
    ``get_ids(batch) -> Tensor | None`` reads ids from other batch layouts. Under DDP the ids
    of every rank's batch are gathered (rank order), so each record holds the whole global
    batch; DistributedSampler gives every rank the same batch sizes, which this needs. The ids
    are those the loader yields (before :class:`UnlearningCallback` drops forgotten ones).
    """

    def __init__(self, every_n_steps: int | None = 100, checkpoint_dir: str | Path | None = None,
                 *, save_initial: bool = True, require_ids: bool = True,
                 get_ids: Callable[[Any], Tensor | None] | None = None) -> None:
        if every_n_steps is not None and (isinstance(every_n_steps, bool)
                                          or not isinstance(every_n_steps, int)
                                          or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be a positive integer or None, got "
                             f"{every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.save_initial = bool(save_initial)
        self.require_ids = bool(require_ids)
        self.get_ids = get_ids or batch_ids
        self.steps: list[StepRecord] = []
        self.checkpoints: list[tuple[int, str | dict[str, Tensor]]] = []
        self.optimizers: list[dict[str, Any]] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps,
                                        checkpoint_dir=str(self.checkpoint_dir))

    # ------------------------------------------------------------------ reading back

    def batches_containing(self, ids: Iterable[int]) -> list[StepRecord]:
        """Every record whose batch holds at least one of ``ids``, in training order."""
        wanted = {int(i) for i in ids}
        if any(r.ids is None for r in self.steps):
            raise ValueError("this log has batches without ids (require_ids=False), so it "
                             "cannot tell which batches contained given ids")
        return [r for r in self.steps if wanted.intersection(r.ids or ())]

    def load_checkpoint(self, step: int) -> dict[str, Tensor]:
        """The state dict saved at optimizer step ``step``."""
        import torch

        for s, where in self.checkpoints:
            if s == step:
                if isinstance(where, dict):
                    return where
                return torch.load(where, map_location="cpu", weights_only=True)
        raise KeyError(f"no checkpoint at step {step}; saved steps: "
                       f"{[s for s, _ in self.checkpoints]}")

    # ------------------------------------------------------------------ hooks

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.optimizers = [_describe(opt) for opt in trainer.optimizers]
        if (self.save_initial and self.every_n_steps is not None and trainer.global_step == 0
                and not any(s == 0 for s, _ in self.checkpoints)):
            self._save(trainer, pl_module, 0)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        ids = self.get_ids(batch)
        if ids is None and self.require_ids:
            raise ValueError(
                f"TrainingLogCallback needs batches of (ids, x, y) (unlearn.data.IndexedDataset); "
                f"batch {batch_idx} of epoch {trainer.current_epoch} is a {_shape(batch)}. Pass "
                "require_ids=False to record ids=None, or get_ids=... to read them")
        if ids is not None and trainer.world_size > 1:
            ids = pl_module.all_gather(ids).reshape(-1)
        lrs = tuple(tuple(float(g["lr"]) for g in opt.param_groups) for opt in trainer.optimizers)
        self.steps.append(StepRecord(
            step=int(trainer.global_step), epoch=int(trainer.current_epoch),
            batch_idx=int(batch_idx),
            ids=None if ids is None else tuple(int(i) for i in ids.tolist()), lrs=lrs))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = int(trainer.global_step)
        if (self.every_n_steps is not None and step > 0 and step % self.every_n_steps == 0
                and not any(s == step for s, _ in self.checkpoints)):
            self._save(trainer, pl_module, step)

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        state = cpu_state(pl_module)
        if self.checkpoint_dir is None:
            self.checkpoints.append((step, state))
            return
        path = self.checkpoint_dir / f"step_{step:08d}.pt"
        if trainer.is_global_zero:
            atomic_torch_save(state, path)
        self.checkpoints.append((step, str(path)))

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "every_n_steps": self.every_n_steps,
                "steps": [r.to_dict() for r in self.steps],
                "checkpoints": [[s, w] for s, w in self.checkpoints],
                "optimizers": self.optimizers}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version", 1) > 1:
            raise ValueError(f"TrainingLogCallback state version {state_dict['version']} is "
                             "newer than this unlearn understands (1)")
        self.steps = [StepRecord.from_dict(d) for d in state_dict["steps"]]
        self.checkpoints = [(int(s), w) for s, w in state_dict["checkpoints"]]
        self.optimizers = list(state_dict.get("optimizers", []))


def _describe(opt: Any) -> dict[str, Any]:
    """The optimizer's class and its scalar default hyper-parameters (momentum, decay, ...)."""
    simple = {}
    for k, v in opt.defaults.items():
        if isinstance(v, bool) or (isinstance(v, (int, float)) and math.isfinite(v)):
            simple[k] = v
        elif isinstance(v, tuple) and all(isinstance(x, (int, float)) for x in v):
            simple[k] = list(v)
    return {"class": type(opt).__name__, "defaults": simple}


def _shape(batch: Any) -> str:
    if isinstance(batch, (tuple, list)):
        parts = [type(b).__name__ if not isinstance(b, Tensor) else
                 f"Tensor{tuple(b.shape)}:{str(b.dtype).removeprefix('torch.')}" for b in batch]
        return f"{type(batch).__name__} of {len(batch)} ({', '.join(parts)})"
    return type(batch).__name__
