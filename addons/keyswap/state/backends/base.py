"""The state backend's interface: how keyswap reads and writes its state, whichever
database holds it (SQLite or PostgreSQL).

A `Backend` is opened once per process (or per component that wants its own
connection) and hands out `Session`s; a session is one connection, used from one thread
at a time and never nested inside another session of the same backend. SQL is written
once, with `?` placeholders and the SQL both databases share; the rare statement that
cannot be shared asks `session.dialect`. Every error a database raises reaches the
caller as a `StateError` whose message never holds a password (the driver's exception
stays its `__cause__`)."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal

Kind = Literal["sqlite", "postgresql"]
Params = Sequence[Any]
# A location that starts so is a PostgreSQL URL; anything else is an SQLite file's path.
SCHEMES = ("postgresql://", "postgres://")

# Rows per INSERT statement: 32 rows of the widest table stay under SQLite's oldest limit
# of 999 bound parameters. Python's sqlite3 releases the GIL around every statement step
# (and psycopg around every round trip), and `executemany` steps once per row: under
# load each re-acquire waits for the busy event loop to hand the GIL back, a context
# switch pair per row. One statement per 32 rows makes that one pair per 32 rows.
ROWS_PER_STATEMENT = 32


class StateError(Exception):
    """The state database failed or cannot be used; the message says why, never with a
    password."""


class TransientError(StateError):
    """The database failed, not the statement: a connection lost or refused, a server
    restarting, a lock waited on too long, a serialization conflict. The same statements
    may well succeed when tried again."""


class SchemaTooNew(StateError):
    """The database was upgraded by a newer keyswap: writing to it could break it."""


class Session(ABC):
    """One connection to the state database, for one thread. Outside `transaction()`
    every statement commits on its own."""

    dialect: Kind

    @abstractmethod
    def query(self, sql: str, params: Params = ()) -> list[dict[str, Any]]:
        """The rows a statement returns, as dicts keyed by column name."""

    @abstractmethod
    def execute(self, sql: str, params: Params = ()) -> int:
        """Run a statement; the number of rows it changed."""

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Session]:
        """A write transaction: committed at the end of the block, rolled back on an
        exception. SQLite takes the database's write lock at its start (`BEGIN
        IMMEDIATE`: it waits for another writer instead of failing); PostgreSQL starts a
        normal (read committed) transaction, in which `SELECT ... FOR UPDATE` locks rows.
        Nested, it is a savepoint."""

    @abstractmethod
    def snapshot(self) -> AbstractContextManager[Session]:
        """A read-only transaction: every query in the block sees the same committed
        state. Inside a transaction, the transaction's own view."""

    @abstractmethod
    def lock(self, name: str) -> None:
        """Hold a lock named `name` until the current `transaction()` ends, across every
        process and node that shares the database (PostgreSQL: an advisory lock; SQLite:
        the transaction's write lock already excludes every other writer)."""

    def insert(
        self, table: str, rows: Sequence[dict[str, Any]], *, replace_on: str | None = None
    ) -> None:
        """Insert rows (their keys are the columns; a missing one is NULL), in multi-row
        statements. With `replace_on` (the table's primary key), a row whose key exists
        replaces that row's given columns instead."""
        if not rows:
            return
        columns = sorted({c for row in rows for c in row})
        names = ", ".join(f'"{c}"' for c in columns)
        marks = f"({', '.join('?' * len(columns))})"
        tail = ""
        if replace_on is not None:
            updates = ", ".join(f'"{c}" = excluded."{c}"' for c in columns if c != replace_on)
            tail = f' on conflict ("{replace_on}") do ' + (
                f"update set {updates}" if updates else "nothing"
            )
        for start in range(0, len(rows), ROWS_PER_STATEMENT):
            chunk = rows[start : start + ROWS_PER_STATEMENT]
            values = ", ".join([marks] * len(chunk))
            # the table and column names are keyswap's own; every value is bound
            sql = f'insert into "{table}" ({names}) values {values}{tail}'  # noqa: S608
            self.execute(sql, [row.get(c) for row in chunk for c in columns])


class Backend(ABC):
    """Where the state lives: an SQLite file or a PostgreSQL database."""

    kind: Kind
    # What to show of it (logs, errors, health, the command line): the path, or the URL
    # with its password masked as ********.
    shown: str

    @abstractmethod
    def session(self) -> AbstractContextManager[Session]:
        """A session for the calling thread, given back at the end of the block."""

    @abstractmethod
    def close(self) -> None:
        """Close every connection; the backend cannot be used afterwards."""

    @property
    def secrets(self) -> frozenset[str]:
        """Values that must never be shown: the password, if the location holds one."""
        return frozenset()

    def ping(self) -> float:
        """Seconds one round trip to the database takes; raises StateError when it
        cannot be reached."""
        started = time.perf_counter()
        with self.session() as session:
            session.query("select 1 as ok")
        return time.perf_counter() - started

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
