"""The state database's tables, versioned: migration N takes a database from version N-1
to N, on either backend, and the gateway (and every command that writes) runs the ones
a database lacks. SQLite keeps the version in `PRAGMA user_version`, PostgreSQL in the
table `schema_version`; each upgrade is one transaction under a lock (SQLite's write
lock, a PostgreSQL advisory lock), so two processes or nodes starting at once upgrade
once. A keyswap refuses to write to a database of a newer version than it knows."""

from __future__ import annotations

from collections.abc import Callable

from keyswap.state.backends import Backend, SchemaTooNew, Session

SCHEMA_VERSION = 4
LOCK = "keyswap.migrations"

# Column types as SQL per backend. PostgreSQL compares text by its bytes ("C"), as
# SQLite does: `keyswap logs` orders by id and time, `stats` walks the proxy ids in
# order, whatever the database's locale.
_TYPES = {
    "sqlite": {str: "TEXT", int: "INTEGER", float: "FLOAT", bytes: "BLOB"},
    "postgresql": {
        str: 'text collate "C"',
        int: "bigint",
        float: "double precision",
        bytes: "bytea",
    },
}

REQUEST_COLUMNS_V1: dict[str, type] = {
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
AUDIT_COLUMNS: dict[str, type] = {
    "id": int,
    "at": str,
    "actor": str,
    "action": str,
    "resource": str,
    "detail": str,
}
OAUTH2_COLUMNS_V1: dict[str, type] = {
    "credential": str,
    "ciphertext": str,  # the tokens, encrypted with a key only the client secret gives
    "expires_at": str,
    "refreshed_at": str,
    "error": str,
    "terminal": int,
}
GATEWAY_COLUMNS: dict[str, type] = {
    "id": str,  # <node>:<pid>:<random>, also the `gateway` of the requests it serves
    "node": str,  # the host name
    "pid": int,
    "listen": str,  # JSON: [{"mode": "reverse", "address": "127.0.0.1:8080"}, ...]
    "config": str,  # the config file's absolute path: the command line matches on it
    "config_digest": str,  # of the config it serves now
    "started_at": str,
    "last_seen": str,  # ISO 8601 UTC, refreshed by its heartbeat
}
RATE_LIMIT_COLUMNS: dict[str, type] = {
    "key": str,
    "tat": float,  # GCRA's theoretical arrival time, Unix seconds
    "updated_at": str,
}
ASYNC_COLUMNS: dict[str, type] = {
    "id": str,  # also the path of its result: /_keyswap/requests/<id>
    "proxy_id": str,
    "token_id": str,  # the proxy token that asked
    "token_sha256": str,  # its digest (as the config holds it): a revoked token's requests stop
    "client_ip": str,  # the client that asked
    "state": str,  # queued, delivering, succeeded, failed, expired, cancelled
    "created_at": str,  # ISO 8601 UTC, as every time here
    "updated_at": str,
    "deadline_at": str,  # created_at + the proxy's async.max_age_s (reset by a retry)
    "next_attempt_at": str,
    "attempts": int,  # started so far
    "max_attempts": int,
    "lease_owner": str,  # the gateway delivering it (state delivering)
    "lease_until": str,
    "idempotency_key": str,  # the client's, or one keyswap made; on every attempt
    "accepted_request_id": str,  # the activity log row of the 202
    "last_request_id": str,  # the activity log row of the latest attempt
    "last_error": str,
    # The request as the gateway accepted it: the path the client sent (no token in it),
    # its headers after the proxy's request filter (no token, no target credential), the
    # body. Delivery sends it through the whole pipeline again.
    "method": str,
    "path": str,
    "request_headers": str,  # JSON [[name, value], ...], each byte a code point (latin-1)
    "request_body": bytes,
    # The target's answer, once done (secrets masked, the body bounded).
    "response_status": int,
    "response_headers": str,  # JSON [[name, value], ...], as request_headers
    "response_body": bytes,
    "response_bytes": int,  # the body's whole size
    "response_truncated": int,  # 1: response_body is its first bytes (the bound)
}

# The activity log's indexes. The columns after the first two let the database filter
# (and `keyswap stats` count) from the index alone, without reading the wide rows.
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


def _column(session: Session, name: str, kind: type) -> str:
    return f'"{name}" {_TYPES[session.dialect][kind]}'


def _create(
    session: Session,
    table: str,
    columns: dict[str, type],
    key: str,
    not_null: tuple[str, ...] = (),
) -> None:
    """CREATE TABLE IF NOT EXISTS; an integer key counts up by itself."""
    parts = []
    for name, kind in columns.items():
        part = _column(session, name, kind)
        if name == key:
            auto = kind is int and session.dialect == "postgresql"
            part += " generated by default as identity" if auto else ""
            part += " primary key"
        elif name in not_null:
            part += " not null"
        parts.append(part)
    session.execute(f'create table if not exists "{table}" ({", ".join(parts)})')


def _add(session: Session, table: str, name: str, kind: type, extra: str = "") -> None:
    session.execute(f'alter table "{table}" add column {_column(session, name, kind)}{extra}')


def _v1(session: Session) -> None:
    """The activity log, the audit trail, the gateways a command waits for, the OAuth2
    token cache. Also completes an SQLite file from before versions were kept, whose
    tables may lack columns."""
    _create(session, "requests", REQUEST_COLUMNS_V1, "id", ("started_at",))
    if session.dialect == "sqlite":
        have = {r["name"] for r in session.query("pragma table_info(requests)")}
        for name, kind in REQUEST_COLUMNS_V1.items():
            if name not in have:
                _add(session, "requests", name, kind)
    for name, columns in {
        "idx_requests_proxy_id_started_at": "proxy_id, started_at",
        "idx_requests_status_started_at": "status, started_at",
        "idx_requests_started_at": "started_at",
    }.items():
        session.execute(f"create index if not exists {name} on requests ({columns})")
    _create(session, "audit", AUDIT_COLUMNS, "id", ("at", "action"))
    session.execute("create index if not exists idx_audit_at on audit (at)")
    v1_gateways = {"pid": int, "config": str, "url": str, "started_at": str}
    _create(session, "gateways", v1_gateways, "pid")
    _create(session, "oauth2_tokens", OAUTH2_COLUMNS_V1, "credential")


def _v2(session: Session) -> None:
    """Wider indexes, so that `keyswap logs` and `stats` read indexes, not rows."""
    for name, columns in REQUEST_INDEXES.items():
        session.execute(f"create index if not exists {name} on requests ({columns})")
    for name in ("idx_requests_proxy_id_started_at", "idx_requests_started_at"):
        session.execute(f"drop index if exists {name}")


def _v3(session: Session) -> None:
    """Several processes and nodes on one database: which gateway served a request, in
    which mode; the registry of live gateways; OAuth2 token versions and refresh leases;
    shared rate limits. On PostgreSQL, `requests.seq` orders rows by commit, as SQLite's
    rowid does (`keyswap logs --follow`)."""
    _add(session, "requests", "mode", str)
    _add(session, "requests", "gateway", str)
    if session.dialect == "postgresql":
        session.execute("alter table requests add column seq bigint generated always as identity")
        session.execute("create unique index idx_requests_seq on requests (seq)")
    session.execute("drop table if exists gateways")
    _create(session, "gateways", GATEWAY_COLUMNS, "id", ("node", "pid", "last_seen"))
    _add(session, "oauth2_tokens", "version", int, " not null default 0")
    _add(session, "oauth2_tokens", "lease_owner", str)
    _add(session, "oauth2_tokens", "lease_until", str)  # ISO 8601 UTC, as every time here
    _create(session, "rate_limits", RATE_LIMIT_COLUMNS, "key", ("tat",))


def _v4(session: Session) -> None:
    """The async queue: requests accepted with `Prefer: respond-async`, their delivery
    leases and results."""
    _create(session, "async_requests", ASYNC_COLUMNS, "id", ("proxy_id", "state", "created_at"))
    for name, columns in {
        "idx_async_requests_state_next_attempt_at": "state, next_attempt_at",
        "idx_async_requests_proxy_id_created_at": "proxy_id, created_at",
        "idx_async_requests_state_updated_at": "state, updated_at",
        "idx_async_requests_state_deadline_at": "state, deadline_at",
    }.items():
        session.execute(f"create index if not exists {name} on async_requests ({columns})")


MIGRATIONS: dict[int, Callable[[Session], None]] = {1: _v1, 2: _v2, 3: _v3, 4: _v4}
assert sorted(MIGRATIONS) == list(range(1, SCHEMA_VERSION + 1))


def version(session: Session) -> int:
    """The database's schema version; 0 for one without keyswap's tables."""
    if session.dialect == "sqlite":
        return int(session.query("pragma user_version")[0]["user_version"])
    # A query of the catalog, not to_regclass(): that reads a cache which, right after
    # the migration lock is granted, may not yet know the table another node just made.
    found = session.query(
        "select 1 as present from pg_tables"
        " where schemaname = current_schema() and tablename = 'schema_version'"
    )
    if not found:
        return 0
    [row] = session.query("select max(version) as version from schema_version")
    return int(row["version"] or 0)


def _set_version(session: Session, to: int) -> None:
    if session.dialect == "sqlite":
        session.execute(f"pragma user_version = {int(to)}")
        return
    session.execute("create table if not exists schema_version (version integer not null)")
    session.execute("delete from schema_version")
    session.execute("insert into schema_version (version) values (?)", [to])


def _refuse_newer(backend: Backend, found: int) -> None:
    if found > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"{backend.shown} has schema version {found}, newer than this keyswap knows"
            f" ({SCHEMA_VERSION}): a newer keyswap upgraded it; run that version (or newer)"
        )


