"""Applying requests, crash-safely: claims, the commit point, recovery, model versions.

A claim moves pending requests to ``applying`` and reserves a new model version number, in
one transaction, under the applier lock. The new weights are written to the
:class:`~unlearn.ledger.models.ModelStore` atomically, and then ONE transaction records the
version and marks every request of the claim ``applied``: that commit is the only point where
anything becomes true. If the process dies before it, the requests are still ``applying``
under a claim nobody holds (the applier lock died with the process); the next ledger to open,
or to claim, moves them back to ``pending`` and deletes the unrecorded model file, so the next
attempt starts again from the last recorded version. If it dies after, the requests are
``applied`` and their version is recorded. So a request is never lost (it is in the database
from the moment ``submit`` returns) and never applied twice (a model version contains a
request's removal exactly when the ledger says so), and version numbers are never reused.
"""

from __future__ import annotations

import json
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

from unlearn.ledger.db import Database
from unlearn.ledger.errors import (
    LedgerBusyError,
    LedgerError,
    LostClaimError,
    ModelVersionError,
)
from unlearn.ledger.locks import ApplierLock
from unlearn.ledger.models import ModelStore
from unlearn.ledger.records import Request, canonical_json, check_text, to_json_value, utc_now

__all__ = ["Claim", "Batch", "Recovery", "Applying"]


@dataclass
class Claim:
    """Requests moved to ``applying`` by one attempt. ``version`` is the model version number
    reserved for the result, ``base_version`` the recorded version to start from, ``new_ids``
    the sample ids not already forgotten by earlier requests (remove only these)."""

    attempt: str
    requests: tuple[Request, ...]
    version: int | None
    base_version: int | None
    new_ids: tuple[int, ...]
    open: bool = True

    @property
    def ids(self) -> list[int]:
        """Every sample id of the claimed requests."""
        return sorted({i for r in self.requests for i in r.ids})

    @property
    def request_ids(self) -> list[int]:
        return [r.id for r in self.requests]


@dataclass
class Recovery:
    """What opening (or claiming) found left by a dead applier."""

    rolled_back: list[int] = field(default_factory=list)
    attempts: list[str] = field(default_factory=list)
    pruned_versions: list[int] = field(default_factory=list)
    skipped: bool = False  # another process holds the applier lock


