"""Deletion-request ledger: durable, idempotent, hash-chained, crash-safe.

>>> ledger = Ledger("ledger.db", models="models/")       # SQLite file, WAL mode
>>> ledger.register_model(model.state_dict())            # version 1: the trained model
>>> ledger.submit([3, 17], requester="alice", reason="GDPR art. 17")
>>> with ledger.applying() as batch:                      # crash-safe, one applier at a time
...     model.load_state_dict(batch.load_base())
...     forget(model, batch.new_ids)                      # your removal method
...     batch.commit(model.state_dict())                  # the commit point
>>> ledger.verify().ok

A server database is reached by installing SQLAlchemy (and the database's driver) and passing
its URL, e.g. ``Ledger("postgresql+psycopg://user@host/unlearn")``; a plain path or a
``sqlite:///path`` URL uses the standard library only.
"""

from unlearn.ledger.apply import Batch, Claim, Recovery
from unlearn.ledger.chain import Problem, VerifyReport
from unlearn.ledger.core import Ledger
from unlearn.ledger.db import SCHEMA_VERSION
from unlearn.ledger.errors import (
    IdempotencyConflictError,
    IllegalTransitionError,
    LedgerBusyError,
    LedgerCorruptError,
    LedgerError,
    LedgerNotFoundError,
    LedgerSchemaError,
    LostClaimError,
    ModelVersionError,
    RequestFileError,
    RequestNotFoundError,
)
from unlearn.ledger.models import ModelStore
from unlearn.ledger.records import STATES, TRANSITIONS, Event, Request, load_request_file

__all__ = [
    "Ledger", "Batch", "Claim", "Recovery", "ModelStore", "Request", "Event", "Problem",
    "VerifyReport", "STATES", "TRANSITIONS", "SCHEMA_VERSION", "load_request_file",
    "LedgerError", "LedgerNotFoundError", "LedgerCorruptError", "LedgerSchemaError",
    "LedgerBusyError", "IllegalTransitionError", "IdempotencyConflictError", "LostClaimError",
    "RequestNotFoundError", "RequestFileError", "ModelVersionError",
]
