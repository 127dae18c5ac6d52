"""Requests, events, the state machine, input validation and request files."""

from __future__ import annotations

import hashlib
import json
import operator
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from unlearn.ledger.errors import RequestFileError

__all__ = [
    "STATES",
    "TRANSITIONS",
    "Request",
    "Event",
    "canonical_json",
    "event_hash",
    "GENESIS",
    "utc_now",
    "check_ids",
    "check_text",
    "check_known",
    "auto_key",
    "load_request_file",
    "KIND_STATE",
    "fold",
    "to_json_value",
]

STATES = ("pending", "applying", "applied", "certified", "rejected", "failed")

#: legal moves; ``applying -> pending`` is a released claim or a crash rolled back
TRANSITIONS: dict[str, frozenset[str]] = {
    "pending": frozenset({"applying", "rejected"}),
    "applying": frozenset({"applied", "failed", "pending"}),
    "applied": frozenset({"certified"}),
    "failed": frozenset({"pending"}),
    "rejected": frozenset(),
    "certified": frozenset(),
}

#: ``prev_hash`` of the first event
GENESIS = "0" * 64

_MAX_TEXT = 10_000
_MAX_KEY = 255
_SHOWN = 10


@dataclass(frozen=True)
class Request:
    """One deletion request as the ledger holds it now."""

    id: int
    ids: tuple[int, ...]
    requester: str
    reason: str
    created_at: str
    key: str | None
    state: str
    state_reason: str | None
    model_version: int | None
    attempt: str | None
    updated_at: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ids"] = list(self.ids)
        return d


@dataclass(frozen=True)
class Event:
    """One entry of the append-only, hash-chained event log (``request_id`` None for
    ledger-level events such as a registered model version)."""

    seq: int
    request_id: int | None
    kind: str
    state: str | None
    at: str
    data: dict[str, Any]
    prev_hash: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no spaces, ASCII only, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


def event_hash(prev_hash: str, seq: int, request_id: int | None, kind: str, state: str | None,
               at: str, data: Mapping[str, Any]) -> str:
    """sha256 of the previous hash followed by the canonical JSON of the event."""
    body = canonical_json({"seq": seq, "request_id": request_id, "kind": kind, "state": state,
                           "at": at, "data": data})
    return hashlib.sha256((prev_hash + body).encode("ascii")).hexdigest()


def utc_now() -> str:
    """The current UTC time, ISO 8601 with microseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _show(values: list[Any]) -> str:
    head = ", ".join(repr(v) for v in values[:_SHOWN])
    return f"[{head}{', ...' if len(values) > _SHOWN else ''}]"


def check_ids(ids: Iterable[Any], what: str = "ids") -> list[int]:
    """Sorted list of ``ids``: integers (Python, numpy or 0-d tensors), non-empty, unique."""
    if isinstance(ids, (str, bytes)):
        raise ValueError(f"{what} must be a list of integers, got the string {ids!r}")
    try:
        items = list(ids)
    except TypeError:
        raise ValueError(f"{what} must be a list of integers, got {type(ids).__name__}") from None
    out: list[int] = []
    for pos, v in enumerate(items):
        if isinstance(v, bool):
            raise ValueError(f"{what}[{pos}] is the boolean {v}, not an integer id")
        try:
            out.append(operator.index(v))
        except TypeError:
            raise ValueError(f"{what}[{pos}] = {v!r} is not an integer") from None
    if not out:
        raise ValueError(f"{what} is empty: a deletion request needs at least one id")
    seen: set[int] = set()
    dups = [v for v in out if v in seen or seen.add(v)]  # type: ignore[func-returns-value]
    if dups:
        raise ValueError(f"{what} must be unique; repeated: {_show(sorted(set(dups)))}")
    bad = [v for v in out if not -(2**63) <= v < 2**63]
    if bad:
        raise ValueError(f"{what} must fit in 64 bits, got {bad[0]}")
    return sorted(out)


def check_text(value: Any, what: str, limit: int = _MAX_TEXT) -> str:
    """A non-blank string of at most ``limit`` characters."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    if len(value) > limit:
        raise ValueError(f"{what} is {len(value)} characters long; the limit is {limit}")
    return value


def check_key(key: Any) -> str | None:
    return None if key is None else check_text(key, "key", _MAX_KEY)


