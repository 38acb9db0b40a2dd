"""The dashboard's metadata without Datasette: config/datasette.yaml is what it generates,
every chart's SQL runs on keyswap's schema (empty or full), finds its window through an
index, and computes what `keyswap stats` computes."""

from __future__ import annotations

import calendar
import math
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import yaml

from keyswap.state import dashboard, queries
from keyswap.state.store import iso
from tests.support import ROOT
from tests.support.activity import sqlite_log, write_log

CHARTS = dashboard.charts("keyswap")
WINDOWED = [(slug, chart["query"]) for slug, chart in CHARTS.items()]


def run(conn: sqlite3.Connection, sql: str, last: str = "", proxy: str = "") -> list[sqlite3.Row]:
    """The chart's SQL as datasette-dashboards runs it: a [[ ]] part only when its
    parameter is given; every parameter bound, "" when not given."""
    kept = re.sub(r"\[\[(.*?)\]\]", lambda m: m.group(1) if proxy else "", sql)
    conn.row_factory = sqlite3.Row
    return conn.execute(kept, {"last": last, "proxy": proxy}).fetchall()


@pytest.fixture(scope="module")
def full_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sqlite3.Connection]:
    path = tmp_path_factory.mktemp("log") / "keyswap.db"
    write_log(path, per_hour=200)
    with closing(sqlite3.connect(path)) as conn:
        yield conn


def test_the_example_file_is_what_keyswap_dashboard_prints() -> None:
    """config/datasette.yaml cannot drift: regenerate it with the command in its header."""
    assert (ROOT / "config" / "datasette.yaml").read_text() == dashboard.metadata_yaml("keyswap")


def test_the_metadata_is_for_the_database_it_names() -> None:
    meta = yaml.safe_load(dashboard.metadata_yaml("gw-prod"))
    assert meta == dashboard.metadata("gw-prod")
    assert list(meta["databases"]) == ["gw-prod"]
    requests = meta["databases"]["gw-prod"]["tables"]["requests"]
    assert requests["sort_desc"] == "started_at"
    assert requests["facets"] == ["proxy_id", "status", "proxy_code", "method", "upstream_proxy"]
    board = meta["plugins"]["datasette-dashboards"]["keyswap"]
    assert {chart["db"] for chart in board["charts"].values()} == {"gw-prod"}
    assert board["filters"]["proxy"]["db"] == "gw-prod"
    assert board["filters"]["last"]["default"] == "24 hours"
    # every chart has its place in the grid, and nothing else does
    assert {slug for row in board["layout"] for slug in row} == set(board["charts"])
    assert {len(row) for row in board["layout"]} == {4}


@pytest.mark.parametrize(
    ("path", "datasette", "served"),
    [
        ("keyswap.db", "keyswap", "keyswap"),
        ("/var/lib/keyswap/gw-prod.db", "gw-prod", "gw-prod"),
        ("logs/gw.2026.db", "gw.2026", "gw_2026"),
        ("état.sqlite", "état", "_tat"),
    ],
)
def test_database_names(path: str, datasette: str, served: str) -> None:
    assert dashboard.datasette_name(path) == datasette
    assert dashboard.served_name(path) == served


HIDE = "_nocol=request_headers&_nocol=response_headers&_defaults=1"
DAY = "started_at__gte=2026-11-29T10%3A20%3A00.000Z"  # a day before NOW, to the minute
NOW = calendar.timegm((2026, 11, 30, 10, 20, 31, 0, 0, 0)) + 0.5


@pytest.mark.parametrize(
    ("path", "query", "location"),
    [
        ("/k/requests", "", f"/k/requests?{DAY}&{HIDE}"),
        # the user's filters stay as they are; only the columns change
        (
            "/k/requests",
            "proxy_id=crm&_sort=status",
            f"/k/requests?proxy_id=crm&_sort=status&{HIDE}",
        ),
        ("/k/requests", "_nocol=path", None),  # the page says which columns
        ("/k/requests", "_col=id&_col=request_headers", None),
        ("/k/requests", "_defaults=1", None),  # what "Show all columns" leaves
        ("/k/requests", "proxy_id=crm&_defaults=1", None),  # the filter form, without the day
        ("/k/requests.json", "", None),
        ("/k/requests/0190abc", "", None),  # a row shows everything
        ("/k/audit", "", None),
        ("/other/requests", "", None),
    ],
)
def test_the_requests_table_opens_on_the_last_day_without_header_columns(
    path: str, query: str, location: str | None
) -> None:
    columns = ("request_headers", "response_headers")
    assert dashboard.table_defaults(path, query, "k", columns, now=NOW) == location


