"""UnlearningCallback: apply the ledger's pending deletion requests to the model being trained.

>>> ledger = Ledger("run/ledger.db", models="run/models")
>>> ledger.submit([3, 17], requester="alice", reason="GDPR art. 17")
>>> cb = UnlearningCallback(ledger, IAU(ClassificationTask()), train_dataset=train)
>>> Trainer(callbacks=[cb]).fit(module, DataLoader(train, shuffle=True))
>>> ledger.get(1).state, ledger.get(1).model_version        # 'applied', 2

When (``when="fit_end"``, ``every_n_epochs=N``, or an explicit :meth:`process_now`), on rank
zero: pending requests with ids outside ``train_dataset`` are *rejected* with the reason (the
others go on); the current weights become the ledger's head (registered as a version if they
are not already); the valid requests are claimed with the ledger's crash-safe
:meth:`~unlearn.ledger.Ledger.applying` block; the removal method runs on a copy of the module
with forget = the ids not forgotten before and retain = the training set minus every forgotten
id; the new weights are committed (the commit point, with method, seconds and sizes in the
ledger's details) and loaded into the module. The decision and the new weights are then
broadcast (``trainer.strategy.broadcast``) so every rank loads the same weights, and only rank
zero ever writes to the ledger. ``fit_end`` runs in ``on_train_end``: after the last epoch,
before the strategy is torn down (Lightning's own checkpoints of that run predate it; the
ledger's model store has the result).

While training, forgotten ids are dropped from every training batch (``exclude_forgotten``,
by wrapping ``training_step`` like :mod:`unlearn.lightning.gradient_restriction`), so later
epochs do not learn them again; a batch left empty is skipped (single process) or contributes
a zero loss (DDP, where every rank must step).

Certification plugs in with :meth:`UnlearningCallback.add_listener`: each round that applied
requests calls ``listener(report, trainer, pl_module)`` with the request ids and the committed
model version (then ``ledger.certify(report.applied, details)`` moves them to ``certified``).

Resuming from a Lightning checkpoint restores :attr:`history`; if the ledger records requests
applied after that checkpoint was written, the restored weights still contain them, and
``on_fit_start`` warns (re-process them into a fresh version with ``reapply_missing=True``).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from unlearn.data import IndexedDataset
from unlearn.ledger import Ledger
from unlearn.lightning._common import (
    batch_ids,
    cpu_state,
    detached_copy,
    unwrap_training_step,
    wrap_training_step,
)
from unlearn.removal.base import RemovalMethod

__all__ = ["UnlearningCallback", "ProcessReport"]

WHEN = ("fit_end", "epochs", "manual")

#: called after every processing round that applied requests (on every rank, after the new
#: weights are loaded): ``listener(report, trainer, pl_module)``; ``trainer`` may be None
Listener = Callable[["ProcessReport", "pl.Trainer | None", "pl.LightningModule"], None]


@dataclass
class ProcessReport:
    """What one processing round did."""

    applied: list[int] = field(default_factory=list)          # request ids
    rejected: dict[int, str] = field(default_factory=dict)    # request id -> reason
    model_version: int | None = None
    n_forget: int = 0
    seconds: float = 0.0
    epoch: int | None = None
    global_step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rejected"] = {str(k): v for k, v in self.rejected.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProcessReport:
        return cls(applied=[int(i) for i in d["applied"]],
                   rejected={int(k): v for k, v in d["rejected"].items()},
                   model_version=d["model_version"], n_forget=int(d["n_forget"]),
                   seconds=float(d["seconds"]), epoch=d.get("epoch"),
                   global_step=d.get("global_step"))


class UnlearningCallback(pl.Callback):
    """Apply pending ledger requests with ``method`` at the end of fit, every N epochs, or
    when :meth:`process_now` is called.

    Args:
        ledger: a :class:`~unlearn.ledger.Ledger` opened with ``models=...``, or its path (then
            ``models`` is required and the ledger is opened on rank zero only).
        method: the :class:`~unlearn.removal.RemovalMethod` to apply.
        train_dataset: the :class:`~unlearn.data.IndexedDataset` the module is trained on
            (forget / retain loaders are built from it by id).
        when: ``"fit_end"`` (default), ``"manual"`` (only :meth:`process_now`); giving
            ``every_n_epochs`` selects per-epoch processing.
        every_n_epochs: process at the end of every N-th epoch.
        batch_size, loader_kwargs: of the forget / retain loaders (not shuffled by default).
        exclude_forgotten: drop forgotten ids from training batches (see module docstring).
        reapply_missing: after a resume, re-remove requests the restored weights predate.
    """

    def __init__(self, ledger: Ledger | str | os.PathLike[str], method: RemovalMethod, *,
                 train_dataset: IndexedDataset, when: str = "fit_end",
                 every_n_epochs: int | None = None, models: str | os.PathLike[str] | None = None,
                 batch_size: int = 256, loader_kwargs: dict[str, Any] | None = None,
                 exclude_forgotten: bool = True, reapply_missing: bool = False) -> None:
        if not isinstance(method, RemovalMethod):
            raise TypeError(f"method must be an unlearn.removal.RemovalMethod, got {type(method)}")
        if not isinstance(train_dataset, IndexedDataset):
            raise TypeError(f"train_dataset must be an unlearn.data.IndexedDataset (ids are how "
                            f"requests name samples), got {type(train_dataset)}")
        if every_n_epochs is not None:
            if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) \
                    or every_n_epochs < 1:
                raise ValueError(f"every_n_epochs must be a positive integer, got "
                                 f"{every_n_epochs!r}")
            when = "epochs"
        if when not in WHEN:
            raise ValueError(f"when must be 'fit_end' or 'manual' (or pass every_n_epochs=N), "
                             f"got {when!r}")
        if isinstance(ledger, Ledger):
            if ledger.models is None:
                raise ValueError("the ledger needs a model store to version the unlearned "
                                 "weights: open it with Ledger(path, models=DIRECTORY)")
        elif models is None:
            raise ValueError("pass models=DIRECTORY with a ledger path (where the model "
                             "versions are stored)")
        self._ledger, self._ledger_target, self._models = (
            (ledger, None, None) if isinstance(ledger, Ledger)
            else (None, os.fspath(ledger), os.fspath(models)))  # type: ignore[arg-type]
        self.method, self.train_dataset = method, train_dataset
        self.when, self.every_n_epochs = when, every_n_epochs
        self.batch_size, self.loader_kwargs = int(batch_size), dict(loader_kwargs or {})
        self.exclude_forgotten, self.reapply_missing = bool(exclude_forgotten), reapply_missing
        self.history: list[ProcessReport] = []
        self.listeners: list[Listener] = []
        self._forgotten: set[int] = set()
        self._restored = False
        self._wrapper: Any = None
        self._module: pl.LightningModule | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=type(self.method).__name__,
                                        ledger=self._ledger_target or self.ledger.target)

    @property
    def ledger(self) -> Ledger:
        """The ledger (opened on first use when a path was given)."""
        if self._ledger is None:
            self._ledger = Ledger(self._ledger_target, models=self._models)  # type: ignore
        return self._ledger

    @property
    def applied_requests(self) -> list[int]:
        """Request ids this callback applied to the module's weights (survives a resume)."""
        return sorted({r for rep in self.history for r in rep.applied})

    # ------------------------------------------------------------------ hooks

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        missing: list[int] = []
        if trainer.is_global_zero:
            self._forgotten = set(self.ledger.forgotten_ids())
            if self._restored:
                missing = self._missing_after_resume()
        self._forgotten, missing = trainer.strategy.broadcast((self._forgotten, missing), src=0)
        if missing:
            if self.reapply_missing:
                self._reapply(trainer, pl_module, missing)
            elif trainer.is_global_zero:
                warnings.warn(
                    f"the ledger records requests {missing} as applied after the checkpoint this "
                    "run resumed from was written, so the restored weights still contain their "
                    "data; pass reapply_missing=True to remove it again", RuntimeWarning,
                    stacklevel=2)
        if self.exclude_forgotten:
            self._module = pl_module
            self._wrapper = wrap_training_step(pl_module, self._filtered_step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "epochs" and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.process_now(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "fit_end":
            self.process_now(trainer, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        unwrap_training_step(pl_module, self._wrapper)
        self._wrapper, self._module = None, None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    # ------------------------------------------------------------------ processing

    def process_now(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule
                    ) -> ProcessReport:
        """Process the pending requests now (every rank must call it under DDP)."""
        rank_zero = trainer is None or trainer.is_global_zero
        outcome: tuple[Any, ...] = (None, None, None, None)
        error: BaseException | None = None
        if rank_zero:
            try:
                report, state = self._process(trainer, pl_module)
                outcome = (report, state, set(self.ledger.forgotten_ids()), None)
            except Exception as err:
                error = err
                outcome = (None, None, None, f"{type(err).__name__}: {err}")
        if trainer is not None and trainer.world_size > 1:
            outcome = trainer.strategy.broadcast(outcome, src=0)
        report, state, forgotten, message = outcome
        if error is not None:
            raise error
        if message is not None:
            raise RuntimeError(f"UnlearningCallback failed on rank zero: {message}")
        if not rank_zero and state is not None:
            pl_module.load_state_dict(state)
        self._forgotten = forgotten
        self.history.append(report)
        if report.applied:
            for listener in self.listeners:
                listener(report, trainer, pl_module)
        return report

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(report, trainer, pl_module)`` after each round that applied requests
        (the seam for certification: the report names the requests and the model version)."""
        if not callable(listener):
            raise TypeError(f"listener must be callable, got {type(listener)}")
        self.listeners.append(listener)

    def _process(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule
                 ) -> tuple[ProcessReport, dict[str, Tensor] | None]:
        ledger = self.ledger
        report = ProcessReport(epoch=None if trainer is None else int(trainer.current_epoch),
                               global_step=None if trainer is None else int(trainer.global_step))
        pending = ledger.list(state="pending")
        valid = []
        for req in pending:
            unknown = [i for i in req.ids if i not in self.train_dataset]
            if unknown:
                reason = (f"{len(unknown)} sample id(s) not in the training set of "
                          f"{len(self.train_dataset)} examples: {unknown[:10]}")
                ledger.reject(req.id, reason)
                report.rejected[req.id] = reason
            else:
                valid.append(req.id)
        if not valid:
            return report, None
        self._make_head(ledger, pl_module, report)
        start = time.perf_counter()
        new_state: dict[str, Tensor] | None = None
        with ledger.applying(request_ids=valid) as batch:
            details: dict[str, Any] = {"epoch": report.epoch, "global_step": report.global_step}
            if batch.new_ids:
                result, n_retain = self._remove(pl_module, batch.new_ids,
                                                ledger.forgotten_ids())
                new_state = cpu_state(result.model)
                details.update(_jsonable(result.details), method=result.details.get(
                    "method", type(self.method).__name__), seconds=result.seconds,
                    n_forget=len(batch.new_ids), n_retain=n_retain)
            else:
                details.update(method=type(self.method).__name__, seconds=0.0, n_forget=0,
                               note="every id was already forgotten")
            report.model_version = batch.commit(new_state, details=details,
                                                meta={"source": "UnlearningCallback"})
            report.applied = list(batch.claim.request_ids)
            report.n_forget = len(batch.new_ids)
        if new_state is not None:
            pl_module.load_state_dict(new_state)
        report.seconds = time.perf_counter() - start
        return report, new_state

    def _make_head(self, ledger: Ledger, pl_module: pl.LightningModule,
                   report: ProcessReport) -> None:
        """Make the module's current weights the ledger's head version."""
        state = cpu_state(pl_module)
        head = ledger.head()
        if head is not None and _same(ledger.load_model(head), state):
            return
        ledger.register_model(state, meta={
            "source": "UnlearningCallback", "what": "trained weights" if head is None
            else "weights after further training", "epoch": report.epoch,
            "global_step": report.global_step})

    def _remove(self, pl_module: pl.LightningModule, new_ids: list[int],
                forgotten: list[int]) -> tuple[Any, int]:
        """Run the method: forget ``new_ids``, retain the training set minus ``forgotten``."""
        forgotten = [i for i in forgotten if i in self.train_dataset]
        forget = self.train_dataset.subset(sorted(new_ids))
        retain = self.train_dataset.without(sorted(set(forgotten) | set(new_ids)))
        kw = {"batch_size": self.batch_size, **self.loader_kwargs}
        model = detached_copy(pl_module)
        with torch.inference_mode(False), torch.enable_grad():
            result = self.method.unlearn(
                model, forget=DataLoader(forget, **kw),
                retain=DataLoader(retain, **kw) if len(retain) else None)
        return result, len(retain)

    # ------------------------------------------------------------------ resume

    def _missing_after_resume(self) -> list[int]:
        mine = set(self.applied_requests)
        done = [r.id for r in self.ledger.list(state="applied") + self.ledger.list(
            state="certified")]
        return sorted(i for i in done if i not in mine and self._applied_by_me(i))

    def _applied_by_me(self, request_id: int) -> bool:
        """Whether the request was applied by an UnlearningCallback (so, to this lineage)."""
        for ev in self.ledger.events(request_id):
            if ev.kind == "applied":
                return "global_step" in ev.data.get("details", {})
        return False

    def _reapply(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                 missing: list[int]) -> None:
        state = None
        if trainer.is_global_zero:
            ids = sorted({i for r in missing for i in self.ledger.get(r).ids})
            ids = [i for i in ids if i in self.train_dataset]
            result, _ = self._remove(pl_module, ids, self.ledger.forgotten_ids())
            state = cpu_state(result.model)
            self.ledger.register_model(state, meta={
                "source": "UnlearningCallback", "what": "requests re-removed after a resume",
                "requests": missing, "global_step": int(trainer.global_step)})
        state = trainer.strategy.broadcast(state, src=0)
        pl_module.load_state_dict(state)
        self.history.append(ProcessReport(applied=list(missing), n_forget=0,
                                          global_step=int(trainer.global_step)))

    # ------------------------------------------------------------------ training filter

    def _filtered_step(self, inner: Any, *args: Any, **kwargs: Any) -> Any:
        if not self._forgotten:
            return inner(*args, **kwargs)
        args = list(args)
        batch = args[0] if args else kwargs["batch"]
        ids = batch_ids(batch)
        if ids is None:
            return inner(*args, **kwargs)
        keep = ~torch.isin(ids, torch.tensor(sorted(self._forgotten), device=ids.device))
        if bool(keep.all()):
            return inner(*args, **kwargs)
        if not bool(keep.any()):
            module = self._module
            if module is not None and module.trainer.world_size > 1:
                out = inner(*args, **kwargs)
                return out * 0.0 if isinstance(out, Tensor) else {**out, "loss": out["loss"] * 0}
            return None
        new = type(batch)(t[keep] if isinstance(t, Tensor) else t for t in batch)
        if args:
            args[0] = new
        else:
            kwargs["batch"] = new
        return inner(*args, **kwargs)

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "history": [r.to_dict() for r in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version", 1) > 1:
            raise ValueError(f"UnlearningCallback state version {state_dict['version']} is newer "
                             "than this unlearn understands (1)")
        self.history = [ProcessReport.from_dict(d) for d in state_dict["history"]]
        self._restored = True


def _same(a: dict[str, Any], b: dict[str, Tensor]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(torch.equal(torch.as_tensor(a[k]).cpu(), b[k]) for k in a)


def _jsonable(details: dict[str, Any]) -> dict[str, Any]:
    """The JSON-serialisable entries of a removal result's details."""
    out = {}
    for k, v in details.items():
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        out[k] = v
    return out
