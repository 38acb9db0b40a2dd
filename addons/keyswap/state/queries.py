"""Reading the activity log: the library under `keyswap logs`, `stats`, `curl` and
`audit`, on either backend. Every query is answered by the database from an index
(docs/activity-log.md says which); none loads more rows into Python than it returns."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

from keyswap.config.model import BasicProxyAuth, Config
from keyswap.config.secrets import MASK
from keyswap.net.urls import hostport
from keyswap.state.backends import Session

_SINCE = re.compile(r"(\d+)\s*(s|m|h|d)")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
# Not worth repeating in a curl command: curl sets them, or they describe the old hop.
_CURL_SKIP = {"host", "content-length", "connection", "accept-encoding", "transfer-encoding"}
# Columns that hold a JSON document: a reader gets the document, not its text.
JSON_COLUMNS = frozenset({"request_headers", "response_headers", "detail"})
GRANTED, DENIED, PROXY_ERROR = "proxy-access-granted", "proxy-access-denied", "proxy-error"
# The column that numbers rows in commit order: SQLite's rowid; PostgreSQL has `seq`
# (migrations, version 3), which no reader shows.
CURSOR = {"sqlite": "rowid", "postgresql": "seq"}


def since_iso(since: str) -> str:
    """`15m`, `2h`, `1d` (ago) or an ISO 8601 time, as the log's timestamp format."""
    m = _SINCE.fullmatch(since.strip())
    if m:
        moment = datetime.now(UTC) - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
    else:
        try:
            moment = datetime.fromisoformat(since.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"--since '{since}': use 15m, 2h, 1d or an ISO 8601 time") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def status_clause(status: str) -> tuple[str, list[Any]]:
    """`2xx`..`5xx` or an exact status, as SQL. A class is `status / 100` (integer
    division in both databases), the expression the status class index is built on, so
    that the database reads it newest first from there."""
    s = status.strip().lower()
    if re.fullmatch(r"[1-5]xx", s):
        return "status / 100 = ?", [int(s[0])]
    if s.isdigit():
        return "status = ?", [int(s)]
    raise ValueError(f"--status '{status}': use 2xx, 4xx, 5xx or a status such as 429")


@dataclass(frozen=True)
class LogFilter:
    """`keyswap logs`' filters as one SQL condition, every value bound. A relative
    `--since` is fixed when the filter is made, so that following the log does not
    drop a long request that started inside the window but ends after it moved."""

    condition: str = "1 = 1"
    params: tuple[Any, ...] = ()

    @classmethod
    def of(
        cls,
        proxy: str | None = None,
        status: str | None = None,
        code: str | None = None,
        since: str | None = None,
    ) -> LogFilter:
        """The filter of these options; ValueError says how to write a wrong one."""
        parts: list[tuple[str, list[Any]]] = []
        if proxy:
            parts.append(("proxy_id = ?", [proxy]))
        if status:
            clause, values = status_clause(status)
            # With a proxy, its index decides: it holds the status (and the code), so
            # the database filters there; a status index would read the table for the
            # proxy. (A unary plus keeps both SQLite and PostgreSQL off the status index.)
            parts.append(("+" + clause if proxy else clause, values))
        if code:
            parts.append(("proxy_code = ?", [code]))
        if since:
            parts.append(("started_at >= ?", [since_iso(since)]))
        if not parts:
            return cls()
        condition = " and ".join(clause for clause, _ in parts)
        return cls(condition, tuple(v for _, values in parts for v in values))


def decoded(row: dict[str, Any]) -> dict[str, Any]:
    """A row with its JSON columns as documents (a value that is not JSON stays text),
    without PostgreSQL's `seq`: a row reads the same from either backend."""
    row.pop("seq", None)
    for name in JSON_COLUMNS.intersection(row):
        value = row[name]
        if isinstance(value, str):
            with suppress(ValueError):
                row[name] = json.loads(value)
    return row


