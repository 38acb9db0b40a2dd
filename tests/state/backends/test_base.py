"""The backend interface, the same on SQLite and PostgreSQL: sessions, transactions
(rolled back on an error, nested as savepoints), snapshots, inserts and upserts, locks,
ping; and `open_backend` choosing by the location's form."""

import threading
import time
from pathlib import Path

import pytest

from keyswap.state import migrations
from keyswap.state.backends import Backend, StateError, is_url, open_backend, shown
from keyswap.state.backends.base import ROWS_PER_STATEMENT


def ids(backend: Backend) -> list[str]:
    with backend.session() as session:
        return [r["id"] for r in session.query("select id from requests order by id")]


def request(i: int, **fields: object) -> dict[str, object]:
    return {"id": f"r{i:03d}", "started_at": "2099-01-01T00:00:00.000Z", **fields}


def test_a_transaction_commits_or_rolls_back_whole(backend: Backend) -> None:
    with backend.session() as session:
        with session.transaction():
            session.insert("requests", [request(1), request(2)])
        with pytest.raises(RuntimeError), session.transaction():
            session.insert("requests", [request(3)])
            raise RuntimeError("after the insert")
        with pytest.raises(StateError), session.transaction():
            session.insert("requests", [request(4)])
            session.insert("requests", [request(1)])  # its key exists
        with session.transaction():
            session.insert("requests", [request(5)])
            with pytest.raises(StateError), session.transaction():  # a savepoint
                session.insert("requests", [request(2)])
            session.insert("requests", [request(6)])
    assert ids(backend) == ["r001", "r002", "r005", "r006"]


def test_insert_writes_many_rows_and_replaces_on_a_key(backend: Backend) -> None:
    rows = [request(i, status=200 + i % 3) for i in range(3 * ROWS_PER_STATEMENT + 5)]
    with backend.session() as session:
        session.insert("requests", rows)
        session.insert("requests", [])
        assert session.query("select count(*) as n from requests") == [{"n": len(rows)}]
        token = {"credential": "c", "ciphertext": "one", "error": "x"}
        session.insert("oauth2_tokens", [token], replace_on="credential")
        session.insert("oauth2_tokens", [{**token, "ciphertext": "two"}], replace_on="credential")
        session.insert("oauth2_tokens", [{"credential": "c"}], replace_on="credential")
        found = session.query("select credential, ciphertext, error from oauth2_tokens")
        assert found == [{"credential": "c", "ciphertext": "two", "error": "x"}]
        assert session.execute("update requests set status = ? where status = ?", [1, 200]) == 34


def test_a_snapshot_sees_one_committed_state(backend: Backend) -> None:
    with backend.session() as reader, reader.snapshot():
        assert reader.query("select count(*) as n from requests") == [{"n": 0}]

        def write() -> None:
            with backend.session() as writer:
                writer.insert("requests", [request(1)])

        thread = threading.Thread(target=write)
        thread.start()
        thread.join()
        assert reader.query("select count(*) as n from requests") == [{"n": 0}]
    assert ids(backend) == ["r001"]


def test_a_lock_holds_other_writers_until_the_transaction_ends(state_db: str) -> None:
    order: list[str] = []
    with open_backend(state_db) as first, open_backend(state_db) as second:
        migrations.upgrade(first)
        taken = threading.Event()

        def later() -> None:
            taken.wait()
            with second.session() as session, session.transaction():
                session.lock("keyswap.test")
                order.append("second")

        thread = threading.Thread(target=later)
        thread.start()
        with first.session() as session, session.transaction():
            session.lock("keyswap.test")
            taken.set()
            time.sleep(0.3)
            order.append("first")
        thread.join()
    assert order == ["first", "second"]


def test_ping_measures_a_round_trip(backend: Backend) -> None:
    assert 0 < backend.ping() < 5


@pytest.mark.parametrize(
    ("location", "url"),
    [
        ("keyswap.db", False),
        ("postgresql://u@h/db", True),
        ("postgres://u:p@h:5433/db", True),
        ("postgresql:/not/a/url", False),
    ],
)
def test_the_location_picks_the_backend(location: str, url: bool) -> None:
    assert is_url(location) is url


def test_an_sqlite_location_is_a_path(tmp_path: Path) -> None:
    with open_backend(tmp_path / "k.db") as backend:
        assert (backend.kind, backend.shown) == ("sqlite", str(tmp_path / "k.db"))
        assert shown(tmp_path / "k.db") == str(tmp_path / "k.db")
    with pytest.raises(StateError, match="cannot open .*/nowhere/k.db"):
        with open_backend(tmp_path / "nowhere" / "k.db") as backend, backend.session():
            pass
