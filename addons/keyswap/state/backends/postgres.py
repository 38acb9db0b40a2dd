"""The PostgreSQL backend: any number of gateway processes on any number of nodes share
one database. psycopg 3 connections from a psycopg_pool pool; every call blocks its
thread, which is never the event loop's (the gateway does state I/O on its own threads).

The URL is libpq's (`postgresql://USER[:PASSWORD]@HOST[:PORT]/DB[?PARAM=VALUE...]`,
also `postgres://`); without a password in it, libpq reads `PGPASSWORD` or
`~/.pgpass`. The password never leaves this module: `shown` masks it, and every error
message is scrubbed of it (libpq quotes a malformed URL whole)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl, unquote

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool

from keyswap.state.backends.base import (
    SCHEMES,
    Backend,
    Params,
    Session,
    StateError,
    TransientError,
)

MASK = "********"
_QUERY_PASSWORD = re.compile(r"(^|&)password=[^&]*")
CONNECT_TIMEOUT_S = 10
# Connections per pool: the gateway's writer, registry and OAuth2 store borrow one each
# at a time; the command line, one.
POOL_SIZE = 4


class Location:
    """A PostgreSQL URL: what to connect with, what to show, and what to scrub."""

    def __init__(self, url: str) -> None:
        if not url.startswith(SCHEMES):
            raise StateError(f"not a PostgreSQL URL: use {SCHEMES[0]}USER@HOST[:PORT]/DB")
        scheme, _, rest = url.partition("://")
        netloc, sep, tail = _split_netloc(rest)
        userinfo, at, host = netloc.rpartition("@")
        user, colon, password = userinfo.partition(":")
        path, mark, query = ("", "", tail) if sep == "?" else tail.partition("?")
        secrets = {password, unquote(password)} | {
            v for k, v in parse_qsl(query) if k == "password"
        }
        self.secrets = frozenset(s for s in secrets if s)
        masked = f"{user}{colon}{MASK if colon else ''}{at}{host}" if at else netloc
        query = _QUERY_PASSWORD.sub(rf"\1password={MASK}", query)
        self.shown = f"{scheme}://{masked}{sep}{path}{mark}{query}"
        try:
            self.params: dict[str, Any] = conninfo_to_dict(url)
        except psycopg.Error as e:
            reason = self.scrub(str(e), url)
            raise StateError(f"{self.shown} is not a valid URL: {reason}") from None

    def scrub(self, text: str, url: str | None = None) -> str:
        """`text` without the password (and without the whole URL, which libpq quotes)."""
        if url:
            text = text.replace(url, self.shown)
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, MASK)
        return text


def _split_netloc(rest: str) -> tuple[str, str, str]:
    """`user:pw@host:port`, then the separator and what follows (`/db?...`)."""
    for i, ch in enumerate(rest):
        if ch in "/?":
            return rest[:i], ch, rest[i + 1 :]
    return rest, "", ""


class PostgresSession(Session):
    """One pooled connection (autocommit outside `transaction()`)."""

    dialect = "postgresql"

    def __init__(self, conn: psycopg.Connection[DictRow], location: Location) -> None:
        self.conn = conn
        self.location = location

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except psycopg.Error as e:
            message = f"{self.location.shown}: {self.location.scrub(str(e).strip())}"
            raise _failed(e, message) from e

    def query(self, sql: str, params: Params = ()) -> list[dict[str, Any]]:
        with self._errors(), self.conn.cursor() as cursor:
            cursor.execute(placeholders(sql), params)
            return cursor.fetchall() if cursor.description else []

    def execute(self, sql: str, params: Params = ()) -> int:
        with self._errors(), self.conn.cursor() as cursor:
            cursor.execute(placeholders(sql), params)
            return cursor.rowcount

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        with self._errors(), self.conn.transaction():
            yield self

    def insert(
        self, table: str, rows: Sequence[dict[str, Any]], *, replace_on: str | None = None
    ) -> None:
        # PostgreSQL's text cannot hold NUL, which a client may send (a body preview): it
        # is stored as `\x00`, the way keyswap shows a byte that is not UTF-8.
        clean = [
            {k: v.replace("\x00", "\\x00") if type(v) is str else v for k, v in row.items()}
            if any(type(v) is str and "\x00" in v for v in row.values())
            else row
            for row in rows
        ]
        super().insert(table, clean, replace_on=replace_on)

    @contextmanager
    def snapshot(self) -> Iterator[Session]:
        if self.conn.info.transaction_status != pq.TransactionStatus.IDLE:
            yield self
            return
        self.execute("begin isolation level repeatable read, read only")
        try:
            yield self
        finally:
            with suppress(StateError):  # it wrote nothing; a broken connection leaves the pool
                self.execute("rollback")

    def lock(self, name: str) -> None:
        assert self.conn.info.transaction_status == pq.TransactionStatus.INTRANS, (
            "lock() holds until a transaction ends: start one"
        )
        self.query("select pg_advisory_xact_lock(?)", [lock_key(name)])


def _failed(e: psycopg.Error, message: str) -> StateError:
    # OperationalError: the connection or the server (lost, refused, shutting down, a
    # lock or statement timeout, a serialization conflict), never the statement's values.
    return (TransientError if isinstance(e, psycopg.OperationalError) else StateError)(message)


def lock_key(name: str) -> int:
    """An advisory lock's 64-bit key for a name (the same in every process)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


@lru_cache(maxsize=512)
def placeholders(sql: str) -> str:
    """`?` placeholders as psycopg's `%s` (and a literal `%` as `%%`); a `?` inside a
    quoted literal stays. keyswap's SQL has no `?` in identifiers or comments."""
    out = []
    quoted = False
    for ch in sql:
        if ch == "'":
            quoted = not quoted
        if ch == "%":
            out.append("%%")
        elif ch == "?" and not quoted:
            out.append("%s")
        else:
            out.append(ch)
    return "".join(out)


class PostgresBackend(Backend):
    """A PostgreSQL database, through a small pool of connections."""

    kind = "postgresql"

    def __init__(self, url: str, pool_size: int = POOL_SIZE) -> None:
        self.location = Location(url)
        self.shown = self.location.shown
        params: dict[str, Any] = {
            "connect_timeout": CONNECT_TIMEOUT_S,
            "application_name": "keyswap",
            **self.location.params,
            "autocommit": True,
            "row_factory": dict_row,
        }
        # One connection first: an unreachable server or a wrong password is said now,
        # in libpq's words (the pool would only time out).
        try:
            psycopg.connect(**params).close()
        except psycopg.Error as e:
            reason = self.location.scrub(str(e).strip(), url)
            raise _failed(e, f"cannot connect to {self.shown}: {reason}") from None
        self._pool: ConnectionPool[psycopg.Connection[DictRow]] = ConnectionPool(
            kwargs=params,
            min_size=1,
            max_size=pool_size,
            open=False,
            name="keyswap",
            timeout=CONNECT_TIMEOUT_S,
        )
        self._pool.open()

    @property
    def secrets(self) -> frozenset[str]:
        return self.location.secrets

    @contextmanager
    def session(self) -> Iterator[Session]:
        try:
            conn = self._pool.getconn()
        except psycopg.Error as e:
            reason = self.location.scrub(str(e).strip())
            raise _failed(e, f"no connection to {self.shown}: {reason}") from e
        try:
            yield PostgresSession(conn, self.location)
        finally:
            # The pool rolls back a transaction left open and drops a broken connection.
            self._pool.putconn(conn)

    def close(self) -> None:
        self._pool.close()