class Applying:
    """The applying half of :class:`~unlearn.ledger.Ledger` (a mixin over its storage)."""

    db: Database
    models: ModelStore | None
    target: str
    readonly: bool
    _lock: ApplierLock
    last_recovery: Recovery | None

    # provided by Ledger
    def _write(self) -> AbstractContextManager[None]: ...
    def _meta(self, key: str) -> str: ...
    def _row(self, request_id: int) -> Request: ...
    def _move(self, req: Request, kind: str, data: Mapping[str, Any], at: str) -> Request: ...
    def _append(self, request_id: int | None, kind: str, state: str | None,
                data: Mapping[str, Any], at: str) -> None: ...
    def list(self, state: str | None = None, requester: str | None = None
             ) -> list[Request]: ...
    def forgotten_ids(self) -> list[int]: ...

    # ------------------------------------------------------------------ model versions

    def head(self) -> int | None:
        """The newest model version recorded in the ledger (None before any)."""
        return self.db.execute("SELECT MAX(version) FROM versions")[0][0]

    def versions(self) -> list[dict[str, Any]]:
        """Recorded model versions, oldest first."""
        rows = self.db.execute("SELECT version, parent, sha256, attempt, created_at, meta "
                               "FROM versions ORDER BY version")
        return [{"version": r[0], "parent": r[1], "sha256": r[2], "attempt": r[3],
                 "created_at": r[4], "meta": json.loads(r[5])} for r in rows]

    def _recorded_sha256(self, version: int) -> str:
        rows = self.db.execute("SELECT sha256 FROM versions WHERE version = :v",
                               {"v": int(version)})
        if not rows:
            raise ModelVersionError(f"model version {version} is not recorded in the ledger")
        return rows[0][0]

    def _store(self) -> ModelStore:
        if self.models is None:
            raise LedgerError("this needs the model store: open the ledger with "
                              "Ledger(path, models=DIRECTORY)")
        return self.models

    def load_model(self, version: int | None = None) -> dict[str, Any]:
        """The state dict of a recorded version (default: :meth:`head`), its file checked
        against the sha256 the ledger recorded."""
        store = self._store()
        version = self.head() if version is None else version
        if version is None:
            raise ModelVersionError("the ledger records no model version yet; "
                                    "register the trained model with register_model()")
        return store.load(version, expected_sha256=self._recorded_sha256(version))

    def register_model(self, state_dict: Mapping[str, Any],
                       meta: Mapping[str, Any] | None = None, *, wait: float = 0.0) -> int:
        """Record a model version not produced by requests (the trained model, or a model
        retrained from scratch); it becomes the head. Returns its version."""
        store = self._store()
        meta = to_json_value(dict(meta or {}), "meta")
        attempt = self._acquire(wait)
        try:
            self._recover_locked()
            with self._write():
                version, base = self._reserve_version()
            store.save(state_dict, {**meta, "parent": base}, version=version)
            sha = store.sha256(version)
            with self._write():
                if self.head() != base:  # only possible if our lease expired meanwhile
                    raise LostClaimError(f"the model head moved from {base} to {self.head()} "
                                         f"while version {version} was being registered")
                self._record_version(version, base, sha, attempt, meta, "model_registered",
                                     [])
            return version
        finally:
            self._lock.release()

    def _reserve_version(self) -> tuple[int, int | None]:
        """A fresh version number (never handed out before) and the current head."""
        counter = int(self._meta("next_version"))
        if self.models is not None:
            counter = max(counter, (self.models.latest() or 0) + 1)
        self.db.execute("UPDATE meta SET value = :v WHERE key = 'next_version'",
                        {"v": str(counter + 1)})
        return counter, self.head()

    def _record_version(self, version: int, parent: int | None, sha256: str, attempt: str,
                        meta: Mapping[str, Any], kind: str, request_ids: list[int]) -> str:
        at = utc_now()
        self.db.execute(
            "INSERT INTO versions (version, parent, sha256, attempt, created_at, meta) "
            "VALUES (:v, :p, :sha, :att, :at, :meta)",
            {"v": version, "p": parent, "sha": sha256, "att": attempt, "at": at,
             "meta": canonical_json(meta)})
        self._append(None, kind, None, {"version": version, "parent": parent, "sha256": sha256,
                                        "attempt": attempt, "meta": meta,
                                        "requests": request_ids}, at)
        return at

    # ------------------------------------------------------------------ applying

    def _acquire(self, wait: float) -> str:
        attempt = uuid.uuid4().hex
        if not self._lock.acquire(attempt, wait):
            raise LedgerBusyError(f"another process is applying requests of {self.target!r}; "
                                  "try again when it is done (or pass wait=SECONDS)")
        return attempt

    def claim_pending(self, *, request_ids: Iterable[int] | None = None,
                      limit: int | None = None, wait: float = 0.0) -> Claim:
        """Move pending requests (all, the given ones, or the oldest ``limit``) to
        ``applying`` in one transaction and hold the applier lock until
        :meth:`mark_applied`, :meth:`mark_failed` or :meth:`release`. An empty claim (nothing
        pending) holds nothing. Raises :class:`LedgerBusyError` if another process is applying
        for longer than ``wait`` seconds."""
        if limit is not None and (isinstance(limit, bool) or int(limit) < 1):
            raise ValueError(f"limit must be a positive integer, got {limit!r}")
        wanted = None if request_ids is None else [int(i) for i in request_ids]
        attempt = self._acquire(wait)
        try:
            self._recover_locked()
            with self._write():
                claim = self._claim_locked(attempt, wanted, limit)
        except BaseException:
            self._lock.release()
            raise
        if not claim.requests:
            self._lock.release()
        return claim

    def _claim_locked(self, attempt: str, wanted: list[int] | None,
                      limit: int | None) -> Claim:
        if wanted is None:
            reqs = self.list(state="pending")
        else:
            reqs = [self._row(i) for i in dict.fromkeys(wanted)]
        reqs = reqs[:limit] if limit is not None else reqs
        if not reqs:
            return Claim(attempt, (), None, self.head(), (), open=False)
        version, base = self._reserve_version()
        forgotten = set(self.forgotten_ids())
        at = utc_now()
        data = {"attempt": attempt, "version": version, "base_version": base}
        moved = tuple(self._move(r, "claimed", data, at) for r in reqs)
        new_ids = tuple(sorted({i for r in moved for i in r.ids} - forgotten))
        return Claim(attempt, moved, version, base, new_ids)

    def _check_claim(self, claim: Claim) -> list[Request]:
        """The claim's requests as they are now; :class:`LostClaimError` if a recovery took
        them (inside a write transaction)."""
        if not claim.requests:
            raise ValueError("the claim is empty: there is nothing to mark")
        if not claim.open:
            raise LostClaimError(f"claim {claim.attempt} is already closed")
        now = [self._row(r.id) for r in claim.requests]
        lost = [r.id for r in now if r.state != "applying" or r.attempt != claim.attempt]
        if lost:
            raise LostClaimError(f"requests {lost} are no longer held by claim {claim.attempt} "
                                 "(a recovery rolled them back); nothing was recorded")
        if self.head() != claim.base_version:
            raise LostClaimError(f"the model head moved from {claim.base_version} to "
                                 f"{self.head()} during claim {claim.attempt}")
        return now

    def mark_applied(self, claim: Claim, model_version: int | None, *,
                     sha256: str | None = None, details: Mapping[str, Any] | None = None,
                     meta: Mapping[str, Any] | None = None) -> list[Request]:
        """The commit point: record ``model_version`` (``claim.version``: a new version whose
        file is written; ``claim.base_version``: no new weights were needed) and mark every
        request of the claim ``applied``, in one transaction."""
        details = to_json_value(dict(details or {}))
        meta = to_json_value(dict(meta or {}), "meta")
        new = model_version is not None and model_version == claim.version
        if not new and model_version != claim.base_version:
            raise ModelVersionError(
                f"model_version must be the claim's new version {claim.version} or its base "
                f"{claim.base_version}, got {model_version!r}")
        if new and sha256 is None:
            sha256 = self._store().sha256(model_version)  # type: ignore[arg-type]
        try:
            with self._write():
                reqs = self._check_claim(claim)
                at = utc_now()
                if new:
                    at = self._record_version(model_version, claim.base_version,  # type: ignore
                                              sha256, claim.attempt, meta,  # type: ignore
                                              "model_committed", claim.request_ids)
                data = {"attempt": claim.attempt, "model_version": model_version,
                        "details": details}
                out = [self._move(r, "applied", data, at) for r in reqs]
        except LostClaimError:
            self._close(claim)
            raise
        self._close(claim)
        return out

    def mark_failed(self, claim: Claim, reason: str) -> list[Request]:
        """``applying -> failed`` with the reason, for every request of the claim."""
        return self._end_claim(claim, "failed", {"attempt": claim.attempt,
                                                 "reason": check_text(reason, "reason")})

    def release(self, claim: Claim, reason: str = "released without a result") -> list[Request]:
        """Give the claim back: its requests return to ``pending`` untouched."""
        return self._end_claim(claim, "released", {"attempt": claim.attempt,
                                                   "reason": check_text(reason, "reason")})

    def _end_claim(self, claim: Claim, kind: str, data: Mapping[str, Any]) -> list[Request]:
        try:
            with self._write():
                at = utc_now()
                return [self._move(r, kind, data, at) for r in self._check_claim(claim)]
        finally:
            self._close(claim)

    def _close(self, claim: Claim) -> None:
        if claim.open:
            claim.open = False
            self._lock.release()

    @contextmanager
    def applying(self, *, request_ids: Iterable[int] | None = None, limit: int | None = None,
                 wait: float = 0.0) -> Iterator[Batch]:
        """Claim pending requests and yield a :class:`Batch`; ``batch.commit(new_state)``
        saves the new version and marks the requests applied. An exception inside marks
        them ``failed`` with it (an interrupt, or leaving without a commit, returns them to
        ``pending``); a crash leaves them for recovery."""
        self._store()
        claim = self.claim_pending(request_ids=request_ids, limit=limit, wait=wait)
        batch = Batch(self, claim)
        try:
            yield batch
        except Exception as err:
            self._abandon(claim, "failed", f"{type(err).__name__}: {err}")
            raise
        except BaseException as err:
            self._abandon(claim, "released", f"interrupted ({type(err).__name__})")
            raise
        else:
            self._abandon(claim, "released", "the batch ended without a commit")

    def _abandon(self, claim: Claim, kind: str, reason: str) -> None:
        if not claim.open:
            return
        try:
            if kind == "failed":
                self.mark_failed(claim, reason)
            else:
                self.release(claim, reason)
        except Exception as err:  # the requests stay 'applying'; recovery rolls them back
            warnings.warn(f"could not record the end of claim {claim.attempt}: {err}",
                          RuntimeWarning, stacklevel=3)
        finally:
            self._close(claim)

    # ------------------------------------------------------------------ recovery

    def recover(self) -> Recovery:
        """Roll back requests left ``applying`` by a dead process and delete the model files
        it wrote but never recorded. Skipped (``skipped=True``) while another process holds
        the applier lock. Runs on opening and before every claim."""
        if self.readonly:
            raise LedgerError(f"the ledger {self.target!r} was opened read-only")
        try:
            self._acquire(0.0)
        except LedgerBusyError:
            return Recovery(skipped=True)
        try:
            return self._recover_locked()
        finally:
            self._lock.release()

    def _recover_locked(self) -> Recovery:
        out = Recovery()
        with self._write():
            stale = self.list(state="applying")
            at = utc_now()
            for r in stale:
                self._move(r, "rolled_back", {
                    "attempt": r.attempt,
                    "reason": f"the process applying it (attempt {r.attempt}) stopped before "
                              "recording a model version"}, at)
            committed = {v for (v,) in self.db.execute("SELECT version FROM versions")}
            counter = int(self._meta("next_version"))
        out.rolled_back = [r.id for r in stale]
        out.attempts = sorted({r.attempt for r in stale if r.attempt})
        if self.models is not None:
            out.pruned_versions = _prune(self.models, committed, counter)
        self.last_recovery = out
        return out


