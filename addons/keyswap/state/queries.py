"""Reading the activity log: the library under `keyswap logs`, `stats`, `curl` and
`audit`."""

from __future__ import annotations

import json
import math
import re
import shlex
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
    """`2xx`..`5xx` or an exact status, as SQL."""
    s = status.strip().lower()
    if re.fullmatch(r"[1-5]xx", s):
        low = int(s[0]) * 100
        return "status >= ? and status < ?", [low, low + 100]
    if s.isdigit():
        return "status = ?", [int(s)]
    raise ValueError(f"--status '{status}': use 2xx, 4xx, 5xx or a status such as 429")


def logs(
    db: Database,
    *,
    proxy: str | None = None,
    status: str | None = None,
    code: str | None = None,
    since: str | None = None,
    after: str | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """The newest matching rows, oldest first; `after` returns only rows after that id."""
    status_sql, status_values = status_clause(status) if status else ("", [])
    where, params = _where(
        ("proxy_id = ?", [proxy] if proxy else None),
        (status_sql, status_values or None),
        ("proxy_code = ?", [code] if code else None),
        ("started_at >= ?", [since_iso(since)] if since else None),
        ("id > ?", [after] if after else None),
    )
    # The clauses are constants; every value is a bound parameter.
    sql = f"select * from requests where {where} order by id desc limit ?"  # noqa: S608
    rows = [dict(r) for r in db.query(sql, [*params, limit])]
    return rows[::-1]


def _where(*conditions: tuple[str, list[Any] | None]) -> tuple[str, list[Any]]:
    """The SQL condition of the filters that are given (values None are left out)."""
    given = [(clause, values) for clause, values in conditions if values is not None]
    sql = " and ".join(clause for clause, _ in given) or "1 = 1"
    return sql, [v for _, values in given for v in values]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile: the smallest value with at least q of them at or below."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def stats(db: Database, since: str | None = None) -> list[dict[str, Any]]:
    """Per proxy: volume, success / error / denied rates, latency percentiles, bytes."""
    where, params = "", []
    if since:
        where, params = "where started_at >= ?", [since_iso(since)]
    columns = "proxy_id, status, proxy_code, duration_ms, bytes_in, bytes_out"
    sql = f"select {columns} from requests {where} order by proxy_id"  # noqa: S608
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in db.query(sql, params):
        groups.setdefault(row["proxy_id"] or "(no proxy)", []).append(row)
    out = []
    for proxy, rows in groups.items():
        n = len(rows)
        granted = [r for r in rows if r["proxy_code"] == "proxy-access-granted"]
        ok = [r for r in granted if r["status"] is not None and r["status"] < 400]
        errors = [r for r in rows if r["proxy_code"] == "proxy-error" or (r["status"] or 0) >= 500]
        durations = [r["duration_ms"] for r in granted if r["duration_ms"] is not None]
        out.append(
            {
                "proxy": proxy,
                "requests": n,
                "success_rate": round(len(ok) / n, 4),
                "error_rate": round(len(errors) / n, 4),
                "denied": sum(r["proxy_code"] == "proxy-access-denied" for r in rows),
                "p50_ms": percentile(durations, 0.50),
                "p95_ms": percentile(durations, 0.95),
                "p99_ms": percentile(durations, 0.99),
                "bytes_in": sum(r["bytes_in"] or 0 for r in rows),
                "bytes_out": sum(r["bytes_out"] or 0 for r in rows),
            }
        )
    return out


def curl_command(row: dict[str, Any], config: Config | None) -> str:
    """The request as the target saw it, as a curl command; every secret is masked."""
    if not row.get("target_url"):
        raise ValueError(f"request {row['id']} was not forwarded ({row['proxy_code']})")
    parts = ["curl", "-X", row["method"], row["target_url"]]
    for name, value in json.loads(row["request_headers"] or "{}").items():
        if name not in _CURL_SKIP:
            parts += ["-H", f"{name}: {value}"]
    upstream = row.get("upstream_proxy")
    if upstream:
        proxy = config.upstream_proxies.get(upstream) if config else None
        if proxy is None:
            parts += ["--proxy", f"<upstream proxy {upstream}>"]
        else:
            parts += ["--proxy", f"{proxy.type}://{hostport(proxy.host, proxy.port)}"]
            if isinstance(proxy.auth, BasicProxyAuth):
                parts += ["--proxy-user", f"{proxy.auth.user}:{MASK}"]
    return " ".join(shlex.quote(p) for p in parts)


def audit(
    db: Database, since: str | None = None, resource: str | None = None
) -> list[dict[str, Any]]:
    where, params = _where(
        ("at >= ?", [since_iso(since)] if since else None),
        ("resource = ?", [resource] if resource else None),
    )
    sql = f"select * from audit where {where} order by id"  # noqa: S608
    return [dict(r) for r in db.query(sql, params)]
