"""Verification of the hash-chained event log.

Every event stores ``hash = sha256(prev_hash + canonical JSON of the event)``, where
``prev_hash`` is the hash of the event before it (``"0" * 64`` for the first). Changing,
deleting or reordering an event breaks the chain at that event. The request and version
tables are a projection of the log, so :func:`verify_log` also replays the log and compares:
editing a table row is caught too. Rewriting the whole log with fresh hashes is caught only
against an ``anchor``, a hash recorded somewhere else earlier (a previous report's ``head``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from unlearn.ledger.errors import LedgerError, ModelVersionError
from unlearn.ledger.models import ModelStore
from unlearn.ledger.records import GENESIS, MODEL_KINDS, auto_key, event_hash, fold

__all__ = ["Problem", "VerifyReport", "verify_log"]

Row = tuple[Any, ...]

_COMPARED = ("ids", "requester", "reason", "created_at", "key", "state", "state_reason",
             "attempt", "model_version", "updated_at")
_COLUMN = {"ids": "sample_ids", "key": "user_key"}


@dataclass(frozen=True)
class Problem:
    """One inconsistency: at event ``seq`` and/or about request ``request_id``."""

    message: str
    seq: int | None = None
    request_id: int | None = None

    def __str__(self) -> str:
        where = []
        if self.seq is not None:
            where.append(f"event {self.seq}")
        if self.request_id is not None:
            where.append(f"request {self.request_id}")
        return f"{', '.join(where) or 'ledger'}: {self.message}"


@dataclass
class VerifyReport:
    """``ok`` when the chain and the tables agree; ``head`` is the last event's hash."""

    ok: bool
    events: int
    requests: int
    versions: int
    head: str
    problems: list[Problem] = field(default_factory=list)

    @property
    def first_bad(self) -> Problem | None:
        return self.problems[0] if self.problems else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["problems"] = [dict(asdict(p), text=str(p)) for p in self.problems]
        return d

    def __str__(self) -> str:
        if self.ok:
            return (f"ok: {self.events} events, {self.requests} requests, {self.versions} model "
                    f"versions; head {self.head}")
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        return f"FAILED at {self.problems[0]}{more}"


