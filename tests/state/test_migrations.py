"""The schema's versions on both backends: a new database, SQLite files of versions 1
and 2 upgraded in place, and a database of a newer version refused."""

import sqlite3
import threading
from pathlib import Path

import pytest
from sqlite_utils import Database

from keyswap.state import migrations
from keyswap.state.backends import Backend, SchemaTooNew, Session, open_backend
from keyswap.state.migrations import REQUEST_INDEXES, SCHEMA_VERSION

NEW_TABLES = {"requests", "audit", "gateways", "oauth2_tokens", "rate_limits"}


def columns(session: Session, table: str) -> set[str]:
    if session.dialect == "sqlite":
        return {r["name"] for r in session.query(f"pragma table_info({table})")}
    found = session.query(
        "select column_name from information_schema.columns where table_name = ?", [table]
    )
    return {r["column_name"] for r in found}


def request_indexes(session: Session) -> set[str]:
    if session.dialect == "sqlite":
        sql = "select name from sqlite_master where type = 'index' and tbl_name = 'requests'"
    else:
        sql = "select indexname as name from pg_indexes where tablename = 'requests'"
    return {r["name"] for r in session.query(sql)}


def test_a_new_database_gets_every_table(state_db: str) -> None:
    with open_backend(state_db) as backend:
        assert migrations.upgrade(backend) == (0, SCHEMA_VERSION)
        assert migrations.upgrade(backend) == (SCHEMA_VERSION, SCHEMA_VERSION)
        with backend.session() as session:
            assert migrations.version(session) == SCHEMA_VERSION == 4
            assert {"mode", "gateway", "started_at", "async_id"} <= columns(session, "requests")
            assert columns(session, "gateways") >= {
                "id", "node", "pid", "listen", "config_digest", "last_seen", "config"
            }  # fmt: skip
            assert {"version", "lease_owner", "lease_until"} <= columns(session, "oauth2_tokens")
            assert columns(session, "rate_limits") == {"key", "tat", "updated_at"}
            assert set(REQUEST_INDEXES) <= request_indexes(session)
            assert "idx_requests_started_at" not in request_indexes(session)
            session.insert("oauth2_tokens", [{"credential": "c", "ciphertext": "x"}])
            [token] = session.query("select version, lease_owner from oauth2_tokens")
            assert token == {"version": 0, "lease_owner": None}


def version_1(path: Path) -> None:
    """An SQLite file as keyswap's schema version 1 left it (sqlite-utils made it), with
    rows, and a gateway announced in version 1's shape."""
    db = Database(path)
    db.enable_wal()
    db["requests"].create(
        {c: t for c, t in migrations.REQUEST_COLUMNS_V1.items()},
        pk="id",
        not_null={"started_at"},
    )
    db.execute("CREATE INDEX idx_requests_proxy_id_started_at ON requests (proxy_id, started_at)")
    db.execute("CREATE INDEX idx_requests_status_started_at ON requests (status, started_at)")
    db.execute("CREATE INDEX idx_requests_started_at ON requests (started_at)")
    db["audit"].create(migrations.AUDIT_COLUMNS, pk="id", not_null={"at", "action"})
    db["audit"].create_index(["at"])
    db["gateways"].create({"pid": int, "config": str, "url": str, "started_at": str}, pk="pid")
    db["oauth2_tokens"].create(migrations.OAUTH2_COLUMNS_V1, pk="credential")
    db["requests"].insert_all(
        {"id": f"r{i}", "started_at": f"2026-01-01T00:00:0{i}.000Z", "proxy_id": "p"}
        for i in range(5)
    )
    db["gateways"].insert({"pid": 1, "config": "/x.yaml", "url": "http://127.0.0.1:1"})
    db["oauth2_tokens"].insert({"credential": "hub", "ciphertext": "secret", "terminal": 0})
    db.execute("PRAGMA user_version = 1")
    db.conn.commit()
    db.close()


def version_2(path: Path) -> None:
    version_1(path)
    db = Database(path)
    for name, columns in REQUEST_INDEXES.items():
        db.execute(f"CREATE INDEX IF NOT EXISTS {name} ON requests ({columns})")
    db.execute("DROP INDEX idx_requests_proxy_id_started_at")
    db.execute("DROP INDEX idx_requests_started_at")
    db.execute("PRAGMA user_version = 2")
    db.conn.commit()
    db.close()


@pytest.mark.parametrize(("make", "old"), [(version_1, 1), (version_2, 2)])
def test_an_sqlite_file_of_an_older_version_is_upgraded_in_place(
    tmp_path: Path, make: object, old: int
) -> None:
    path = tmp_path / "k.db"
    make(path)  # type: ignore[operator]
    with open_backend(path) as backend:
        # a reader leaves it as it is: an upgrade would hold the write lock
        assert migrations.for_reading(backend) == old
        assert migrations.upgrade(backend) == (old, SCHEMA_VERSION)
        with backend.session() as session:
            assert [r["id"] for r in session.query("select id from requests order by id")] == [
                f"r{i}" for i in range(5)
            ]
            assert request_indexes(session) == {"sqlite_autoindex_requests_1", *REQUEST_INDEXES}
            assert session.query("select * from gateways") == []  # version 1's shape is gone
            [token] = session.query("select credential, ciphertext, version from oauth2_tokens")
            assert token == {"credential": "hub", "ciphertext": "secret", "version": 0}
            assert {"mode", "gateway"} <= columns(session, "requests")


def test_a_file_from_before_versions_gets_its_missing_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute("create table requests (id text primary key, started_at text not null)")
        conn.execute("insert into requests values ('r1', '2026-01-01T00:00:00.000Z')")
    conn.close()
    with open_backend(path) as backend:
        assert migrations.upgrade(backend) == (0, SCHEMA_VERSION)
        with backend.session() as session:
            assert set(migrations.REQUEST_COLUMNS_V1) <= columns(session, "requests")
            assert session.query("select id from requests") == [{"id": "r1"}]


def test_a_newer_version_is_refused_naming_both(backend: Backend) -> None:
    with backend.session() as session:
        if session.dialect == "sqlite":
            session.execute("pragma user_version = 9")
        else:
            session.execute("update schema_version set version = 9")
    with pytest.raises(
        SchemaTooNew, match=r"schema version 9, newer than this keyswap knows \(4\)"
    ):
        migrations.upgrade(backend)
    assert migrations.for_reading(backend) == 9  # reading it is fine


def test_processes_starting_at_once_upgrade_once(state_db: str) -> None:
    """Four backends (as four gateways would) upgrade one new database at once: the lock
    lets one migrate; the others find it current."""
    results: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            with open_backend(state_db) as backend:
                results.append(migrations.upgrade(backend))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(results) == [(0, SCHEMA_VERSION)] + [(SCHEMA_VERSION, SCHEMA_VERSION)] * 3
