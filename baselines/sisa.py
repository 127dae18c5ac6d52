"""SISA training (Bourtoule et al., "Machine Unlearning", IEEE S&P 2021): Sharded, Isolated,
Sliced, Aggregated.

The training set is split at random into ``n_shards`` disjoint shards, each shard into
``n_slices`` slices. One model per shard is trained incrementally: at step ``k`` it trains for
``recipe.epochs`` epochs on slices ``0..k`` of its shard, and its state is checkpointed after
every step (step 0's checkpoint is the initialisation). Predictions average the shard models'
probabilities (:class:`SISAEnsemble`, an ``nn.Module`` returning the log of the averaged
probabilities, so ``argmax`` is the aggregated vote and cross-entropy its negative
log-likelihood).

To forget ids, only the shards that hold them are retrained, each from the checkpoint taken
just before its earliest affected slice, on its remaining data. Every (shard, step) trains under
its own seed derived from ``(seed, shard, step)``, so the unlearned ensemble is exactly the one
SISA would have trained from scratch on the retained data with the same partition.
"""

from __future__ import annotations

import copy
import math
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from baselines.retrain import Recipe, derive_seed, fit, seeded
from baselines.scrub import require_classification
from unlearn.data import IndexedDataset, UnknownIdError
from unlearn.influence.grads import model_dtype_device
from unlearn.removal.base import RemovalMethod, RemovalResult
from unlearn.tasks import Task

__all__ = ["SISA", "SISAEnsemble"]

Partition = list[list[Tensor]]  # [shard][slice] -> LongTensor of sample ids
CheckpointRef = Any  # an in-memory state dict, or the path of a saved one


def _load_checkpoint(ref: CheckpointRef, like: nn.Module) -> dict[str, Tensor]:
    if isinstance(ref, (str, Path)):
        device = model_dtype_device(like)[1]
        return torch.load(ref, map_location=device, weights_only=True)
    return ref


class SISAEnsemble(nn.Module):
    """Shard models aggregated by averaging predicted probabilities.

    ``forward`` returns ``log((1/m) Σ_s softmax(f_s(x)))`` over the ``m`` active shards (a shard
    whose data was entirely forgotten is deactivated). ``partition[s][k]`` holds the ids of
    slice ``k`` of shard ``s``; ``checkpoints[s][k]`` is the state of shard ``s`` after training
    on slices ``0..k-1`` (``k = 0``: its initialisation).
    """

    def __init__(self, members: Sequence[nn.Module], partition: Partition,
                 checkpoints: list[list[CheckpointRef]], active: Sequence[bool] | None = None):
        super().__init__()
        if not len(members) == len(partition) == len(checkpoints):
            raise ValueError("members, partition and checkpoints must have one entry per shard")
        self.members = nn.ModuleList(members)
        self.partition = partition
        self.checkpoints = checkpoints
        self.active = list(active) if active is not None else [True] * len(members)

    @property
    def n_shards(self) -> int:
        return len(self.members)

    @property
    def n_slices(self) -> int:
        return len(self.partition[0])

    def ids(self) -> Tensor:
        """Every id the ensemble was trained on (and has not forgotten)."""
        return torch.cat([t for shard in self.partition for t in shard])

    def checkpoint(self, shard: int, step: int) -> dict[str, Tensor]:
        """The state of shard ``shard`` after ``step`` slices (0: initialisation)."""
        return _load_checkpoint(self.checkpoints[shard][step], self.members[shard])

    def forward(self, x: Any) -> Tensor:
        logps = [F.log_softmax(m(x), dim=1)
                 for m, on in zip(self.members, self.active, strict=True) if on]
        if not logps:
            raise RuntimeError("every shard of this SISA ensemble has been emptied")
        return torch.logsumexp(torch.stack(logps), dim=0) - math.log(len(logps))


