"""Database access: one small adapter for the standard library's sqlite3 (the default) and
one for SQLAlchemy (any server database, when SQLAlchemy is installed), the schema, and the
checks made before a file is touched.

SQL is written once with ``:name`` parameters and portable types, so both adapters run it.
Writers are serialised: sqlite3 opens write transactions with ``BEGIN IMMEDIATE``; on a server
database the first statement of every write transaction updates the ``writer`` row of ``meta``,
which holds a row lock until commit.
"""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from unlearn.ledger.errors import LedgerCorruptError, LedgerError, LedgerNotFoundError

__all__ = ["SCHEMA_VERSION", "FORMAT", "Database", "open_database", "parse_target", "redact"]

FORMAT = "unlearn-ledger"
SCHEMA_VERSION = 1
SQLITE_HEADER = b"SQLite format 3\x00"

SCHEMA = (
    """CREATE TABLE meta (
        key VARCHAR(64) PRIMARY KEY,
        value TEXT NOT NULL)""",
    """CREATE TABLE requests (
        id INTEGER PRIMARY KEY,
        idem_key VARCHAR(255) NOT NULL UNIQUE,
        user_key VARCHAR(255),
        requester VARCHAR(255) NOT NULL,
        reason TEXT NOT NULL,
        sample_ids TEXT NOT NULL,
        n_ids INTEGER NOT NULL,
        created_at VARCHAR(40) NOT NULL,
        state VARCHAR(16) NOT NULL,
        state_reason TEXT,
        attempt VARCHAR(64),
        model_version INTEGER,
        updated_at VARCHAR(40) NOT NULL)""",
    "CREATE INDEX requests_state ON requests (state)",
    "CREATE INDEX requests_requester ON requests (requester)",
    """CREATE TABLE events (
        seq INTEGER PRIMARY KEY,
        request_id INTEGER,
        kind VARCHAR(32) NOT NULL,
        state VARCHAR(16),
        at VARCHAR(40) NOT NULL,
        data TEXT NOT NULL,
        prev_hash CHAR(64) NOT NULL,
        hash CHAR(64) NOT NULL)""",
    "CREATE INDEX events_request ON events (request_id)",
    """CREATE TABLE versions (
        version INTEGER PRIMARY KEY,
        parent INTEGER,
        sha256 CHAR(64) NOT NULL,
        attempt VARCHAR(64),
        created_at VARCHAR(40) NOT NULL,
        meta TEXT NOT NULL)""",
)


def parse_target(target: str | os.PathLike[str]) -> tuple[str, str]:
    """``("file", path)`` for a path or a ``sqlite:///path`` URL, ``("url", url)`` for any
    other ``dialect[+driver]://`` URL (reached through SQLAlchemy)."""
    text = os.fspath(target)
    if "://" not in text:
        kind, path = "file", text
    elif text.startswith("sqlite:///"):
        kind, path = "file", text[len("sqlite:///"):]
    else:
        return "url", text
    if path in ("", ":memory:") or path.startswith("file:"):
        raise LedgerError(f"a ledger must be a file on disk, got {text!r}")
    return kind, path


def redact(target: str) -> str:
    """``target`` with any password in a URL replaced by ``***`` (for messages)."""
    return re.sub(r"(://[^:/@]*:)[^/]*@", r"\1***@", target)


Row = tuple[Any, ...]


