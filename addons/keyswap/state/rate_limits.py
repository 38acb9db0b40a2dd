"""Rate limits shared by every gateway process and node on one state database: each
proxy's `rate_limit` is one `rate_limits` row, updated by one statement per request.

The algorithm is GCRA (the generic cell rate algorithm), which is the token bucket of
`count` requests per `per_s` seconds, bursts up to `count`, kept as a single number: the
row's `tat`, the theoretical arrival time of the next request. A request may pass when
`max(tat, now) + interval - per_s <= now`; passing moves `tat` on by `interval`
(`per_s / count`). Since `interval <= per_s`, that is `tat <= now + per_s - interval`.
The test and the move are one `INSERT ... ON CONFLICT DO UPDATE ... WHERE`, which
changes a row exactly when the request passes (a missing row is a full burst). It is
atomic in both databases (SQLite: the write lock; PostgreSQL: the row lock, the
condition re-read on the row's newest version), so no two processes can both take the
last place.

`now` is the database's clock, read by the statement itself once it holds the lock:
one clock for every node (PostgreSQL: clock_timestamp(), not the nodes' clocks, which
may disagree), and never a time taken before a wait for the lock."""

from __future__ import annotations

import time
from dataclasses import dataclass

from keyswap.config.model import parse_rate_limit
from keyswap.state.backends import Session
from keyswap.state.store import iso

TABLE = "rate_limits"

# Unix seconds now, by the database's clock. SQLite's 'now' is fixed for one statement
# (milliseconds); PostgreSQL's clock_timestamp() is read at each use, which is once in
# the condition and once in the move, both after the row is locked.
NOW = {
    "sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
    "postgresql": "cast(extract(epoch from clock_timestamp()) as double precision)",
}
GREATEST = {"sqlite": "max", "postgresql": "greatest"}

# Unix seconds as doubles are ~0.2 us apart today, and `tat` is a sum of intervals: a
# request may pass this early (at most a hundredth of an interval), so that rounding
# never refuses the last of `count` requests that arrive at one instant.
SLACK_S = 1e-4


@dataclass(frozen=True)
class Rate:
    """`count` requests per `per_s` seconds, bursts up to `count`."""

    count: int
    per_s: int

    @classmethod
    def parse(cls, text: str) -> Rate:
        return cls(*parse_rate_limit(text))

    @property
    def interval(self) -> float:
        """Seconds between requests at the steady rate (GCRA's emission interval)."""
        return self.per_s / self.count

    def key(self, proxy_id: str) -> str:
        """The proxy's row: a changed rate is a new row, so an edited limit starts
        afresh (and every process agrees on the row while they serve the same rate)."""
        return f"{proxy_id}|{self.count}/{self.per_s}s"


def _step_sql(dialect: str, now: str) -> str:
    greatest = GREATEST[dialect]
    return (
        f"insert into {TABLE} (key, tat, updated_at) values (?, {now} + ?, ?)"  # noqa: S608
        f" on conflict (key) do update set tat = {greatest}({TABLE}.tat, {now}) + ?,"
        f" updated_at = excluded.updated_at where {TABLE}.tat <= {now} + ?"
    )


_STEP = {dialect: _step_sql(dialect, now) for dialect, now in NOW.items()}
_STEP_AT = {dialect: _step_sql(dialect, "?") for dialect in NOW}


def take(session: Session, key: str, rate: Rate, now: float | None = None) -> float:
    """Take a place for one request in the row `key`: 0.0 when it may pass, else the
    seconds until one could (the row is then unchanged). One statement, committed on its
    own; a refusal reads the row once more for the wait. `now` replaces the database's
    clock (for tests)."""
    if rate.count == 0:
        return float(rate.per_s)  # `0/s` lets nothing through; ask again next window
    interval = rate.interval
    slack = min(SLACK_S, interval / 100)
    reach = rate.per_s - interval + slack  # how far ahead of now `tat` may be
    stamp = iso(time.time())
    if now is None:
        changed = session.execute(_STEP[session.dialect], [key, interval, stamp, interval, reach])
    else:
        params = [key, now, interval, stamp, now, interval, now, reach]
        changed = session.execute(_STEP_AT[session.dialect], params)
    if changed:  # inserted, or updated: the place is taken
        return 0.0
    clock = "?" if now is not None else NOW[session.dialect]
    rows = session.query(
        f"select tat - {clock} as ahead from {TABLE} where key = ?",  # noqa: S608
        [now, key] if now is not None else [key],
    )
    ahead = float(rows[0]["ahead"]) if rows else 0.0
    return max(ahead - reach, slack)


def prune(session: Session, idle_s: float) -> int:
    """Delete rows idle for `idle_s` seconds; the number deleted. A row whose `tat` is
    past behaves as no row at all (a full burst), so this changes no limit: it only
    drops the rows of rates and proxies no longer configured."""
    now = NOW[session.dialect]
    return session.execute(f"delete from {TABLE} where tat < {now} - ?", [idle_s])  # noqa: S608