class SISA(RemovalMethod):
    """Sharded, sliced training with checkpoints; unlearning retrains only affected shards.

    ``fit(train)`` trains and returns a :class:`SISAEnsemble`; ``unlearn(ensemble, forget=...)``
    (the removal protocol; ``retain`` is not needed) returns a new ensemble. Forget batches must
    be ``(ids, x, y)``. ``recipe.epochs`` is the number of epochs of *each* slice step.
    Checkpoints stay in memory, or go to ``checkpoint_dir`` (new files per unlearning, so the
    input ensemble's checkpoints are never overwritten).
    """

    name = "sisa"
    needs_retain = False

    def __init__(self, task: Task, model_factory: Callable[[], nn.Module], *, n_shards: int = 5,
                 n_slices: int = 3, recipe: Recipe | None = None, seed: int = 0,
                 checkpoint_dir: str | Path | None = None) -> None:
        super().__init__(task)
        require_classification(task, "SISA")
        if not callable(model_factory):
            raise TypeError(f"model_factory must be callable, got {type(model_factory)}")
        if not isinstance(n_shards, int) or n_shards < 1:
            raise ValueError(f"n_shards must be a positive int, got {n_shards!r}")
        if not isinstance(n_slices, int) or n_slices < 1:
            raise ValueError(f"n_slices must be a positive int, got {n_slices!r}")
        self.model_factory = model_factory
        self.n_shards, self.n_slices = n_shards, n_slices
        self.recipe = recipe or Recipe()
        self.seed = int(seed)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.dataset_: IndexedDataset | None = None

    # ------------------------------------------------------------------ partition & training

    def random_partition(self, train: IndexedDataset) -> Partition:
        """Shards of near-equal size drawn at random (seeded), each cut into slices."""
        n = len(train)
        if n < self.n_shards * self.n_slices:
            raise ValueError(f"{n} samples cannot fill {self.n_shards} shards x "
                             f"{self.n_slices} slices")
        gen = torch.Generator().manual_seed(derive_seed(self.seed, 2))
        perm = train.ids[torch.randperm(n, generator=gen)]
        return [list(torch.tensor_split(shard, self.n_slices))
                for shard in torch.tensor_split(perm, self.n_shards)]

    def _check_partition(self, train: IndexedDataset, partition: Partition) -> Partition:
        if len(partition) != self.n_shards or any(len(s) != self.n_slices for s in partition):
            raise ValueError(f"partition must be {self.n_shards} shards x {self.n_slices} "
                             "slices of ids")
        out = [[torch.as_tensor(t, dtype=torch.long).reshape(-1) for t in s] for s in partition]
        flat = torch.cat([t for s in out for t in s])
        if flat.unique().numel() != flat.numel():
            raise ValueError("partition lists some ids more than once")
        train.index_of(flat)  # raises UnknownIdError for ids not in train
        if flat.numel() != len(train):
            raise ValueError(f"partition covers {flat.numel()} of the {len(train)} samples; "
                             "it must cover all of them")
        return out

    def _save(self, state: dict[str, Tensor], shard: int, step: int) -> CheckpointRef:
        state = {k: v.detach().clone() for k, v in state.items()}
        if self.checkpoint_dir is None:
            return state
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        path = self.checkpoint_dir / f"shard{shard:03d}_step{step:03d}_{uuid.uuid4().hex}.pt"
        torch.save(state, path)
        return str(path)

    def train_slices(self, model: nn.Module, shard: int, slices: Sequence[Tensor],
                     start: int) -> tuple[list[CheckpointRef], int]:
        """Continue shard ``shard``'s model (in the state after ``start`` slices) through the
        remaining slice steps; returns the checkpoints after steps ``start+1..n_slices`` and
        the number of examples processed."""
        assert self.dataset_ is not None
        refs, seen = [], 0
        for k in range(start, self.n_slices):
            ids = torch.cat(list(slices[: k + 1]))
            if ids.numel():
                loader = DataLoader(self.dataset_.subset(ids), batch_size=self.recipe.batch_size)
                with seeded(derive_seed(self.seed, 1, shard, k), model) as gen:
                    seen += fit(model, self.task, loader, self.recipe, gen)
            refs.append(self._save(model.state_dict(), shard, k + 1))
        return refs, seen

    def fit(self, train: IndexedDataset, partition: Partition | None = None) -> SISAEnsemble:
        """Train the shard models on ``train`` (random partition unless one is given)."""
        if not isinstance(train, IndexedDataset):
            raise TypeError(f"SISA.fit needs an unlearn.data.IndexedDataset, got {type(train)}")
        parts = (self.random_partition(train) if partition is None
                 else self._check_partition(train, partition))
        self.dataset_ = train
        members, checkpoints = [], []
        for s in range(self.n_shards):
            with seeded(derive_seed(self.seed, 0, s)):
                model = self.model_factory()
            if not isinstance(model, nn.Module):
                raise TypeError(f"model_factory() must return an nn.Module, got {type(model)}")
            init = self._save(model.state_dict(), s, 0)
            refs, _ = self.train_slices(model, s, parts[s], 0)
            members.append(model)
            checkpoints.append([init, *refs])
        return SISAEnsemble(members, parts, checkpoints)

    # ------------------------------------------------------------------ unlearning

    def unlearn(self, model: nn.Module, *, forget: DataLoader,
                retain: DataLoader | None = None) -> RemovalResult:
        if not isinstance(model, SISAEnsemble):
            raise TypeError(f"SISA unlearns a SISAEnsemble from SISA.fit, got {type(model)}")
        if self.dataset_ is None:
            raise RuntimeError("call SISA.fit(train) first: the shards are retrained from it")
        if model.n_shards != self.n_shards or model.n_slices != self.n_slices:
            raise ValueError(f"the ensemble has {model.n_shards} shards x {model.n_slices} "
                             f"slices, this SISA {self.n_shards} x {self.n_slices}")
        return super().unlearn(model, forget=forget, retain=retain)

    def _forget_ids(self, forget: DataLoader) -> Tensor:
        chunks = []
        for batch in forget:
            ids = self.task.batch_ids(batch)
            if ids is None:
                raise ValueError("SISA needs forget batches of (ids, x, y) to know which "
                                 "shards hold them; build the loader over an IndexedDataset")
            chunks.append(ids.reshape(-1).long().cpu())
        return torch.cat(chunks).unique()

    def _unlearn(self, model: nn.Module, forget: DataLoader,
                 retain: DataLoader | None) -> dict[str, Any]:
        assert isinstance(model, SISAEnsemble)
        ens = model
        drop = self._forget_ids(forget)
        where = {int(i): (s, k) for s, shard in enumerate(ens.partition)
                 for k, t in enumerate(shard) for i in t.tolist()}
        unknown = [int(i) for i in drop.tolist() if int(i) not in where]
        if unknown:
            raise UnknownIdError(unknown)
        if drop.numel() == len(where):
            raise ValueError("the forget set is the whole training set of this SISA ensemble; "
                             "there is nothing left to train on")
        first: dict[int, int] = {}
        for i in drop.tolist():
            s, k = where[int(i)]
            first[s] = min(first.get(s, k), k)
        drop_set = set(drop.tolist())
        seen, emptied, steps = 0, [], {}
        for s in sorted(first):
            ens.partition[s] = [t[torch.tensor([int(i) not in drop_set for i in t.tolist()],
                                               dtype=torch.bool)] for t in ens.partition[s]]
            if sum(t.numel() for t in ens.partition[s]) == 0:
                ens.active[s] = False
                emptied.append(s)
            member = copy.deepcopy(ens.members[s])  # same architecture; state from checkpoint
            member.load_state_dict(ens.checkpoint(s, first[s]))
            refs, n = self.train_slices(member, s, ens.partition[s], first[s])
            ens.checkpoints[s] = [*ens.checkpoints[s][: first[s] + 1], *refs]
            ens.members[s] = member
            seen += n
            steps[s] = self.n_slices - first[s]
        full = self.recipe.epochs * sum(
            sum(t.numel() for t in shard[: k + 1])
            for shard in ens.partition for k in range(self.n_slices))
        return {"shards_retrained": sorted(first), "n_shards_retrained": len(first),
                "first_slice": dict(sorted(first.items())), "slice_steps_retrained": steps,
                "shards_emptied": emptied, "n_forgotten": int(drop.numel()),
                "examples_processed": seen, "full_retrain_examples": int(full),
                "work_fraction": seen / full if full else 0.0}