def plans(conn: sqlite3.Connection, sql: str, **params: str) -> list[str]:
    kept = re.sub(r"\[\[(.*?)\]\]", lambda m: m.group(1) if params.get("proxy") else "", sql)
    values = {"last": "", "proxy": "", **params}
    return [row[3] for row in conn.execute("explain query plan " + kept, values)]


@pytest.mark.parametrize("last", ["", *dashboard.WINDOWS])
@pytest.mark.parametrize(("slug", "sql"), WINDOWED, ids=[s for s, _ in WINDOWED])
def test_every_chart_finds_its_window_through_an_index(
    full_log: sqlite3.Connection, slug: str, sql: str, last: str
) -> None:
    """A large log stays fast: the window (and the proxy, when chosen) bounds an index
    search; no chart reads the whole table."""
    whole = plans(full_log, sql, last=last)
    assert not [p for p in whole if p.startswith("SCAN requests")], whole
    assert [p for p in whole if re.search(r"^SEARCH requests .*INDEX \w+ \(started_at>\?\)$", p)]
    one = plans(full_log, sql, last=last, proxy="crm-prod")
    assert not [p for p in one if p.startswith("SCAN requests")], one
    by_proxy = r"^SEARCH requests .*INDEX \w+ \(proxy_id=\? AND started_at>\?\)$"
    assert [p for p in one if re.search(by_proxy, p)], one


def test_the_proxy_choices_read_one_index_entry_per_proxy(full_log: sqlite3.Connection) -> None:
    plan = [row[3] for row in full_log.execute("explain query plan " + queries.PROXY_IDS)]
    assert not [p for p in plan if p.startswith("SCAN requests")], plan
    assert [r[0] for r in full_log.execute(queries.PROXY_IDS)] == [
        "crm-prod",
        "maps-web",
        "openai-agents",
        "stripe-billing",
    ]


@pytest.mark.parametrize(("slug", "sql"), WINDOWED, ids=[s for s, _ in WINDOWED])
def test_every_chart_runs_on_an_empty_log(tmp_path: Path, slug: str, sql: str) -> None:
    with closing(sqlite_log(tmp_path / "empty.db")) as db:
        rows = run(db.conn, sql, last="24 hours")
    if CHARTS[slug]["library"] == "metric":  # one number, never null
        field = CHARTS[slug]["display"]["field"]
        assert len(rows) == 1 and rows[0][field] is not None
    else:
        assert rows == []


@pytest.mark.parametrize(("slug", "sql"), WINDOWED, ids=[s for s, _ in WINDOWED])
def test_every_chart_has_data_on_a_day_of_traffic(
    full_log: sqlite3.Connection, slug: str, sql: str
) -> None:
    rows = run(full_log, sql, last="24 hours")
    assert rows
    if CHARTS[slug]["library"] == "metric":
        assert float(rows[0][CHARTS[slug]["display"]["field"]]) > 0
    fields = chart_fields(CHARTS[slug]["display"])
    assert fields <= set(rows[0].keys()), f"the view uses fields the SQL does not return: {fields}"


def chart_fields(display: dict[str, Any]) -> set[str]:
    """The fields a Vega-Lite view reads from the rows (before its own transforms)."""
    if "encoding" not in display:
        return {display["field"]}
    made = {name for t in display.get("transform", []) for name in t.get("as", [])}
    used = set(display.get("transform", [{}])[0].get("fold", []))
    for channel in display["encoding"].values():
        for item in channel if isinstance(channel, list) else [channel]:
            if "field" in item:
                used.add(item["field"])
    return used - made


