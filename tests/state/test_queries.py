import json
import random
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from keyswap.config.model import Config
from keyswap.state import migrations, queries
from keyswap.state.backends import Backend, Session, open_backend
from keyswap.state.queries import Follower, LogFilter
from keyswap.state.writer import commit
from tests.support.activity import sqlite_log
from tests.support.synthetic_log import PROXIES, fill


@pytest.fixture
def db(backend: Backend) -> Iterator[Session]:
    """A session on a new state database, of each backend."""
    with backend.session() as session:
        yield session


def row(i: int, **fields: object) -> dict[str, object]:
    return {
        "id": f"{i:026d}",
        "started_at": "2099-01-01T00:00:00.000Z",
        "proxy_id": "a",
        "status": 200,
        "proxy_code": "proxy-access-granted",
        "duration_ms": float(i),
        "method": "GET",
        **fields,
    }


def add(db: Session, i: int, **fields: object) -> None:
    db.insert("requests", [row(i, **fields)])


def ids(rows: list[dict[str, Any]]) -> list[int]:
    return [int(r["id"]) for r in rows]


def test_stats_from_rows_with_known_durations(db: Session) -> None:
    for i in range(1, 101):
        add(db, i, bytes_in=10, bytes_out=100)
    add(db, 101, status=401, proxy_code="proxy-access-denied", duration_ms=1000.0)
    add(db, 102, status=502, proxy_code="proxy-error", duration_ms=2000.0)
    add(db, 103, proxy_id="b", duration_ms=3.0)
    add(db, 104, proxy_id=None, status=404, proxy_code="proxy-access-denied")
    by_proxy = {s["proxy"]: s for s in queries.stats(db)}
    assert list(by_proxy) == [None, "a", "b"]
    a = by_proxy["a"]
    assert a["requests"] == 102 and a["denied"] == 1
    assert a["success_rate"] == round(100 / 102, 4) and a["error_rate"] == round(1 / 102, 4)
    # latency covers forwarded requests only: 1..100 ms, nearest rank
    assert (a["p50_ms"], a["p95_ms"], a["p99_ms"]) == (50, 95, 99)
    assert (a["bytes_in"], a["bytes_out"]) == (1000, 10000)
    assert by_proxy["b"]["p99_ms"] == 3.0
    assert by_proxy[None]["p50_ms"] is None and by_proxy[None]["denied"] == 1


@pytest.mark.parametrize(
    ("durations", "expected"),
    [
        ([0.0004, 0.2344, 0.9996], 0.234),  # microseconds below 1 ms
        ([5.678, 5.674], 5.67),
        ([27.851, 27.849, 27.95], 27.9),  # nearest rank over the 3-digit values
        ([329.4, 328.6, 1.0], 329.0),
        ([12_345.0, 12_355.0], 12_300.0),
        ([9_999.6, 10_000.0], 10_000.0),  # a decade's last value rounds up, in order
        ([3_725_000.0], 3_725_000.0),  # over 100 s: to the second
    ],
)
def test_percentiles_are_exact_ranks_to_3_significant_digits(
    db: Session, durations: list[float], expected: float
) -> None:
    for i, ms in enumerate(durations):
        add(db, i, duration_ms=ms)
    assert queries.stats(db)[0]["p50_ms"] == expected


