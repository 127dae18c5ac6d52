"""CertificationCallback: audit each unlearning round against models retrained without the data.

>>> unl = UnlearningCallback(ledger, IAU(task), train_dataset=train)
>>> cert = CertificationCallback(ledger, Recipe(epochs=20, lr=0.05), train_dataset=train,
...                              test_dataset=test, out_dir="run/audit", cache_dir="run/refs")
>>> cert.attach(unl)                       # certify after every round that applied requests
>>> Trainer(callbacks=[unl, cert]).fit(module, loader)
>>> cert.last.passed, ledger.get(1).state  # True, 'certified'

What is compared: the module's current weights (after the removal) against ``n_references``
(at least 3) models retrained from scratch on the training set minus *every* id the ledger
records as forgotten (applied or certified), one per seed, with
:func:`unlearn.audit.certify`. The forget set of the audit is those forgotten ids, the retain
set the rest of ``train_dataset``, the test set ``test_dataset``.

How references are retrained: with :class:`baselines.Retrain`, a fresh model from a factory
trained by a :class:`baselines.Recipe` (minibatch SGD / Adam on the task's loss). Pass either
a ready ``Retrain`` or a ``Recipe``; with a ``Recipe`` the factory is
``type(pl_module)(**pl_module.hparams)`` (the same LightningModule class with the
hyper-parameters it saved with ``save_hyperparameters()``). The recipe is *not* read from the
Trainer: for a faithful comparison give it the epochs, learning rate, batch size, momentum and
weight decay the module trains with (the demo builds both from one ``Recipe``). References are
cached in ``cache_dir`` under a key of (forgotten ids, retained ids, recipe, seed, task,
architecture), so auditing the same state again retrains nothing.

Outcome: ``certificate.json`` and ``report.html`` in ``out_dir`` (also kept per round as
``certificate-v<model version>.json``). When the certificate passes, the requests move
``applied -> certified`` with the verdict, the failed checks (none), the file and the model
version in the event's details; ``certificate.json`` is written first (the event names it), and
after the ledger update both files are written (atomically) with a timeline that ends in the
``certified`` events. When it fails they stay ``applied``: the ledger's state
machine has no "certification failed" state, so the failure is recorded in the certificate
file, in :attr:`CertificationCallback.history` and in the returned
:class:`CertificationRecord`, and a later round (or a retry after a better removal) can still
certify them. ``certify_failed=True`` records a failing certificate as ``certified`` anyway,
with ``passed: false`` in the event, for deployments that use the state to mean "audited".
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from torch import nn
from torch.utils.data import DataLoader, Dataset

from baselines.retrain import Recipe, Retrain
from unlearn.audit.certificate import MIN_REFERENCES, Certificate, _timeline, certify
from unlearn.data import IndexedDataset
from unlearn.ledger import Ledger
from unlearn.lightning._common import detached_copy
from unlearn.removal.base import RemovalResult
from unlearn.tasks import ClassificationTask, Task

__all__ = ["CertificationCallback", "CertificationRecord"]


@dataclass
class CertificationRecord:
    """One audit: the requests, the verdict, the files and where it left the requests."""

    request_ids: list[int]
    passed: bool
    failed_checks: list[str]
    certificate: str
    report: str | None
    model_version: int | None
    n_forget: int
    retrained: int  # references trained now (0: all from the cache)
    seconds: float
    certified: list[int] = field(default_factory=list)  # requests moved to 'certified'

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CertificationRecord:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class CertificationCallback(pl.Callback):
    """Certify applied requests against retraining (see the module docstring).

    Args:
        ledger: the :class:`~unlearn.ledger.Ledger` (with its model store, to load the
            pre-removal weights for the report) or its path.
        reference: a :class:`baselines.Retrain`, or a :class:`baselines.Recipe` (the factory is
            then the module's class with its saved hyper-parameters).
        train_dataset, test_dataset: the module's training set (ids name the requests' samples)
            and a held-out set.
        out_dir: where ``certificate.json`` and ``report.html`` are written.
        cache_dir: retrained references (default ``out_dir / "references"``).
        n_references: seeds ``0 .. n-1`` (at least 3); k, floors: the pass band.
        task: defaults to the Retrain's task, else :class:`ClassificationTask`.
        html: also write ``report.html``; progress: progress bar over the references.
        certify_failed: record a failing certificate as ``certified`` (``passed: false``).
    """

    def __init__(self, ledger: Ledger | str | os.PathLike[str], reference: Retrain | Recipe, *,
                 train_dataset: IndexedDataset, test_dataset: Dataset,
                 out_dir: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None,
                 n_references: int = MIN_REFERENCES, k: float = 3.0,
                 floors: dict[str, float] | None = None, task: Task | None = None,
                 models: str | os.PathLike[str] | None = None, batch_size: int = 256,
                 html: bool = True, progress: bool = False,
                 certify_failed: bool = False) -> None:
        if not isinstance(reference, (Retrain, Recipe)):
            raise TypeError(f"reference must be a baselines.Retrain or a baselines.Recipe, got "
                            f"{type(reference).__name__}")
        if not isinstance(train_dataset, IndexedDataset):
            raise TypeError(f"train_dataset must be an unlearn.data.IndexedDataset, got "
                            f"{type(train_dataset).__name__}")
        if isinstance(n_references, bool) or not isinstance(n_references, int) \
                or n_references < MIN_REFERENCES:
            raise ValueError(f"n_references must be an integer >= {MIN_REFERENCES} (the pass "
                             f"band is the references' seed-to-seed spread), got "
                             f"{n_references!r}")
        self._ledger = ledger if isinstance(ledger, Ledger) else None
        self._ledger_target = None if self._ledger is not None else os.fspath(ledger)
        self._models = None if models is None else os.fspath(models)
        self.reference = reference
        ref_task = reference.task if isinstance(reference, Retrain) else None
        self.task = task or ref_task or ClassificationTask()
        self.train_dataset, self.test_dataset = train_dataset, test_dataset
        self.out_dir = Path(out_dir)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.out_dir / "references"
        self.n_references, self.k, self.floors = n_references, float(k), floors
        self.batch_size, self.html, self.progress = int(batch_size), html, progress
        self.certify_failed = bool(certify_failed)
        self.history: list[CertificationRecord] = []
        self.last: Certificate | None = None

    @property
    def state_key(self) -> str:
        target = self._ledger_target or (self._ledger.target if self._ledger else "")
        return self._generate_state_key(ledger=target, out_dir=str(self.out_dir))

    @property
    def ledger(self) -> Ledger:
        """The ledger (opened on first use when a path was given)."""
        if self._ledger is None:
            self._ledger = Ledger(self._ledger_target, models=self._models)  # type: ignore
        return self._ledger

    # ------------------------------------------------------------------ wiring

    def attach(self, unlearning: Any) -> CertificationCallback:
        """Certify after every round of ``unlearning`` (an UnlearningCallback) that applied
        requests; returns self."""
        unlearning.add_listener(self._on_round)
        return self

    def _on_round(self, report: Any, trainer: pl.Trainer | None,
                  pl_module: pl.LightningModule) -> None:
        if trainer is not None and not trainer.is_global_zero:
            return  # rank zero audits and writes the ledger; the weights are identical
        self.certify_now(trainer, pl_module, report.applied)

    # ------------------------------------------------------------------ certifying

    def certify_now(self, trainer: pl.Trainer | None, pl_module: nn.Module,
                    request_ids: Iterable[int] | None = None, *,
                    removal: RemovalResult | None = None) -> Certificate:
        """Audit ``pl_module`` against retraining without every forgotten id, write the files
        and update the ledger for ``request_ids`` (default: every ``applied`` request)."""
        start = time.perf_counter()
        ledger = self.ledger
        ids = self._request_ids(request_ids)
        forgotten = [i for i in ledger.forgotten_ids() if i in self.train_dataset]
        if not forgotten:
            raise ValueError("the ledger records no forgotten sample of train_dataset: "
                             "nothing to certify (apply requests first)")
        model = detached_copy(pl_module).eval()
        version = self._version_of(ids)
        loaders = self._loaders(forgotten)
        removal = removal if removal is not None else self._removal_from_ledger(model, ids)
        cert = certify(model, self._retrain(pl_module), **loaders, task=self.task,
                       original=self._original(model, version), n_references=self.n_references,
                       cache_dir=self.cache_dir, removal=removal, k=self.k, floors=self.floors,
                       ledger=ledger, request_ids=ids, progress=self.progress)
        paths = self._write(cert, version, html=False)  # the file the ledger event names
        certified = self._record(cert, ids, paths, version)
        if certified:  # the timeline now ends in the 'certified' events: write it again
            cert.timeline = _timeline(ledger, ids, None)
        paths = self._write(cert, version, html=self.html)
        record = CertificationRecord(
            request_ids=ids, passed=cert.passed, failed_checks=cert.failed,
            certificate=str(paths[0]), report=None if paths[1] is None else str(paths[1]),
            model_version=version, n_forget=len(forgotten),
            retrained=sum(1 for c in cert.config["cached"] if not c),
            seconds=time.perf_counter() - start, certified=certified)
        self.history.append(record)
        self.last = cert
        return cert

    def _request_ids(self, request_ids: Iterable[int] | None) -> list[int]:
        if request_ids is None:
            return [r.id for r in self.ledger.list(state="applied")]
        ids = [int(i) for i in request_ids]
        bad = {i: self.ledger.get(i).state for i in ids
               if self.ledger.get(i).state not in ("applied", "certified")}
        if bad:
            raise ValueError(f"only applied requests can be certified; these are not: {bad}")
        return ids

    def _version_of(self, request_ids: list[int]) -> int | None:
        versions = [self.ledger.get(i).model_version for i in request_ids]
        known = [v for v in versions if v is not None]
        return max(known) if known else self.ledger.head()

    def _loaders(self, forgotten: list[int]) -> dict[str, DataLoader]:
        kw = {"batch_size": self.batch_size}
        return {"forget": DataLoader(self.train_dataset.subset(forgotten), **kw),
                "retain": DataLoader(self.train_dataset.without(forgotten), **kw),
                "test": DataLoader(self.test_dataset, **kw)}

    def _retrain(self, pl_module: nn.Module) -> Retrain:
        if isinstance(self.reference, Retrain):
            return self.reference
        return Retrain(self.task, _factory_of(pl_module), recipe=self.reference)

    def _original(self, model: nn.Module, version: int | None) -> nn.Module | None:
        """The weights the removal started from (the parent of ``version``), if stored."""
        if version is None or self.ledger.models is None:
            return None
        parent = next((v["parent"] for v in self.ledger.versions()
                       if v["version"] == version), None)
        if parent is None:
            return None
        original = detached_copy(model)
        original.load_state_dict(self.ledger.load_model(parent))
        return original.eval()

    def _removal_from_ledger(self, model: nn.Module, request_ids: list[int]
                             ) -> RemovalResult | None:
        """The removal's seconds (the method's own time, without the ledger's file writes) and
        method from the ledger's 'applied' events."""
        seconds, method = 0.0, None
        for rid in request_ids:
            for ev in self.ledger.events(rid):
                if ev.kind == "applied":
                    details = ev.data.get("details", {})
                    seconds = max(seconds, float(details.get("seconds") or 0.0))
                    method = method or details.get("method")
        return RemovalResult(model, seconds, {"method": method}) if method else None

    def _write(self, cert: Certificate, version: int | None, *, html: bool
               ) -> tuple[Path, Path | None]:
        """Write ``certificate.json`` (+ the per-version copy) and, with ``html``, the report;
        each file atomically (temporary file, then rename)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / "certificate.json"
        cert.to_json(path)
        if version is not None:
            cert.to_json(self.out_dir / f"certificate-v{version}.json")
        report = cert.render_html(self.out_dir / "report.html") if html else None
        return path, report

    def _record(self, cert: Certificate, ids: list[int], paths: tuple[Path, Path | None],
                version: int | None) -> list[int]:
        todo = [i for i in ids if self.ledger.get(i).state == "applied"]
        if not todo or not (cert.passed or self.certify_failed):
            return []
        details = {"passed": cert.passed, "failed_checks": cert.failed,
                   "certificate": str(paths[0]), "schema": cert.schema,
                   "model_version": version, "n_references": cert.config["n_references"],
                   "average_gap": cert.average_gap}
        self.ledger.certify(todo, details)
        return todo

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "history": [asdict(r) for r in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version", 1) > 1:
            raise ValueError(f"CertificationCallback state version {state_dict['version']} is "
                             "newer than this unlearn understands (1)")
        self.history = [CertificationRecord.from_dict(d) for d in state_dict["history"]]


def _factory_of(pl_module: nn.Module) -> Callable[[], nn.Module]:
    """``type(pl_module)(**hparams)``: a fresh module of the same class and hyper-parameters."""
    cls = type(pl_module)
    hparams = dict(getattr(pl_module, "hparams", {}) or {})

    def factory() -> nn.Module:
        try:
            return cls(**hparams)
        except TypeError as err:
            raise TypeError(f"cannot build a fresh {cls.__name__} for the retrained references "
                            f"from its saved hyper-parameters {sorted(hparams)} ({err}); call "
                            "self.save_hyperparameters() in its __init__, or pass "
                            "reference=Retrain(task, model_factory, recipe=...)") from err

    return factory
