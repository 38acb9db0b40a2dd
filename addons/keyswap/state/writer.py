"""The activity log's writer: one thread, a bounded queue, a transaction per batch.

The event loop only appends to a deque (no lock: a `queue.Queue` costs the loop a lock
and a notify per row); the database is written on this thread (not the default
executor, which mitmproxy uses for DNS), through the state backend. When the queue is
full a row is dropped and counted, never silently; `close()` writes everything still
queued. While the database is unavailable (a PostgreSQL restart or failover, an SQLite
file locked too long) rows wait in the queue and the batch is tried again, with a
growing pause, until it is written or the writer closes."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from datetime import UTC, datetime, timedelta
from typing import Any

from keyswap.state.backends import Backend, Session, TransientError

logger = logging.getLogger(__name__)

QUEUE_SIZE = 50_000
Row = dict[str, Any]
BATCH_SIZE = 1_000
# After the first row of a batch, wait this long for more. Each transaction costs the
# event loop about two dozen GIL hand-overs (futex calls) and rewrites the same index
# pages, whatever its size: at 400 requests/s a quarter second makes it ~100 rows, and
# a row is in the log within that quarter second.
LINGER_S = 0.25
PRUNE_EVERY_S = 3600.0
# While the database is unavailable: the first pause before trying a batch again, and the
# longest (it doubles in between); at shutdown, how long to keep trying.
RETRY_S = (0.25, 5.0)
RETRY_AT_SHUTDOWN_S = 5.0
# Held (`Session.lock`) by every writer of `requests` from its insert to its commit, so
# that writers commit one at a time in the order they take row numbers: on PostgreSQL a
# row's `seq`, which `keyswap logs --follow` follows, is then its commit order, as
# SQLite's rowid is (SQLite has one writer at a time anyway).
COMMIT_ORDER = "keyswap.requests.commit-order"


class Writer:
    """Writes `requests` and `audit` rows to the state database on its own thread. The
    backend's schema must be current (keyswap.state.migrations.upgrade)."""

    def __init__(
        self, backend: Backend, retention_days: int = 0, queue_size: int = QUEUE_SIZE
    ) -> None:
        self.backend = backend
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
        self._retry_in = 0.0  # > 0 while the database is unavailable
        self._give_up_at = float("inf")  # set by close()
        self._gone: TransientError | None = None  # still unavailable then
        self._thread = threading.Thread(target=self._run, name="keyswap-writer", daemon=True)
        self._thread.start()

    def add(self, table: str, row: Row, done: asyncio.Future[None] | None = None) -> None:
        """Queue a row; never blocks. `done` resolves once the row is committed."""
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
        self._give_up_at = time.monotonic() + RETRY_AT_SHUTDOWN_S
        self._closing.set()
        self._wake.set()
        self._thread.join(timeout)

    def report(self) -> dict[str, Any]:
        return {
            "db": self.backend.shown,
            "queue_depth": self.depth,
            "rows_written": self.written,
            "rows_dropped": self.dropped,
            "write_failures": self.failed,
        }

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()  # a row added from now on sets it again
            # Let rows gather: one transaction for many (close() cuts the wait short).
            self._closing.wait(LINGER_S)
            while self._rows:
                batch = [self._rows.popleft() for _ in range(min(BATCH_SIZE, len(self._rows)))]
                if not self._write(batch):
                    # Unavailable: the batch goes back to the front, in order, and waits.
                    self._rows.extendleft(reversed(batch))
                    self._wake.set()
                    if self._closing.is_set():
                        time.sleep(self._retry_in)
                    else:
                        self._closing.wait(self._retry_in)  # close() cuts it short
                    break
            self._prune()
            if self._closing.is_set() and not self._rows:
                break

    def _write(self, batch: list[tuple[str, Row, Any]]) -> bool:
        """Write a batch (a bad row costs only itself); False, and nothing written, when
        the database is unavailable and the writer is not closing."""
        errors: dict[int, Exception] = {}
        made = [(i, table, row) for i, (table, row, _) in enumerate(batch)]
        tables: dict[str, list[dict[str, Any]]] = {}
        for _, table, row in made:
            tables.setdefault(table, []).append(row)
        try:
            if self._gone is not None:
                raise self._gone
            with self.backend.session() as session:
                commit(session, tables)
        except TransientError as e:
            if self._gone is None and time.monotonic() < self._give_up_at:
                self._unavailable(e)
                return False
            # Still unavailable at shutdown: what is queued is lost, said and counted.
            if self._gone is None:
                logger.error("keyswap: the state database is unavailable at shutdown: %s", e)
            self._gone = e
            errors.update((i, e) for i, _, _ in made)
        except Exception:
            # One bad row must not cost the others theirs: write them one by one.
            logger.exception(
                "keyswap: a batch of %d rows failed; writing them one by one", len(made)
            )
            self._one_by_one(made, errors)
        if self._retry_in:
            logger.info("keyswap: the state database is available again")
            self._retry_in = 0.0
        self.failed += len(errors)
        self.written += len(batch) - len(errors)
        for i, (_, _, done) in enumerate(batch):
            if done is not None:
                done.get_loop().call_soon_threadsafe(_resolve, done, errors.get(i))
        return True

    def _one_by_one(
        self, made: list[tuple[int, str, dict[str, Any]]], errors: dict[int, Exception]
    ) -> None:
        left = list(made)
        try:
            # A session of its own: the batch may have failed with its connection.
            with self.backend.session() as session:
                while left:
                    i, table, row = left[0]
                    try:
                        commit(session, {table: [row]})
                    except TransientError:
                        raise
                    except Exception as e:
                        errors[i] = e
                        logger.error(
                            "keyswap: could not write a %s row (id %s): %s",
                            table,
                            row.get("id"),
                            type(e).__name__,
                        )
                    left.pop(0)
        except TransientError as e:  # the database went away meanwhile
            errors.update((i, e) for i, _, _ in left)
            logger.error("keyswap: %d activity log rows lost: %s", len(left), e)

    def _unavailable(self, error: TransientError) -> None:
        if not self._retry_in:  # said once per outage, not every try
            logger.warning("keyswap: the state database is unavailable; rows wait: %s", error)
        first, longest = RETRY_S
        self._retry_in = min(longest, self._retry_in * 2) if self._retry_in else first

    def _prune(self) -> None:
        if not self.retention_days or time.monotonic() < self._next_prune:
            return
        self._next_prune = time.monotonic() + PRUNE_EVERY_S
        cutoff = datetime.now(UTC) - timedelta(days=self.retention_days)
        stamp = cutoff.strftime("%Y-%m-%dT%H:%M:%S.000Z")
        try:
            with self.backend.session() as session:
                session.execute("delete from requests where started_at < ?", [stamp])
        except Exception:
            logger.exception("keyswap: pruning the activity log failed")


def commit(session: Session, tables: dict[str, list[dict[str, Any]]]) -> None:
    """Rows of each table, in one transaction, in multi-row INSERT statements
    (`Session.insert`); `requests` rows in commit order (COMMIT_ORDER)."""
    with session.transaction():
        if "requests" in tables:
            session.lock(COMMIT_ORDER)
        for table, rows in tables.items():
            session.insert(table, rows)


def _resolve(done: asyncio.Future[None], error: Exception | None) -> None:
    if done.done():
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)
