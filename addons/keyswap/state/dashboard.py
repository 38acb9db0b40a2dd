"""The activity log in Datasette: canned queries, the `requests` table's defaults and the
datasette-dashboards charts, as Datasette metadata for a database of any name. Pure data:
`keyswap dashboard` serves it, and `config/datasette.yaml` is its output for
`keyswap.db`."""

from __future__ import annotations

import copy
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import yaml

from keyswap.state.queries import PROXY_IDS
from keyswap.state.store import iso

DASHBOARD = "keyswap"  # the dashboard's slug: /-/dashboards/keyswap

# The "last" filter: how far back the charts look, and the width of a time bucket for
# each choice (about a hundred points per chart).
WINDOWS = {
    "1 hour": 60,
    "6 hours": 300,
    "24 hours": 900,
    "7 days": 7200,
    "30 days": 21600,
}
DEFAULT_WINDOW = "24 hours"

# Shown on a row's page, hidden from the table by default: long JSON and body previews.
HIDDEN_COLUMNS = ("request_headers", "response_headers", "request_body", "response_body")
FACETS = ("proxy_id", "status", "proxy_code", "method", "upstream_proxy")

# Every SQL text here is made of this module's constants (hence the `noqa: S608`); the
# filters' values reach SQLite as bound parameters. The same definitions as
# `keyswap stats` (state/queries.py):
ERROR = "proxy_code = 'proxy-error' or status >= 500"
DENIED = "proxy_code = 'proxy-access-denied'"
GRANTED = "proxy_code = 'proxy-access-granted'"
UPSTREAM_FAILED = "upstream_proxy is not null and proxy_code = 'proxy-error'"

# A chart's SQL sees the filters as :last and :proxy. A chart opened without them (its
# own page, a hand-written URL) gets "" for :last, which means the default. Datasette
# binds the values as parameters; datasette-dashboards drops the [[ ]] part when the
# proxy filter is empty.
_SINCE = (
    f"strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-' || coalesce(nullif(:last, ''), '{DEFAULT_WINDOW}'))"
)
# Only constant bounds on started_at (and proxy_id): the (started_at) and
# (proxy_id, started_at) indexes find the window without reading older rows.
IN_WINDOW = f"started_at >= {_SINCE} [[and proxy_id = :proxy]]"
# The width of a time bucket, in seconds (for a :last not offered, the default's).
_STEP = (
    "case :last "
    + " ".join(
        f"when '{span}' then {step}" for span, step in WINDOWS.items() if span != DEFAULT_WINDOW
    )
    + f" else {WINDOWS[DEFAULT_WINDOW]} end"
)
_SLOT = f"cast(strftime('%s', started_at) as integer) / ({_STEP})"  # the bucket's number
_TIME = f"strftime('%Y-%m-%dT%H:%M:%SZ', slot * ({_STEP}), 'unixepoch')"
_UNTIL = f"strftime('%Y-%m-%dT%H:%M:%SZ', (slot + 1) * ({_STEP}), 'unixepoch')"
_PROXY = "coalesce(proxy_id, '(no proxy)')"


def _time_axis() -> dict[str, Any]:
    return {"field": "time", "type": "temporal", "title": None, "scale": {"type": "utc"}}


def _vega_lite(title: str, sql: str, database: str, display: dict[str, Any]) -> dict[str, Any]:
    # SVG (crisp, and its marks can be counted in a browser test), and no link to the
    # online Vega editor: the dashboard works offline.
    actions = {"export": True, "source": False, "compiled": False, "editor": False}
    embed = {"renderer": "svg", "actions": actions}
    return {
        "title": title,
        "db": database,
        "query": sql,
        "library": "vega-lite",
        "display": {**display, "usermeta": {"embedOptions": embed}},
    }


def _metric(title: str, sql: str, database: str, field: str, suffix: str = "") -> dict[str, Any]:
    return {
        "title": title,
        "db": database,
        "query": sql,
        "library": "metric",
        "display": {"field": field, "prefix": "", "suffix": suffix},
    }


