from contextlib import closing
from pathlib import Path

from sqlite_utils import Database

from keyswap.state.store import REQUEST_INDEXES, SCHEMA_VERSION, new_request_id, open_db


def test_request_ids_sort_by_time_and_are_unique() -> None:
    ids = [new_request_id() for _ in range(1000)]
    assert len(set(ids)) == 1000 and all(len(i) == 26 for i in ids)
    assert sorted(ids, key=lambda i: i[:12]) == ids


def version_1(path: Path) -> None:
    """A database as schema version 1 left it: its indexes, and rows."""
    db = open_db(path)
    for name in REQUEST_INDEXES:
        db.execute(f"DROP INDEX {name}")
    db.execute("CREATE INDEX idx_requests_proxy_id_started_at ON requests (proxy_id, started_at)")
    db.execute("CREATE INDEX idx_requests_status_started_at ON requests (status, started_at)")
    db.execute("CREATE INDEX idx_requests_started_at ON requests (started_at)")
    db["requests"].insert_all(
        {"id": f"r{i}", "started_at": f"2026-01-01T00:00:0{i}.000Z", "proxy_id": "p"}
        for i in range(5)
    )
    db.execute("PRAGMA user_version = 1")
    db.conn.commit()
    db.close()


def indexes(db: Database) -> set[str]:
    return {
        r[0]
        for r in db.execute(
            "select name from sqlite_master where type = 'index' and tbl_name = 'requests'"
        )
    }


def test_version_1_is_upgraded_keeping_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "k.db"
    version_1(path)
    with closing(open_db(path, upgrade=False)) as reader:  # a reader leaves it alone
        assert reader.execute("PRAGMA user_version").fetchone()[0] == 1
        assert "idx_requests_proxy_id_started_at" in indexes(reader)
    with closing(open_db(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        assert indexes(db) == {"sqlite_autoindex_requests_1", *REQUEST_INDEXES}
        assert [r["id"] for r in db.query("select id from requests order by id")] == [
            f"r{i}" for i in range(5)
        ]


def test_a_reader_creates_a_missing_schema(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    with closing(open_db(path, upgrade=False)) as db:
        assert indexes(db) == {"sqlite_autoindex_requests_1", *REQUEST_INDEXES}
