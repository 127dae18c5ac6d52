"""The :class:`Ledger`: durable, idempotent deletion requests with a hash-chained audit log.

Storage, requests, queries and verification live here; applying them (claims, the commit
point, recovery, model versions) in :mod:`unlearn.ledger.apply`.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from unlearn.ledger.apply import Applying
from unlearn.ledger.chain import VerifyReport, verify_log
from unlearn.ledger.db import FORMAT, SCHEMA, SCHEMA_VERSION, open_database, redact
from unlearn.ledger.errors import (
    IdempotencyConflictError,
    LedgerCorruptError,
    LedgerError,
    LedgerNotFoundError,
    LedgerSchemaError,
    RequestNotFoundError,
)
from unlearn.ledger.locks import ApplierLock, FileLock, LeaseLock
from unlearn.ledger.models import ModelStore
from unlearn.ledger.records import (
    GENESIS,
    STATES,
    Event,
    Request,
    auto_key,
    canonical_json,
    check_ids,
    check_key,
    check_known,
    check_text,
    event_hash,
    fold,
    to_json_value,
    utc_now,
)

__all__ = ["Ledger"]

_REQUEST_COLS = ("id, sample_ids, requester, reason, created_at, user_key, state, state_reason, "
                 "model_version, attempt, updated_at, idem_key")


class Ledger(Applying):
    """Deletion requests in SQLite (one file, WAL) or, with SQLAlchemy installed, any
    database URL such as ``postgresql+psycopg://user@host/db``.

    ``models`` (a folder or :class:`ModelStore`) is where the versions of the model live; it
    is needed by :meth:`applying`, :meth:`register_model` and :meth:`load_model`. Opening
    recovers from a crashed applier unless ``readonly``. One object per thread.
    """

    def __init__(self, target: str | os.PathLike[str], *,
                 models: str | os.PathLike[str] | ModelStore | None = None,
                 create: bool = True, readonly: bool = False, timeout: float = 30.0,
                 lease_seconds: float = 3600.0) -> None:
        self.target = redact(os.fspath(target))  # for messages: no password
        self.readonly = readonly
        self.db, new = open_database(target, create=create and not readonly, timeout=timeout)
        try:
            self._open_schema(new, create and not readonly)
        except Exception as err:
            self.db.close()
            if isinstance(err, sqlite3.DatabaseError) or _is_sqlalchemy_db_error(err):
                raise LedgerCorruptError(f"{self.target!r} is damaged or not a ledger "
                                         f"(left unchanged): {err}") from err
            raise
        except BaseException:
            self.db.close()
            raise
        self.models = models if isinstance(models, ModelStore) or models is None \
            else ModelStore(models)
        self._lock: ApplierLock = (
            FileLock(Path(f"{self.db.path}.applier.lock")) if self.db.path is not None
            else LeaseLock(self.db, lease_seconds))
        self.last_recovery = None if readonly else self.recover()

    # ------------------------------------------------------------------ opening

    def _open_schema(self, new: bool, create: bool) -> None:
        tables = self._tables()
        if "meta" in tables:
            self._check_schema()
            if not self.readonly and self.db.path is not None:
                self.db.configure()  # type: ignore[attr-defined]
            self.db.lock_row = True  # type: ignore[attr-defined]
            return
        ours = {"requests", "events", "versions"} & tables
        if ours or (tables and self.db.path is not None):
            raise LedgerCorruptError(f"{self.target!r} is a database but not an unlearn ledger "
                                     f"(tables: {sorted(tables)}); left unchanged")
        if not create:
            raise LedgerNotFoundError(f"no ledger in {self.target!r}")
        if self.db.path is not None:
            self.db.configure()  # type: ignore[attr-defined]
        self._create_schema()
        self.db.lock_row = True  # type: ignore[attr-defined]

    def _tables(self) -> set[str]:
        return self.db.tables()

    def _check_schema(self) -> None:
        meta = dict(self.db.execute("SELECT key, value FROM meta"))
        if meta.get("format") != FORMAT:
            raise LedgerCorruptError(f"{self.target!r} is not an unlearn ledger (meta format "
                                     f"{meta.get('format')!r}); left unchanged")
        try:
            version = int(meta["schema_version"])
        except (KeyError, ValueError):
            raise LedgerCorruptError(f"{self.target!r}: unreadable schema version "
                                     f"{meta.get('schema_version')!r}") from None
        if version > SCHEMA_VERSION:
            raise LedgerSchemaError(
                f"{self.target!r} has ledger schema version {version}, newer than version "
                f"{SCHEMA_VERSION} that this unlearn reads; upgrade unlearn to open it (the "
                "file was not changed)")
        if version < 1:
            raise LedgerCorruptError(f"{self.target!r}: invalid schema version {version}")
        if self.db.path is not None:
            bad = [r[0] for r in self.db.execute("PRAGMA quick_check")]
            if bad != ["ok"]:
                raise LedgerCorruptError(f"{self.target!r} is damaged: {'; '.join(bad[:3])}")

    def _create_schema(self) -> None:
        with self.db.transaction(write=True):
            if "meta" in self._tables():  # another process created it meanwhile
                self._check_schema()
                return
            for statement in SCHEMA:
                self.db.execute(statement)
            now = utc_now()
            for key, value in (("format", FORMAT), ("schema_version", str(SCHEMA_VERSION)),
                               ("created_at", now), ("next_version", "1"), ("writer", ""),
                               ("applier", "")):
                self.db.execute("INSERT INTO meta (key, value) VALUES (:k, :v)",
                                {"k": key, "v": value})

    def close(self) -> None:
        """Close the database (an open claim's lock is released)."""
        self._lock.release()
        self.db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ledger({self.target!r})"

    # ------------------------------------------------------------------ low level

    @contextmanager
    def _write(self) -> Iterator[None]:
        if self.readonly:
            raise LedgerError(f"the ledger {self.target!r} was opened read-only")
        with self.db.transaction(write=True):
            yield

    def _append(self, request_id: int | None, kind: str, state: str | None,
                data: Mapping[str, Any], at: str) -> None:
        """Append one event to the chain (inside a write transaction)."""
        last = self.db.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1")
        seq, prev = (last[0][0] + 1, last[0][1]) if last else (1, GENESIS)
        data = dict(data)
        digest = event_hash(prev, seq, request_id, kind, state, at, data)
        self.db.execute(
            "INSERT INTO events (seq, request_id, kind, state, at, data, prev_hash, hash) "
            "VALUES (:seq, :rid, :kind, :state, :at, :data, :prev, :hash)",
            {"seq": seq, "rid": request_id, "kind": kind, "state": state, "at": at,
             "data": canonical_json(data), "prev": prev, "hash": digest})

    def _meta(self, key: str) -> str:
        return self.db.execute("SELECT value FROM meta WHERE key = :k", {"k": key})[0][0]

    def _rows(self, where: str = "", params: Mapping[str, Any] | None = None) -> list[Request]:
        rows = self.db.execute(f"SELECT {_REQUEST_COLS} FROM requests {where} ORDER BY id",
                               params)
        return [_to_request(r) for r in rows]

    def _row(self, request_id: int) -> Request:
        rows = self._rows("WHERE id = :id", {"id": int(request_id)})
        if not rows:
            raise RequestNotFoundError(f"no request {request_id} in the ledger {self.target!r}")
        return rows[0]

    def _move(self, req: Request, kind: str, data: Mapping[str, Any], at: str) -> Request:
        """Apply event ``kind`` to ``req`` (inside a write transaction); illegal moves raise."""
        fields = fold(_fields(req), kind, data, at, req.id)
        self.db.execute(
            "UPDATE requests SET state = :state, state_reason = :sr, attempt = :att, "
            "model_version = :mv, updated_at = :at WHERE id = :id",
            {"state": fields["state"], "sr": fields["state_reason"], "att": fields["attempt"],
             "mv": fields["model_version"], "at": at, "id": req.id})
        self._append(req.id, kind, fields["state"], data, at)
        return self._row(req.id)

    # ------------------------------------------------------------------ requests

    def submit(self, ids: Iterable[Any], *, requester: str, reason: str,
               key: str | None = None, known_ids: Collection[int] | None = None) -> Request:
        """Record a deletion request (or return the identical one already recorded)."""
        return self.submit_once(ids, requester=requester, reason=reason, key=key,
                                known_ids=known_ids)[0]

    def submit_once(self, ids: Iterable[Any], *, requester: str, reason: str,
                    key: str | None = None, known_ids: Collection[int] | None = None
                    ) -> tuple[Request, bool]:
        """``(request, created)``. The same request twice is one request: the same ``key``,
        or without a key the same requester, id set and reason, returns the first one
        (``created`` False). Reusing a key for a different request raises
        :class:`IdempotencyConflictError`. ``known_ids`` (the training set's ids) turns
        unknown ids into :class:`unlearn.data.UnknownIdError`."""
        id_list = check_ids(ids)
        requester = check_text(requester, "requester", 255)
        reason = check_text(reason, "reason")
        key = check_key(key)
        check_known(id_list, known_ids)
        idem = key if key is not None else auto_key(requester, id_list, reason)
        with self._write():
            found = self._rows("WHERE idem_key = :k", {"k": idem})
            if found:
                _check_same(found[0], id_list, requester, reason)
                return found[0], False
            new_id = (self.db.execute("SELECT MAX(id) FROM requests")[0][0] or 0) + 1
            now = utc_now()
            data = {"ids": id_list, "requester": requester, "reason": reason, "key": key,
                    "created_at": now}
            self.db.execute(
                "INSERT INTO requests (id, idem_key, user_key, requester, reason, sample_ids, "
                "n_ids, created_at, state, updated_at) VALUES (:id, :idem, :key, :who, :why, "
                ":ids, :n, :at, 'pending', :at)",
                {"id": new_id, "idem": idem, "key": key, "who": requester, "why": reason,
                 "ids": canonical_json(id_list), "n": len(id_list), "at": now})
            self._append(new_id, "submitted", "pending", data, now)
            return self._row(new_id), True

    def get(self, request_id: int) -> Request:
        """The request with this id; :class:`RequestNotFoundError` if none."""
        return self._row(request_id)

    def list(self, state: str | None = None, requester: str | None = None) -> list[Request]:
        """Requests, oldest first, optionally only those in ``state`` / from ``requester``."""
        clauses, params = [], {}
        if state is not None:
            if state not in STATES:
                raise ValueError(f"unknown state {state!r}; states: {', '.join(STATES)}")
            clauses.append("state = :state")
            params["state"] = state
        if requester is not None:
            clauses.append("requester = :who")
            params["who"] = requester
        return self._rows(("WHERE " + " AND ".join(clauses)) if clauses else "", params)

    def events(self, request_id: int | None = None) -> list[Event]:
        """The event log (of one request, or all of it with the model events), in order."""
        sql = "SELECT seq, request_id, kind, state, at, data, prev_hash, hash FROM events"
        if request_id is not None:
            self._row(request_id)
            rows = self.db.execute(sql + " WHERE request_id = :id ORDER BY seq",
                                   {"id": int(request_id)})
        else:
            rows = self.db.execute(sql + " ORDER BY seq")
        return [Event(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6], r[7]) for r in rows]

    def show(self, request_id: int) -> dict[str, Any]:
        """``{"request": ..., "events": [...]}`` as plain JSON-able data."""
        return {"request": self.get(request_id).to_dict(),
                "events": [e.to_dict() for e in self.events(request_id)]}

    def forgotten_ids(self) -> list[int]:
        """Every sample id of an ``applied`` or ``certified`` request, sorted."""
        rows = self.db.execute(
            "SELECT sample_ids FROM requests WHERE state IN ('applied', 'certified')")
        return sorted({i for (text,) in rows for i in json.loads(text)})

    def reject(self, request_id: int, reason: str) -> Request:
        """``pending -> rejected`` with the reason."""
        reason = check_text(reason, "reason")
        with self._write():
            return self._move(self._row(request_id), "rejected", {"reason": reason}, utc_now())

    def retry(self, request_id: int, reason: str = "retry") -> Request:
        """``failed -> pending``."""
        reason = check_text(reason, "reason")
        with self._write():
            return self._move(self._row(request_id), "retried", {"reason": reason}, utc_now())

    def certify(self, request_ids: Iterable[int], details: Mapping[str, Any] | None = None
                ) -> list[Request]:
        """``applied -> certified`` for every request in one transaction; ``details`` (e.g.
        the certificate's verdict and file) go into each event."""
        data = {"details": to_json_value(dict(details or {}))}
        with self._write():
            at = utc_now()
            return [self._move(self._row(i), "certified", data, at) for i in request_ids]

    def verify(self, *, check_models: bool = True, anchor: str | None = None) -> VerifyReport:
        """Check the hash chain, replay the events against the request and version tables,
        and (with a model store and ``check_models``) each recorded version's file hash.
        ``anchor`` is an event hash saved earlier (e.g. a previous report's ``head``): it
        must still be in the chain, which detects a log cut short or rewritten whole."""
        with self.db.transaction(write=False):
            events = self.db.execute("SELECT seq, request_id, kind, state, at, data, prev_hash, "
                                     "hash FROM events ORDER BY seq")
            requests = self.db.execute(f"SELECT {_REQUEST_COLS}, n_ids FROM requests "
                                       "ORDER BY id")
            versions = self.db.execute("SELECT version, parent, sha256, attempt, created_at, "
                                       "meta FROM versions ORDER BY version")
        store = self.models if check_models else None
        return verify_log(events, requests, versions, store=store, anchor=anchor)


