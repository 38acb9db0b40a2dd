"""The PostgreSQL backend's edges: its URL (never shown with its password, also when
malformed or refused), `?` placeholders, and what an unreachable server says."""

import logging
import threading
import time

import pytest

from keyswap.state import migrations
from keyswap.state.backends import StateError, open_backend, shown
from keyswap.state.backends.postgres import POOL_SIZE, Location, PostgresBackend, placeholders
from tests.support.postgres import Postgres

SECRET = "s3cr3t-pw"


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        (f"postgresql://gw:{SECRET}@db.internal:5433/keyswap", "postgresql://gw:********@db.internal:5433/keyswap"),
        (f"postgres://gw:{SECRET}@db/keyswap?sslmode=require", "postgres://gw:********@db/keyswap?sslmode=require"),
        ("postgresql://gw@db/keyswap", "postgresql://gw@db/keyswap"),
        ("postgresql://db/keyswap", "postgresql://db/keyswap"),
        (f"postgresql://gw:{SECRET}@[::1]:5432/k", "postgresql://gw:********@[::1]:5432/k"),
        (f"postgresql://gw@db/k?password={SECRET}", "postgresql://gw@db/k?password=********"),
        ("postgresql://gw:p%40ss%2Fword@db/k", "postgresql://gw:********@db/k"),
        (f"postgresql://db?dbname=k&password={SECRET}", "postgresql://db?dbname=k&password=********"),
    ],
)  # fmt: skip
def test_a_url_is_shown_without_its_password(url: str, masked: str) -> None:
    location = Location(url)
    assert location.shown == masked == shown(url)
    assert "p@ss/word" not in location.shown


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://gw:{SECRET}@db:notaport/k",
        f"postgresql://gw:{SECRET}@[::1/k",
        f"postgresql://gw:{SECRET}%zz@db/k",
        f"postgresql://gw:{SECRET}@db/k?nonsense=1",
    ],
)
def test_a_malformed_url_is_said_without_its_password(url: str) -> None:
    with pytest.raises(StateError) as raised:
        open_backend(url)
    assert SECRET not in str(raised.value) and "********" in str(raised.value)


def test_a_refused_password_is_said_without_it(postgres: Postgres) -> None:
    wrong = postgres.url().replace(postgres.password, SECRET)
    with pytest.raises(StateError, match="password authentication failed") as raised:
        open_backend(wrong)
    assert SECRET not in str(raised.value) and postgres.password not in str(raised.value)


def test_an_unreachable_server_is_said_at_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG), pytest.raises(StateError) as raised:
        open_backend(f"postgresql://gw:{SECRET}@127.0.0.1:1/k")
    assert "cannot connect to postgresql://gw:********@127.0.0.1:1/k" in str(raised.value)
    assert SECRET not in str(raised.value) + caplog.text


def test_ping_raises_when_the_connection_is_gone_then_recovers(pg_url: str) -> None:
    backend = PostgresBackend(pg_url)
    try:
        assert backend.ping() > 0
        with open_backend(pg_url) as admin, admin.session() as session:
            session.query(
                "select pg_terminate_backend(pid) from pg_stat_activity"
                " where datname = current_database() and pid != pg_backend_pid()"
            )
        with pytest.raises(StateError):  # the pool hands out a connection that died
            backend.ping()
        for _ in range(POOL_SIZE):  # each dead one is dropped as it comes back
            try:
                assert backend.ping() > 0
                break
            except StateError:
                continue
        else:
            pytest.fail("no new connection after the old ones died")
    finally:
        backend.close()


@pytest.mark.parametrize(
    ("sql", "psycopg"),
    [
        ("select * from t where a = ? and b > ?", "select * from t where a = %s and b > %s"),
        ("select '?' as q, ? as p", "select '?' as q, %s as p"),
        ("select strftime('%Y', x) from t where y like '%a?'", "select strftime('%%Y', x) from t where y like '%%a?'"),
        ("select 'it''s ?', ?", "select 'it''s ?', %s"),
    ],
)  # fmt: skip
def test_placeholders(sql: str, psycopg: str) -> None:
    assert placeholders(sql) == psycopg


def test_select_for_update_locks_rows_inside_a_transaction(pg_url: str) -> None:
    with open_backend(pg_url) as first, open_backend(pg_url) as second:
        migrations.upgrade(first)
        with first.session() as session:
            session.insert("rate_limits", [{"key": "k", "tat": 1.0}])
        order: list[str] = []
        locked = threading.Event()

        def update() -> None:
            locked.wait()
            with second.session() as session, session.transaction():
                session.execute("update rate_limits set tat = tat + 1 where key = ?", ["k"])
                order.append("update")

        thread = threading.Thread(target=update)
        thread.start()
        with first.session() as session, session.transaction():
            [row] = session.query("select tat from rate_limits where key = ? for update", ["k"])
            locked.set()
            time.sleep(0.3)
            session.execute("update rate_limits set tat = ? where key = ?", [row["tat"] * 10, "k"])
            order.append("locked")
        thread.join()
        with first.session() as session:
            assert session.query("select tat from rate_limits") == [{"tat": 11.0}]
    assert order == ["locked", "update"]
