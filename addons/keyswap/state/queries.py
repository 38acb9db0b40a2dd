"""Reading the activity log: the library under `keyswap logs`, `stats`, `curl` and
`audit`. Every query is answered by SQLite from an index (docs/activity-log.md says
which); none loads more rows into Python than it returns."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlite_utils import Database

from keyswap.config.model import BasicProxyAuth, Config
from keyswap.config.secrets import MASK
from keyswap.net.urls import hostport

_SINCE = re.compile(r"(\d+)\s*(s|m|h|d)")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
# Not worth repeating in a curl command: curl sets them, or they describe the old hop.
_CURL_SKIP = {"host", "content-length", "connection", "accept-encoding", "transfer-encoding"}
# Columns that hold a JSON document: a reader gets the document, not its text.
JSON_COLUMNS = frozenset({"request_headers", "response_headers", "detail"})
GRANTED, DENIED, PROXY_ERROR = "proxy-access-granted", "proxy-access-denied", "proxy-error"


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
    """`2xx`..`5xx` or an exact status, as SQL. A class is `status / 100`, the expression
    the status class index is built on, so that SQLite reads it newest first from there."""
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
            # SQLite filters there; a status index would read the table for the proxy.
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
    """A row with its JSON columns as documents (a value that is not JSON stays text)."""
    for name in JSON_COLUMNS.intersection(row):
        value = row[name]
        if isinstance(value, str):
            with suppress(ValueError):
                row[name] = json.loads(value)
    return row


def logs(db: Database, where: LogFilter | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """The newest `limit` matching rows, oldest first."""
    where = where or LogFilter()
    # The condition is built from constants; every value is a bound parameter. The
    # order is an index's (by proxy, by status or status class, or by time), with the
    # id to order the rows of one millisecond.
    sql = (
        f"select * from requests where {where.condition}"  # noqa: S608
        " order by started_at desc, id desc limit ?"
    )
    rows = [decoded(dict(r)) for r in db.query(sql, [*where.params, limit])]
    return rows[::-1]


@contextmanager
def read_snapshot(db: Database) -> Iterator[Database]:
    """One read transaction: its queries see the same committed state of the log."""
    db.execute("BEGIN")
    try:
        yield db
    finally:
        db.execute("COMMIT")


class Follower:
    """Follows the log as rows are written, losing and repeating none.

    The cursor is SQLite's rowid, not the time: the writer commits a flow's row when the
    flow ends, in batches, so rows arrive slightly out of `started_at` order (a long
    request after shorter ones that started later). One writer commits at a time, and
    each new row takes the next rowid, so a committed rowid at or below the cursor is
    never followed by another one there. The cursor remembers its row's id as well:
    if that row is gone or moved (every row pruned, or `VACUUM` renumbering the table),
    following resumes after that id instead."""

    BATCH = 1_000

    def __init__(self, db: Database, where: LogFilter | None = None) -> None:
        self.db = db
        self.where = where or LogFilter()
        self.position = 0  # the rowid up to which every row has been seen
        self._anchor: str | None = None  # the id of the row at `position`

    def start(self, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` matching rows, oldest first; later rows come from `poll`."""
        with read_snapshot(self.db):
            self._to_end()
            return logs(self.db, self.where, limit)

    def poll(self) -> Iterator[list[dict[str, Any]]]:
        """Matching rows written since the last call, in the order they were written,
        in batches (a batch may be empty)."""
        self._find_anchor()
        end, end_id = self._end()
        while True:
            sql = (
                "select rowid as rowid_, * from requests not indexed"  # noqa: S608
                f" where rowid > ? and rowid <= ? and ({self.where.condition})"
                " order by rowid limit ?"
            )
            found = list(self.db.query(sql, [self.position, end, *self.where.params, self.BATCH]))
            if len(found) < self.BATCH:
                self.position, self._anchor = end, end_id
            else:
                self.position, self._anchor = found[-1]["rowid_"], found[-1]["id"]
            yield [decoded({k: v for k, v in r.items() if k != "rowid_"}) for r in found]
            if len(found) < self.BATCH:
                return

    def _end(self) -> tuple[int, str | None]:
        last = list(
            self.db.query(
                "select rowid, id from requests where rowid = (select max(rowid) from requests)"
            )
        )
        return (last[0]["rowid"], last[0]["id"]) if last else (0, None)

    def _to_end(self) -> None:
        self.position, self._anchor = self._end()

    def _find_anchor(self) -> None:
        if self._anchor is None:
            return
        at = list(self.db.query("select id from requests where rowid = ?", [self.position]))
        if at and at[0]["id"] == self._anchor:
            return
        moved = list(self.db.query("select rowid from requests where id = ?", [self._anchor]))
        # Moved (VACUUM): resume after it. Gone (pruned with every row before it):
        # whatever remains was written after it.
        self.position = moved[0]["rowid"] if moved else 0


