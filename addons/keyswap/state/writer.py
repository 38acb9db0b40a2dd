"""The activity log's writer: one thread, a bounded queue, a transaction per batch.

The event loop only appends to a deque (no lock: a `queue.Queue` costs the loop a lock
and a notify per row); SQLite runs on this thread (not the default executor, which
mitmproxy uses for DNS). When the queue is full a row is dropped and counted, never
silently; `close()` writes everything still queued."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from keyswap.state.store import open_db

logger = logging.getLogger(__name__)

QUEUE_SIZE = 50_000
# A row, or what makes it: the recorder hands over a flow's captured values and the row
# is made here, off the event loop, a batch at a time.
Row = dict[str, Any] | Callable[[], dict[str, Any]]
# Tables keyed by name whose rows replace the previous one (state, not history).
REPLACING = frozenset({"gateways"})
BATCH_SIZE = 1_000
# After the first row of a batch, wait this long for more. Each transaction costs the
# event loop about two dozen GIL hand-overs (futex calls) and rewrites the same index
# pages, whatever its size: at 400 requests/s a quarter second makes it ~100 rows, and
# a row is in the log within that quarter second.
LINGER_S = 0.25
PRUNE_EVERY_S = 3600.0


class Writer:
    """Writes `requests` and `audit` rows to the state database on its own thread."""

    def __init__(self, path: Path, retention_days: int = 0, queue_size: int = QUEUE_SIZE) -> None:
        self.path = path
        self.retention_days = retention_days
        self.queue_size = queue_size
        self._rows: deque[tuple[str, Row, asyncio.Future[None] | None]] = deque()
        self._wake = threading.Event()  # set when rows wait and the thread may be asleep
        self._closing = threading.Event()
        self.written = 0
        self.dropped = 0
        self.failed = 0
        self._last_drop_log = 0.0
        self._next_prune = 0.0
        self._thread = threading.Thread(target=self._run, name="keyswap-writer", daemon=True)
        open_db(path).close()  # create the schema now: errors surface at start
        self._thread.start()

    def add(self, table: str, row: Row, done: asyncio.Future[None] | None = None) -> None:
        """Queue a row (or a function that makes it); never blocks. `done` resolves once
        the row is committed."""
        if len(self._rows) < self.queue_size:
            self._rows.append((table, row, done))
            if not self._wake.is_set():
                self._wake.set()
            return
        self.dropped += 1
        if done is not None:
            done.set_exception(RuntimeError("activity log queue full"))
        now = time.monotonic()
        if now - self._last_drop_log > 10:
            self._last_drop_log = now
            logger.warning("keyswap: activity log queue full, %d rows dropped so far", self.dropped)

    @property
    def depth(self) -> int:
        return len(self._rows)

    def close(self, timeout: float = 30.0) -> None:
        """Write every queued row, then stop the thread."""
        self._closing.set()
        self._wake.set()
        self._thread.join(timeout)

    def report(self) -> dict[str, Any]:
        return {
            "db": str(self.path),
            "queue_depth": self.depth,
            "rows_written": self.written,
            "rows_dropped": self.dropped,
            "write_failures": self.failed,
        }

    def _run(self) -> None:
        db = open_db(self.path)
        while True:
            self._wake.wait()
            self._wake.clear()  # a row added from now on sets it again
            # Let rows gather: one transaction for many (close() cuts the wait short).
            self._closing.wait(LINGER_S)
            while self._rows:
                batch = [self._rows.popleft() for _ in range(min(BATCH_SIZE, len(self._rows)))]
                self._write(db, batch)
            self._prune(db)
            if self._closing.is_set() and not self._rows:
                break
        db.close()

    def _write(self, db: Any, batch: list[tuple[str, Row, Any]]) -> None:
        errors: dict[int, Exception] = {}
        made: list[tuple[int, str, dict[str, Any]]] = []
        for i, (table, row, _) in enumerate(batch):
            try:
                made.append((i, table, row() if callable(row) else row))
            except Exception as e:
                errors[i] = e
                logger.exception("keyswap: could not make a %s row", table)
        tables: dict[str, list[dict[str, Any]]] = {}
        for _, table, row in made:
            tables.setdefault(table, []).append(row)
        try:
            with db.atomic():
                for table, rows in tables.items():
                    insert(db, table, rows)
        except Exception:
            # One bad row must not cost the others theirs: write them one by one.
            logger.exception(
                "keyswap: a batch of %d rows failed; writing them one by one", len(made)
            )
            for i, table, row in made:
                try:
                    with db.atomic():
                        insert(db, table, [row])
                except Exception as e:
                    errors[i] = e
                    logger.error(
                        "keyswap: could not write a %s row (id %s): %s",
                        table,
                        row.get("id"),
                        type(e).__name__,
                    )
        self.failed += len(errors)
        self.written += len(batch) - len(errors)
        for i, (_, _, done) in enumerate(batch):
            if done is not None:
                done.get_loop().call_soon_threadsafe(_resolve, done, errors.get(i))

    def _prune(self, db: Any) -> None:
        if not self.retention_days or time.monotonic() < self._next_prune:
            return
        self._next_prune = time.monotonic() + PRUNE_EVERY_S
        cutoff = datetime.now(UTC) - timedelta(days=self.retention_days)
        stamp = cutoff.strftime("%Y-%m-%dT%H:%M:%S.000Z")
        try:
            with db.atomic():
                db.execute("DELETE FROM requests WHERE started_at < ?", [stamp])
        except Exception:
            logger.exception("keyswap: pruning the activity log failed")


# Rows per INSERT statement: 32 rows of the widest table stay under SQLite's oldest
# limit of 999 bound parameters.
ROWS_PER_STATEMENT = 32


def insert(db: Any, table: str, rows: list[dict[str, Any]]) -> None:
    """Multi-row INSERT statements, 32 rows each. Python's sqlite3 releases the GIL
    around every statement step, and `executemany` steps once per row: under load each
    re-acquire waits for the busy event loop to hand the GIL back, a context switch
    pair per row. One step per 32 rows makes that one pair per 32 rows."""
    columns = sorted({c for row in rows for c in row})
    verb = "insert or replace" if table in REPLACING else "insert"
    names = ", ".join(f'"{c}"' for c in columns)
    marks = f"({', '.join('?' * len(columns))})"
    for start in range(0, len(rows), ROWS_PER_STATEMENT):
        chunk = rows[start : start + ROWS_PER_STATEMENT]
        values = ", ".join([marks] * len(chunk))
        sql = f'{verb} into "{table}" ({names}) values {values}'  # table and columns are ours
        db.conn.execute(sql, [row.get(c) for row in chunk for c in columns])


def _resolve(done: asyncio.Future[None], error: Exception | None) -> None:
    if done.done():
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)
