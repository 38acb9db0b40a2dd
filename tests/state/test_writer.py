import asyncio
import threading
import time
from pathlib import Path

import pytest
from sqlite_utils import Database

from keyswap.state import store
from keyswap.state import writer as writer_module
from keyswap.state.store import audit_row
from keyswap.state.writer import Writer


def rows(path: Path, table: str = "requests") -> list[dict[str, object]]:
    db = Database(path)
    try:
        return list(db[table].rows)
    finally:
        db.close()


def row(i: int, started_at: str = "2026-11-21T10:00:00.000Z") -> dict[str, object]:
    return {"id": f"{i:026d}", "started_at": started_at, "proxy_id": "p", "status": 200}


def test_close_writes_every_queued_row(tmp_path: Path) -> None:
    writer = Writer(tmp_path / "k.db")
    for i in range(10_000):
        writer.add("requests", row(i))
    writer.add("audit", audit_row("reload", "k.yaml", {"digest": "x"}, actor="test"))
    writer.close()
    assert len(rows(tmp_path / "k.db")) == 10_000 and len(rows(tmp_path / "k.db", "audit")) == 1
    assert writer.report()["rows_written"] == 10_001


def test_a_full_queue_counts_what_it_drops(tmp_path: Path) -> None:
    writer = Writer(tmp_path / "k.db", queue_size=10)
    writer._thread.join(0)  # the thread is running; flood faster than it drains
    for i in range(5_000):
        writer.add("requests", row(i))
    writer.close()
    written = len(rows(tmp_path / "k.db"))
    assert writer.dropped > 0
    assert written + writer.dropped == 5_000
    assert writer.report()["rows_dropped"] == writer.dropped


def test_retention_prunes_old_rows(tmp_path: Path) -> None:
    writer = Writer(tmp_path / "k.db", retention_days=1)
    writer.add("requests", row(1, "2020-01-01T00:00:00.000Z"))
    writer.add("requests", row(2, time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())))
    writer.close()
    ids = [r["id"] for r in rows(tmp_path / "k.db")]
    assert ids == [f"{2:026d}"]


def test_sqlite_never_runs_on_the_event_loop_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every statement SQLite executes while the loop runs comes from the writer thread."""
    threads: list[str] = []

    def traced(path: Path) -> Database:
        db = store.open_db(path)
        db.conn.set_trace_callback(lambda _: threads.append(threading.current_thread().name))
        return db

    monkeypatch.setattr(writer_module, "open_db", traced)
    writer = Writer(tmp_path / "k.db")
    threads.clear()  # the schema is created on the caller's thread, before any loop runs

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
    assert len(rows(tmp_path / "k.db")) == 10_000
    assert threads and set(threads) == {"keyswap-writer"}, set(threads)
    assert loop_thread != "keyswap-writer"


def test_a_row_that_cannot_be_written_costs_only_itself(tmp_path: Path) -> None:
    writer = Writer(tmp_path / "k.db")
    for i in range(10):
        writer.add("requests", row(i))
    writer.add("requests", {**row(10), "user_agent": "bad-\udcff"})  # SQLite refuses it
    for i in range(11, 20):
        writer.add("requests", row(i))
    writer.close()
    assert len(rows(tmp_path / "k.db")) == 19
    assert writer.report()["write_failures"] == 1 and writer.report()["rows_written"] == 19