class _Replay:
    """Walks the events once: chain links, hashes, and the state each row should have."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.fields: dict[int, dict[str, Any]] = {}
        self.models: dict[int, tuple[str, dict[str, Any]]] = {}
        self.broken: set[int] = set()  # requests whose replay failed
        self.prev = GENESIS
        self.next_seq = 1

    def bad(self, message: str, seq: int | None = None, rid: int | None = None) -> None:
        self.problems.append(Problem(message, seq, rid))

    def event(self, row: Row) -> None:
        seq, rid, kind, state, at, text, prev_hash, digest = row
        if seq != self.next_seq:
            self.bad(f"expected event {self.next_seq} here, found {seq}: events were deleted "
                     "or reordered", seq, rid)
        self.next_seq = seq + 1
        if prev_hash != self.prev:
            self.bad("prev_hash does not match the hash of the event before it (that event "
                     "or this one was altered)", seq, rid)
        self.prev = digest
        try:
            data = json.loads(text)
        except (TypeError, ValueError):
            self.bad("its data is not valid JSON (altered)", seq, rid)
            return
        if event_hash(prev_hash, seq, rid, kind, state, at, data) != digest:
            self.bad(f"its content does not match its hash (the {kind!r} event was altered)",
                     seq, rid)
        if rid is None:
            self.model_event(seq, kind, at, data)
        else:
            self.request_event(seq, rid, kind, state, at, data)

    def model_event(self, seq: int, kind: str, at: str, data: dict[str, Any]) -> None:
        if kind not in MODEL_KINDS:
            self.bad(f"event kind {kind!r} without a request", seq)
            return
        try:
            self.models[int(data["version"])] = (at, data)
        except (KeyError, TypeError, ValueError):
            self.bad(f"{kind!r} event without a model version", seq)

    def request_event(self, seq: int, rid: int, kind: str, state: str | None, at: str,
                      data: dict[str, Any]) -> None:
        if rid in self.broken:
            return
        try:
            fields = fold(self.fields.get(rid), kind, data, at, rid)
        except (LedgerError, KeyError, TypeError) as err:
            self.bad(f"cannot replay {kind!r}: {err}", seq, rid)
            self.broken.add(rid)
            return
        if state != fields["state"]:
            self.bad(f"records state {state!r} but {kind!r} leads to {fields['state']!r}",
                     seq, rid)
        self.fields[rid] = fields


def _row_fields(r: Row) -> dict[str, Any]:
    return {"ids": json.loads(r[1]), "requester": r[2], "reason": r[3], "created_at": r[4],
            "key": r[5], "state": r[6], "state_reason": r[7], "model_version": r[8],
            "attempt": r[9], "updated_at": r[10]}


def _check_requests(rep: _Replay, requests: list[Row]) -> None:
    seen = set()
    for r in requests:
        rid = r[0]
        seen.add(rid)
        if rid in rep.broken:
            continue
        want = rep.fields.get(rid)
        if want is None:
            rep.bad("is in the table but has no events (inserted by hand?)", None, rid)
            continue
        try:
            got = _row_fields(r)
        except (TypeError, ValueError):
            rep.bad("its sample_ids column is not valid JSON (altered)", None, rid)
            continue
        for name in _COMPARED:
            if got[name] != want[name]:
                rep.bad(f"column {_COLUMN.get(name, name)!r} is {_short(got[name])} but the "
                        f"event log says {_short(want[name])} (the table was altered)", None, rid)
        idem = want["key"] if want["key"] is not None else auto_key(
            want["requester"], want["ids"], want["reason"])
        if r[11] != idem or r[12] != len(want["ids"]):
            rep.bad("its idempotency key or id count was altered", None, rid)
    for rid in sorted(set(rep.fields) - seen):
        rep.bad("has events but no row in the table (deleted?)", None, rid)


def _check_versions(rep: _Replay, versions: list[Row], store: ModelStore | None) -> None:
    rows = {r[0]: r for r in versions}
    for v in sorted(set(rows) | set(rep.models)):
        if v not in rep.models:
            rep.bad(f"model version {v} is in the table but no event records it")
            continue
        if v not in rows:
            rep.bad(f"model version {v} is recorded by an event but missing from the table")
            continue
        at, data = rep.models[v]
        _, parent, sha, attempt, created_at, meta = rows[v]
        if (parent, sha, attempt, created_at) != (data.get("parent"), data.get("sha256"),
                                                  data.get("attempt"), at) \
                or json.loads(meta) != data.get("meta"):
            rep.bad(f"model version {v}: the table row differs from its event (altered)")
        if store is not None:
            try:
                got = store.sha256(v)
            except ModelVersionError as err:
                rep.bad(str(err))
                continue
            if got != sha:
                rep.bad(f"model version {v}: file {store.path(v)} has sha256 {got[:12]}..., the "
                        f"ledger recorded {sha[:12]}... (the file was changed)")
    for rid, f in rep.fields.items():
        mv = f["model_version"]
        if mv is not None and mv not in rep.models:
            rep.bad(f"points to model version {mv}, which was never recorded", None, rid)


def verify_log(events: list[Row], requests: list[Row], versions: list[Row], *,
               store: ModelStore | None = None, anchor: str | None = None) -> VerifyReport:
    """Check a snapshot of the three tables (rows as the ledger selects them)."""
    rep = _Replay()
    for row in events:
        rep.event(row)
    _check_requests(rep, requests)
    _check_versions(rep, versions, store)
    if anchor is not None and anchor not in {row[7] for row in events}:
        rep.bad(f"the anchor hash {anchor[:16]}... is not in the chain: the log was cut short "
                "or rewritten since it was recorded")
    head = events[-1][7] if events else GENESIS
    return VerifyReport(not rep.problems, len(events), len(requests), len(versions), head,
                        rep.problems)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