# A latency in whole microseconds, rounded to 3 significant digits (at least 1 µs, at
# most 1 s): the percentiles are taken over these values. Rounding never reorders two
# latencies, so the result is the exact nearest-rank percentile, rounded the same way.
_LATENCY_US = """case
  when duration_ms < 1 then cast(duration_ms * 1000 + 0.5 as integer)
  when duration_ms < 10 then cast(duration_ms * 100 + 0.5 as integer) * 10
  when duration_ms < 100 then cast(duration_ms * 10 + 0.5 as integer) * 100
  when duration_ms < 1000 then cast(duration_ms + 0.5 as integer) * 1000
  when duration_ms < 10000 then cast(duration_ms / 10 + 0.5 as integer) * 10000
  when duration_ms < 100000 then cast(duration_ms / 100 + 0.5 as integer) * 100000
  else cast(duration_ms / 1000 + 0.5 as integer) * 1000000 end"""
PERCENTILES = (50, 95, 99)
_PERCENTILE_COLUMNS = ", ".join(
    f"min(us) filter (where below * 100 >= total * {p}) / 1000.0 as p{p}_ms" for p in PERCENTILES
)

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
# Per proxy, from the per-proxy index alone (it holds every column read here).
_VOLUME = f"""
select count(*) as requests,
  coalesce(sum(proxy_code = '{GRANTED}' and status < 400), 0) as ok,
  coalesce(sum(proxy_code = '{PROXY_ERROR}' or status >= 500), 0) as errors,
  coalesce(sum(proxy_code = '{DENIED}'), 0) as denied,
  coalesce(sum(bytes_in), 0) as bytes_in,
  coalesce(sum(bytes_out), 0) as bytes_out
from requests where proxy_id is :proxy and started_at >= :since
"""  # noqa: S608 (constants only)
# Nearest rank: the smallest latency with at least p% of the forwarded requests at or
# below it. SQLite sorts the distinct rounded latencies (a few thousand at most), not
# the rows.
_LATENCY = f"""
with timed as (
  select {_LATENCY_US} as us, count(*) as n from requests
  where proxy_id is :proxy and started_at >= :since
    and proxy_code = '{GRANTED}' and duration_ms is not null
  group by us
), ranked as (
  select us, sum(n) over (order by us) as below, sum(n) over () as total from timed
)
select {_PERCENTILE_COLUMNS} from ranked
"""  # noqa: S608 (constants only)


def proxy_ids(db: Database) -> list[str | None]:
    """The proxies the log has rows of; None for rows of no proxy (first, if any)."""
    ids: list[str | None] = [r["proxy_id"] for r in db.query(PROXY_IDS)]
    if list(db.query("select 1 from requests where proxy_id is null limit 1")):
        ids.insert(0, None)
    return ids


def stats(db: Database, since: str | None = None) -> list[dict[str, Any]]:
    """Per proxy (None: rows of no proxy): volume, success / error / denied, latency
    percentiles over forwarded requests (nearest rank, to 3 significant digits), bytes;
    computed by SQLite."""
    # "" sorts before every timestamp: no --since is the same query.
    params: dict[str, Any] = {"since": since_iso(since) if since else ""}
    out = []
    with read_snapshot(db):
        for proxy in proxy_ids(db):
            params["proxy"] = proxy
            (volume,) = db.query(_VOLUME, params)
            n = volume["requests"]
            if not n:
                continue
            (latency,) = db.query(_LATENCY, params)
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


def request(db: Database, request_id: str) -> dict[str, Any] | None:
    """One row by id, its JSON columns as documents."""
    found = list(db.query("select * from requests where id = ?", [request_id]))
    return decoded(dict(found[0])) if found else None


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
    db: Database, since: str | None = None, resource: str | None = None
) -> list[dict[str, Any]]:
    """Audit entries, oldest first, `detail` as a document."""
    parts: list[tuple[str, Any]] = []
    if since:
        parts.append(("at >= ?", since_iso(since)))
    if resource:
        parts.append(("resource = ?", resource))
    where = " and ".join(clause for clause, _ in parts) or "1 = 1"
    sql = f"select * from audit where {where} order by id"  # noqa: S608
    return [decoded(dict(r)) for r in db.query(sql, [v for _, v in parts])]