def charts(database: str) -> dict[str, dict[str, Any]]:
    """The dashboard's charts, each one SQL query over the window and a Vega-Lite view."""
    per_proxy = f"""\
select {_TIME} as time, proxy, requests
from (
  select {_SLOT} as slot, {_PROXY} as proxy, count(*) as requests
  from requests
  where {IN_WINDOW}
  group by slot, proxy
)
order by time, proxy"""  # noqa: S608
    error_rate = f"""\
select {_TIME} as time, requests, errors, round(1.0 * errors / requests, 4) as error_rate
from (
  select {_SLOT} as slot, count(*) as requests, sum({ERROR}) as errors
  from requests
  where {IN_WINDOW}
  group by slot
)
order by time"""  # noqa: S608
    refusals = f"""\
select coalesce(status, '-') || ' ' || coalesce(message, '') as reason, {_PROXY} as proxy,
       count(*) as refused
from requests
where {IN_WINDOW} and {DENIED}
group by reason, proxy
order by refused desc
limit 40"""  # noqa: S608
    outcome = f"case when {ERROR} then 'error' when {DENIED} then 'denied' else 'forwarded' end"
    tokens = f"""\
with usage as (
  select {_PROXY} || ' / ' || coalesce(token_id, '(no valid token)') as token,
         {outcome} as outcome, count(*) as requests
  from requests
  where {IN_WINDOW}
  group by token, outcome
),
busiest as (
  select token from usage group by token order by sum(requests) desc limit 25
)
select token, outcome, requests from usage where token in (select token from busiest)
order by token, outcome"""  # noqa: S608
    upstream = f"""\
select {_TIME} as time, {_UNTIL} as until, upstream_proxy, failures
from (
  select {_SLOT} as slot, upstream_proxy, count(*) as failures
  from requests
  where {IN_WINDOW} and {UPSTREAM_FAILED}
  group by slot, upstream_proxy
)
order by time, upstream_proxy"""  # noqa: S608
    # p50/p95/p99 of forwarded requests' durations, nearest rank like `keyswap stats`:
    # the smallest duration with at least q of them at or below. SQLite has no percentile
    # function (and may lack ceil()): `rank >= q * n`, in integers. The partition is an
    # expression, not the column: by the column, SQLite would walk a whole index that
    # starts with proxy_id for its order, instead of searching the window.
    latency = f"""\
with ranked as (
  select {_PROXY} as proxy, duration_ms,
         row_number() over (partition by {_PROXY} order by duration_ms) as rank,
         count(*) over (partition by {_PROXY}) as n
  from requests
  where {IN_WINDOW} and {GRANTED} and duration_ms is not null
)
select proxy,
       min(case when rank * 100 >= 50 * n then duration_ms end) as p50,
       min(case when rank * 100 >= 95 * n then duration_ms end) as p95,
       min(case when rank * 100 >= 99 * n then duration_ms end) as p99
from ranked
group by proxy
order by proxy"""  # noqa: S608
    # The metrics: one number each, over the same window. Counting all requests reads
    # the index alone.
    counted = f"select count(*) as {{}}\nfrom requests\nwhere {IN_WINDOW}"
    error_pct = f"""\
select printf('%.2f', 100.0 * coalesce(sum({ERROR}), 0) / max(count(*), 1)) as error_pct
from requests
where {IN_WINDOW}"""  # noqa: S608
    return {
        "requests": _metric("Requests", counted.format("requests"), database, "requests"),
        "error_pct": _metric("Error rate", error_pct, database, "error_pct", "%"),
        "denied": _metric(
            "Refused", counted.format("refused") + f"\n  and {DENIED}", database, "refused"
        ),
        "upstream_failures": _metric(
            "Upstream proxy failures",
            counted.format("failures") + f"\n  and {UPSTREAM_FAILED}",
            database,
            "failures",
        ),
        "per_proxy": _vega_lite(
            "Requests per proxy",
            per_proxy,
            database,
            {
                "mark": {"type": "area", "line": True, "point": False, "opacity": 0.8},
                "encoding": {
                    "x": _time_axis(),
                    "y": {
                        "field": "requests",
                        "type": "quantitative",
                        "stack": "zero",
                        "title": None,
                        "impute": {"value": 0},  # no line across a bucket without requests
                    },
                    "color": {"field": "proxy", "type": "nominal", "title": "proxy"},
                    "tooltip": [
                        {"field": "time", "type": "temporal", "format": "%Y-%m-%d %H:%M"},
                        {"field": "proxy"},
                        {"field": "requests", "type": "quantitative"},
                    ],
                },
            },
        ),
        "error_rate": _vega_lite(
            "Error rate (proxy-error or status >= 500)",
            error_rate,
            database,
            {
                "mark": {"type": "line", "point": False, "color": "#d62728"},
                "encoding": {
                    "x": _time_axis(),
                    "y": {
                        "field": "error_rate",
                        "type": "quantitative",
                        "title": None,
                        "axis": {"format": "%"},
                    },
                    "tooltip": [
                        {"field": "time", "type": "temporal", "format": "%Y-%m-%d %H:%M"},
                        {"field": "error_rate", "type": "quantitative", "format": ".2%"},
                        {"field": "errors", "type": "quantitative"},
                        {"field": "requests", "type": "quantitative"},
                    ],
                },
            },
        ),
        "latency": _vega_lite(
            "Latency per proxy, forwarded requests (ms)",
            latency,
            database,
            {
                "transform": [{"fold": ["p50", "p95", "p99"], "as": ["percentile", "ms"]}],
                "mark": {"type": "bar"},
                "encoding": {
                    "x": {"field": "proxy", "type": "nominal", "title": None},
                    "xOffset": {"field": "percentile", "type": "nominal"},
                    "y": {"field": "ms", "type": "quantitative", "title": None},
                    "color": {"field": "percentile", "type": "nominal", "title": None},
                    "tooltip": [
                        {"field": "proxy"},
                        {"field": "percentile"},
                        {"field": "ms", "type": "quantitative", "format": ",.1f"},
                    ],
                },
            },
        ),
        "refusals": _vega_lite(
            "Refusals by reason",
            refusals,
            database,
            {
                "height": {"step": 18},  # one bar per line, however many
                "mark": {"type": "bar"},
                "encoding": {
                    "y": {
                        "field": "reason",
                        "type": "nominal",
                        "sort": "-x",
                        "title": None,
                        "axis": {"labelLimit": 320},
                    },
                    "x": {"field": "refused", "type": "quantitative", "title": None},
                    "color": {"field": "proxy", "type": "nominal", "title": "proxy"},
                    "tooltip": [
                        {"field": "reason"},
                        {"field": "proxy"},
                        {"field": "refused", "type": "quantitative"},
                    ],
                },
            },
        ),
        "tokens": _vega_lite(
            "Requests per token",
            tokens,
            database,
            {
                "height": {"step": 18},  # one bar per line, however many
                "mark": {"type": "bar"},
                "encoding": {
                    "y": {"field": "token", "type": "nominal", "sort": "-x", "title": None},
                    "x": {"field": "requests", "type": "quantitative", "title": None},
                    "color": {
                        "field": "outcome",
                        "type": "nominal",
                        "title": None,
                        "scale": {
                            "domain": ["forwarded", "denied", "error"],
                            "range": ["#4c78a8", "#f58518", "#d62728"],
                        },
                    },
                    "tooltip": [
                        {"field": "token"},
                        {"field": "outcome"},
                        {"field": "requests", "type": "quantitative"},
                    ],
                },
            },
        ),
        "upstream": _vega_lite(
            "Upstream proxy failures",
            upstream,
            database,
            {
                "mark": {"type": "bar"},
                "encoding": {
                    "x": _time_axis(),
                    "x2": {"field": "until"},
                    "y": {"field": "failures", "type": "quantitative", "title": None},
                    "y2": {"datum": 0},
                    "color": {
                        "field": "upstream_proxy",
                        "type": "nominal",
                        "title": "upstream proxy",
                    },
                    "tooltip": [
                        {"field": "time", "type": "temporal", "format": "%Y-%m-%d %H:%M"},
                        {"field": "upstream_proxy"},
                        {"field": "failures", "type": "quantitative"},
                    ],
                },
            },
        ),
    }