def writable(backend: Backend) -> int:
    """The database's version, when this keyswap may write to it; SchemaTooNew when a
    newer keyswap upgraded it. Only reads."""
    with backend.session() as session:
        found = version(session)
    _refuse_newer(backend, found)
    return found


def upgrade(backend: Backend) -> tuple[int, int]:
    """Bring the database to SCHEMA_VERSION: (version before, version after). A current
    database is only read. Raises SchemaTooNew for a database of a newer version."""
    with backend.session() as session:
        found = version(session)
        _refuse_newer(backend, found)
        if found == SCHEMA_VERSION:
            return found, found
        with session.transaction():
            session.lock(LOCK)
            found = version(session)  # another process may have upgraded it meanwhile
            _refuse_newer(backend, found)
            for step in range(found + 1, SCHEMA_VERSION + 1):
                MIGRATIONS[step](session)
            if found != SCHEMA_VERSION:
                _set_version(session, SCHEMA_VERSION)
        return found, SCHEMA_VERSION


def for_reading(backend: Backend) -> int:
    """Make the database ready for a command that only reads, and say its version. An
    existing schema is left as it is, older or newer: an upgrade holds the write lock
    while it builds indexes (seconds per million rows), which would stall a running
    gateway's writes, and the gateway upgrades its database when it starts. An empty
    database gets the schema."""
    with backend.session() as session:
        found = version(session)
    return upgrade(backend)[1] if found == 0 else found