@pytest.mark.parametrize(
    ("slug", "last", "first", "count"),
    [
        ("per_proxy", "1 hour", 60, 61),
        ("error_rate", "24 hours", 900, 97),
        ("upstream", "7 days", 7200, 85),
    ],
)
def test_time_buckets_fit_the_window(
    tmp_path: Path, slug: str, last: str, first: int, count: int
) -> None:
    """About a hundred buckets whatever the window, each `time` on a bucket boundary (UTC)."""
    now = time.time()
    with closing(sqlite_log(tmp_path / "k.db")) as db:
        seconds = {"1 hour": 3600, "24 hours": 86400, "7 days": 7 * 86400}[last]
        rows = [
            {
                "id": f"{i:026d}",
                "started_at": iso(now - seconds + 1 + i * (seconds - 2) / 400),
                "proxy_id": "p",
                "status": 502,
                "proxy_code": "proxy-error",
                "upstream_proxy": "corporate",
            }
            for i in range(401)
        ]
        db["requests"].insert_all(rows)
        found = run(db.conn, CHARTS[slug]["query"], last=last)
    stamps = [calendar.timegm(time.strptime(r["time"], "%Y-%m-%dT%H:%M:%SZ")) for r in found]
    assert all(s % first == 0 for s in stamps)
    assert count - 1 <= len(found) <= count
    if slug == "upstream":
        assert all(r["until"] > r["time"] for r in found)


def nearest_rank(values: list[float], q: int) -> float:
    """The smallest value with at least q% of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(len(ordered) * q / 100) - 1)]


def test_latency_percentiles_are_nearest_rank_over_forwarded_requests(tmp_path: Path) -> None:
    """Per proxy, like `keyswap stats`: ties, a proxy of one request, and refused or
    failed requests left out."""
    path = tmp_path / "k.db"
    write_log(path, per_hour=300, days=1)
    granted = {"proxy_code": "proxy-access-granted", "status": 200}
    with closing(sqlite_log(path)) as db:
        db["requests"].insert_all(
            [
                {"id": "a1", "started_at": iso(time.time() - 60), "proxy_id": "tiny"}
                | granted
                | {"duration_ms": 7.0},
                *(
                    {"id": f"t{i}", "started_at": iso(time.time() - 60), "proxy_id": "ties"}
                    | granted
                    | {"duration_ms": float(i // 10)}
                    for i in range(20)
                ),
            ]
        )
        durations: dict[str, list[float]] = {}
        for proxy, duration in db.execute(
            "select proxy_id, duration_ms from requests where proxy_code = 'proxy-access-granted'"
        ).fetchall():
            durations.setdefault(proxy, []).append(duration)
        chart = run(db.conn, CHARTS["latency"]["query"], last="7 days")
        only = run(db.conn, CHARTS["latency"]["query"], last="7 days", proxy="ties")
    assert [r["proxy"] for r in chart] == sorted(durations)
    for r in chart:
        values = durations[r["proxy"]]
        assert (r["p50"], r["p95"], r["p99"]) == tuple(
            nearest_rank(values, q) for q in (50, 95, 99)
        )
    assert [tuple(r) for r in only] == [("ties", 0.0, 1.0, 1.0)]
    assert [tuple(r) for r in chart if r["proxy"] == "tiny"] == [("tiny", 7.0, 7.0, 7.0)]


def test_the_metrics_count_the_last_day(full_log: sqlite3.Connection) -> None:
    """Errors and refusals as `keyswap stats` defines them; no filter means 24 hours."""
    day = iso(time.time() - 86400)
    total, errors, denied = full_log.execute(
        "select count(*),"
        " sum(proxy_code = 'proxy-error' or status >= 500),"
        " sum(proxy_code = 'proxy-access-denied')"
        " from requests where started_at >= ?",
        [day],
    ).fetchone()
    assert run(full_log, CHARTS["requests"]["query"])[0]["requests"] == total
    assert run(full_log, CHARTS["denied"]["query"])[0]["refused"] == denied
    assert run(full_log, CHARTS["error_pct"]["query"])[0]["error_pct"] == (
        f"{100 * errors / total:.2f}"
    )


def test_refusals_tokens_and_upstream_failures(full_log: sqlite3.Connection) -> None:
    refusals = run(full_log, CHARTS["refusals"]["query"], last="7 days")
    assert {
        "401 the token is not valid for this proxy",
        "404 no proxy is configured for this path",
    } <= {r["reason"] for r in refusals}
    tokens = {
        (r["token"], r["outcome"])
        for r in run(full_log, CHARTS["tokens"]["query"], last="7 days", proxy="crm-prod")
    }
    assert ("crm-prod / sales-app", "forwarded") in tokens
    assert ("crm-prod / (no valid token)", "denied") in tokens  # a wrong token names none
    assert {t.split(" / ")[0] for t, _ in tokens} == {"crm-prod"}
    upstream = run(full_log, CHARTS["upstream"]["query"], last="24 hours")
    assert {r["upstream_proxy"] for r in upstream} == {"corporate"}
    assert sum(r["failures"] for r in upstream) >= 10  # the generated outage