LAYOUT = [
    ["requests", "error_pct", "denied", "upstream_failures"],
    ["per_proxy", "per_proxy", "error_rate", "error_rate"],
    ["latency", "latency", "refusals", "refusals"],
    ["tokens", "tokens", "upstream", "upstream"],
]

# Loose index scan over (proxy_id, started_at): one index lookup per proxy, not a read
# of the whole log, to list the proxy filter's choices.
QUERIES = {
    "errors_last_hour": {
        "title": "Errors in the last hour",
        "sql": f"""\
select started_at, id, proxy_id, method, path, status, proxy_code, message, error
from requests
where started_at >= strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-1 hour')
  and ({ERROR})
order by started_at desc""",  # noqa: S608
    },
    "slowest_requests": {
        "title": "Slowest forwarded requests (last 24 hours)",
        "sql": f"""\
select started_at, id, proxy_id, method, path, status, duration_ms, target_url
from requests
where {GRANTED}
  and started_at >= strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-1 day')
order by duration_ms desc
limit 100""",  # noqa: S608
    },
    "volume_per_proxy_per_hour": {
        "title": "Volume per proxy per hour (last 7 days)",
        "sql": f"""\
select substr(started_at, 1, 13) || ':00Z' as hour, proxy_id,
       count(*) as requests,
       sum({DENIED}) as denied,
       sum({ERROR}) as errors
from requests
where started_at >= strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-7 days')
group by hour, proxy_id
order by hour desc, requests desc""",  # noqa: S608
    },
}


