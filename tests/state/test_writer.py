"""The activity log's writer on both backends: batches, a bad row costing only itself,
close() writing everything, and no database call on the event loop's thread."""

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from keyswap.state import migrations
from keyswap.state import writer as writer_module
from keyswap.state.backends import Backend, Session, TransientError, open_backend
from keyswap.state.store import audit_row
from keyswap.state.writer import Writer


def rows(backend: Backend, table: str = "requests") -> list[dict[str, Any]]:
    with backend.session() as session:
        return session.query(f"select * from {table} order by id")  # noqa: S608


def row(i: int, started_at: str = "2026-11-21T10:00:00.000Z") -> dict[str, object]:
    return {"id": f"{i:026d}", "started_at": started_at, "proxy_id": "p", "status": 200}


def test_close_writes_every_queued_row(backend: Backend) -> None:
    writer = Writer(backend)
    for i in range(10_000):
        writer.add("requests", row(i))
    writer.add("audit", audit_row("reload", "k.yaml", {"digest": "x"}, actor="test"))
    writer.close()
    assert len(rows(backend)) == 10_000 and len(rows(backend, "audit")) == 1
    assert writer.report()["rows_written"] == 10_001
    assert writer.report()["db"] == backend.shown


def test_rows_go_in_batches_of_many(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A transaction per batch (up to 1,000 rows), not per row."""
    transactions: list[int] = []
    commit = writer_module.commit

    def counted(session: Session, tables: dict[str, list[dict[str, Any]]]) -> None:
        transactions.append(sum(len(r) for r in tables.values()))
        commit(session, tables)

    monkeypatch.setattr(writer_module, "commit", counted)
    writer = Writer(backend)
    for i in range(5_000):
        writer.add("requests", row(i))
    writer.close()
    assert len(rows(backend)) == 5_000
    assert len(transactions) <= 10 and max(transactions) <= writer_module.BATCH_SIZE


def test_a_full_queue_counts_what_it_drops(backend: Backend) -> None:
    writer = Writer(backend, queue_size=10)
    for i in range(5_000):
        writer.add("requests", row(i))
    writer.close()
    written = len(rows(backend))
    assert writer.dropped > 0
    assert written + writer.dropped == 5_000
    assert writer.report()["rows_dropped"] == writer.dropped


def test_retention_prunes_old_rows(backend: Backend) -> None:
    writer = Writer(backend, retention_days=1)
    writer.add("requests", row(1, "2020-01-01T00:00:00.000Z"))
    writer.add("requests", row(2, time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())))
    writer.close()
    assert [r["id"] for r in rows(backend)] == [f"{2:026d}"]


def test_the_database_is_never_called_on_the_event_loop_thread(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every session the writer opens while the loop runs is on the writer thread."""
    threads: list[str] = []
    session = backend.session

    @contextmanager
    def traced() -> Iterator[Session]:
        threads.append(threading.current_thread().name)
        with session() as opened:
            yield opened

    monkeypatch.setattr(backend, "session", traced)
    writer = Writer(backend)

    async def produce() -> str:
        for i in range(20):
            for j in range(500):
                writer.add("requests", row(i * 500 + j))
            await asyncio.sleep(0.01)
        while writer.depth:
            await asyncio.sleep(0.01)
        return threading.current_thread().name

    loop_thread = asyncio.run(produce())
    writer.close()
    monkeypatch.undo()
    assert len(rows(backend)) == 10_000
    assert threads and set(threads) == {"keyswap-writer"}, set(threads)
    assert loop_thread != "keyswap-writer"


@pytest.mark.parametrize(
    "bad",
    [
        {**row(10), "user_agent": "bad-\udcff"},  # neither database takes a lone surrogate
        {**row(10), "status": "not a number"},  # PostgreSQL refuses it; SQLite keeps it
        row(5),  # a second row of the same id
    ],
    ids=["surrogate", "type", "duplicate"],
)
def test_a_row_that_cannot_be_written_costs_only_itself(backend: Backend, bad: Any) -> None:
    writer = Writer(backend)
    for i in range(10):
        writer.add("requests", row(i))
    writer.add("requests", bad)
    for i in range(11, 20):
        writer.add("requests", row(i))
    writer.close()
    written = {r["id"] for r in rows(backend)}
    assert {f"{i:026d}" for i in range(20) if i != 10} <= written
    kept = len(written) == 20  # only SQLite stores text in an integer column
    assert writer.report()["write_failures"] == (0 if kept else 1)
    assert writer.report()["rows_written"] == 19 + kept


def test_a_nul_character_is_kept_in_words(backend: Backend) -> None:
    writer = Writer(backend)
    writer.add("requests", {**row(1), "response_body": "a\x00b"})
    writer.close()
    body = rows(backend)[0]["response_body"]
    assert body in ("a\x00b", "a\\x00b")  # SQLite keeps it; PostgreSQL text cannot


def test_rows_wait_while_the_database_is_unavailable(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A database that is briefly away (a restart, a failover, a long lock) costs no row:
    the batch is tried again, said once in the log."""
    caplog.set_level("INFO")
    monkeypatch.setattr(writer_module, "RETRY_S", (0.01, 0.05))
    failures = [3]
    session = backend.session

    @contextmanager
    def flaky() -> Iterator[Session]:
        if failures[0]:
            failures[0] -= 1
            raise TransientError("the database is restarting")
        with session() as opened:
            yield opened

    monkeypatch.setattr(backend, "session", flaky)
    writer = Writer(backend)
    for i in range(2_000):
        writer.add("requests", row(i))
    deadline = time.monotonic() + 10
    while writer.written < 2_000 and time.monotonic() < deadline:
        time.sleep(0.02)
    writer.close()
    monkeypatch.undo()
    assert len(rows(backend)) == 2_000 and writer.report()["write_failures"] == 0
    assert caplog.text.count("the state database is unavailable") == 1
    assert "available again" in caplog.text


def test_at_shutdown_an_unavailable_database_costs_the_queue_counted(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    def gone() -> Iterator[Session]:
        raise TransientError("the database is gone")

    monkeypatch.setattr(writer_module, "RETRY_AT_SHUTDOWN_S", 0.5)
    writer = Writer(backend)
    monkeypatch.setattr(backend, "session", contextmanager(gone))
    for i in range(3_000):
        writer.add("requests", row(i))
    started = time.monotonic()
    writer.close()
    assert time.monotonic() - started < 5
    assert writer.report()["write_failures"] == 3_000 and writer.written == 0


def test_a_connection_killed_under_the_writer_costs_no_row(pg_url: str) -> None:
    """PostgreSQL: the pool's connections are terminated (as a restart would) while rows
    are written; every row arrives."""
    with open_backend(pg_url) as backend, open_backend(pg_url) as admin:
        migrations.upgrade(backend)
        writer = Writer(backend)
        for i in range(1_000):
            writer.add("requests", row(i))
        while writer.written < 1_000:
            time.sleep(0.02)
        with admin.session() as session:
            session.query(
                "select pg_terminate_backend(pid) from pg_stat_activity"
                " where datname = current_database() and pid != pg_backend_pid()"
            )
        for i in range(1_000, 2_000):
            writer.add("requests", row(i))
        writer.close()
        assert len(rows(backend)) == 2_000 and writer.report()["write_failures"] == 0