class Database:
    """The operations the ledger needs: ``execute`` and read/write transactions."""

    kind: str = "file"
    path: Path | None = None

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        raise NotImplementedError

    @contextmanager
    def transaction(self, write: bool) -> Iterator[None]:
        raise NotImplementedError
        yield

    def tables(self) -> set[str]:
        """Names of the tables in the database."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class SQLiteDatabase(Database):
    """A ledger file through the standard library's sqlite3, autocommit plus explicit
    ``BEGIN``/``BEGIN IMMEDIATE``."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.conn = sqlite3.connect(str(path), timeout=timeout, isolation_level=None)
        self._depth = 0

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        return self.conn.execute(sql, params or {}).fetchall()

    @contextmanager
    def transaction(self, write: bool) -> Iterator[None]:
        if self._depth:
            raise LedgerError("nested ledger transactions are not supported")
        self.conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        self._depth = 1
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")
        finally:
            self._depth = 0

    def tables(self) -> set[str]:
        return {r[0] for r in self.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def configure(self) -> None:
        """WAL journal (readers never block the writer) and ``synchronous=FULL``: every
        commit is on disk before it returns, so an acknowledged request survives a power
        cut, not only a crash (NORMAL would risk the last commits on power loss). Requests are
        few, so the extra fsync per commit costs nothing that matters."""
        mode = self.execute("PRAGMA journal_mode=WAL")[0][0]
        if str(mode).lower() != "wal":
            raise LedgerError(f"{self.path}: SQLite refused WAL mode (got {mode!r}); is the "
                              "file on a network file system?")
        self.execute("PRAGMA synchronous=FULL")

    def close(self) -> None:
        self.conn.close()


class SQLAlchemyDatabase(Database):
    """Any database SQLAlchemy reaches (PostgreSQL, MySQL, ...)."""

    kind = "url"

    def __init__(self, url: str) -> None:
        try:
            import sqlalchemy
        except ImportError:
            raise LedgerError(
                f"the ledger {redact(url)!r} is a database URL, which needs SQLAlchemy: "
                "`pip install sqlalchemy` plus the database's driver (e.g. psycopg); a plain "
                "path or a sqlite:///path URL needs nothing") from None
        self._text = sqlalchemy.text
        try:
            self.engine = sqlalchemy.create_engine(url)
            self.conn = self.engine.connect()
        except Exception as err:
            raise LedgerError(f"cannot connect to the ledger database {redact(url)!r}: "
                              f"{redact(str(err))}") from err
        self._tx: Any = None
        #: set by the ledger once the ``meta`` table exists
        self.lock_row = False

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        if self._tx is None:
            with self.transaction(write=False):
                return self.execute(sql, params)
        result = self.conn.execute(self._text(sql), dict(params or {}))
        return [tuple(r) for r in result.fetchall()] if result.returns_rows else []

    @contextmanager
    def transaction(self, write: bool) -> Iterator[None]:
        if self._tx is not None:
            raise LedgerError("nested ledger transactions are not supported")
        if self.conn.in_transaction():  # an autobegun one, e.g. by inspection
            self.conn.rollback()
        self._tx = self.conn.begin()
        try:
            if write and self.lock_row:
                self.conn.execute(self._text(
                    "UPDATE meta SET value = value WHERE key = 'writer'"))
            yield
        except BaseException:
            self._tx.rollback()
            raise
        else:
            self._tx.commit()
        finally:
            self._tx = None

    def tables(self) -> set[str]:
        import sqlalchemy

        if self._tx is None:
            with self.transaction(write=False):
                return self.tables()
        return set(sqlalchemy.inspect(self.conn).get_table_names())

    def close(self) -> None:
        self.conn.close()
        self.engine.dispose()


def _check_sqlite_file(path: Path, create: bool) -> bool:
    """True if ``path`` must be created. Raise before connecting when it is not SQLite."""
    if not path.exists():
        if not create:
            raise LedgerNotFoundError(f"no ledger at {str(path)!r}")
        if not path.parent.is_dir():
            raise LedgerNotFoundError(f"cannot create the ledger {str(path)!r}: the folder "
                                      f"{str(path.parent)!r} does not exist")
        return True
    if path.is_dir():
        raise LedgerCorruptError(f"{str(path)!r} is a folder, not a ledger file")
    with open(path, "rb") as f:
        head = f.read(len(SQLITE_HEADER))
    if not head:
        if not create:
            raise LedgerCorruptError(f"{str(path)!r} is an empty file, not a ledger")
        return True
    if head != SQLITE_HEADER:
        raise LedgerCorruptError(f"{str(path)!r} is not a ledger: it is not a SQLite database "
                                 "(left unchanged)")
    return False


def open_database(target: str | os.PathLike[str], *, create: bool,
                  timeout: float = 30.0) -> tuple[Database, bool]:
    """``(database, is_new)``. Nothing is written to an existing file here."""
    kind, where = parse_target(target)
    if kind == "url":
        return SQLAlchemyDatabase(where), False
    path = Path(where)
    new = _check_sqlite_file(path, create)
    try:
        return SQLiteDatabase(path, timeout), new
    except sqlite3.Error as err:
        raise LedgerCorruptError(f"cannot open the ledger {str(path)!r}: {err}") from err