def check_known(ids: list[int], known_ids: Collection[int] | None) -> None:
    """Raise :class:`unlearn.data.UnknownIdError` for ids outside ``known_ids``."""
    if known_ids is None:
        return
    universe = known_ids if isinstance(known_ids, (set, frozenset)) else {
        operator.index(v) for v in known_ids}
    unknown = [i for i in ids if i not in universe]
    if unknown:
        from unlearn.data import UnknownIdError  # torch is imported only on this path

        raise UnknownIdError(unknown)


def auto_key(requester: str, ids: list[int], reason: str) -> str:
    """The idempotency key of a request submitted without one."""
    body = canonical_json({"requester": requester, "ids": ids, "reason": reason})
    return "auto:" + hashlib.sha256(body.encode("ascii")).hexdigest()


_FILE_FIELDS = {"ids", "requester", "reason", "key"}


def load_request_file(path: str | Path) -> dict[str, Any]:
    """Read a request file: a JSON list of ids, or an object with ``ids`` and optionally
    ``requester``, ``reason``, ``key``. Returns the fields found, ``ids`` checked."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RequestFileError(f"request file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RequestFileError(f"cannot read request file {str(path)!r}: {err}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise RequestFileError(f"{path}: not valid JSON (line {err.lineno}, column "
                               f"{err.colno}: {err.msg})") from None
    if isinstance(data, list):
        data = {"ids": data}
    if not isinstance(data, dict):
        raise RequestFileError(f"{path}: expected a JSON list of ids or an object with 'ids', "
                               f"got {type(data).__name__}")
    extra = sorted(set(data) - _FILE_FIELDS)
    if extra:
        raise RequestFileError(f"{path}: unknown field(s) {extra}; allowed: "
                               f"{sorted(_FILE_FIELDS)}")
    if "ids" not in data:
        raise RequestFileError(f"{path}: no 'ids' field")
    try:
        data["ids"] = check_ids(data["ids"], "ids")
        for field in ("requester", "reason"):
            if field in data:
                check_text(data[field], field)
        if "key" in data:
            check_key(data["key"])
    except ValueError as err:
        raise RequestFileError(f"{path}: {err}") from None
    return data


#: event kind -> the state a request is in after it
KIND_STATE: dict[str, str] = {
    "submitted": "pending",
    "claimed": "applying",
    "applied": "applied",
    "failed": "failed",
    "released": "pending",  # a claim given back without a commit (interrupted, no result)
    "rolled_back": "pending",  # recovery after the applying process died
    "rejected": "rejected",
    "certified": "certified",
    "retried": "pending",
}

#: ledger-level events (no request): a model version added to the line of versions
MODEL_KINDS = ("model_registered", "model_committed")


def fold(fields: dict[str, Any] | None, kind: str, data: Mapping[str, Any], at: str,
         request_id: int) -> dict[str, Any]:
    """A request's fields after event ``kind``: the one definition of what each event does,
    used to update the table and, by ``verify``, to replay the log against it."""
    from unlearn.ledger.errors import IllegalTransitionError, LedgerError

    if kind not in KIND_STATE:
        raise LedgerError(f"unknown event kind {kind!r}")
    target = KIND_STATE[kind]
    if fields is None:
        if kind != "submitted":
            raise LedgerError(f"request {request_id}: first event is {kind!r}, not 'submitted'")
        return {"ids": list(data["ids"]), "requester": data["requester"],
                "reason": data["reason"], "key": data["key"], "created_at": data["created_at"],
                "state": target, "state_reason": None, "attempt": None, "model_version": None,
                "updated_at": at}
    if kind == "submitted" or target not in TRANSITIONS[fields["state"]]:
        raise IllegalTransitionError(request_id, fields["state"], target)
    out = dict(fields, state=target, updated_at=at)
    if kind == "claimed":
        out.update(attempt=data["attempt"], state_reason=None)
    elif kind == "applied":
        out.update(model_version=data["model_version"])
    elif kind in ("failed", "rejected"):
        out.update(state_reason=data["reason"])
    elif kind in ("released", "rolled_back", "retried"):
        out.update(attempt=None, state_reason=None)
    return out


def to_json_value(value: Any, where: str = "details") -> Any:
    """``value`` as plain JSON: numpy / torch scalars and small tensors become numbers or
    lists, non-finite floats become the strings "nan", "inf", "-inf", paths become strings;
    anything else raises a TypeError naming where it is."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): to_json_value(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else value
        return [to_json_value(v, f"{where}[{i}]") for i, v in enumerate(items)]
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy / torch values
        return to_json_value(value.tolist(), where)
    raise TypeError(f"{where} is a {type(value).__name__}, which cannot be stored as JSON")