def metadata(database: str) -> dict[str, Any]:
    """Datasette metadata (0.65) for the activity log served as `database`: a new copy
    each time, since Datasette edits what it is given (it names each canned query)."""
    meta = {
        "title": "keyswap activity log",
        "description": (
            "One row per request that reached the gateway; the audit trail of config "
            "changes. The charts are under Dashboards, in the menu."
        ),
        "databases": {
            database: {
                "queries": QUERIES,
                "tables": {
                    "requests": {
                        "sort_desc": "started_at",
                        "facets": list(FACETS),
                    },
                    "audit": {"sort_desc": "at", "facets": ["action", "actor"]},
                    "oauth2_tokens": {"hidden": True},
                },
            }
        },
        "plugins": {
            "datasette-dashboards": {
                DASHBOARD: {
                    "title": "keyswap gateway",
                    "description": (
                        "Traffic, errors, latency and refusals of the activity log. Errors "
                        "are proxy-error rows and statuses of 500 and above, as in "
                        "keyswap stats; times are UTC."
                    ),
                    "settings": {"allow_fullscreen": True},
                    "layout": LAYOUT,
                    "filters": {
                        "last": {
                            "name": "Last",
                            "type": "select",
                            "options": list(WINDOWS),
                            "default": DEFAULT_WINDOW,
                        },
                        "proxy": {
                            "name": "Proxy",
                            "type": "select",
                            "db": database,
                            "query": PROXY_IDS.strip(),
                        },
                    },
                    "charts": charts(database),
                }
            }
        },
    }
    return copy.deepcopy(meta)


def datasette_name(path: str | Path) -> str:
    """The name Datasette gives a database file: its stem."""
    return Path(path).stem


def served_name(path: str | Path) -> str:
    """The name `keyswap dashboard` serves a database under: its stem, with what is not a
    letter, digit, `_` or `-` made `_` (the charts fetch `/<name>.json` unescaped)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", datasette_name(path)) or "keyswap"


# Marks a `requests` table URL that has had its defaults: Datasette's "Show all columns"
# drops `_nocol` and `_col` and its filter form keeps every `_` argument, so what the
# user changes afterwards stays changed.
DEFAULTS_APPLIED = "_defaults"


def table_defaults(
    path: str,
    query: str,
    database: str,
    columns: tuple[str, ...] = HIDDEN_COLUMNS,
    now: float | None = None,
) -> str | None:
    """Where a `requests` table URL should go instead, when it has not had its defaults:
    the same page without `columns`; the bare table also only for the last 24 hours,
    so that its facets count a day through the started_at index, not the whole log."""
    if path != f"/{database}/requests":
        return None
    args = parse_qsl(query, keep_blank_values=True)
    if any(name in ("_col", "_nocol", DEFAULTS_APPLIED) for name, _ in args):
        return None
    if not args:
        day_ago = (time.time() if now is None else now) - 86400
        args.append(("started_at__gte", iso(day_ago // 60 * 60)))
    args += [("_nocol", column) for column in columns] + [(DEFAULTS_APPLIED, "1")]
    return f"{path}?{urlencode(args)}"


HEADER = """\
# Datasette metadata for the activity log: `datasette keyswap.db -m config/datasette.yaml`
# (pip install 'keyswap[datasette]'), or `keyswap dashboard`, which needs no file.
# Generated: keyswap dashboard --db keyswap.db --metadata > config/datasette.yaml
# (tests/state/test_dashboard.py fails when it differs from what that prints).
"""


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line SQL, so the file reads like SQL."""


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


def metadata_yaml(database: str) -> str:
    """`metadata(database)` as a commented YAML file."""
    body = yaml.dump(
        metadata(database), Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True
    )
    return HEADER + body