def logs(session: Session, where: LogFilter | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """The newest `limit` matching rows, oldest first."""
    where = where or LogFilter()
    # The condition is built from constants; every value is a bound parameter. The
    # order is an index's (by proxy, by status or status class, or by time), with the
    # id to order the rows of one millisecond.
    sql = (
        f"select * from requests where {where.condition}"  # noqa: S608
        " order by started_at desc, id desc limit ?"
    )
    rows = [decoded(r) for r in session.query(sql, [*where.params, limit])]
    return rows[::-1]


class Follower:
    """Follows the log as rows are written, losing and repeating none.

    The cursor is the row's number in commit order (CURSOR), not the time: the writer
    commits a flow's row when the flow ends, in batches, so rows arrive slightly out of
    `started_at` order (a long request after shorter ones that started later). Writers
    commit one at a time, each taking its row numbers under the same lock (SQLite's
    write lock; on PostgreSQL the writer's COMMIT_ORDER advisory lock, held from the
    insert to the commit), so a committed row number at or below the cursor is never
    followed by another one there. On SQLite the cursor remembers its row's id as well:
    if that row is gone or moved (every row pruned, or `VACUUM` renumbering the table),
    following resumes after that id instead. PostgreSQL's `seq` never moves."""

    BATCH = 1_000

    def __init__(self, session: Session, where: LogFilter | None = None) -> None:
        self.session = session
        self.where = where or LogFilter()
        self.cursor = CURSOR[session.dialect]
        self.position = 0  # the row number up to which every row has been seen
        self._anchor: str | None = None  # the id of the row at `position` (SQLite)

    def start(self, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` matching rows, oldest first; later rows come from `poll`."""
        with self.session.snapshot():
            self._to_end()
            return logs(self.session, self.where, limit)

    def poll(self) -> Iterator[list[dict[str, Any]]]:
        """Matching rows written since the last call, in the order they were written,
        in batches (a batch may be empty)."""
        self._find_anchor()
        end, end_id = self._end()
        # SQLite: by rowid, never by an index the filter might suggest.
        source = "requests not indexed" if self.session.dialect == "sqlite" else "requests"
        sql = (
            f"select {self.cursor} as cursor_, * from {source}"  # noqa: S608 (constants)
            f" where {self.cursor} > ? and {self.cursor} <= ? and ({self.where.condition})"
            f" order by {self.cursor} limit ?"
        )
        while True:
            found = self.session.query(sql, [self.position, end, *self.where.params, self.BATCH])
            if len(found) < self.BATCH:
                self.position, self._anchor = end, end_id
            else:
                self.position, self._anchor = found[-1]["cursor_"], found[-1]["id"]
            yield [decoded({k: v for k, v in r.items() if k != "cursor_"}) for r in found]
            if len(found) < self.BATCH:
                return

    def _end(self) -> tuple[int, str | None]:
        c = self.cursor
        last = self.session.query(
            f"select {c} as cursor_, id from requests"  # noqa: S608 (constants)
            f" where {c} = (select max({c}) from requests)"
        )
        return (last[0]["cursor_"], last[0]["id"]) if last else (0, None)

    def _to_end(self) -> None:
        self.position, self._anchor = self._end()

    def _find_anchor(self) -> None:
        if self._anchor is None or self.session.dialect != "sqlite":
            return
        at = self.session.query("select id from requests where rowid = ?", [self.position])
        if at and at[0]["id"] == self._anchor:
            return
        moved = self.session.query("select rowid from requests where id = ?", [self._anchor])
        # Moved (VACUUM): resume after it. Gone (pruned with every row before it):
        # whatever remains was written after it.
        self.position = moved[0]["rowid"] if moved else 0


# A latency in whole microseconds, rounded to 3 significant digits (at least 1 µs, at
# most 1 s): the percentiles are taken over these values. Rounding never reorders two
# latencies, so the result is the exact nearest-rank percentile, rounded the same way.
# Below each bound (ms): the value to round to a whole number, and that number's unit
# (µs); above the last, to the second.
_ROUNDING = (
    (1, "duration_ms * 1000", 1),
    (10, "duration_ms * 100", 10),
    (100, "duration_ms * 10", 100),
    (1000, "duration_ms", 1000),
    (10000, "duration_ms / 10", 10000),
    (100000, "duration_ms / 100", 100000),
)
# The integer part of a positive double: SQLite's cast truncates, PostgreSQL's rounds
# (so it truncates first). Both compute the same doubles, so the same figures.
_WHOLE = {"sqlite": "cast({} as integer)", "postgresql": "cast(trunc({}) as bigint)"}
PERCENTILES = (50, 95, 99)

# The distinct proxy ids, one index seek each (the index starts with proxy_id).
PROXY_IDS = """
with recursive ids(proxy_id) as (
  select min(proxy_id) from requests
  union all
  select (select min(proxy_id) from requests where proxy_id > ids.proxy_id)
  from ids where ids.proxy_id is not null
)
select proxy_id from ids where proxy_id is not null
"""


@cache
def _stats_sql(dialect: str, of_a_proxy: bool) -> tuple[str, str]:
    """`keyswap stats`' two statements for one proxy (or for the rows of none) since a
    time, in this dialect: volume, and latency percentiles."""
    whole = _WHOLE[dialect]
    steps = " ".join(
        f"when duration_ms < {bound} then {whole.format(value + ' + 0.5')} * {unit}"
        for bound, value, unit in _ROUNDING
    )
    latency_us = f"case {steps} else {whole.format('duration_ms / 1000 + 0.5')} * 1000000 end"
    # `proxy_id = ?`, never `proxy_id is ?`, which PostgreSQL cannot answer from an index
    rows = f"{'proxy_id = ?' if of_a_proxy else 'proxy_id is null'} and started_at >= ?"
    # From the per-proxy index alone (it holds every column read here). Sums are cast:
    # PostgreSQL sums integers as numeric.
    volume = f"""
select count(*) as requests,
  count(*) filter (where proxy_code = '{GRANTED}' and status < 400) as ok,
  count(*) filter (where proxy_code = '{PROXY_ERROR}' or status >= 500) as errors,
  count(*) filter (where proxy_code = '{DENIED}') as denied,
  cast(coalesce(sum(bytes_in), 0) as bigint) as bytes_in,
  cast(coalesce(sum(bytes_out), 0) as bigint) as bytes_out
from requests where {rows}"""  # noqa: S608 (constants only)
    # Nearest rank: the smallest latency with at least p% of the forwarded requests at
    # or below it. The database sorts the distinct rounded latencies (a few thousand at
    # most), not the rows.
    percentiles = ", ".join(
        f"cast(min(us) filter (where below * 100 >= total * {p}) as double precision) / 1000"
        f" as p{p}_ms"
        for p in PERCENTILES
    )
    latency = f"""
with timed as (
  select {latency_us} as us, count(*) as n from requests
  where {rows} and proxy_code = '{GRANTED}' and duration_ms is not null
  group by us
), ranked as (
  select us, sum(n) over (order by us) as below, sum(n) over () as total from timed
)
select {percentiles} from ranked"""  # noqa: S608 (constants only)
    return volume, latency


def proxy_ids(session: Session) -> list[str | None]:
    """The proxies the log has rows of; None for rows of no proxy (first, if any)."""
    ids: list[str | None] = [r["proxy_id"] for r in session.query(PROXY_IDS)]
    if session.query("select 1 as found from requests where proxy_id is null limit 1"):
        ids.insert(0, None)
    return ids


def stats(session: Session, since: str | None = None) -> list[dict[str, Any]]:
    """Per proxy (None: rows of no proxy): volume, success / error / denied, latency
    percentiles over forwarded requests (nearest rank, to 3 significant digits), bytes;
    computed by the database, the same figures from either backend."""
    # "" sorts before every timestamp: no --since is the same query.
    start = since_iso(since) if since else ""
    out = []
    with session.snapshot():
        for proxy in proxy_ids(session):
            volume_sql, latency_sql = _stats_sql(session.dialect, proxy is not None)
            params = [start] if proxy is None else [proxy, start]
            (volume,) = session.query(volume_sql, params)
            n = volume["requests"]
            if not n:
                continue
            (latency,) = session.query(latency_sql, params)
            out.append(
                {
                    "proxy": proxy,
                    "requests": n,
                    "success_rate": round(volume["ok"] / n, 4),
                    "error_rate": round(volume["errors"] / n, 4),
                    "denied": volume["denied"],
                    **{f"p{p}_ms": latency[f"p{p}_ms"] for p in PERCENTILES},
                    "bytes_in": volume["bytes_in"],
                    "bytes_out": volume["bytes_out"],
                }
            )
    return out


def request(session: Session, request_id: str) -> dict[str, Any] | None:
    """One row by id, its JSON columns as documents."""
    found = session.query("select * from requests where id = ?", [request_id])
    return decoded(found[0]) if found else None


def curl_argv(row: dict[str, Any], config: Config | None) -> list[str]:
    """The request as the target saw it, as curl's arguments; every secret is masked."""
    if not row.get("target_url"):
        raise ValueError(f"request {row['id']} was not forwarded ({row['proxy_code']})")
    argv = ["curl", "-X", row["method"], row["target_url"]]
    headers = row.get("request_headers") or {}
    if isinstance(headers, str):
        headers = json.loads(headers)
    for name, value in headers.items():
        if name not in _CURL_SKIP:
            argv += ["-H", f"{name}: {value}"]
    upstream = row.get("upstream_proxy")
    if upstream:
        proxy = config.upstream_proxies.get(upstream) if config else None
        if proxy is None:
            argv += ["--proxy", f"<upstream proxy {upstream}>"]
        else:
            argv += ["--proxy", f"{proxy.type}://{hostport(proxy.host, proxy.port)}"]
            if isinstance(proxy.auth, BasicProxyAuth):
                argv += ["--proxy-user", f"{proxy.auth.user}:{MASK}"]
    return argv


def curl_command(row: dict[str, Any], config: Config | None) -> str:
    """`curl_argv` as one shell command line."""
    return " ".join(shlex.quote(p) for p in curl_argv(row, config))


def audit(
    session: Session, since: str | None = None, resource: str | None = None
) -> list[dict[str, Any]]:
    """Audit entries, oldest first, `detail` as a document."""
    parts: list[tuple[str, Any]] = []
    if since:
        parts.append(("at >= ?", since_iso(since)))
    if resource:
        parts.append(("resource = ?", resource))
    where = " and ".join(clause for clause, _ in parts) or "1 = 1"
    sql = f"select * from audit where {where} order by id"  # noqa: S608
    return [decoded(r) for r in session.query(sql, [v for _, v in parts])]