class Batch:
    """The requests one :meth:`Ledger.applying` block works on."""

    def __init__(self, ledger: Applying, claim: Claim) -> None:
        self.ledger, self.claim = ledger, claim

    requests = property(lambda self: self.claim.requests)
    ids = property(lambda self: self.claim.ids, doc="every sample id of the batch")
    new_ids = property(lambda self: list(self.claim.new_ids),
                       doc="ids not forgotten before: remove exactly these")
    base_version = property(lambda self: self.claim.base_version)
    version = property(lambda self: self.claim.version)

    def __len__(self) -> int:
        return len(self.claim.requests)

    def __bool__(self) -> bool:
        return bool(self.claim.requests)

    def load_base(self) -> dict[str, Any] | None:
        """The state dict to start from (the recorded head), None if the ledger has none."""
        if self.base_version is None:
            return None
        return self.ledger.load_model(self.base_version)

    def commit(self, state_dict: Mapping[str, Any] | None, *,
               details: Mapping[str, Any] | None = None,
               meta: Mapping[str, Any] | None = None) -> int | None:
        """Save ``state_dict`` as the new version and mark the batch applied (the commit
        point); ``None`` records that no new weights were needed (e.g. every id was already
        forgotten). Returns the model version the requests now point to."""
        if not self:
            raise ValueError("nothing to commit: no request was pending")
        if state_dict is None:
            self.ledger.mark_applied(self.claim, self.base_version, details=details, meta=meta)
            return self.base_version
        store = self.ledger._store()
        meta = dict(to_json_value(dict(meta or {}), "meta"))
        version = store.save(state_dict, {**meta, "parent": self.base_version,
                                          "requests": self.claim.request_ids},
                             version=self.version)
        # a failure from here on leaves an unrecorded file: recovery deletes it, never this
        # code (the commit may have reached the disk even if it reported an error)
        self.ledger.mark_applied(self.claim, version, sha256=store.sha256(version),
                                 details=details, meta=meta)
        return version


def _prune(store: ModelStore, committed: set[int], counter: int) -> list[int]:
    """Delete files of versions this ledger reserved (below ``counter``) but never recorded."""
    pruned = [v for v in store.versions() if v < counter and v not in committed]
    for v in pruned:
        store.discard(v)
    for v, path in store.temp_files():
        if v < counter and v not in committed:
            path.unlink(missing_ok=True)
    return pruned
