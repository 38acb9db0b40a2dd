"""The state database (SQLite, via sqlite-utils): the activity log `requests` and the
`audit` trail. Opened in WAL mode so the command line and Datasette read while the
gateway writes."""

from __future__ import annotations

import getpass
import itertools
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlite_utils import Database

REQUEST_COLUMNS: dict[str, type] = {
    "id": str,
    "started_at": str,
    "duration_ms": float,
    "proxy_id": str,
    "token_id": str,
    "environment": str,
    "region": str,
    "client_ip": str,
    "method": str,
    "path": str,
    "target": str,
    "target_url": str,
    "status": int,
    "proxy_code": str,
    "message": str,
    "error": str,
    "upstream_proxy": str,
    "bytes_in": int,
    "bytes_out": int,
    "origin": str,
    "user_agent": str,
    "request_headers": str,
    "response_headers": str,
    "request_body": str,
    "response_body": str,
    "attempts": int,
    "async_id": str,
}
# The activity log's indexes. The columns after the first two let SQLite filter (and
# `keyswap stats` count) from the index alone, without reading the table's wide rows.
REQUEST_INDEXES = {
    # per proxy over time, with every column `keyswap stats` reads
    "idx_requests_proxy_id_started_at_outcome": (
        "proxy_id, started_at, proxy_code, status, duration_ms, bytes_in, bytes_out"
    ),
    # errors over time: by status, and by status class (`keyswap logs --status 5xx`)
    "idx_requests_status_started_at": "status, started_at",
    "idx_requests_status_class_started_at": "(status / 100), started_at",
    # over time, with what `keyswap logs --code` filters on
    "idx_requests_started_at_outcome": "started_at, proxy_code, status",
}
# Version 1's, now the first columns of one above.
SUPERSEDED_INDEXES = ("idx_requests_proxy_id_started_at", "idx_requests_started_at")
AUDIT_COLUMNS: dict[str, type] = {
    "id": int,
    "at": str,
    "actor": str,
    "action": str,
    "resource": str,
    "detail": str,
}
AUDIT_ACTIONS = (
    "create",
    "edit",
    "enable",
    "disable",
    "rotate-token",
    "delete",
    "reload",
    "reload-failed",
)


OAUTH2_COLUMNS: dict[str, type] = {
    "credential": str,
    "ciphertext": str,  # the tokens, encrypted with a key only the client secret gives
    "expires_at": str,
    "refreshed_at": str,
    "error": str,
    "terminal": int,
}


def iso(ts: float) -> str:
    """A Unix time as UTC ISO 8601 with milliseconds: sorts as text."""
    return f"{_iso_second(int(ts))}.{int(ts * 1000) % 1000:03d}Z"


@lru_cache(maxsize=8)
def _iso_second(second: int) -> str:
    """Formatted once per second, not once per log row."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def now_iso() -> str:
    return iso(time.time())


BUSY_TIMEOUT_S = 10.0
# Raise when ensure_schema changes: a database of an older version is upgraded on open.
# 2: wider indexes, so that `keyswap logs` and `stats` read indexes, not rows.
SCHEMA_VERSION = 2


def open_db(path: str | Path, *, upgrade: bool = True) -> Database:
    """Open (and create or upgrade) the state database. A reader (`upgrade=False`) leaves
    an existing schema of another version as it is: an upgrade holds the write lock while
    it builds indexes (seconds per million rows), which would stall a running gateway's
    writes; the gateway upgrades its database when it starts."""
    conn = sqlite3.connect(str(path), check_same_thread=False, timeout=BUSY_TIMEOUT_S)
    db = Database(conn)
    db.enable_wal()
    db.execute("PRAGMA synchronous=NORMAL")
    # Only a database whose schema is not current takes the write lock here: readers
    # (`keyswap logs`, a read-only copy) open without it.
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version != SCHEMA_VERSION and (upgrade or version == 0):
        with write_transaction(db):
            ensure_schema(db)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return db


@contextmanager
def write_transaction(db: Database) -> Iterator[Database]:
    """A transaction that holds SQLite's write lock from its start, waiting up to the busy
    timeout for it. sqlite-utils' own transactions start deferred and read first (does the
    table exist?): such a read-then-write fails at once with "database is locked", busy
    timeout or not, when another connection writes in between, because SQLite will not
    wait where waiting could deadlock. Inside, sqlite-utils nests with savepoints."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        db.rollback()
        raise


def ensure_schema(db: Database) -> None:
    requests = db.table("requests")
    if not requests.exists():
        requests.create(REQUEST_COLUMNS, pk="id", not_null={"started_at"})
    else:
        missing = {k: v for k, v in REQUEST_COLUMNS.items() if k not in requests.columns_dict}
        for name, kind in missing.items():
            requests.add_column(name, kind)
    for name, columns in REQUEST_INDEXES.items():
        db.execute(f"CREATE INDEX IF NOT EXISTS {name} ON requests ({columns})")
    for name in SUPERSEDED_INDEXES:
        db.execute(f"DROP INDEX IF EXISTS {name}")
    audit = db.table("audit")
    if not audit.exists():
        audit.create(AUDIT_COLUMNS, pk="id", not_null={"at", "action"})
    audit.create_index(["at"], if_not_exists=True)
    gateways = db.table("gateways")  # who serves which config: `keyswap proxies` waits for them
    if not gateways.exists():
        gateways.create({"pid": int, "config": str, "url": str, "started_at": str}, pk="pid")
    tokens = db.table("oauth2_tokens")
    if not tokens.exists():
        tokens.create(OAUTH2_COLUMNS, pk="credential")


def audit_row(
    action: str, resource: str, detail: dict[str, Any], actor: str | None = None
) -> dict[str, Any]:
    """An `audit` row; `detail` must hold no secret."""
    assert action in AUDIT_ACTIONS, action
    return {
        "at": now_iso(),
        "actor": actor or _os_user(),
        "action": action,
        "resource": resource,
        "detail": json.dumps(detail, sort_keys=True),
    }


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def audit(
    db_path: Path, action: str, resource: str, detail: dict[str, Any], actor: str | None
) -> None:
    """Record a change made from the command line (no secret in `detail`)."""
    with closing(open_db(db_path)) as db, write_transaction(db):
        db.table("audit").insert(audit_row(action, resource, detail, actor))


_PROCESS = os.urandom(4).hex()  # tells gateways (and restarts) apart
_SEQUENCE = itertools.count()


def new_request_id() -> str:
    """26 hex digits, time-ordered and unique: milliseconds, process, sequence."""
    return f"{time.time_ns() // 1_000_000:012x}{_PROCESS}{next(_SEQUENCE) % 0x1000000:06x}"
