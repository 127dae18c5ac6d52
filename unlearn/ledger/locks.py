"""The applier lock: at most one process applies requests at a time.

Removal extends one line of model versions, so two concurrent appliers would fork it. For a
ledger file the lock is an OS file lock on ``<ledger>.applier.lock``: the kernel drops it when
its process dies, even by ``kill -9``, so a free lock proves that requests still marked
``applying`` belong to a dead process. A server database has no shared file, so there the
lock is a lease row in ``meta`` that expires after ``lease_seconds``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from unlearn.ledger.db import Database

__all__ = ["ApplierLock", "FileLock", "LeaseLock"]


class ApplierLock:
    """``try_acquire(attempt) -> bool`` and ``release()``."""

    def try_acquire(self, attempt: str) -> bool:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def acquire(self, attempt: str, wait: float) -> bool:
        """Try for up to ``wait`` seconds."""
        deadline = time.monotonic() + max(wait, 0.0)
        while True:
            if self.try_acquire(attempt):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


class FileLock(ApplierLock):
    """An exclusive ``flock`` (``msvcrt.locking`` on Windows) on a side file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def try_acquire(self, attempt: str) -> bool:
        if self._fd is not None:
            return False
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock(fd)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            _unlock(fd)
            os.close(fd)


if sys.platform == "win32":  # pragma: no cover
    import msvcrt

    def _lock(fd: int) -> None:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


class LeaseLock(ApplierLock):
    """A lease row ``meta['applier'] = {"attempt", "until"}`` (server databases). A holder
    that outlives its lease loses it: its commit then fails and changes nothing."""

    def __init__(self, db: Database, seconds: float) -> None:
        self.db, self.seconds = db, seconds
        self._attempt: str | None = None

    def _read(self) -> dict[str, Any]:
        rows = self.db.execute("SELECT value FROM meta WHERE key = 'applier'")
        return json.loads(rows[0][0]) if rows and rows[0][0] else {}

    def try_acquire(self, attempt: str) -> bool:
        if self._attempt is not None:
            return False
        with self.db.transaction(write=True):
            lease = self._read()
            if lease and lease["until"] > time.time():
                return False
            value = json.dumps({"attempt": attempt, "until": time.time() + self.seconds})
            self.db.execute("UPDATE meta SET value = :v WHERE key = 'applier'", {"v": value})
        self._attempt = attempt
        return True

    def release(self) -> None:
        if self._attempt is None:
            return
        attempt, self._attempt = self._attempt, None
        with self.db.transaction(write=True):
            if self._read().get("attempt") == attempt:
                self.db.execute("UPDATE meta SET value = '' WHERE key = 'applier'")
