"""State backends: where keyswap keeps its state. `open_backend` picks one by the
location's form: a `postgresql://` (or `postgres://`) URL is PostgreSQL, anything else a
path to an SQLite file. Both hold the same tables and columns (keyswap.state.migrations);
base.py is the interface the rest of keyswap uses."""

from __future__ import annotations

from pathlib import Path

from keyswap.state.backends.base import (
    SCHEMES,
    Backend,
    SchemaTooNew,
    Session,
    StateError,
    TransientError,
)

__all__ = [
    "Backend",
    "SchemaTooNew",
    "Session",
    "StateError",
    "TransientError",
    "is_url",
    "open_backend",
    "shown",
]


def is_url(db: str | Path) -> bool:
    """Whether `db` names a PostgreSQL database rather than an SQLite file."""
    return isinstance(db, str) and db.startswith(SCHEMES)


def open_backend(db: str | Path) -> Backend:
    """The backend at `db`; a PostgreSQL one is connected (StateError says why not), an
    SQLite file is opened (and made) when first used. psycopg is imported only for
    PostgreSQL: the command line starts faster without it."""
    if is_url(db):
        from keyswap.state.backends.postgres import PostgresBackend

        return PostgresBackend(str(db))
    from keyswap.state.backends.sqlite import SqliteBackend

    return SqliteBackend(Path(db))


def shown(db: str | Path) -> str:
    """`db` as keyswap shows it, without connecting: a URL's password masked."""
    if is_url(db):
        from keyswap.state.backends.postgres import Location

        return Location(str(db)).shown
    return str(db)
