"""A large activity log made in SQL, fast and repeatable: for the tests and the benchmark of
`keyswap logs` and `keyswap stats` (scripts/bench_log.py).

Rows look like a real gateway's (the same columns and sizes: header documents, URLs,
messages; about 500 bytes of text a row) over the 30 days up to now, for five proxies of
different volume and latency, plus rows of no proxy; about 83% forwarded (mostly 2xx,
some 404 and 5xx), 7% denied and 2% failed, latencies with a long tail. Values follow
from the row number, so two logs of the same size differ only in their timestamps.
`wide=False` leaves the text columns empty: only what `logs` and `stats` filter and
count on, for a test that needs many rows quickly."""

from __future__ import annotations

import time

from sqlite_utils import Database

DAYS = 30
# proxy id, then the upper bound of its share (per cent) and its latency factor
PROXIES = (
    ("billing", 40, 1.0),
    ("crm-prod", 65, 1.6),
    ("agent-llm", 85, 6.0),
    ("search", 95, 0.4),
    ("maps", 99, 0.2),
)

# Per row i: u, a pseudo-random number in [0, 1) (Lehmer); k, the outcome per mille;
# p, the proxy per cent; t, the start time.
_ROWS = """
with recursive n(i) as (select 0 union all select i + 1 from n where i < :count - 1),
r as (
  select i,
    ((i * 48271) % 2147483647) / 2147483647.0 as u,
    (i * 104729 + 7) % 1000 as k,
    (i * 7919) % 100 as p,
    :start + (i * :span) / :count as t
  from n
),
o as (
  select *,
    case {proxy} end as proxy_id,
    case {scale} else 1.0 end as scale,
    case when k < 70 then 'proxy-access-denied' when k < 90 then 'proxy-error'
      else 'proxy-access-granted' end as proxy_code,
    case when k < 40 then 401 when k < 60 then 403 when k < 70 then 429
      when k < 85 then 502 when k < 90 then 504 when k < 110 then 500 when k < 120 then 503
      when k < 180 then 404 when k < 300 then 201 else 200 end as status
  from r
)
select {columns} from o
"""
_COLUMNS = {
    "id": "printf('%012x%08x%06x', cast(t * 1000 as integer), 2882400001, i % 16777216)",
    "started_at": "strftime('%Y-%m-%dT%H:%M:%fZ', t, 'unixepoch')",
    "duration_ms": """case when proxy_code = 'proxy-access-denied' then 0.2 + u
      when proxy_code = 'proxy-error' then 10000.0 * u
      else round(scale * (5 + 400 * u * u * u * u + (u > 0.99) * 3000 * u), 3) end""",
    "proxy_id": "proxy_id",
    "status": "status",
    "proxy_code": "proxy_code",
    "method": "case when k % 3 = 0 then 'POST' else 'GET' end",
    "bytes_in": "case when k % 3 = 0 then 200 + i % 3000 else 0 end",
    "bytes_out": """case when proxy_code = 'proxy-access-granted' then 300 + (i * 31) % 20000
      else 180 end""",
    "attempts": "case when proxy_code = 'proxy-access-denied' then 0 else 1 end",
}
_TEXT_COLUMNS = {
    "token_id": "'web'",
    "environment": "'prod'",
    "region": "'eu'",
    "client_ip": "printf('10.0.%d.%d', i % 250, i % 199)",
    "path": "printf('/api/%s/v1/resources/%d?page=%d', coalesce(proxy_id, 'none'), i % 10007, i % 7)",
    "target": "proxy_id",
    "target_url": """case when proxy_code != 'proxy-access-denied' then
      printf('https://api.%s.example.com/v1/resources/%d?page=%d', proxy_id, i % 10007, i % 7)
      end""",
    "message": """case when proxy_code = 'proxy-access-denied'
      then 'the token is not valid for this proxy'
      when proxy_code = 'proxy-error' then printf('target ''%s'' failed: timed out', proxy_id)
      else printf('forwarded to target ''%s''', proxy_id) end""",
    "error": "case when proxy_code = 'proxy-error' then 'TimeoutError: read timed out' end",
    "upstream_proxy": "case when p < 40 then 'corporate' end",
    "user_agent": "'python-httpx/0.27.2'",
    "request_headers": """printf('{"host": "api.%s.example.com", '
      || '"user-agent": "python-httpx/0.27.2", "accept": "*/*", '
      || '"accept-encoding": "gzip, deflate", "authorization": "********", '
      || '"content-type": "application/json", "x-team": "sales-%d"}', proxy_id, i % 13)""",
    "response_headers": """printf('{"content-type": "application/json", '
      || '"content-length": "%d", "date": "Mon, 01 Dec 2025 10:00:00 GMT", '
      || '"x-request-id": "req_%012x", "keyswap-proxy-code": "%s", '
      || '"cache-control": "no-store"}', 300 + (i * 31) % 20000, i * 2654435761, proxy_code)""",
}


def fill(db: Database, count: int, *, end: float | None = None, wide: bool = True) -> None:
    """Append `count` rows spread over the 30 days before `end` (default: now)."""
    columns = {**_COLUMNS, **(_TEXT_COLUMNS if wide else {})}
    select = _ROWS.format(
        proxy=" ".join(f"when p < {bound} then '{name}'" for name, bound, _ in PROXIES),
        scale=" ".join(f"when p < {bound} then {scale}" for _, bound, scale in PROXIES),
        columns=", ".join(columns.values()),
    )
    span = DAYS * 86400.0
    start = (end if end is not None else time.time()) - span
    sql = f"insert into requests ({', '.join(columns)}) {select}"
    with db.conn:
        db.conn.execute(sql, {"count": count, "start": start, "span": span})