def reference_percentile(durations: list[float], p: int) -> float:
    """Nearest rank over latencies rounded to 3 significant digits, in Python (for
    values that sit on no rounding tie)."""
    rounded = sorted(float(f"{d:.3g}") for d in durations)
    return rounded[max(0, -(-len(rounded) * p // 100) - 1)]


def test_stats_are_the_same_on_both_backends(tmp_path: Path, pg_url: str) -> None:
    """The same rows give the same figures from SQLite and PostgreSQL, to the last digit."""
    rng = random.Random(17)
    edges = [0.0004, 0.0005, 0.9995, 0.9996, 5.675, 9.9995, 99.995, 999.5, 9999.5, 99999.5]
    generated = []
    for i in range(3000):
        code = rng.choice(["proxy-access-granted"] * 8 + ["proxy-access-denied", "proxy-error"])
        ms = edges[i] if i < len(edges) else round(rng.lognormvariate(3, 1.5), 3)
        generated.append(
            row(
                i,
                proxy_id=rng.choice(["a", "b", "c-d", "Zed", "é", None]),
                proxy_code=code,
                status=rng.choice([200, 201, 404, 429, 500, 502]),
                duration_ms=ms,
                bytes_in=rng.randrange(5000),
                bytes_out=rng.randrange(50_000),
                started_at=f"2099-01-{1 + i % 28:02d}T00:00:00.000Z",
            )
        )
    figures = []
    for location in (str(tmp_path / "k.db"), pg_url):
        with open_backend(location) as backend:
            migrations.upgrade(backend)
            with backend.session() as session:
                session.insert("requests", generated)
                figures.append(
                    (
                        queries.stats(session),
                        queries.stats(session, since="2099-01-15"),
                        queries.logs(session, LogFilter.of(status="5xx"), limit=100),
                        queries.proxy_ids(session),
                    )
                )
    assert figures[0] == figures[1]
    stats = {s["proxy"]: s for s in figures[0][0]}
    assert list(stats) == [None, "Zed", "a", "b", "c-d", "é"]  # by bytes, as SQLite sorts
    forwarded = [
        r["duration_ms"]
        for r in generated
        if r["proxy_id"] == "a" and r["proxy_code"] == "proxy-access-granted"
    ]
    assert stats["a"]["p95_ms"] == reference_percentile(forwarded, 95)


def test_stats_since_counts_only_the_window(db: Session) -> None:
    add(db, 1, started_at="2000-01-01T00:00:00.000Z", duration_ms=900.0)
    add(db, 2, duration_ms=10.0)
    add(db, 3, proxy_id="old", started_at="2000-01-01T00:00:00.000Z")
    [a] = queries.stats(db, since="1d")
    assert (a["proxy"], a["requests"], a["p99_ms"]) == ("a", 1, 10.0)


def test_log_filters(db: Session) -> None:
    add(db, 1, status=200)
    add(db, 2, status=404, proxy_code="proxy-access-denied")
    add(db, 3, status=503, proxy_id="b")
    add(db, 4, status=429, proxy_code="proxy-access-denied", started_at="2000-01-01T00:00:00.000Z")

    def logs(limit: int = 50, **filters: str) -> list[int]:
        return ids(queries.logs(db, LogFilter.of(**filters), limit))

    # newest last: by start time, then id
    assert logs() == [4, 1, 2, 3]
    assert logs(status="4xx") == [4, 2]
    assert logs(status="503") == [3]
    assert logs(proxy="b") == [3]
    assert logs(code="proxy-access-denied") == [4, 2]
    assert logs(since="1d") == [1, 2, 3]
    assert logs(limit=2) == [2, 3]
    assert logs(proxy="a", status="4xx", since="1d") == [2]


def test_json_columns_are_documents(db: Session) -> None:
    add(db, 1, request_headers=json.dumps({"accept": "*/*"}), response_headers="not json {")
    [logged] = queries.logs(db)
    assert logged["request_headers"] == {"accept": "*/*"}
    assert logged["response_headers"] == "not json {"  # shown as it is, never lost
    db.insert("audit", [{"at": "2099", "actor": "x", "action": "edit", "detail": '{"a": [1]}'}])
    assert queries.audit(db)[0]["detail"] == {"a": [1]}


@pytest.mark.parametrize("since", ["15m", "2h", "1d", "2026-11-21T10:00:00Z", "2026-11-21"])
def test_since_forms(since: str) -> None:
    assert queries.since_iso(since).endswith("Z")


@pytest.mark.parametrize(("bad", "option"), [("yesterday", "since"), ("2x", "status")])
def test_bad_filters_say_what_to_write(bad: str, option: str) -> None:
    with pytest.raises(ValueError, match="use"):
        LogFilter.of(**{option: bad})


# --- following the log ---------------------------------------------------------------


def written(db: Session, *rows: dict[str, object]) -> None:
    """Rows committed the way the gateway's writer commits them: one batch."""
    commit(db, {"requests": list(rows)})


def followed(follower: Follower) -> list[int]:
    return [int(r["id"]) for batch in follower.poll() for r in batch]


def test_follow_prints_nothing_again_while_nothing_is_written(db: Session) -> None:
    for i in range(1, 4):
        add(db, i)
    follower = Follower(db)
    assert ids(follower.start(limit=2)) == [2, 3]
    assert followed(follower) == []
    assert followed(follower) == []
    written(db, row(4))
    assert followed(follower) == [4]
    assert followed(follower) == []


def test_follow_gets_rows_committed_out_of_start_order_once(db: Session) -> None:
    written(db, row(10, started_at="2099-01-01T00:00:10.000Z"))
    follower = Follower(db)
    follower.start(limit=50)
    # a long request that started before the newest row ends (and is written) after it
    written(db, row(11, started_at="2099-01-01T00:00:11.000Z"))
    written(db, row(5, started_at="2099-01-01T00:00:05.000Z"))
    assert followed(follower) == [11, 5]
    assert followed(follower) == []


def test_follow_applies_the_filter_and_pages_through_bursts(db: Session) -> None:
    follower = Follower(db, LogFilter.of(proxy="a", status="5xx"))
    assert follower.start(limit=50) == []
    burst = [row(i, status=500 + i % 2, proxy_id="a" if i % 3 else "b") for i in range(2500)]
    written(db, *burst)
    batches = list(follower.poll())
    assert len(batches) >= 2  # more than one batch of Follower.BATCH
    got = [int(r["id"]) for batch in batches for r in batch]
    assert got == [i for i in range(2500) if i % 3]
    assert followed(follower) == []


def test_follow_survives_pruning(db: Session) -> None:
    written(db, *(row(i) for i in range(1, 6)))
    follower = Follower(db)
    follower.start(limit=50)
    db.execute("delete from requests where id <= ?", [f"{3:026d}"])
    written(db, row(6))
    if db.dialect == "sqlite":
        # what VACUUM may do to a table without an INTEGER PRIMARY KEY: 4, 5, 6 become
        # 1, 2, 3 (PostgreSQL's seq never moves)
        db.execute("update requests set rowid = rowid - 3")
        db.execute("VACUUM")
    written(db, row(7))
    assert followed(follower) == [6, 7]
    db.execute("delete from requests")  # retention pruned everything
    written(db, row(8))
    assert followed(follower) == [8]


def test_follow_loses_and_repeats_no_row_while_writers_commit(state_db: str) -> None:
    """Two gateway processes' writers commit batches of rows in shuffled start order,
    each commit held back a little after its rows got their numbers, while the log is
    followed: each row is seen exactly once."""
    reader = open_backend(state_db)
    migrations.upgrade(reader)
    total = 4000

    def writer(offset: int) -> None:
        rng = random.Random(offset)
        with open_backend(state_db) as backend, backend.session() as db:
            for start in range(offset, offset + total // 2, 100):
                batch = [
                    row(i, started_at=f"2099-01-01T00:{rng.randrange(60):02d}:00.000Z")
                    for i in range(start, start + 100)
                ]
                rng.shuffle(batch)
                with db.transaction():
                    written(db, *batch)
                    time.sleep(rng.random() / 100)  # committed a while after the insert
                time.sleep(rng.random() / 200)

    with reader.session() as session:
        follower = Follower(session)
        follower.start(limit=10)
        threads = [threading.Thread(target=writer, args=(n,)) for n in (0, total // 2)]
        for t in threads:
            t.start()
        seen: list[int] = []
        while any(t.is_alive() for t in threads):
            seen += followed(follower)
            time.sleep(0.002)
        for t in threads:
            t.join()
        seen += followed(follower)
    reader.close()
    assert len(seen) == total and sorted(seen) == list(range(total))


# --- query plans and memory on a large log ---------------------------------------------

LARGE = 200_000


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    """A session on an SQLite log of LARGE rows (query plans are SQLite's)."""
    path = tmp_path_factory.mktemp("large") / "k.db"
    database = sqlite_log(path)
    fill(database, LARGE, wide=False)
    database.close()
    with open_backend(path) as backend, backend.session() as session:
        yield session


def statements(db: Session, action: Callable[[], object]) -> list[str]:
    """The SQL statements `action` runs (with their values), but transactions' own."""
    ran: list[str] = []
    conn = db.conn  # type: ignore[attr-defined]
    conn.set_trace_callback(ran.append)
    try:
        action()
    finally:
        conn.set_trace_callback(None)
    return [
        s
        for s in ran
        if s.split()[0].upper() not in ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE")
    ]


def plans(db: Session, action: Callable[[], object]) -> list[str]:
    """The query plan of every statement `action` runs, one text each."""
    out = []
    for sql in statements(db, action):
        steps = db.query("explain query plan " + sql)
        out.append("\n".join(step["detail"] for step in steps))
    return out


def scans_the_table(plan: str) -> bool:
    return any("SCAN requests" in line and "INDEX" not in line for line in plan.splitlines())


def reads_no_table(plan: str) -> bool:
    """An index read in its order: neither a scan of the table's rows nor a sort of them
    (a sort of the rows of one millisecond, "right part of order by", is fine)."""
    return not scans_the_table(plan) and "TEMP B-TREE FOR ORDER BY" not in plan


@pytest.mark.parametrize(
    ("filters", "index"),
    [
        ({}, "idx_requests_started_at_outcome"),
        ({"since": "2h"}, "idx_requests_started_at_outcome (started_at>?)"),
        ({"proxy": "maps"}, "idx_requests_proxy_id_started_at_outcome (proxy_id=?)"),
        (
            {"proxy": "maps", "since": "1d"},
            "proxy_id_started_at_outcome (proxy_id=? AND started_at>?)",
        ),
        ({"status": "5xx"}, "idx_requests_status_class_started_at (<expr>=?)"),
        ({"status": "5xx", "since": "1d"}, "status_class_started_at (<expr>=? AND started_at>?)"),
        ({"status": "429"}, "idx_requests_status_started_at (status=?)"),
        ({"code": "proxy-error"}, "idx_requests_started_at_outcome"),
        # with a proxy, its index: it holds the status and code to filter on
        (
            {"proxy": "maps", "status": "5xx", "code": "proxy-error"},
            "idx_requests_proxy_id_started_at_outcome (proxy_id=?)",
        ),
    ],
)
def test_logs_reads_an_index_newest_first(
    large: Session, filters: dict[str, str], index: str
) -> None:
    [plan] = plans(large, lambda: queries.logs(large, LogFilter.of(**filters)))
    assert index in plan and reads_no_table(plan), plan


def test_stats_reads_the_per_proxy_index_only(large: Session) -> None:
    for since in (None, "1d"):
        found = plans(large, lambda: queries.stats(large, since))  # noqa: B023
        assert len(found) > len(PROXIES)
        for plan in found:
            assert not scans_the_table(plan), plan
            for line in plan.splitlines():
                if "requests" in line:
                    assert "COVERING INDEX" in line or "INTEGER PRIMARY KEY" in line, plan


def test_follow_reads_by_rowid(large: Session) -> None:
    follower = Follower(large, LogFilter.of(proxy="maps", status="5xx"))
    follower.start(limit=1)
    found = plans(large, lambda: list(follower.poll()))
    assert all(reads_no_table(p) for p in found)
    assert any("INTEGER PRIMARY KEY (rowid>? AND rowid<?)" in p for p in found), found


def test_a_large_log_is_not_loaded_into_python(large: Session) -> None:
    tracemalloc.start()
    try:
        result = queries.stats(large)
        queries.stats(large, since="7d")
        queries.logs(large, LogFilter.of(status="2xx"), limit=50)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sum(r["requests"] for r in result) == LARGE
    assert [r["proxy"] for r in result] == [None, *sorted(p for p, _, _ in PROXIES)]
    # the old stats kept every row as a dict: ~110 MB for 200,000 rows
    assert peak < 512 * 1024, f"{peak} bytes at the peak"


# --- curl ------------------------------------------------------------------------------


def test_curl_command_masks_and_names_the_upstream_proxy() -> None:
    config = Config.model_validate(
        {
            "upstream_proxies": {
                "corp": {
                    "host": "proxy.corp",
                    "port": 3128,
                    "auth": {"type": "basic", "user": "svc", "password": "pw-secret"},
                }
            }
        }
    )
    logged = {
        "id": "r1",
        "method": "POST",
        "proxy_code": "proxy-access-granted",
        "target_url": "https://api.example.com/v1/x?key=********",
        "request_headers": {
            "authorization": "********",
            "content-type": "application/json",
            "host": "api.example.com",
        },
        "upstream_proxy": "corp",
    }
    command = queries.curl_command(logged, config)
    assert command == (
        "curl -X POST 'https://api.example.com/v1/x?key=********' -H 'authorization: ********' "
        "-H 'content-type: application/json' --proxy http://proxy.corp:3128 --proxy-user 'svc:********'"
    )
    assert "pw-secret" not in command
    with pytest.raises(ValueError, match="was not forwarded"):
        queries.curl_command(
            {**logged, "target_url": None, "proxy_code": "proxy-access-denied"}, config
        )
