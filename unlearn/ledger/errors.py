"""Errors raised by the ledger; every one names the bad value and says what to do."""

from __future__ import annotations

__all__ = [
    "LedgerError",
    "LedgerNotFoundError",
    "LedgerCorruptError",
    "LedgerSchemaError",
    "LedgerBusyError",
    "IllegalTransitionError",
    "IdempotencyConflictError",
    "LostClaimError",
    "RequestNotFoundError",
    "RequestFileError",
    "ModelVersionError",
]


class LedgerError(Exception):
    """Base class of every ledger error."""


class LedgerNotFoundError(LedgerError, FileNotFoundError):
    """The ledger file does not exist (and was not to be created)."""


class LedgerCorruptError(LedgerError):
    """The file is not a SQLite database, is damaged, or is not an unlearn ledger."""


class LedgerSchemaError(LedgerError):
    """The ledger was written by a newer version of unlearn."""


class LedgerBusyError(LedgerError):
    """Another process is applying requests (only one applier at a time)."""


class IllegalTransitionError(LedgerError):
    """A request cannot move from its current state to the asked one."""

    def __init__(self, request_id: int, current: str, target: str) -> None:
        self.request_id, self.current, self.target = request_id, current, target
        super().__init__(f"request {request_id} is {current!r}; it cannot become {target!r}")


class IdempotencyConflictError(LedgerError):
    """An idempotency key was reused for a different request."""


class LostClaimError(LedgerError):
    """The claim on these requests is no longer held (rolled back by a recovery)."""


class RequestNotFoundError(LedgerError, KeyError):
    """No request has this id."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class RequestFileError(LedgerError, ValueError):
    """A deletion-request JSON file is unreadable or malformed."""


class ModelVersionError(LedgerError):
    """A model version is missing, already taken, or does not match the ledger."""