def _to_request(r: tuple[Any, ...]) -> Request:
    return Request(id=r[0], ids=tuple(json.loads(r[1])), requester=r[2], reason=r[3],
                   created_at=r[4], key=r[5], state=r[6], state_reason=r[7],
                   model_version=r[8], attempt=r[9], updated_at=r[10])


def _fields(req: Request) -> dict[str, Any]:
    return {"ids": list(req.ids), "requester": req.requester, "reason": req.reason,
            "key": req.key, "created_at": req.created_at, "state": req.state,
            "state_reason": req.state_reason, "attempt": req.attempt,
            "model_version": req.model_version, "updated_at": req.updated_at}


def _check_same(found: Request, ids: list[int], requester: str, reason: str) -> None:
    if list(found.ids) != ids or found.requester != requester or found.reason != reason:
        raise IdempotencyConflictError(
            f"key {found.key!r} already names request {found.id} (requester "
            f"{found.requester!r}, {len(found.ids)} ids, reason {found.reason!r}), which differs "
            "from this one; use a new key for a new request")


def _is_sqlalchemy_db_error(err: BaseException) -> bool:
    return type(err).__module__.startswith("sqlalchemy") and type(err).__name__ in (
        "DatabaseError", "OperationalError", "ProgrammingError", "IntegrityError")
