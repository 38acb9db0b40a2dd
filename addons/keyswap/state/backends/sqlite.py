"""The SQLite backend: one file, any number of processes on one machine sharing it in
WAL mode, so that readers (the command line, Datasette) never wait for the writer."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from keyswap.state.backends.base import Backend, Params, Session, StateError, TransientError

# How long a writer waits for another one's write lock before it fails.
BUSY_TIMEOUT_S = 10.0
# Failures of the file, not of the statement (SQLite's primary result codes).
_TRANSIENT = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_CANTOPEN", "SQLITE_IOERR", "SQLITE_FULL")


def _failed(e: sqlite3.Error, message: str) -> StateError:
    name = getattr(e, "sqlite_errorname", "")
    return (TransientError if name.startswith(_TRANSIENT) else StateError)(message)


class SqliteSession(Session):
    """One connection to the file (autocommit outside `transaction()`)."""

    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection, shown: str) -> None:
        self.conn = conn
        self.shown = shown
        self._savepoints = 0

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as e:
            raise _failed(e, f"{self.shown}: {e}") from e

    def query(self, sql: str, params: Params = ()) -> list[dict[str, Any]]:
        with self._errors():
            cursor = self.conn.execute(sql, params)
            names = [d[0] for d in cursor.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cursor]

    def execute(self, sql: str, params: Params = ()) -> int:
        with self._errors():
            return self.conn.execute(sql, params).rowcount

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        # BEGIN IMMEDIATE takes the write lock at once, waiting up to the busy timeout. A
        # deferred transaction that reads first and then writes fails at once with
        # "database is locked" when another connection wrote in between, busy timeout or
        # not: SQLite will not wait where waiting could deadlock.
        if self.conn.in_transaction:
            self._savepoints += 1
            name = f"keyswap_{self._savepoints}"
            self.execute(f"savepoint {name}")
            try:
                yield self
            except BaseException:
                self.execute(f"rollback to {name}")
                self.execute(f"release {name}")
                raise
            finally:
                self._savepoints -= 1
            self.execute(f"release {name}")
            return
        self.execute("begin immediate")
        try:
            yield self
            self.execute("commit")
        except BaseException:
            self._rollback()
            raise

    @contextmanager
    def snapshot(self) -> Iterator[Session]:
        if self.conn.in_transaction:
            yield self
            return
        self.execute("begin")  # deferred: a read transaction from its first read on
        try:
            yield self
        finally:
            self._rollback()  # it wrote nothing

    def _rollback(self) -> None:
        if self.conn.in_transaction:  # (a failed COMMIT may have ended it already)
            self.conn.rollback()

    def lock(self, name: str) -> None:
        # The write transaction already holds the database's only write lock.
        assert self.conn.in_transaction, "lock() holds until a transaction ends: start one"


class SqliteBackend(Backend):
    """An SQLite file. Each thread gets its own connection, kept until `close()`: a
    connection keeps its page cache, which the writer thread re-reads every batch."""

    kind = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.shown = str(path)
        self._local = threading.local()
        self._opened: list[sqlite3.Connection] = []
        self._guard = threading.Lock()

    @contextmanager
    def session(self) -> Iterator[Session]:
        session: SqliteSession | None = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = SqliteSession(self._connect(), self.shown)
        yield session

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path, check_same_thread=False, timeout=BUSY_TIMEOUT_S, isolation_level=None
            )
            conn.execute("pragma journal_mode = wal")
            conn.execute("pragma synchronous = normal")
        except sqlite3.Error as e:
            raise _failed(e, f"cannot open {self.shown}: {e}") from e
        with self._guard:
            self._opened.append(conn)
        return conn

    def close(self) -> None:
        with self._guard:
            for conn in self._opened:
                conn.close()
            self._opened.clear()
        self._local = threading.local()
